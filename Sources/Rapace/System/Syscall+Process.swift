#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CRapaceShim

// Child processes, for the plugin host (RapacePlugin): package-visible so that module goes
// through this choke point too.
extension Sys {
    /// `pidfd_open(pid, 0)` (Linux 5.3+): a close-on-exec descriptor that polls readable
    /// once `pid` has exited. Throws with `ENOSYS` where the kernel lacks it and `EPERM`
    /// where a seccomp filter forbids it; the caller then has to poll `waitpid`.
    package static func pidfdOpen(_ pid: pid_t) throws(SystemError) -> Int32 {
        try call("pidfd_open(\(pid))") { rapace_pidfd_open(pid) }
    }

    /// Sends `signal` to the process `pidfd` refers to (`pidfd_send_signal(2)`, Linux 5.1+).
    /// Unlike `kill(2)` by pid it cannot reach another process, even one that reused the
    /// pid. Returns false when that process is gone (`ESRCH`: reaped); throws for anything
    /// else: `ENOSYS` where the kernel lacks the call, `ENOSYS` or `EPERM` where a seccomp
    /// filter forbids it.
    @discardableResult
    package static func pidfdSendSignal(_ pidfd: Int32, _ signal: Int32) throws(SystemError) -> Bool {
        try sendSignal("pidfd_send_signal(\(pidfd), \(signal))") { rapace_pidfd_send_signal(pidfd, signal) }
    }

    /// A signalling call: true when sent, false when its target is gone (`ESRCH`).
    private static func sendSignal(_ operation: @autoclosure () -> String, _ body: () -> Int32) throws(SystemError) -> Bool {
        do throws(SystemError) {
            _ = try call(operation(), body)
            return true
        } catch where error.errno.rawValue == ESRCH {
            return false
        }
    }

    /// Reaps `pid` if it has exited (`waitpid(pid, &status, WNOHANG)`): its wait status, or
    /// nil while it runs. Throws (`ECHILD`) when `pid` is not an unreaped child.
    package static func reapIfExited(_ pid: pid_t) throws(SystemError) -> Int32? {
        var status: Int32 = 0
        let reaped = try call("waitpid(\(pid))") { waitpid(pid, &status, WNOHANG) }
        return reaped == pid ? status : nil
    }
}

// Spawning and signalling, for the plugin host; the plugin's own process calls.
extension Sys {
    /// Blocks the calling thread for `duration` (resuming after a signal until it has passed).
    package static func sleep(_ duration: Duration) {
        let nanoseconds = duration.nanoseconds
        var request = timespec(tv_sec: Int(clamping: nanoseconds / 1_000_000_000), tv_nsec: Int(nanoseconds % 1_000_000_000))
        var remaining = timespec()
        // `retrying` resumes after EINTR with the time that was left; nanosleep fails otherwise
        // only for a bad argument, which these values are not.
        _ = try? retrying("nanosleep") { () -> Int32 in
            defer { request = remaining }
            return nanosleep(&request, &remaining)
        }
    }

    /// This process's id (`getpid`, which cannot fail).
    package static var processID: pid_t { getpid() }

    /// The parent process's id (`getppid`, which cannot fail).
    package static var parentProcessID: pid_t { getppid() }

    /// Sends `signal` to `pid` (`kill(2)`). Returns false when no process has that pid
    /// (`ESRCH`); throws for anything else (`EPERM`: not ours to signal). The pid names
    /// whichever process has it now: signal a child through its pidfd where there is one.
    @discardableResult
    package static func signal(_ pid: pid_t, _ signal: Int32) throws(SystemError) -> Bool {
        try sendSignal("kill(\(pid), \(signal))") { kill(pid, signal) }
    }

    /// Whether a process has the id `pid` (`kill(pid, 0)`, which sends nothing): false only
    /// when there is none (`ESRCH`). A process that is not ours to signal (`EPERM`) exists,
    /// and so does one that has exited but is not reaped yet (a zombie). The pid names
    /// whichever process has it now, in this process's pid namespace. `pid` must be
    /// positive (`kill` reads 0 and negative pids as process groups).
    package static func processExists(_ pid: pid_t) -> Bool {
        precondition(pid > 0, "processExists(\(pid)): not a process id")
        do throws(SystemError) { return try signal(pid, 0) } catch { return true }
    }

    /// This process's effective user id (`geteuid`, which cannot fail): the owner of the
    /// files it creates.
    package static var effectiveUserID: uid_t { geteuid() }

    /// Asks the kernel to send `signal` to this process when its parent *thread* dies
    /// (`prctl(PR_SET_PDEATHSIG)`; Linux ties it to the thread that spawned the process).
    package static func setParentDeathSignal(_ signal: Int32) throws(SystemError) {
        _ = try call("prctl(PR_SET_PDEATHSIG, \(signal))") { rapace_set_parent_death_signal(signal) }
    }

    /// A pipe whose ends are both close-on-exec from the start (`pipe2(O_CLOEXEC)`): a child
    /// spawned concurrently by another thread cannot inherit them.
    package static func pipe() throws(SystemError) -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        _ = try call("pipe2") { rapace_pipe_cloexec(&fds) }
        return (fds[0], fds[1])
    }

    /// Sets `O_NONBLOCK` on `fd` (`fcntl` F_GETFL, then F_SETFL).
    package static func setNonBlocking(_ fd: Int32) throws(SystemError) {
        let flags = try call("fcntl(\(fd), F_GETFL)") { fcntl(fd, F_GETFL) }
        if flags & O_NONBLOCK != 0 { return }
        _ = try call("fcntl(\(fd), F_SETFL)") { fcntl(fd, F_SETFL, flags | O_NONBLOCK) }
    }

    /// `read(2)` from a non-blocking descriptor that is not a socket (a pipe): the number of
    /// bytes read (0 at end of file), or nil when nothing is available now.
    package static func readAvailable(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int? {
        if case .done(let count) = try read(fd, buffer) { return count }
        return nil
    }

    /// `poll(2)` on `fds` for up to `timeoutMilliseconds` (-1: no limit): how many are ready
    /// (0 when the time ran out). EINTR is retried with the whole timeout.
    package static func poll(_ fds: inout [pollfd], timeoutMilliseconds: Int32) throws(SystemError) -> Int {
        let count = nfds_t(fds.count)
        return Int(try call("poll") { Glibc.poll(&fds, count, timeoutMilliseconds) })
    }

    /// Starts `executable` (`posix_spawn(2)`, no `PATH` search) with `arguments` (without
    /// the program name, which is added as `argv[0]`) and `environment` (`NAME=value`);
    /// each `(from, to)` of `redirections` makes the child's descriptor `to` a copy of this
    /// process's `from` (a `dup2` file action). Returns the child's pid.
    ///
    /// The child starts with no signal blocked and every signal at its default disposition
    /// (`POSIX_SPAWN_SETSIGMASK` with an empty set, `POSIX_SPAWN_SETSIGDEF` with all but
    /// `SIGKILL` and `SIGSTOP`), whichever thread spawns it: otherwise it would inherit the
    /// spawning thread's mask (a thread of Swift's cooperative pool blocks `SIGTERM`, among
    /// others) and the signals this process ignores, and a `SIGTERM` would not end it.
    package static func spawn(
        _ executable: String, arguments: [String], environment: [String], redirections: [(from: Int32, to: Int32)]
    ) throws(SystemError) -> pid_t {
        var actions = posix_spawn_file_actions_t()
        try callReturningErrorNumber("posix_spawn_file_actions_init") { posix_spawn_file_actions_init(&actions) }
        defer { posix_spawn_file_actions_destroy(&actions) }
        var attributes = posix_spawnattr_t()
        try callReturningErrorNumber("posix_spawnattr_init") { posix_spawnattr_init(&attributes) }
        defer { posix_spawnattr_destroy(&attributes) }
        // The sigset calls fail only for an invalid signal number.
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        try callReturningErrorNumber("posix_spawnattr_setsigmask") { posix_spawnattr_setsigmask(&attributes, &noSignals) }
        var catchable = sigset_t()
        sigfillset(&catchable)
        sigdelset(&catchable, SIGKILL)
        sigdelset(&catchable, SIGSTOP)
        try callReturningErrorNumber("posix_spawnattr_setsigdefault") { posix_spawnattr_setsigdefault(&attributes, &catchable) }
        try callReturningErrorNumber("posix_spawnattr_setflags") {
            posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        }
        for redirection in redirections {
            try callReturningErrorNumber("posix_spawn_file_actions_adddup2(\(redirection.from), \(redirection.to))") {
                posix_spawn_file_actions_adddup2(&actions, redirection.from, redirection.to)
            }
        }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        try callReturningErrorNumber("posix_spawn(\(executable))") { posix_spawn(&pid, executable, &actions, &attributes, argv, envp) }
        return pid
    }

    /// ``spawn(_:arguments:environment:redirections:)`` with each of the child's descriptors
    /// `outputs` (1 for its stdout, 2 for its stderr) on a new pipe: the child's pid and the
    /// pipes' read ends, in the order of `outputs`, for the caller to close.
    ///
    /// The pipes are close-on-exec from the start (``pipe()``): a child that another thread
    /// spawns meanwhile does not inherit them, which would hold off their end of file (the
    /// `dup2` in this child clears the flag on its copies). The write ends are closed here
    /// once the child has its copies; when a pipe or the spawn fails, every descriptor this
    /// call made is closed before it throws.
    ///
    /// `duplicating` adds redirections made in the child after the pipes are in place:
    /// `[(1, 2)]` with `outputs` `[1]` puts stdout and stderr on the one pipe.
    package static func spawn(
        _ executable: String, arguments: [String], environment: [String], pipingOutputs outputs: [Int32],
        duplicating duplicates: [(from: Int32, to: Int32)] = []
    ) throws(SystemError) -> (pid: pid_t, outputs: [Int32]) {
        var pipes: [(read: Int32, write: Int32)] = []
        var spawned = false
        defer {
            for pipe in pipes {
                close(pipe.write)
                if !spawned { close(pipe.read) }
            }
        }
        for _ in outputs { pipes.append(try pipe()) }
        let redirections = zip(pipes, outputs).map { (from: $0.write, to: $1) } + duplicates
        let pid = try spawn(executable, arguments: arguments, environment: environment, redirections: redirections)
        spawned = true
        return (pid, pipes.map(\.read))
    }

    /// This process's environment (`environ`) as `NAME=value` entries, with `overrides`
    /// set: an entry whose name is overridden is left out and the override added (in name
    /// order). For a child's environment; like any read of `environ`, not safe against a
    /// `setenv` on another thread meanwhile.
    package static func environment(overriding overrides: [String: String] = [:]) -> [String] {
        var entries: [String] = []
        var entry = environ
        while let pointer = entry.pointee {
            let text = String(cString: pointer)
            let name = text.firstIndex(of: "=").map { text[..<$0] } ?? text[...]
            if overrides[String(name)] == nil { entries.append(text) }
            entry += 1
        }
        for (name, value) in overrides.sorted(by: { $0.key < $1.key }) { entries.append("\(name)=\(value)") }
        return entries
    }

    /// A call that returns an error number instead of setting `errno` (0: success), as
    /// `posix_spawn`, its file actions and its attributes do: throws naming `operation`.
    private static func callReturningErrorNumber(_ operation: @autoclosure () -> String, _ body: () -> Int32) throws(SystemError) {
        let rc = body()
        guard rc == 0 else { throw SystemError(operation(), errno: Errno(rawValue: rc)) }
    }
}
