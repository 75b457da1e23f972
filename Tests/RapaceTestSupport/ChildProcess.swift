import Foundation
import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// A child process with its stdout, its stderr, or both (`.merged`) on a pipe (what is not
/// piped is inherited), killed and reaped when released.
///
/// Reading and waiting come in two forms: blocking (`readLine`, `wait`), for synchronous
/// set-up code and child processes that answer at once; and async (`nextLine`,
/// `runToExit`), which poll with `Task.sleep` and so never hold a thread of the shared
/// cooperative pool while other tests run.
package final class ChildProcess: @unchecked Sendable {
    // @unchecked Sendable: the reading and waiting state is used by one task at a time
    // (each test owns its children); `pid`, `output` and `started` never change.

    /// Which output stream goes to the pipe.
    package enum Output: Sendable {
        case stdout
        case stderr
        /// Both on one pipe, in the order written (a log line is one write, so lines do not
        /// interleave within themselves).
        case merged
    }

    package let pid: pid_t
    /// When the process was spawned.
    package let started: ContinuousClock.Instant
    private let outputFD: Int32
    private var buffered: [UInt8] = []
    private var outputEnded = false
    private var nonBlocking = false
    /// The wait status once the process has been reaped.
    package private(set) var exitStatus: Int32?

    /// Spawns `executable` with `arguments` and this process's environment, its `output` on
    /// a pipe. The pipe is close-on-exec (`Sys.spawn(…pipingOutputs:)`): a child another test
    /// spawns meanwhile does not inherit its write end, which would hold off the end of the
    /// output.
    package init(_ executable: String, _ arguments: [String], capturing output: Output = .stdout) throws {
        guard access(executable, X_OK) == 0 else { throw TestFailure("\(executable) is missing: build the package first") }
        started = ContinuousClock.now
        let spawned: (pid: pid_t, outputs: [Int32])
        do {
            spawned = try Sys.spawn(
                executable, arguments: arguments, environment: Sys.environment(), pipingOutputs: [output == .stderr ? 2 : 1],
                duplicating: output == .merged ? [(from: 1, to: 2)] : [])
        } catch {
            throw TestFailure("cannot start \(executable): \(error)")
        }
        pid = spawned.pid
        outputFD = spawned.outputs[0]
    }

    deinit {
        terminate()
        close(outputFD)
    }

    /// The next line, if a whole one is buffered.
    private func bufferedLine() -> String? {
        guard let newline = buffered.firstIndex(of: UInt8(ascii: "\n")) else { return nil }
        let line = String(decoding: buffered[..<newline], as: UTF8.self)
        buffered.removeSubrange(...newline)
        return line
    }

    private enum ReadResult {
        case data
        case nothing
        case end
    }

    /// Reads what is there (at most 4 KiB).
    @discardableResult
    private func readChunk() -> ReadResult {
        var chunk = [UInt8](repeating: 0, count: 4096)
        let n = read(outputFD, &chunk, chunk.count)
        if n > 0 {
            buffered.append(contentsOf: chunk[0..<n])
            return .data
        }
        if n == 0 {
            outputEnded = true
            return .end
        }
        return .nothing  // EAGAIN (non-blocking) or EINTR: look again later
    }

    /// Reads until nothing more is there now (non-blocking descriptor), at most 4 MiB: a
    /// grandchild that inherited the pipe may go on writing after the child exits.
    private func drain() {
        for _ in 0..<1024 where !outputEnded {
            guard readChunk() == .data else { return }
        }
    }

    /// Reads one line, blocking the calling thread at most `timeout`.
    package func readLine(timeout: Duration = .seconds(10)) throws -> String {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let line = bufferedLine() { return line }
            if outputEnded { throw TestFailure("pid \(pid) closed its output before a full line") }
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { throw TestFailure("no line from pid \(pid) within \(timeout)") }
            var poller = pollfd(fd: outputFD, events: Int16(POLLIN), revents: 0)
            let ms = Int32(max(1, remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000))
            // Nothing readable yet: look at the deadline again rather than block in read(2).
            if poll(&poller, 1, ms) <= 0 { continue }
            readChunk()
        }
    }

    /// Reads one line, waiting at most `timeout` in a suspended task (polling every 2 ms).
    package func nextLine(timeout: Duration = .seconds(10)) async throws -> String {
        setNonBlocking()
        let deadline = ContinuousClock.now + timeout
        while true {
            if let line = bufferedLine() { return line }
            if outputEnded { throw TestFailure("pid \(pid) closed its output before a full line") }
            if readChunk() == .data { continue }
            guard ContinuousClock.now < deadline else { throw TestFailure("no line from pid \(pid) within \(timeout)") }
            try await Task.sleep(for: .milliseconds(2))
        }
    }

    private func setNonBlocking() {
        guard !nonBlocking else { return }
        _ = fcntl(outputFD, F_SETFL, fcntl(outputFD, F_GETFL) | O_NONBLOCK)
        nonBlocking = true
    }

    package func signal(_ signo: Int32) { kill(pid, signo) }

    /// Waits for the process to exit (blocking the calling thread at most `timeout`; killed
    /// after that), then returns its wait status.
    @discardableResult
    package func wait(timeout: Duration = .seconds(10)) throws -> Int32 {
        if let exitStatus { return exitStatus }
        let deadline = ContinuousClock.now + timeout
        while true {
            if let status = reap() { return status }
            if ContinuousClock.now > deadline {
                kill(pid, SIGKILL)
                _ = reap(blocking: true)
                throw TestFailure("pid \(pid) did not exit within \(timeout); killed")
            }
            usleep(5_000)
        }
    }

    /// Reaps the process if it has exited (or, `blocking`, once it does). Output that
    /// remains in the pipe can still be read.
    private func reap(blocking: Bool = false) -> Int32? {
        if let exitStatus { return exitStatus }
        var status: Int32 = 0
        guard waitpid(pid, &status, blocking ? 0 : WNOHANG) == pid else { return nil }
        exitStatus = status
        return status
    }

    /// Kills (SIGKILL) and reaps the process if it is still running.
    package func terminate() {
        guard exitStatus == nil else { return }
        kill(pid, SIGKILL)
        _ = try? wait(timeout: .seconds(5))
    }

    /// Collects the captured output until the process exits, waiting at most `timeout` in
    /// a suspended task (then it is killed and this throws).
    package func runToExit(timeout: Duration) async throws -> FinishedProcess {
        setNonBlocking()
        let deadline = ContinuousClock.now + timeout
        while exitStatus == nil {
            drain()
            if reap() != nil { break }
            if ContinuousClock.now > deadline {
                kill(pid, SIGKILL)
                _ = reap(blocking: true)
                throw TestFailure("pid \(pid) did not exit within \(timeout); killed")
            }
            try await Task.sleep(for: .milliseconds(2))
        }
        let elapsed = ContinuousClock.now - started
        drain()
        return FinishedProcess(waitStatus: exitStatus ?? 0, output: String(decoding: buffered, as: UTF8.self), elapsed: elapsed)
    }
}

/// A process run to its end by ``ChildProcess/runToExit(timeout:)``.
package struct FinishedProcess: Sendable {
    /// The raw wait status.
    package let waitStatus: Int32
    /// What it wrote to the captured stream.
    package let output: String
    /// From spawn to exit (as seen by polling every 2 ms).
    package let elapsed: Duration

    /// The exit code, or minus the signal that killed it.
    package var status: Int32 {
        (waitStatus & 0x7F) == 0 ? (waitStatus >> 8) & 0xFF : -(waitStatus & 0x7F)
    }

    /// Spawns `executable`, collects its `output` stream until it exits (at most `timeout`).
    package static func run(
        _ executable: String, _ arguments: [String] = [], capturing output: ChildProcess.Output = .stderr, timeout: Duration
    ) async throws -> FinishedProcess {
        try await ChildProcess(executable, arguments, capturing: output).runToExit(timeout: timeout)
    }
}
