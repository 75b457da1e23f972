import CRapaceShim
import Foundation
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// Errors of the test helpers.
struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Runs `body` with a fresh reactor on its own thread, shutting it down afterwards.
func withReactor<T>(_ name: String = "test-reactor", _ body: (Reactor) async throws -> T) async throws -> T {
    let reactor = try Reactor.start(name: name)
    do {
        let value = try await body(reactor)
        reactor.shutdown()
        return value
    } catch {
        reactor.shutdown()
        throw error
    }
}

/// Fails with a timeout error if `body` takes longer than `limit`.
func withTimeout<T: Sendable>(_ limit: Duration, _ what: String = "operation", _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: limit)
            throw TestFailure("\(what) did not finish within \(limit)")
        }
        let first = try await group.next()!
        group.cancelAll()
        return first
    }
}

/// The directory holding the package's built products (next to the test bundle).
var productsDirectory: String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let path = count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    return (path as NSString).deletingLastPathComponent
}

/// A unique path for a Unix socket in /tmp, removed by the caller.
func temporarySocketPath(_ tag: String) -> String {
    "/tmp/rapace-test-\(getpid())-\(tag)-\(UInt32.random(in: 0...UInt32.max)).sock"
}

/// Descriptor number → target of every open descriptor (for leak reports).
func openFDTargets(pid: pid_t? = nil) -> Set<String> {
    let directory = pid.map { "/proc/\($0)/fd" } ?? "/proc/self/fd"
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
    return Set(entries.compactMap { name in
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\(name)")).map { "\(name)→\($0)" }
    })
}

/// The number of open descriptors of this process.
func openFDCount() -> Int { Sys.openDescriptorCount() }

/// A child process with its stdout on a pipe (stderr inherited).
final class ChildProcess: @unchecked Sendable {
    let pid: pid_t
    private let stdoutFD: Int32
    private var buffered: [UInt8] = []
    private(set) var exitStatus: Int32?

    init(_ executable: String, _ arguments: [String]) throws {
        guard access(executable, X_OK) == 0 else { throw TestFailure("\(executable) is missing: build the package first") }
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw TestFailure("pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        posix_spawn_file_actions_addclose(&actions, fds[1])
        defer { posix_spawn_file_actions_destroy(&actions) }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, nil, argv, environ)
        close(fds[1])
        guard rc == 0 else {
            close(fds[0])
            throw TestFailure("posix_spawn \(executable) failed: \(rc)")
        }
        pid = child
        stdoutFD = fds[0]
    }

    /// Reads one stdout line, waiting at most `timeout`.
    func readLine(timeout: Duration = .seconds(10)) throws -> String {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let newline = buffered.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: buffered[..<newline], as: UTF8.self)
                buffered.removeSubrange(...newline)
                return line
            }
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { throw TestFailure("no line from pid \(pid) within \(timeout)") }
            var poller = pollfd(fd: stdoutFD, events: Int16(POLLIN), revents: 0)
            let ms = Int32(max(1, remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000))
            // Nothing readable yet: look at the deadline again rather than block in read(2).
            if poll(&poller, 1, ms) <= 0 { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(stdoutFD, &chunk, chunk.count)
            if n > 0 { buffered.append(contentsOf: chunk[0..<n]) }
            if n == 0 { throw TestFailure("pid \(pid) closed stdout before a full line") }
        }
    }

    func signal(_ signo: Int32) { kill(pid, signo) }

    /// Waits for the process to exit (at most `timeout`), then returns its wait status.
    @discardableResult
    func wait(timeout: Duration = .seconds(10)) throws -> Int32 {
        if let exitStatus { return exitStatus }
        let deadline = ContinuousClock.now + timeout
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid {
                exitStatus = status
                close(stdoutFD)
                return status
            }
            if ContinuousClock.now > deadline {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, 0)
                exitStatus = status
                close(stdoutFD)
                throw TestFailure("pid \(pid) did not exit within \(timeout); killed")
            }
            usleep(5_000)
        }
    }

    /// Kills (SIGKILL) and reaps the process if it is still running.
    func terminate() {
        guard exitStatus == nil else { return }
        kill(pid, SIGKILL)
        _ = try? wait(timeout: .seconds(5))
    }

    deinit { terminate() }
}

/// A running `rapace-echo serve` child.
final class EchoServerProcess: @unchecked Sendable {
    let process: ChildProcess
    let address: SocketAddress
    private let socketPath: String?

    /// Starts `rapace-echo serve` on a Unix socket (`unix: true`) or TCP 127.0.0.1:0.
    init(unix: Bool, extraArguments: [String] = []) throws {
        let binary = productsDirectory + "/rapace-echo"
        if unix {
            let path = temporarySocketPath("echo")
            socketPath = path
            process = try ChildProcess(binary, ["serve", "--unix", path] + extraArguments)
        } else {
            socketPath = nil
            process = try ChildProcess(binary, ["serve", "--tcp", "127.0.0.1:0"] + extraArguments)
        }
        let line = try process.readLine()
        guard line.hasPrefix("listening on ") else {
            process.terminate()
            throw TestFailure("unexpected first line from rapace-echo: \(line)")
        }
        let text = String(line.dropFirst("listening on ".count))
        address = unix ? .unix(path: text) : try SocketAddress.parseTCP(text)
    }

    func stop() {
        process.terminate()
        if let socketPath { unlink(socketPath) }
    }

    deinit { stop() }
}

/// A blocking raw socket for speaking bytes to a server (bad-input tests).
final class RawPeer {
    let fd: Int32
    private var decoder = StreamFrameDecoder(maxPayload: 64 << 20)

    init(_ address: SocketAddress) throws {
        let resolved = try address.resolve()
        fd = socket(resolved.domain, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket failed") }
        let rc = resolved.withSockaddr { pointer, length in Glibc.connect(fd, pointer, length) }
        guard rc == 0 else {
            close(fd)
            throw TestFailure("connect to \(address) failed: errno \(errno)")
        }
    }

    deinit { close(fd) }

    func write(_ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { rapace_send(fd, $0.baseAddress! + offset, bytes.count - offset) }
            if n <= 0 { return }
            offset += n
        }
    }

    /// Sends one frame with stream framing (the descriptor's payload fields are set here).
    func send(_ descriptor: FrameDescriptor, _ payload: [UInt8]) {
        var frame = Frame(descriptor: descriptor, payload: Payload(payload))
        frame.prepareForSending()
        var out: [UInt8] = []
        StreamFrameDecoder.encode(frame, into: &out)
        write(out)
    }

    /// Sends our Hello (as the initiator unless told otherwise).
    func sendHello(_ hello: Hello = Hello(role: .initiator), messageID: UInt64 = 1) {
        send(FrameDescriptor(messageID: messageID, channelID: 0, methodID: ControlVerb.hello.rawValue, flags: .control), hello.encoded())
    }

    enum Event {
        case frame(Frame)
        case closed
    }

    /// The next frame, or `.closed` at EOF/reset; throws on timeout.
    func next(timeout: Duration = .seconds(5)) throws -> Event {
        let deadline = ContinuousClock.now + timeout
        while true {
            if let frame = try decoder.next() { return .frame(frame) }
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { throw TestFailure("no frame within \(timeout)") }
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = poll(&poller, 1, Int32(max(1, remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000)))
            let n = try decoder.withWritableSpace { space -> Int in
                let r = recv(fd, space.baseAddress, space.count, Int32(MSG_DONTWAIT))
                return r
            }
            if n == 0 { return .closed }
            if n < 0 && errno != EAGAIN && errno != EWOULDBLOCK { return .closed }
        }
    }

    /// Collects frames until the connection closes (or `timeout`).
    func framesUntilClose(timeout: Duration = .seconds(5)) throws -> [Frame] {
        var frames: [Frame] = []
        while case .frame(let frame) = try next(timeout: timeout) { frames.append(frame) }
        return frames
    }

    /// Reads the peer's Hello (the first frame) and returns it.
    func expectHello() throws -> Hello {
        guard case .frame(let frame) = try next(), frame.descriptor.methodID == 0, frame.descriptor.channelID == 0 else {
            throw TestFailure("expected the peer's Hello first")
        }
        return try Hello(decoding: frame.payload.bytes)
    }
}

/// A mutex-guarded value that closures can share.
final class Locked<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}
