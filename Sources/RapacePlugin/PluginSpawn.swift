#if canImport(Glibc)
import Glibc
#endif
import Logging
import Rapace
import Synchronization

/// How a plugin process ended.
public enum PluginExitStatus: Sendable, Hashable, CustomStringConvertible {
    /// It called `exit` with this code.
    case exited(code: Int32)
    /// A signal (for example 9 for `kill -9`) ended it.
    case signalled(Int32)

    public var description: String {
        switch self {
        case .exited(let code): return "exited with code \(code)"
        case .signalled(let signal): return "killed by signal \(signal)"
        }
    }

    init(waitStatus status: Int32) {
        let low = status & 0x7F
        if low == 0 { self = .exited(code: (status >> 8) & 0xFF) } else { self = .signalled(low) }
    }
}

/// A boxed thread body for `pthread_create`.
private final class ThreadBody {
    let body: () -> Void
    init(_ body: @escaping () -> Void) { self.body = body }
}

/// Starts a detached thread running `body`; throws the `SystemError` of `pthread_create`
/// when the system refuses (`EAGAIN`: out of memory for its stack, or a limit on threads
/// reached).
func startDetachedThread(_ body: @escaping @Sendable () -> Void) throws(SystemError) {
    if let errno = PluginSpawner.threadStartFailureForTesting.withLock({ $0 }) { throw SystemError("pthread_create", errno: errno) }
    let context = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(&thread, nil, { raw in
        guard let raw else { return nil }
        Unmanaged<ThreadBody>.fromOpaque(raw).takeRetainedValue().body()
        return nil
    }, context)
    guard rc == 0 else {
        Unmanaged<ThreadBody>.fromOpaque(context).release()
        throw SystemError("pthread_create", errno: Errno(rawValue: rc))
    }
    pthread_detach(thread)
}

/// A child process spawned from, and watched by, a thread of its own that lives exactly as
/// long as the child: the child's parent-death signal (Linux ties it to the spawning thread)
/// then fires when the host process dies, never earlier. The watcher relays the child's
/// stdout and stderr to `logger` line by line and reports the exit status.
///
/// The watcher sleeps in `poll(2)` on the two pipes and a pidfd of the child, so it wakes
/// for output or for the exit, never on a timer. Where `pidfd_open` fails (Linux before 5.3,
/// some seccomp filters) it checks `waitpid` every 20 ms instead.
enum PluginSpawner {
    /// Longest line relayed as one log entry; longer output is split.
    static let maxLineBytes = 64 * 1024

    // The test hooks below cost a load or an uncontended lock per spawn. They are internal
    // (only `@testable` code reaches them) and compiled in every configuration, so that the
    // tests that use them also build for `swift test -c release` (Docs/testing.md).

    /// For tests: spawn as if `pidfd_open` failed, so the exit is checked every 20 ms.
    /// Process-wide: a test that sets it owns the process.
    static let pidfdDisabledForTesting = Atomic<Bool>(false)

    /// For tests: runs on the watcher thread after each spawn, with the new child's pid,
    /// before `onSpawn` reports the child. A test holds the report back with it, so that the plugin's handshake ends
    /// before its pid is known. Process-wide: a test that sets it owns the process.
    static let beforeReportingSpawnForTesting = Mutex<(@Sendable (pid_t) -> Void)?>(nil)

    /// For tests: ``startDetachedThread(_:)`` fails with this errno instead of starting a
    /// thread. Process-wide: a test that sets it owns the process.
    static let threadStartFailureForTesting = Mutex<Errno?>(nil)

    /// Spawns `executable` with `arguments` on a new thread, its environment this process's
    /// with `environment` set on top. `onSpawn` gets the child (its pid, and the way to
    /// signal it) or why it could not start; `onExit` the exit status once the child is
    /// reaped. Both run on the watcher thread (`onSpawn` on the caller's when no thread can
    /// be started).
    static func spawn(
        executable: String, arguments: [String], environment: [String: String], logger: Logger,
        onSpawn: @escaping @Sendable (Result<PluginChild, PluginHostError>) -> Void,
        onExit: @escaping @Sendable (PluginExitStatus) -> Void
    ) {
        // The watcher thread's body: spawns, reports, relays the output, reaps.
        let watch: @Sendable () -> Void = {
            // Its stdout and stderr on two pipes, close-on-exec: plugins spawn on their own
            // threads, and another spawn must not inherit them.
            let spawned: (pid: pid_t, outputs: [Int32])
            do throws(SystemError) {
                spawned = try Sys.spawn(executable, arguments: arguments, environment: Sys.environment(overriding: environment), pipingOutputs: [1, 2])
            } catch {
                onSpawn(.failure(PluginHostError(.spawnFailed, "cannot start \(executable): \(error)", underlying: error)))
                return
            }
            let pid = spawned.pid
            // The child is not reaped before `relay.run` reaps it, so its pid cannot be reused
            // meanwhile and the pidfd names this child.
            var pidfd: Int32?
            do throws(SystemError) {
                if pidfdDisabledForTesting.load(ordering: .relaxed) {
                    throw SystemError("pidfd_open(\(pid))", errno: Errno(rawValue: ENOSYS))
                }
                pidfd = try Sys.pidfdOpen(pid)
            } catch {
                logger.debug("cannot watch the plugin's exit with a pidfd (\(error)); checking every 20 ms instead", metadata: ["pid": .stringConvertible(pid)])
            }
            let child = PluginChild(pid: pid, pidfd: pidfd)
            beforeReportingSpawnForTesting.withLock { $0 }?(pid)
            onSpawn(.success(child))
            var relay = OutputRelay(logger: logger, child: child, pidfd: pidfd, fds: spawned.outputs)
            let status = relay.run()
            onExit(status)
        }
        do throws(SystemError) { try startDetachedThread(watch) } catch {
            onSpawn(.failure(PluginHostError(.spawnFailed, "cannot start a thread to spawn \(executable): \(error)", underlying: error)))
        }
    }
}

/// Reads a child's stdout and stderr until it exits, logging complete lines, then reaps it.
private struct OutputRelay {
    /// How often the exit is checked without a pidfd.
    static let exitCheckMilliseconds: Int32 = 20

    /// Bytes taken from a pipe per `read`.
    static let chunkBytes = 16 * 1024

    let logger: Logger
    /// Reaped here; owns the pidfd (closed by its reap).
    let child: PluginChild
    var pid: pid_t { child.pid }
    var fds: [Int32]
    /// Per pipe, output not yet logged: the start of a line still to be completed.
    var buffers: [[UInt8]] = [[], []]
    /// Where `read` puts a pipe's bytes; allocated once, reused for every read.
    var chunk = [UInt8](repeating: 0, count: OutputRelay.chunkBytes)
    var open = [true, true]
    /// The child's pidfd (readable once it exited), polled; nil when the exit is checked on a
    /// timer. `child` owns it: it stays open, for signals, until `child.reapIfExited()` closes
    /// it, after which `run` returns without polling again.
    var exitFD: Int32?

    /// `pidfd` is `child`'s, if it has one.
    init(logger: Logger, child: PluginChild, pidfd: Int32?, fds: [Int32]) {
        self.logger = logger
        self.child = child
        self.fds = fds
        self.exitFD = pidfd
        for fd in fds {
            // Cannot fail for the pipe this thread has just made (only for a closed descriptor).
            do throws(SystemError) { try Sys.setNonBlocking(fd) } catch {
                logger.warning("cannot make the plugin's output pipe non-blocking: \(error)", metadata: ["pid": .stringConvertible(pid)])
            }
        }
    }

    /// Relays output until the child is reaped; returns its status. Bounded by the child's
    /// life: each turn either relays output or finds the child gone. With a pidfd the wait
    /// has no timeout (the pidfd wakes it on exit); without one it checks every 20 ms.
    mutating func run() -> PluginExitStatus {
        while true {
            var polls = (0..<2).map { pollfd(fd: open[$0] ? fds[$0] : -1, events: Int16(POLLIN), revents: 0) }
            polls.append(pollfd(fd: exitFD ?? -1, events: Int16(POLLIN), revents: 0))
            // EINVAL or ENOMEM (never expected): count it as a timeout and look again.
            let ready = (try? Sys.poll(&polls, timeoutMilliseconds: exitFD == nil ? Self.exitCheckMilliseconds : -1)) ?? 0
            if ready > 0 {
                for index in 0..<2 where polls[index].revents != 0 { drain(index) }
            }
            // Without a pidfd every turn may be the exit; with one only its readiness is.
            guard exitFD == nil || (ready > 0 && polls[2].revents != 0) else { continue }
            let status: Int32?
            do throws(SystemError) {
                status = try child.reapIfExited()
            } catch {
                // Not our unreaped child any more (ECHILD): nothing left to wait for.
                logger.warning("cannot reap the plugin: \(error)", metadata: ["pid": .stringConvertible(pid)])
                return finish(.exited(code: -1))
            }
            if let status { return finish(PluginExitStatus(waitStatus: status)) }
            if exitFD != nil {
                // Readable yet not reapable (never seen on Linux): stop polling the pidfd,
                // which would keep polling readable, and check on the timer from now on (it
                // stays open for signals until the reap).
                exitFD = nil
            }
        }
    }

    private mutating func drain(_ index: Int) {
        let fd = fds[index]
        for _ in 0..<64 {
            let n: Int?
            do throws(SystemError) {
                n = try chunk.withUnsafeMutableBytes { raw in
                    Result { () throws(SystemError) in try Sys.readAvailable(fd, into: raw) }
                }.get()
            } catch {
                // A pipe read fails only for a bug (EBADF, EFAULT): stop reading that pipe
                // rather than poll it again and again.
                logger.warning("cannot read the plugin's output: \(error)", metadata: ["pid": .stringConvertible(pid)])
                n = 0
            }
            guard let n else { return }  // nothing more for now
            if n > 0 {
                let scanned = buffers[index].count
                buffers[index].append(contentsOf: chunk[0..<n])
                emitLines(index, newFrom: scanned)
                continue
            }
            open[index] = false  // end of file: the child closed it (or exited)
            Sys.close(fd)
            fds[index] = -1
            return
        }
    }

    /// Logs the complete lines in pipe `index`'s buffer (its bytes before `newFrom`, already
    /// scanned, hold no newline), then drops them all at once: each byte is scanned once, and
    /// the buffer shifts once per chunk rather than once per line.
    private mutating func emitLines(_ index: Int, newFrom: Int) {
        var start = 0
        var cursor = newFrom
        while let newline = buffers[index][cursor...].firstIndex(of: UInt8(ascii: "\n")) {
            log(index, buffers[index][start..<newline])
            start = newline + 1
            cursor = start
        }
        if buffers[index].count - start >= PluginSpawner.maxLineBytes {
            log(index, buffers[index][start...])
            buffers[index].removeAll()
        } else if start > 0 {
            buffers[index].removeSubrange(..<start)
        }
    }

    private func log(_ index: Int, _ bytes: ArraySlice<UInt8>) {
        let line = String(decoding: bytes, as: UTF8.self)
        let metadata: Logger.Metadata = ["stream": .string(index == 0 ? "stdout" : "stderr"), "pid": .stringConvertible(pid)]
        if index == 0 { logger.info("\(line)", metadata: metadata) } else { logger.notice("\(line)", metadata: metadata) }
    }

    /// The child is gone (its reap closed the pidfd): takes whatever it wrote last, releases
    /// the pipes.
    private mutating func finish(_ status: PluginExitStatus) -> PluginExitStatus {
        for index in 0..<2 where open[index] { drain(index) }
        for index in 0..<2 {
            if !buffers[index].isEmpty { log(index, buffers[index][...]) }
            buffers[index].removeAll()
            if open[index] {
                Sys.close(fds[index])
                open[index] = false
            }
        }
        return status
    }
}
