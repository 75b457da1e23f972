import CRapaceShim
import Foundation
import RapaceTestSupport

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// A running `rapace-echo serve` child.
final class EchoServerProcess: @unchecked Sendable {
    let process: ChildProcess
    let address: SocketAddress
    /// The address as the server printed it: `HOST:PORT`, or the socket's path.
    let printedAddress: String
    /// The Unix socket's path (a `temporarySocketPath`), nil over TCP; ``stop()`` removes it.
    let socketPath: String?

    /// Starts `rapace-echo serve` on a Unix socket (`unix: true`, named after `tag`) or TCP
    /// 127.0.0.1:0, with `extraArguments`, and waits (in a suspended task, at most 20 s) for
    /// it to say where it listens. `output` chooses what ``process`` reads: `.merged` adds
    /// the server's log (stderr), whose lines before the address are skipped.
    init(unix: Bool, extraArguments: [String] = [], tag: String = "echo", output: ChildProcess.Output = .stdout) async throws {
        let binary = productsDirectory + "/rapace-echo"
        if unix {
            let path = temporarySocketPath(tag)
            socketPath = path
            process = try ChildProcess(binary, ["serve", "--unix", path] + extraArguments, capturing: output)
        } else {
            socketPath = nil
            process = try ChildProcess(binary, ["serve", "--tcp", "127.0.0.1:0"] + extraArguments, capturing: output)
        }
        let line: String
        do {
            line = try await Self.nextLine(of: process, timeout: .seconds(20)) { $0.hasPrefix("listening on ") || output != .merged }
        } catch {
            process.terminate()
            throw error
        }
        guard line.hasPrefix("listening on ") else {
            process.terminate()
            throw TestFailure("unexpected first line from rapace-echo serve \(extraArguments.joined(separator: " ")): \(line)")
        }
        printedAddress = String(line.dropFirst("listening on ".count))
        address = unix ? .unix(path: printedAddress) : try SocketAddress.parseTCP(printedAddress)
    }

    /// Reads lines until one contains `text` and returns it (at most `timeout` in all).
    func nextLine(containing text: String, timeout: Duration) async throws -> String {
        try await Self.nextLine(of: process, timeout: timeout) { $0.contains(text) }
    }

    /// Reads `process`'s lines until one `matches` and returns it, within `timeout` in all.
    /// A failure quotes the lines skipped (the server's own error, when it did not start).
    private static func nextLine(of process: ChildProcess, timeout: Duration, matching matches: (String) -> Bool) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        var skipped: [String] = []
        while true {
            let line: String
            do {
                let remaining = deadline - ContinuousClock.now
                guard remaining > .zero else { throw TestFailure("no matching line within \(timeout)") }
                line = try await process.nextLine(timeout: remaining)
            } catch {
                throw TestFailure("\(error); lines before: \(skipped.suffix(20).joined(separator: " | "))")
            }
            if matches(line) { return line }
            skipped.append(line)
        }
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
            let n = decoder.withWritableSpace { space -> Int in
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
