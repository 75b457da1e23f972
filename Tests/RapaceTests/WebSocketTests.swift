import EchoService
import Foundation
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

// MARK: - SHA-1, base64, handshake

@Suite(.sharesProcess) struct WebSocketHandshakeTests {
    private func hex(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

    @Test func sha1Vectors() {
        #expect(hex(SHA1.hash([UInt8]())) == "da39a3ee5e6b4b0d3255bfef95601890afd80709")
        #expect(hex(SHA1.hash(Array("abc".utf8))) == "a9993e364706816aba3e25717850c26c9cd0d89d")
        #expect(hex(SHA1.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8))) == "84983e441c3bd26ebaae4aa1f95129e5e54670f1")
        #expect(hex(SHA1.hash([UInt8](repeating: UInt8(ascii: "a"), count: 1_000_000))) == "34aa973cd4c4daa4f61eeb2bdbad27316534016f")
    }

    @Test func base64RoundTrip() {
        let cases: [(String, String)] = [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]
        for (plain, encoded) in cases {
            #expect(Base64.encode(Array(plain.utf8)) == encoded)
            #expect(Base64.decode(encoded) == Array(plain.utf8))
        }
        #expect(Base64.decode("Zm9") == nil)
        #expect(Base64.decode("Zm9*") == nil)
        #expect(Base64.decode("Z===") == nil)
    }

    @Test func rfc6455AcceptSample() {
        #expect(WebSocketHandshake.acceptValue(forKey: "dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    }

    @Test func parsesHead() throws {
        let text = "GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key:  abc \r\n\r\nrest"
        let bytes = Array(text.utf8)
        let end = try #require(WebSocketHandshake.headEnd(in: bytes))
        #expect(Array(bytes[end...]) == Array("rest".utf8))
        let head = try #require(WebSocketHandshake.parseHead(bytes[0..<(end - 4)]))
        #expect(head.startLine.map(String.init) == ["GET", "/chat", "HTTP/1.1"])
        #expect(head.header("HOST") == "example.com")
        #expect(head.header("sec-websocket-key") == "abc")
        #expect(head.headerContainsToken("connection", "upgrade"))
        #expect(WebSocketHandshake.parseHead(Array("GET /\r\n".utf8)[...]) == nil)
        #expect(WebSocketHandshake.parseHead(Array("GET / HTTP/1.1\r\nno colon".utf8)[...]) == nil)
    }
}

// MARK: - Frame codec

@Suite(.sharesProcess) struct WebSocketCodecTests {
    private func frame(_ opcode: WebSocketOpcode, _ payload: [UInt8], fin: Bool = true, masked: Bool = true) -> [UInt8] {
        var out: [UInt8] = []
        WebSocketFrameEncoder.appendFrame(opcode: opcode, fin: fin, payload: payload, mask: masked ? UInt32.random(in: 0...UInt32.max) : nil, into: &out)
        return out
    }

    private func decodeAll(_ bytes: [UInt8], expectMasked: Bool = true, max: Int = 1 << 20, byteByByte: Bool = false) throws -> [WebSocketEvent] {
        var decoder = WebSocketFrameDecoder(expectMasked: expectMasked, maxMessageSize: max)
        var events: [WebSocketEvent] = []
        if byteByByte {
            for byte in bytes {
                decoder.append([byte])
                while let event = try decoder.next() { events.append(event) }
            }
        } else {
            decoder.append(bytes)
            while let event = try decoder.next() { events.append(event) }
        }
        #expect(!decoder.hasPartialMessage)
        return events
    }

    @Test func rfcMaskedSample() throws {
        // RFC 6455 §5.7: a masked "Hello".
        let sample: [UInt8] = [0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58]
        #expect(try decodeAll(sample) == [.text(Array("Hello".utf8))])
        #expect(try decodeAll([0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F], expectMasked: false) == [.text(Array("Hello".utf8))])
    }

    @Test func lengthsAndMaskingRoundTrip() throws {
        for size in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            for masked in [true, false] {
                let bytes = frame(.binary, payload, masked: masked)
                #expect(try decodeAll(bytes, expectMasked: masked) == [.binary(payload)], "size \(size) masked \(masked)")
            }
        }
        #expect(try decodeAll(frame(.binary, Array(0..<200), masked: true), byteByByte: true) == [.binary(Array(0..<200))])
    }

    @Test func fragmentsWithInterleavedControlFrames() throws {
        var bytes = frame(.binary, [1, 2], fin: false)
        bytes += frame(.ping, [9])
        bytes += frame(.continuation, [3], fin: false)
        bytes += frame(.continuation, [4, 5], fin: true)
        bytes += frame(.close, WebSocketFrameEncoder.closeBody(.normal, reason: "bye"))
        let expected: [WebSocketEvent] = [.ping([9]), .binary([1, 2, 3, 4, 5]), .close(.normal, "bye")]
        #expect(try decodeAll(bytes) == expected)
        #expect(try decodeAll(bytes, byteByByte: true) == expected)
    }

    private func violation(_ bytes: [UInt8], expectMasked: Bool = true, max: Int = 1 << 20) -> WebSocketCloseCode? {
        do {
            _ = try decodeAll(bytes, expectMasked: expectMasked, max: max)
            return nil
        } catch let error as WebSocketProtocolError {
            return error.closeCode
        } catch {
            return nil
        }
    }

    @Test func violations() {
        #expect(violation(frame(.binary, [1], masked: false)) == .protocolError)  // unmasked client frame
        #expect(violation(frame(.binary, [1], masked: true), expectMasked: false) == .protocolError)  // masked server frame
        #expect(violation(frame(.binary, Array(repeating: 0, count: 101)), max: 100) == .messageTooBig)
        #expect(violation(frame(.binary, Array(repeating: 0, count: 60), fin: false) + frame(.continuation, Array(repeating: 0, count: 60)), max: 100) == .messageTooBig)
        #expect(violation(frame(.continuation, [1])) == .protocolError)
        #expect(violation(frame(.binary, [1], fin: false) + frame(.text, [1])) == .protocolError)
        #expect(violation(frame(.ping, [1], fin: false)) == .protocolError)
        #expect(violation(frame(.ping, Array(repeating: 0, count: 126))) == .protocolError)
        #expect(violation([0x83, 0x80, 0, 0, 0, 0]) == .protocolError)  // reserved opcode 3
        #expect(violation([0xC2, 0x80, 0, 0, 0, 0]) == .protocolError)  // RSV1 without extension
        #expect(violation(frame(.close, [0x03])) == .protocolError)
        #expect(violation(frame(.close, [0x03, 0xED])) == .protocolError)  // 1005 may not be sent
        #expect(violation(frame(.close, [0x03, 0xE8, 0xFF])) == .invalidPayload)
        // The size is checked from the header, before the payload arrives.
        var decoder = WebSocketFrameDecoder(expectMasked: false, maxMessageSize: 1000)
        decoder.append([0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0])
        #expect(throws: WebSocketProtocolError.self) { try decoder.next() }
    }
}

// MARK: - Helpers

/// Records what a transport delivers; read from any thread.
///
/// A refused frame is recorded too, not reported from the loop thread (an issue recorded
/// there might not be attributed to the test): tests call ``expectNothingRefused``.
final class RecordingHandler: FrameTransportHandler, @unchecked Sendable {
    // @unchecked Sendable: state behind a Mutex; callbacks arrive on the loop; `transport`
    // is set before the transport starts and then only read on the loop.
    struct State {
        var frames: [Frame] = []
        var closed = false
        var closeError: TransportError?
        var framingError: TransportError?
        /// Why the transport refused frames (`transportDidRefuse`), in order.
        var refusals: [String] = []
    }
    let state = Mutex(State())
    weak var transport: (any FrameTransport)?

    func transportDidReceive(_ frame: Frame) { state.withLock { $0.frames.append(frame) } }
    func transportDidFinishReceiveBatch() {}
    func transportDidClose(_ error: TransportError?) {
        state.withLock { $0.closed = true; $0.closeError = error }
    }
    func transportDidFailFraming(_ error: TransportError) {
        state.withLock { $0.framingError = error }
        transport?.close(error: error)
    }
    func transportDidRefuse(_ frame: Frame, reason: String) {
        state.withLock { $0.refusals.append(reason) }
    }

    /// Expects (from the test's task) that the transport refused no frame.
    func expectNothingRefused(sourceLocation: SourceLocation = #_sourceLocation) {
        let refusals = state.withLock { $0.refusals }
        #expect(refusals.isEmpty, "a WebSocket transport refused frames: \(refusals)", sourceLocation: sourceLocation)
    }

    func waitUntil(_ what: String, timeout: Duration = .seconds(5), _ condition: (State) -> Bool) async throws {
        guard await RapaceTestSupport.waitUntil(timeout: timeout, interval: .milliseconds(5), { state.withLock { condition($0) } }) else {
            throw TestFailure("timed out waiting for \(what)")
        }
    }
}

/// A blocking TCP client for feeding a server raw bytes (tests only, loopback only).
final class RawClient {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(port: UInt16) throws {
        fd = socket(AF_INET, 1 /* SOCK_STREAM */, 0)
        guard fd >= 0 else { throw TestFailure("socket failed") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0 else { Glibc.close(fd); throw TestFailure("connect failed") }
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(fd) }

    func send(_ bytes: [UInt8]) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            offset += n
        }
    }

    func send(_ text: String) { send(Array(text.utf8)) }

    /// Reads until EOF (or the 5 s receive timeout); returns everything.
    func readToEnd() -> [UInt8] {
        var chunk = [UInt8](repeating: 0, count: 65536)
        for _ in 0..<10_000 {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { break }
            buffer.append(contentsOf: chunk[0..<n])
        }
        let all = buffer
        buffer = []
        return all
    }

    /// Reads the HTTP response head; returns the status line and the bytes after the head.
    func readResponseHead() throws -> (status: String, rest: [UInt8]) {
        var chunk = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<1000 {
            if let end = WebSocketHandshake.headEnd(in: buffer) {
                let head = String(decoding: buffer[0..<end], as: UTF8.self)
                let rest = Array(buffer[end...])
                buffer = rest
                return (String(head.split(separator: "\r\n").first ?? ""), rest)
            }
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { throw TestFailure("connection ended before an HTTP response head (\(buffer.count) bytes)") }
            buffer.append(contentsOf: chunk[0..<n])
        }
        throw TestFailure("no HTTP response head")
    }

    /// Upgrades (as a client) and returns the status line.
    func upgrade(origin: String? = nil, version: String = "13", key: String = "dGhlIHNhbXBsZSBub25jZQ==") throws -> String {
        var request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: \(key)\r\nSec-WebSocket-Version: \(version)\r\n"
        if let origin { request += "Origin: \(origin)\r\n" }
        send(request + "\r\n")
        return try readResponseHead().status
    }

    /// Reads (and drops) whatever arrives until end of file; false when `limit` passes first
    /// or the connection is reset instead.
    func seesEndOfFile(within limit: Duration) -> Bool {
        let deadline = ContinuousClock.now + limit
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return false }
            let (seconds, attoseconds) = left.components
            var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int(max(1, attoseconds / 1_000_000_000_000)))
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            let n = recv(fd, &chunk, chunk.count, 0)
            if n == 0 { return true }
            if n < 0 { return false }
        }
    }

    /// Reads server frames until a Close frame arrives; returns its code (nil: none seen).
    func readCloseCode() -> UInt16? {
        var decoder = WebSocketFrameDecoder(expectMasked: false, maxMessageSize: 1 << 24)
        decoder.append(buffer)
        buffer = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        for _ in 0..<1000 {
            while let event = try? decoder.next() {
                if case .close(let code, _) = event { return code?.rawValue ?? 1005 }
            }
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { return nil }
            decoder.append(chunk[0..<n])
        }
        return nil
    }
}

/// The last transport a ``WebSocketListener`` accepted (set on its loop, read by the test).
final class AcceptedTransport: Sendable {
    let value = Mutex<SendableBox<WebSocketTransport>?>(nil)
}

/// Serves Echo over WebSocket on 127.0.0.1 for the duration of `body`.
func withWebSocketServer<T>(
    configuration: WebSocketListener.Configuration = WebSocketListener.Configuration(),
    sessionConfiguration: Session.Configuration = Session.Configuration(),
    _ body: (Reactor, RapaceServer, UInt16) async throws -> T
) async throws -> T {
    try await withReactor("ws-server") { reactor in
        let server = RapaceServer(reactor: reactor, services: [EchoServer(DefaultEcho())], configuration: sessionConfiguration)
        let (address, listener) = try await server.listenWebSocket(configuration: configuration)
        guard case .tcp(_, let port) = address else { throw TestFailure("not TCP") }
        do {
            let value = try await body(reactor, server, port)
            await server.closeWebSocketListener(listener)
            await server.shutdownGracefully(grace: .seconds(1))
            return value
        } catch {
            await server.closeWebSocketListener(listener)
            await server.shutdownGracefully(grace: .seconds(1))
            throw error
        }
    }
}

// MARK: - Over real sockets

@Suite(.serialized, .sharesProcess) struct WebSocketTransportTests {
    @Test func swiftClientAndServerCallEcho() async throws {
        try await withWebSocketServer { reactor, _, port in
            try await withTimeout(.seconds(20), "echo over WebSocket") {
                let session = try await Session.connect(webSocketHost: "127.0.0.1", port: port, reactor: reactor)
                let echo = EchoClient(session)
                #expect(try await echo.echo("héllo") == "héllo")
                #expect(try await echo.add(2, 3) == 5)
                let big = try await echo.blob(size: 300_000)
                #expect(big.count == 300_000 && big[251] == 0 && big[252] == 1)
                #expect(try await echo.checksum(Array(repeating: 7, count: 70_000)) == MethodID.fnv1a64(Array(repeating: 7, count: 70_000)))
                var values: [UInt32] = []
                for try await value in echo.countdown(from: 50) { values.append(value) }
                #expect(values == Array((1...50).reversed()))
                do {
                    try await echo.fail(code: 5, message: "nope")
                    Issue.record("fail did not throw")
                } catch let error as RPCError {
                    #expect(error.code.rawValue == 5)
                    #expect(error.message == "nope")
                }
                await session.closeAndWait()
            }
        }
    }

    @Test func transportCarriesTheSpecVector() async throws {
        // The vector's Echo.add request, sent by our client transport, arrives at a raw
        // server unchanged (after unmasking).
        try await withReactor("ws-vector") { reactor in
            let received = Mutex<[UInt8]?>(nil)
            let handler = RecordingHandler()
            let box = try await onLoopThrowing(reactor) {
                let listener = try WebSocketListener(reactor: reactor) { transport in
                    handler.transport = transport
                    transport.start(handler: handler)
                }
                return SendableBox(listener)
            }
            guard case .tcp(_, let port) = box.value.address else { return }
            let client = try await WebSocketTransport.connect(host: "127.0.0.1", port: port, reactor: reactor)
            let message: [UInt8] = Array(Vectors.hex("03000000000000000100000094f95126ffffffff0000000000000000020000000500000000000000ffffffffffffffff040600000000000000000000000000000406"))
            let frame = message.withUnsafeBytes { raw in
                Frame(descriptor: FrameDescriptor(decoding: raw.baseAddress!), payload: Payload(Array(message[64...])))
            }
            let clientHandler = RecordingHandler()
            await onLoop(reactor) {
                client.value.start(handler: clientHandler)
                client.value.send(frame)
                client.value.flush()
            }
            try await handler.waitUntil("the frame") { !$0.frames.isEmpty }
            handler.state.withLock { state in
                let got = state.frames[0]
                var bytes = [UInt8](repeating: 0, count: 64)
                bytes.withUnsafeMutableBytes { got.descriptor.encode(into: $0.baseAddress!) }
                received.withLock { $0 = bytes + got.payload.bytes }
            }
            #expect(received.withLock { $0 } == message)
            await onLoop(reactor) {
                client.value.close(error: nil)
                box.value.close()
            }
            try await handler.waitUntil("close") { $0.closed }
            #expect(handler.state.withLock { $0.closeError } == nil)
            handler.expectNothingRefused()
            clientHandler.expectNothingRefused()
        }
    }

    @Test(.ownsProcess("a slow loris must be closed within 4 s"))
    func badInputGetsTheRightCloseCodeAndOthersKeepWorking() async throws {
        var configuration = WebSocketListener.Configuration()
        configuration.maxIncomingPayload = 1000
        configuration.handshakeTimeout = .milliseconds(500)
        configuration.allowedOrigins = ["http://good.example"]
        var sessionConfiguration = Session.Configuration()
        sessionConfiguration.limits.maxPayloadSize = 1000
        try await withWebSocketServer(configuration: configuration, sessionConfiguration: sessionConfiguration) { reactor, _, port in
            // A healthy connection, used between the bad ones.
            let session = try await Session.connect(webSocketHost: "127.0.0.1", port: port, reactor: reactor)
            let echo = EchoClient(session)
            #expect(try await echo.add(1, 1) == 2)

            func openRaw() throws -> RawClient {
                let raw = try RawClient(port: port)
                let status = try raw.upgrade()
                #expect(status == "HTTP/1.1 101 Switching Protocols")
                return raw
            }

            let unmasked = try openRaw()
            unmasked.send(Self.clientFrame(.binary, Array(repeating: 0, count: 64), masked: false))
            #expect(unmasked.readCloseCode() == 1002)
            #expect(try await echo.echo("still here") == "still here")

            let text = try openRaw()
            text.send(Self.clientFrame(.text, Array("hello".utf8)))
            #expect(text.readCloseCode() == 1003)

            let oversized = try openRaw()
            oversized.send(Self.clientFrame(.binary, Array(repeating: 0, count: 64 + 1001)))
            #expect(oversized.readCloseCode() == 1009)

            let short = try openRaw()
            short.send(Self.clientFrame(.binary, Array(repeating: 0, count: 10)))
            #expect(short.readCloseCode() == 1002)

            let ping = try openRaw()
            ping.send(Self.clientFrame(.ping, [1, 2, 3]))
            ping.send(Self.clientFrame(.close, WebSocketFrameEncoder.closeBody(.normal, reason: "")))
            var pingDecoder = WebSocketFrameDecoder(expectMasked: false, maxMessageSize: 1 << 20)
            pingDecoder.append(ping.readToEnd())
            var events: [WebSocketEvent] = []
            while let event = try pingDecoder.next() {
                if case .binary = event { continue }  // the server's Hello
                events.append(event)
            }
            #expect(events == [.pong([1, 2, 3]), .close(.normal, "")])

            #expect(try RawClient(port: port).upgrade(version: "8").hasPrefix("HTTP/1.1 426"))
            #expect(try RawClient(port: port).upgrade(key: "short").hasPrefix("HTTP/1.1 400"))
            #expect(try RawClient(port: port).upgrade(origin: "http://evil.example").hasPrefix("HTTP/1.1 403"))
            #expect(try RawClient(port: port).upgrade(origin: "http://good.example").hasPrefix("HTTP/1.1 101"))
            let notHTTP = try RawClient(port: port)
            notHTTP.send("HELLO\r\n\r\n")
            #expect(try notHTTP.readResponseHead().status.hasPrefix("HTTP/1.1 400"))
            let huge = try RawClient(port: port)
            huge.send("GET / HTTP/1.1\r\nX: " + String(repeating: "a", count: 10_000))
            #expect(try huge.readResponseHead().status.hasPrefix("HTTP/1.1 431"))
            let plainGet = try RawClient(port: port)
            plainGet.send("GET /missing HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try plainGet.readResponseHead().status.hasPrefix("HTTP/1.1 404"))

            // Slow loris: half a request head, then nothing. Closed at the handshake deadline.
            let slow = try RawClient(port: port)
            slow.send("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            let started = ContinuousClock.now
            #expect(slow.readToEnd().isEmpty)
            let waited = ContinuousClock.now - started
            #expect(waited >= .milliseconds(300) && waited < .seconds(4))

            #expect(try await echo.echo("after all that") == "after all that")
            await session.closeAndWait()
        }
    }

    /// A client frame, masked with a random key unless `masked` is false.
    static func clientFrame(_ opcode: WebSocketOpcode, _ payload: [UInt8], masked: Bool = true) -> [UInt8] {
        var out: [UInt8] = []
        WebSocketFrameEncoder.appendFrame(opcode: opcode, payload: payload, mask: masked ? UInt32.random(in: 0...UInt32.max) : nil, into: &out)
        return out
    }

    @Test(.ownsProcess("the server must end a failed connection within 1.5 s"))
    func failedConnectionEndsWithoutWaitingForTheCloseTimeout() async throws {
        // RFC 6455 §7.1.7: after a framing error the server sends Close and closes the TCP
        // connection; a browser waits for that (§7.1.1) and sends nothing more. The server's
        // linger (closeTimeout, 2 s) is only the bound for a peer that never closes.
        var configuration = WebSocketListener.Configuration()
        configuration.maxIncomingPayload = 1000
        var sessionConfiguration = Session.Configuration()
        sessionConfiguration.limits.maxPayloadSize = 1000
        try await withWebSocketServer(configuration: configuration, sessionConfiguration: sessionConfiguration) { _, _, port in
            let failures: [(what: String, frame: [UInt8], code: UInt16)] = [
                ("a text message", Self.clientFrame(.text, Array("hello".utf8)), 1003),  // frames still in step
                ("an unmasked frame", Self.clientFrame(.binary, Array(repeating: 0, count: 64), masked: false), 1002),  // out of step
                ("an oversized message", Self.clientFrame(.binary, Array(repeating: 0, count: 64 + 1001)), 1009),  // out of step
            ]
            for failure in failures {
                for repliesWithClose in [false, true] {
                    let raw = try RawClient(port: port)
                    #expect(try raw.upgrade() == "HTTP/1.1 101 Switching Protocols")
                    raw.send(failure.frame)
                    #expect(raw.readCloseCode() == failure.code, "\(failure.what)")
                    if repliesWithClose {
                        raw.send(Self.clientFrame(.close, WebSocketFrameEncoder.closeBody(WebSocketCloseCode(rawValue: failure.code), reason: "")))
                    }
                    #expect(
                        raw.seesEndOfFile(within: .milliseconds(1500)),
                        "after \(failure.what)\(repliesWithClose ? " and the client's Close" : ""), the server did not close within 1.5 s")
                }
            }
        }
    }

    @Test(.ownsProcess("the server must see the client's Close within 1 s"))
    func failedConnectionEndsOnThePeersCloseWhenFramesAreInStep() async throws {
        // After a text message the frames are still in step: the client's Close is read and
        // ends the connection at once. After an unmasked frame they are not: input is
        // discarded until the client's end of file, so that the kernel does not reset the
        // connection before the client has read our Close.
        try await withReactor("ws-fail-close") { reactor in
            let accepted = AcceptedTransport()
            let handlers = Mutex<[RecordingHandler]>([])
            let listener = try await onLoopThrowing(reactor) {
                SendableBox(try WebSocketListener(reactor: reactor) { transport in
                    let fresh = RecordingHandler()
                    fresh.transport = transport
                    handlers.withLock { $0.append(fresh) }
                    accepted.value.withLock { $0 = SendableBox(transport) }
                    transport.start(handler: fresh)
                })
            }
            guard case .tcp(_, let port) = listener.value.address else { throw TestFailure("not TCP") }
            for (frame, code, inStep) in [
                (Self.clientFrame(.text, Array("hello".utf8)), UInt16(1003), true),
                (Self.clientFrame(.binary, Array(repeating: 0, count: 64), masked: false), UInt16(1002), false),
            ] {
                accepted.value.withLock { $0 = nil }
                let raw = try RawClient(port: port)
                #expect(try raw.upgrade() == "HTTP/1.1 101 Switching Protocols")
                raw.send(frame)
                #expect(raw.readCloseCode() == code)
                raw.send(Self.clientFrame(.close, WebSocketFrameEncoder.closeBody(WebSocketCloseCode(rawValue: code), reason: "")))
                let transport = try #require(accepted.value.withLock { $0 })
                let finished = { await onLoop(reactor) { transport.value.isFinished } }
                if inStep {
                    #expect(await waitUntil(timeout: .seconds(1), finished), "the client's Close after close \(code) did not end the connection")
                } else {
                    try await Task.sleep(for: .milliseconds(100))
                    #expect(!(await finished()), "the connection ended before the client's end of file after close \(code)")
                }
                _ = shutdown(raw.fd, Int32(SHUT_RDWR))  // the client's end of file
                #expect(await waitUntil(timeout: .seconds(1), finished), "the client's end of file after close \(code) did not end the connection")
            }
            await onLoop(reactor) { listener.value.close() }
            let acceptedHandlers = handlers.withLock { $0 }
            #expect(acceptedHandlers.count == 2)
            for handler in acceptedHandlers { handler.expectNothingRefused() }
        }
    }

    @Test func clientReportsRefusedAndRejectedConnections() async throws {
        var configuration = WebSocketListener.Configuration()
        configuration.allowedOrigins = ["http://good.example"]
        try await withWebSocketServer(configuration: configuration) { reactor, _, port in
            do {
                _ = try await Session.connect(webSocketHost: "127.0.0.1", port: port, origin: "http://evil.example", reactor: reactor)
                Issue.record("a disallowed Origin connected")
            } catch let error as TransportError {
                #expect(error.code == .connectFailed)
                #expect(error.message.contains("403"))
            }
            let session = try await Session.connect(webSocketHost: "127.0.0.1", port: port, origin: "http://good.example", reactor: reactor)
            #expect(try await EchoClient(session).echo("ok") == "ok")
            await session.closeAndWait()
        }
        // A port nothing listens on (bound, then closed).
        let closedPort: UInt16 = try await withReactor("ws-refused") { reactor in
            let box = try await onLoopThrowing(reactor) { SendableBox(try WebSocketListener(reactor: reactor) { _ in }) }
            let address = box.value.address
            await onLoop(reactor) { box.value.close() }
            guard case .tcp(_, let port) = address else { throw TestFailure("not TCP") }
            return port
        }
        _ = try await withReactor("ws-refused-client") { reactor in
            await #expect(throws: TransportError.self) {
                _ = try await WebSocketTransport.connect(host: "127.0.0.1", port: closedPort, reactor: reactor, timeout: .seconds(2))
            }
        }
    }

    @Test func servesPlainHTTPOnTheSamePort() async throws {
        var configuration = WebSocketListener.Configuration()
        configuration.httpHandler = { path in
            path == "/" ? WebSocketHTTPResponse(contentType: "text/html", text: "<p>hi</p>") : nil
        }
        try await withWebSocketServer(configuration: configuration) { reactor, _, port in
            let raw = try RawClient(port: port)
            raw.send("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            let response = String(decoding: raw.readToEnd(), as: UTF8.self)
            #expect(response.hasPrefix("HTTP/1.1 200 OK\r\n"))
            #expect(response.contains("Content-Length: 9\r\n"))
            #expect(response.hasSuffix("\r\n\r\n<p>hi</p>"))
            let session = try await Session.connect(webSocketHost: "127.0.0.1", port: port, reactor: reactor)
            #expect(try await EchoClient(session).add(20, 22) == 42)
            await session.closeAndWait()
        }
    }
}

// MARK: - Interop with Python's `websockets`

@Suite(.serialized, .sharesProcess) struct WebSocketInteropTests {
    static let peerScript = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Interop/ws_peer.py").path
    static let vectors = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Vectors/vectors.json").path

    /// Fails clearly (never skips) when python3 or `websockets` is missing.
    static func requirePython() async throws -> String {
        try await RapaceTestSupport.requirePython(
            probe: "import websockets.sync.client",
            missing: "python3 with the `websockets` package (11 or newer) is required for the WebSocket interop tests: run tools/test (it installs it) or `pip install 'websockets>=11'`")
    }

    static func spawnPython(_ python: String, _ arguments: [String]) throws -> ChildProcess {
        try ChildProcess("/usr/bin/env", [python] + arguments)
    }

    @Test func pythonClientAgainstOurServer() async throws {
        let python = try await Self.requirePython()
        try await withWebSocketServer { _, _, port in
            let child = try Self.spawnPython(python, [Self.peerScript, "client", "\(port)", Self.vectors])
            defer { child.terminate() }
            var lines: [String] = []
            for _ in 0..<10 {
                guard let line = try? await child.nextLine(timeout: .seconds(20)) else { break }
                lines.append(line)
                if line.hasPrefix("FAIL") || line == "OK text -> 1003" { break }
            }
            #expect(lines == ["OK hello", "OK ping", "OK call add(2,3) -> 5", "OK close 1000", "OK text -> 1003"])
            let status = try await child.runToExit(timeout: .seconds(10)).waitStatus
            #expect(status == 0)
        }
    }

    @Test func ourClientAgainstPythonServer() async throws {
        let python = try await Self.requirePython()
        let child = try Self.spawnPython(python, [Self.peerScript, "server"])
        defer { child.terminate() }
        let portLine = try await child.nextLine(timeout: .seconds(20))
        let port = try #require(UInt16(portLine.replacingOccurrences(of: "PORT ", with: "")), "got \(portLine)")
        try await withReactor("ws-py-client") { reactor in
            let transport = try await WebSocketTransport.connect(host: "127.0.0.1", port: port, reactor: reactor)
            let handler = RecordingHandler()
            let sent: [Frame] = (0..<3).map { i in
                var frame = Frame(descriptor: FrameDescriptor(messageID: UInt64(i + 1), channelID: 1, methodID: 7), payload: Payload((0..<(i * 5000)).map { UInt8(truncatingIfNeeded: $0) }))
                frame.prepareForSending()
                return frame
            }
            await onLoop(reactor) {
                handler.transport = transport.value
                transport.value.start(handler: handler)
                for frame in sent { transport.value.send(frame) }
                transport.value.flush()
            }
            try await handler.waitUntil("python's close", timeout: .seconds(15)) { $0.closed }
            let state = handler.state.withLock { $0 }
            #expect(state.frames.map(\.descriptor.messageID) == [1, 2, 3])
            #expect(state.frames.map(\.payload.bytes) == sent.map(\.payload.bytes))
            #expect(state.closeError?.message.contains("4001") == true)
            handler.expectNothingRefused()
        }
        let line = try await child.nextLine(timeout: .seconds(10))
        #expect(line == "OK echoed 3 messages, ping answered")
        #expect(try await child.runToExit(timeout: .seconds(10)).waitStatus == 0)
    }
}


