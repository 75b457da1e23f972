import EchoService
import RapaceTestSupport
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// Bugs the session fuzz (`SessionFuzzTests`) found, each pinned by a focused test against
/// the same in-process server (Echo and `FuzzSyncService` on a Unix socket) and a raw peer.
@Suite("Session fuzz regressions", .sharesProcess)
struct SessionFuzzRegressionTests {
    /// Runs `body` against a ``FuzzServer`` on a reactor of its own.
    func withServer(_ tag: String, _ body: (FuzzServer) async throws -> Void) async throws {
        let path = temporarySocketPath(tag)
        defer { unlink(path) }
        try await withReactor("fuzz-\(tag)") { reactor in
            let server = try await FuzzServer(reactor: reactor, address: .unix(path: path))
            try await body(server)
            await server.close()
        }
    }

    /// Runs `body`, which blocks (a raw peer waits in `poll`), on a thread of its own: on a
    /// thread of the cooperative pool it would starve the pool, whose timers resume the
    /// server's sleeping handlers.
    func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await onOwnThread("fuzz-regression") { Result { try body() } }.get()
    }

    /// A raw peer that has exchanged Hellos with `server` (`hello` is the peer's).
    func handshaken(_ server: FuzzServer, _ hello: Hello = Hello(role: .initiator)) throws -> RawPeer {
        let peer = try RawPeer(server.address)
        peer.sendHello(hello)
        _ = try peer.expectHello()
        return peer
    }

    func control(_ verb: ControlVerb, _ messageID: UInt64) -> FrameDescriptor {
        FrameDescriptor(messageID: messageID, channelID: 0, methodID: verb.rawValue, flags: .control)
    }

    /// The frames before the first one on `channel`, and that one.
    func frames(until channel: UInt32, from peer: RawPeer) throws -> (before: [Frame], frame: Frame) {
        var before: [Frame] = []
        while true {
            guard case .frame(let frame) = try peer.next() else { throw TestFailure("the server closed the connection; before it: \(before.map(\.descriptor))") }
            if frame.descriptor.channelID == channel { return (before, frame) }
            before.append(frame)
        }
    }

    @Test("a NO_REPLY request to a server-streaming method gets no stream items (spec 6.1: no response), and its handler ends")
    func noReplyStreamSendsNoItems() async throws {
        try await withServer("noreply") { server in
            let (before, answer, held) = try await blocking {
                let peer = try handshaken(server)
                peer.send(control(.openChannel, 2), OpenChannel(channelID: 1, kind: .stream, initialCredits: 1000).encoded())
                peer.send(FrameDescriptor(messageID: 3, channelID: 1, methodID: EchoMethods.countdown.id, flags: [.data, .endOfStream, .noReply]), [0x03])
                // A later call, answered after a few turns of the loop: the countdown's handler ran by then.
                peer.send(control(.openChannel, 4), OpenChannel(channelID: 3, kind: .call).encoded())
                peer.send(FrameDescriptor(messageID: 5, channelID: 3, methodID: EchoMethods.sleep.id, flags: [.data, .endOfStream]), [20])
                let (before, answer) = try frames(until: 3, from: peer)
                // Still connected: the countdown's call must be gone from the session's table.
                let held = blockingOnLoop(server.reactor) { server.accepted.sessions.first?.incoming.count }
                return (before, answer, held)
            }
            #expect(before.isEmpty, "the server sent \(before.map { "\($0.descriptor.flags) on \($0.descriptor.channelID): \($0.payload.bytes)" }) for the NO_REPLY stream")
            #expect(try CallResult(decoding: answer.payload.bytes) == CallResult(status: .ok, body: []))
            #expect(held == 0, "the NO_REPLY stream's call is still held")
        }
    }

    @Test(
        "to a peer with a small max payload, an error answer and a GoAway are shortened to fit it (spec 8.1: the peer must reject more)",
        arguments: [64, 100, 180])
    func errorsFitTheMaxPayload(maxPayload: Int) async throws {
        try await withServer("max-payload") { server in
            // 60 two-byte characters, then 100 ASCII: a cut at 200 bytes or less ends in the é's
            // or just after them.
            let message = String(repeating: "é", count: 60) + String(repeating: "x", count: 100)
            let hello = Hello(role: .initiator, limits: Limits(maxPayloadSize: UInt32(maxPayload)))
            let (answer, goodbye) = try await blocking {
                let peer = try handshaken(server, hello)
                peer.send(control(.openChannel, 2), OpenChannel(channelID: 1, kind: .call).encoded())
                peer.send(
                    FrameDescriptor(messageID: 3, channelID: 1, methodID: EchoMethods.fail.id, flags: [.data, .endOfStream]),
                    Payload.encoding { $0.writeVarint(404); $0.writeString(message) }.bytes)
                let answer = try frames(until: 1, from: peer).frame
                // An OpenChannel that does not decode: a protocol error, told with GoAway.
                peer.send(control(.openChannel, 4), [0xFF])
                return (answer, try peer.framesUntilClose())
            }
            #expect(answer.payload.count <= maxPayload, "an answer of \(answer.payload.count) bytes")
            let result = try CallResult(decoding: answer.payload.bytes)
            #expect(result.status.code == StatusCode(404))
            #expect(result.status.message.hasSuffix(" (truncated)"), "\(result.status.message)")
            #expect(message.hasPrefix(String(result.status.message.dropLast(" (truncated)".count))), "not a prefix: \(result.status.message)")
            let goAway = try #require(goodbye.last, "no GoAway")
            #expect(goAway.descriptor.methodID == ControlVerb.goAway.rawValue)
            #expect(goAway.payload.count <= maxPayload, "a GoAway of \(goAway.payload.count) bytes")
            let decoded = try GoAway(decoding: goAway.payload.bytes)
            #expect(decoded.reason == .protocolError && decoded.lastChannelID == 1 && !decoded.message.isEmpty, "\(decoded)")
        }
    }
}
