import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// A server process started with `posix_spawn`, its standard output on a pipe so the bench
/// can read the `listening on ADDRESS` line; standard error is inherited.
///
/// ``terminate(exitOnItsOwnMs:timeoutMs:)`` sends SIGTERM, waits (then SIGKILL after the
/// timeout) and reaps it. A child that was never terminated is killed and reaped in `deinit`.
final class ChildProcess: @unchecked Sendable {
    // @unchecked Sendable: handed once from the spawner thread to the task that owns it;
    // after that only that task touches the mutable state (buffered output, exit status).
    let pid: pid_t
    /// A short name for messages (`echo-server`, `raw-echo-server`, `shm-plugin`).
    let name: String
    private var stdoutFD: Int32
    private var buffered: [UInt8] = []
    private var exitStatus: Int32?

    private init(pid: pid_t, name: String, stdoutFD: Int32) {
        self.pid = pid
        self.name = name
        self.stdoutFD = stdoutFD
    }

    /// Starts `executable` with `arguments` (argv[1...]) and this process's environment,
    /// from `spawner`'s thread.
    ///
    /// A child that asks for `PR_SET_PDEATHSIG` gets the signal when the *thread* that
    /// spawned it exits, not the process. Pool threads come and go, and on Linux the main
    /// thread leaves too (`dispatch_main` exits it), so children are spawned from a reactor
    /// thread that lives until the bench shuts it down, after every child is reaped.
    ///
    /// With `cpu`, the spawner thread pins itself there first, so the child (which inherits
    /// the spawning thread's CPU mask) starts pinned to it.
    static func spawn(on spawner: Reactor, cpu: Int? = nil, _ executable: String, _ arguments: [String], name: String) async throws -> ChildProcess {
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<ChildProcess, BenchError>, Never>) in
            spawner.execute {
                do {
                    if let cpu { try CPUAffinity.pin(to: cpu) }
                    continuation.resume(returning: .success(try spawnHere(executable, arguments, name: name)))
                } catch let error as BenchError {
                    continuation.resume(returning: .failure(error))
                } catch {
                    continuation.resume(returning: .failure(BenchError("spawning \(name): \(error)")))
                }
            }
        }
        return try result.get()
    }

    private static func spawnHere(_ executable: String, _ arguments: [String], name: String) throws -> ChildProcess {
        // Its stdout on a close-on-exec pipe (`Sys.spawn(…pipingOutputs:)`): it leaks into no
        // later child (the child's stdout is a `dup2` copy, which stays open).
        let spawned: (pid: pid_t, outputs: [Int32])
        do {
            spawned = try Sys.spawn(executable, arguments: arguments, environment: Sys.environment(), pipingOutputs: [1])
        } catch {
            throw BenchError("spawning \(name): \(error)")
        }
        EmergencyCleanup.registerChild(spawned.pid)
        return ChildProcess(pid: spawned.pid, name: name, stdoutFD: spawned.outputs[0])
    }

    /// The next line of the child's standard output (without the newline).
    ///
    /// Fails when the child closes its output or exits first, or after `timeoutMs`.
    func readLine(timeoutMs: Int32 = 15_000) throws -> String {
        let deadline = monotonicNanoseconds() + UInt64(timeoutMs) * 1_000_000
        while true {
            if let newline = buffered.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffered[..<newline], as: UTF8.self)
                buffered.removeSubrange(...newline)
                return line
            }
            let now = monotonicNanoseconds()
            guard now < deadline else {
                throw BenchError("\(name) (pid \(pid)) printed no complete line within \(timeoutMs) ms")
            }
            var poller = pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(clamping: (deadline - now) / 1_000_000 + 1))
            if ready < 0 {
                if errno == EINTR { continue }
                throw BenchError.system("poll on \(name)'s stdout")
            }
            if ready == 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 512)
            let count = chunk.withUnsafeMutableBytes { read(stdoutFD, $0.baseAddress, $0.count) }
            if count < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw BenchError.system("read from \(name)'s stdout")
            }
            if count == 0 {
                let status = reapIfExited(waitMs: 2_000)
                let how = status.map { " (\(ChildProcess.describe(status: $0)))" } ?? ""
                let partial = buffered.isEmpty ? "" : "; it printed \"\(String(decoding: buffered, as: UTF8.self))\""
                throw BenchError("\(name) (pid \(pid)) closed its output before printing a line\(how)\(partial)")
            }
            buffered.append(contentsOf: chunk[0..<count])
        }
    }

    /// Reads lines until one starts with `listening on `; returns the rest of that line.
    func readListeningAddress(timeoutMs: Int32 = 15_000) throws -> String {
        let prefix = "listening on "
        while true {
            let line = try readLine(timeoutMs: timeoutMs)
            if line.hasPrefix(prefix) { return String(line.dropFirst(prefix.count)) }
        }
    }

    /// Waits up to `exitOnItsOwnMs` for the child to exit by itself, then SIGTERM, waits up
    /// to `timeoutMs`, then SIGKILL; reaps the child. Returns its status as text ("exit 0",
    /// "signal 9 (after SIGKILL)").
    @discardableResult
    func terminate(exitOnItsOwnMs: Int = 0, timeoutMs: Int = 10_000) -> String {
        if let exitStatus { return ChildProcess.describe(status: exitStatus) }
        if exitOnItsOwnMs > 0, let status = reapIfExited(waitMs: exitOnItsOwnMs) {
            return ChildProcess.describe(status: status)
        }
        kill(pid, SIGTERM)
        if let status = reapIfExited(waitMs: timeoutMs) { return ChildProcess.describe(status: status) }
        printError("rapace-bench: \(name) (pid \(pid)) ignored SIGTERM for \(timeoutMs) ms; sending SIGKILL")
        kill(pid, SIGKILL)
        let status = reapBlocking()
        return ChildProcess.describe(status: status) + " (after SIGKILL)"
    }

    /// Polls `waitpid(WNOHANG)` for up to `waitMs`; the status once reaped.
    private func reapIfExited(waitMs: Int) -> Int32? {
        if let exitStatus { return exitStatus }
        let deadline = monotonicNanoseconds() + UInt64(waitMs) * 1_000_000
        while true {
            var status: Int32 = 0
            let result = waitpid(pid, &status, WNOHANG)
            if result == pid {
                finishReaping(status)
                return status
            }
            if result < 0 && errno != EINTR {
                finishReaping(0)
                return exitStatus
            }
            if monotonicNanoseconds() >= deadline { return nil }
            usleep(5_000)
        }
    }

    private func reapBlocking() -> Int32 {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 {
            if errno != EINTR { break }
        }
        finishReaping(status)
        return status
    }

    private func finishReaping(_ status: Int32) {
        exitStatus = status
        EmergencyCleanup.unregisterChild(pid)
        if stdoutFD >= 0 {
            close(stdoutFD)
            stdoutFD = -1
        }
    }

    /// `exit N` or `signal N` for a `waitpid` status (the W* macros are not imported).
    static func describe(status: Int32) -> String {
        let signal = status & 0x7F
        if signal == 0 { return "exit \((status >> 8) & 0xFF)" }
        return "signal \(signal)"
    }

    deinit {
        if exitStatus == nil {
            kill(pid, SIGKILL)
            _ = reapBlocking()
        }
    }
}
