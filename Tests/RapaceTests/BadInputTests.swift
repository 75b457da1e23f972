import EchoService
import RapaceTestSupport
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// A hostile or broken peer against a real `rapace-echo` process: each bad input gets the spec's
/// answer, a healthy client on another connection keeps being served, nothing leaks.
@Suite("Bad input over TCP", .serialized, .sharesProcess)
struct BadInputTests {
    /// Runs `body` against a real `rapace-echo` process with a healthy client connected;
    /// checks the healthy client afterwards and that the server leaked no descriptor
    /// (counted in `/proc/PID/fd`, so tests running in parallel in this process don't interfere).
    func withServer(unix: Bool = false, _ body: (SocketAddress) async throws -> Void) async throws {
        let server = try await EchoServerProcess(unix: unix)
        defer { server.stop() }
        try await withReactor("healthy") { clientReactor in
            let healthy = try await Session.connect(to: server.address, reactor: clientReactor)
            let echo = EchoClient(healthy)
            #expect(try await echo.add(1, 2) == 3)
            // The server's concurrency runtime opens its timer descriptor on the first sleep.
            try await echo.sleep(milliseconds: 1)
            // Timer descriptors are the concurrency runtime's, left out of the comparison.
            func descriptors() -> DescriptorSnapshot { DescriptorSnapshot.of(pid: server.process.pid).withoutTimers }
            let baseline = descriptors()
            try await body(server.address)
            #expect(try await echo.echo("still served") == "still served")
            // Every bad connection is closed by the server: its descriptors return to the baseline.
            let settled = await waitUntil(timeout: .seconds(5), interval: .milliseconds(10)) { descriptors() == baseline }
            let now = descriptors()
            #expect(settled, "server descriptors leaked: \(now.opened(since: baseline)), closed: \(baseline.opened(since: now))")
            await healthy.closeAndWait()
        }
        server.process.signal(SIGTERM)
        let exit = try await server.process.runToExit(timeout: .seconds(10))
        #expect(exit.status == 0, "the server exits cleanly after the attack (wait status \(exit.waitStatus))")
    }

    /// A raw peer that completed the handshake.
    func handshaken(_ address: SocketAddress) throws -> RawPeer {
        let peer = try RawPeer(address)
        peer.sendHello()
        let hello = try peer.expectHello()
        #expect(hello.role == .acceptor)
        #expect(hello.methods.map(\.methodID).sorted() == EchoMethods.all.map(\.id).sorted())
        return peer
    }

    /// Expects the server to send GoAway(protocolError) and close.
    func expectGoAwayAndClose(_ peer: RawPeer, _ what: String) throws {
        let frames = try peer.framesUntilClose()
        let goAway = frames.last { $0.descriptor.channelID == 0 && $0.descriptor.methodID == ControlVerb.goAway.rawValue }
        let message = try #require(goAway, "\(what): no GoAway before close (got \(frames.map(\.descriptor.methodID)))")
        let decoded = try GoAway(decoding: message.payload.bytes)
        #expect(decoded.reason == .protocolError, "\(what)")
        #expect(!decoded.message.isEmpty, "\(what): the GoAway says why")
    }

    /// Expects CloseChannel(0, error) and close (a rejected handshake).
    func expectRejectedHandshake(_ peer: RawPeer, _ what: String) throws -> String {
        let frames = try peer.framesUntilClose()
        let close = try #require(frames.last { $0.descriptor.channelID == 0 && $0.descriptor.methodID == ControlVerb.closeChannel.rawValue }, "\(what): no CloseChannel")
        let decoded = try CloseChannel(decoding: close.payload.bytes)
        #expect(decoded.channelID == 0)
        guard case .error(let why) = decoded.reason else {
            Issue.record("\(what): CloseChannel without an error")
            return ""
        }
        return why
    }

    @Test("framing violations: garbage, short length, oversized length, 11-byte varint, payload_len mismatch")
    func framing() async throws {
        try await withServer { address in
            // Garbage before any handshake: the connection is closed.
            let garbage = try RawPeer(address)
            var generator = SystemRandomNumberGenerator()
            garbage.write((0..<300).map { _ in UInt8.random(in: 0...255, using: &generator) })
            _ = try garbage.framesUntilClose()

            let short = try handshaken(address)
            short.write([10] + [UInt8](repeating: 0, count: 10))
            try expectGoAwayAndClose(short, "length < 64")

            let huge = try handshaken(address)
            var length: UInt64 = 64 + (1 << 40)
            var prefix: [UInt8] = []
            while length >= 0x80 { prefix.append(UInt8(truncatingIfNeeded: length) | 0x80); length >>= 7 }
            prefix.append(UInt8(length))
            huge.write(prefix + [UInt8](repeating: 0, count: 64))
            try expectGoAwayAndClose(huge, "length over the max")

            let longVarint = try handshaken(address)
            longVarint.write([UInt8](repeating: 0x80, count: 11) + [0x01])
            try expectGoAwayAndClose(longVarint, "varint over 10 bytes")

            let mismatch = try handshaken(address)
            var descriptor = FrameDescriptor(messageID: 2, channelID: 0, methodID: ControlVerb.ping.rawValue, flags: .control)
            descriptor.payloadLength = 3  // but 8 bytes follow
            mismatch.write([64 + 8] + descriptor.encodedBytes + [UInt8](repeating: 1, count: 8))
            try expectGoAwayAndClose(mismatch, "payload_len ≠ length − 64")
        }
    }

    @Test("handshake violations: first frame not Hello, another major version, same role")
    func handshake() async throws {
        try await withServer { address in
            let notHello = try RawPeer(address)
            notHello.send(FrameDescriptor(messageID: 1, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 1, kind: .call).encoded())
            #expect(try expectRejectedHandshake(notHello, "not Hello").contains("Hello"))

            let version = try RawPeer(address)
            version.sendHello(Hello(protocolVersion: 0x0002_0000, role: .initiator))
            #expect(try expectRejectedHandshake(version, "major version").contains("version"))

            let sameRole = try RawPeer(address)
            sameRole.sendHello(Hello(role: .acceptor))
            #expect(try expectRejectedHandshake(sameRole, "same role").contains("role"))

            let features = try RawPeer(address)
            features.sendHello(Hello(role: .initiator, requiredFeatures: [.callEnvelope, .attachedStreams]))
            #expect(try expectRejectedHandshake(features, "unsupported required feature").contains("feature"))
        }
    }

    @Test("control verb 50 is a protocol error; verb 100 is ignored")
    func unknownVerbs() async throws {
        try await withServer { address in
            let ignored = try handshaken(address)
            ignored.send(FrameDescriptor(messageID: 2, channelID: 0, methodID: 100, flags: .control), [1, 2, 3])
            ignored.send(FrameDescriptor(messageID: 3, channelID: 0, methodID: ControlVerb.ping.rawValue, flags: .control), [1, 2, 3, 4, 5, 6, 7, 8])
            guard case .frame(let pong) = try ignored.next() else { throw TestFailure("closed after verb 100") }
            #expect(pong.descriptor.methodID == ControlVerb.pong.rawValue)
            #expect(pong.payload.bytes == [1, 2, 3, 4, 5, 6, 7, 8])

            let verb50 = try handshaken(address)
            verb50.send(FrameDescriptor(messageID: 2, channelID: 0, methodID: 50, flags: .control), [])
            try expectGoAwayAndClose(verb50, "verb 50")
        }
    }

    @Test("DATA on an unopened channel gets CancelChannel(protocolViolation); undecodable arguments INVALID_ARGUMENT")
    func channelErrors() async throws {
        try await withServer { address in
            let peer = try handshaken(address)
            peer.send(FrameDescriptor(messageID: 2, channelID: 7, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), [0x04, 0x06])
            guard case .frame(let cancel) = try peer.next() else { throw TestFailure("closed") }
            #expect(cancel.descriptor.methodID == ControlVerb.cancelChannel.rawValue)
            #expect(try CancelChannel(decoding: cancel.payload.bytes) == CancelChannel(channelID: 7, reason: .protocolViolation))

            peer.send(FrameDescriptor(messageID: 3, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 9, kind: .call).encoded())
            peer.send(FrameDescriptor(messageID: 4, channelID: 9, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), [0xFF])
            guard case .frame(let response) = try peer.next() else { throw TestFailure("closed") }
            #expect(response.descriptor.channelID == 9)
            #expect(response.descriptor.messageID == 4)
            #expect(response.descriptor.flags.isSuperset(of: [.data, .endOfStream, .response, .error]))
            let result = try CallResult(decoding: response.payload.bytes)
            #expect(result.status.code == .invalidArgument)
            #expect(result.body == nil)

            // The connection still serves: a proper call on channel 11.
            peer.send(FrameDescriptor(messageID: 5, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 11, kind: .call).encoded())
            peer.send(FrameDescriptor(messageID: 6, channelID: 11, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), [0x04, 0x06])
            guard case .frame(let ok) = try peer.next() else { throw TestFailure("closed") }
            #expect(try CallResult(decoding: ok.payload.bytes) == CallResult(status: .ok, body: [0x0A]))

            // A reused channel id is refused.
            peer.send(FrameDescriptor(messageID: 7, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 9, kind: .call).encoded())
            guard case .frame(let reused) = try peer.next() else { throw TestFailure("closed") }
            #expect(try CancelChannel(decoding: reused.payload.bytes) == CancelChannel(channelID: 9, reason: .protocolViolation))

            // Ids may skip (17 after 11): DATA on a skipped id (13) was never opened and gets
            // CancelChannel too; DATA on an ended channel (11) is a late frame, dropped.
            peer.send(FrameDescriptor(messageID: 8, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 17, kind: .call).encoded())
            peer.send(FrameDescriptor(messageID: 9, channelID: 11, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), [0x04, 0x06])
            peer.send(FrameDescriptor(messageID: 10, channelID: 13, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), [0x04, 0x06])
            peer.send(FrameDescriptor(messageID: 11, channelID: 17, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), [0x02, 0x02])
            guard case .frame(let skipped) = try peer.next() else { throw TestFailure("closed") }
            #expect(skipped.descriptor.channelID == 0 && skipped.descriptor.methodID == ControlVerb.cancelChannel.rawValue)
            #expect(try CancelChannel(decoding: skipped.payload.bytes) == CancelChannel(channelID: 13, reason: .protocolViolation))
            guard case .frame(let after) = try peer.next() else { throw TestFailure("closed") }
            #expect(after.descriptor.channelID == 17, "nothing is sent for the late frame on channel 11")
            #expect(try CallResult(decoding: after.payload.bytes) == CallResult(status: .ok, body: [0x04]))
        }
    }

    @Test("a stream opened with no credit waits for the caller's grant (spec 6.3), then sends every item")
    func streamOpenedWithNoCredit() async throws {
        try await withServer { address in
            let peer = try handshaken(address)
            peer.send(FrameDescriptor(messageID: 2, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 1, kind: .stream, initialCredits: 0).encoded())
            peer.send(FrameDescriptor(messageID: 3, channelID: 1, methodID: EchoMethods.countdown.id, flags: [.data, .endOfStream]), [0x03])
            // Nothing may come before the grant: no item (no credit), and no failure either.
            #expect(throws: TestFailure.self) { _ = try peer.next(timeout: .milliseconds(300)) }
            peer.send(FrameDescriptor(messageID: 4, channelID: 0, methodID: ControlVerb.grantCredits.rawValue, flags: .control), GrantCredits(channelID: 1, bytes: 2).encoded())
            var items: [[UInt8]] = []
            for _ in 0..<2 {
                guard case .frame(let item) = try peer.next() else { throw TestFailure("closed") }
                #expect(item.descriptor.channelID == 1 && item.descriptor.flags == [.data, .response])
                items.append(item.payload.bytes)
            }
            #expect(items == [[0x03], [0x02]])
            // The 2 bytes granted are used up: the last item waits for the next grant.
            #expect(throws: TestFailure.self) { _ = try peer.next(timeout: .milliseconds(300)) }
            peer.send(FrameDescriptor(messageID: 5, channelID: 0, methodID: ControlVerb.grantCredits.rawValue, flags: .control), GrantCredits(channelID: 1, bytes: 8).encoded())
            guard case .frame(let last) = try peer.next() else { throw TestFailure("closed") }
            #expect(last.payload.bytes == [0x01])
            guard case .frame(let end) = try peer.next() else { throw TestFailure("closed") }
            #expect(end.descriptor.flags.isSuperset(of: [.data, .endOfStream, .response]))
            #expect(try CallResult(decoding: end.payload.bytes) == CallResult(status: .ok, body: nil))
        }
    }

    @Test(
        "the server enforces deadlines by itself: metadata over TCP, deadline_ns over Unix",
        .ownsProcess("the answer must come within 2 s"), arguments: [false, true])
    func serverSideDeadline(unix: Bool) async throws {
        try await withServer(unix: unix) { address in
            let peer = try handshaken(address)
            var metadata: [MetadataEntry] = []
            var deadline = FrameDescriptor.noDeadline
            if unix {
                deadline = Sys.monotonicNanoseconds() + 150_000_000
            } else {
                metadata = [MetadataEntry(Session.deadlineMetadataKey, [150, 0, 0, 0])]
            }
            let started = ContinuousClock.now
            peer.send(FrameDescriptor(messageID: 2, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 1, kind: .call, metadata: metadata).encoded())
            var request = FrameDescriptor(messageID: 3, channelID: 1, methodID: EchoMethods.sleep.id, flags: [.data, .endOfStream])
            request.deadlineNanoseconds = deadline
            peer.send(request, [0x90, 0x4E])  // sleep(10000)
            guard case .frame(let response) = try peer.next(timeout: .seconds(3)) else { throw TestFailure("closed") }
            #expect(ContinuousClock.now - started < .seconds(2))
            #expect(response.descriptor.flags.contains(.error))
            #expect(try CallResult(decoding: response.payload.bytes).status.code == .deadlineExceeded)
        }
    }

    @Test("no Hello within the handshake timeout: the server closes the connection", .ownsProcess("the server must close within 2 s"))
    func handshakeTimeout() async throws {
        try await withReactor("server") { reactor in
            var configuration = Session.Configuration()
            configuration.handshakeTimeout = .milliseconds(200)
            let server = RapaceServer(reactor: reactor, services: [EchoServer(DefaultEcho())], configuration: configuration)
            let address = try await server.listen(on: .unix(path: temporarySocketPath("timeout")))
            let silent = try RawPeer(address)
            let started = ContinuousClock.now
            let frames = try silent.framesUntilClose(timeout: .seconds(3))
            #expect(ContinuousClock.now - started >= .milliseconds(150))
            #expect(ContinuousClock.now - started < .seconds(2))
            #expect(frames.first?.descriptor.methodID == ControlVerb.hello.rawValue)
            let close = try CloseChannel(decoding: try #require(frames.last).payload.bytes)
            #expect(close.channelID == 0)
            await server.shutdownGracefully()
        }
    }

    @Test("GoAway: channels up to last_channel_id finish, newer ones get CancelChannel(resourceExhausted)")
    func goAwayRefusesNewChannels() async throws {
        try await withReactor("server") { reactor in
            // Channel 1's call stays in its handler until the test releases it: in flight
            // through the GoAway and the refusal of channel 3, however slow the machine.
            let held = HeldCallService()
            let server = RapaceServer(reactor: reactor, services: [EchoServer(DefaultEcho()), held])
            let address = try await server.listen(on: .tcp(host: "127.0.0.1", port: 0))
            // The raw peer blocks in poll while the server's handlers and the shutdown need
            // the cooperative threads: it reads on a thread of its own (Docs/testing.md).
            let (peer, hello) = try await onOwnThread("goaway-peer") {
                Result { () throws -> (SendableBox<RawPeer>, Hello) in
                    let peer = try RawPeer(address)
                    peer.sendHello()
                    return (SendableBox(peer), try peer.expectHello())
                }
            }.get()
            #expect(hello.role == .acceptor)
            peer.value.send(FrameDescriptor(messageID: 2, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 1, kind: .call).encoded())
            peer.value.send(FrameDescriptor(messageID: 3, channelID: 1, methodID: HeldCallService.hold.id, flags: [.data, .endOfStream]), [])
            try await held.waitForEntries(1)
            let shutdown = Task { await server.shutdownGracefully(grace: .seconds(30)) }
            let first = try await onOwnThread("goaway-peer") { Result { SendableBox(try peer.value.next(timeout: .seconds(10))) } }.get().value
            guard case .frame(let goAwayFrame) = first else { throw TestFailure("closed before GoAway") }
            #expect(goAwayFrame.descriptor.channelID == 0 && goAwayFrame.descriptor.methodID == ControlVerb.goAway.rawValue, "GoAway comes before the held call ends")
            let goAway = try GoAway(decoding: goAwayFrame.payload.bytes)
            #expect(goAway.reason == .shutdown)
            #expect(goAway.lastChannelID == 1)
            peer.value.send(FrameDescriptor(messageID: 4, channelID: 0, methodID: ControlVerb.openChannel.rawValue, flags: .control), OpenChannel(channelID: 3, kind: .call).encoded())
            peer.value.send(FrameDescriptor(messageID: 5, channelID: 3, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), [0x04, 0x06])
            // Channel 3 is refused while channel 1 is still in its handler; then channel 1 finishes.
            let beforeRelease = try await onOwnThread("goaway-peer") {
                Result { () throws -> SendableBox<[Frame]> in
                    var frames: [Frame] = []
                    while case .frame(let frame) = try peer.value.next(timeout: .seconds(10)) {
                        frames.append(frame)
                        // The refusal, or an answer on channel 3 (served after all).
                        if frame.descriptor.channelID == 0, frame.descriptor.methodID == ControlVerb.cancelChannel.rawValue { break }
                        if frame.descriptor.channelID == 3 { break }
                    }
                    return SendableBox(frames)
                }
            }.get().value
            let refusal = try #require(beforeRelease.last, "the connection closed before channel 3 was refused")
            try #require(
                refusal.descriptor.channelID == 0 && refusal.descriptor.methodID == ControlVerb.cancelChannel.rawValue,
                "channel 3 was not refused: \(beforeRelease.map(\.descriptor))")
            #expect(try CancelChannel(decoding: refusal.payload.bytes) == CancelChannel(channelID: 3, reason: .resourceExhausted))
            #expect(!beforeRelease.contains { $0.descriptor.channelID == 1 }, "channel 1 ended before it was released: \(beforeRelease.map(\.descriptor))")
            held.release()
            let rest = try await onOwnThread("goaway-peer") { Result { SendableBox(try peer.value.framesUntilClose(timeout: .seconds(10))) } }.get().value
            let results = try rest.filter { $0.descriptor.channelID == 1 }.map { try CallResult(decoding: $0.payload.bytes).status.code }
            #expect(results == [.ok], "channel 1, below last_channel_id, finishes")
            #expect(!rest.contains { $0.descriptor.channelID == 3 }, "channel 3 is never served")
            try await value(of: shutdown, within: .seconds(10), "the graceful shutdown")
        }
    }
}
