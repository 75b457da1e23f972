import RapaceTestSupport
import Testing

@testable import Rapace

/// Randomised checks of ``WebSocketFrameDecoder`` (RFC 6455 §5): what a browser or a hostile
/// client can send a development server. Seeds are fixed, so a failure replays.
@Suite("WebSocket codec fuzz", .sharesProcess)
struct WebSocketCodecFuzzTests {
    static let maxMessage = 4096

    /// A message stream as a peer may legally send it: messages cut into fragments of random
    /// sizes (empty ones too), pings and pongs between the fragments, lengths in all three
    /// encodings, masked with a fresh key per frame when `masked`, ending with a Close.
    private static func legalStream(_ random: inout FuzzRandom, masked: Bool) -> (bytes: [UInt8], events: [WebSocketEvent]) {
        var bytes: [UInt8] = []
        var events: [WebSocketEvent] = []
        func frame(_ opcode: WebSocketOpcode, fin: Bool = true, _ payload: [UInt8], _ random: inout FuzzRandom) {
            WebSocketFrameEncoder.appendFrame(opcode: opcode, fin: fin, payload: payload, mask: masked ? random.u32() : nil, into: &bytes)
        }
        func control(_ random: inout FuzzRandom) {
            let payload = random.bytes(random.int(0...125))
            if random.chance(50) {
                frame(.ping, payload, &random)
                events.append(.ping(payload))
            } else {
                frame(.pong, payload, &random)
                events.append(.pong(payload))
            }
        }
        for _ in 0..<random.int(1...12) {
            // Sizes around the length encodings' edges (125/126, 65535/65536 is over the limit).
            let size = random.chance(30) ? random.pick([0, 1, 125, 126, 127, 1000, maxMessage]) : random.int(0...maxMessage)
            let message = random.bytes(size)
            let binary = random.chance(80)
            var cuts = Set((0..<random.int(0...4)).map { _ in random.int(0...size) })
            cuts.insert(size)
            var start = 0
            var first = true
            for end in cuts.sorted() {
                frame(first ? (binary ? .binary : .text) : .continuation, fin: end == size, Array(message[start..<end]), &random)
                first = false
                start = end
                if end != size && random.chance(40) { control(&random) }
            }
            events.append(binary ? .binary(message) : .text(message))
            if random.chance(30) { control(&random) }
        }
        let reason = String(decoding: random.bytes(random.int(0...20)).map { 0x61 + $0 % 26 }, as: UTF8.self) + (random.chance(50) ? "é€😀" : "")
        var body = WebSocketFrameEncoder.closeBody(.normal, reason: reason)
        if random.chance(20) { body = [] }
        frame(.close, body, &random)
        events.append(body.isEmpty ? .close(nil, "") : .close(.normal, reason))
        return (bytes, events)
    }

    /// Feeds `bytes` in chunks of random sizes (1 byte to everything), taking events after
    /// each chunk; stops at the first error.
    private static func decode(_ bytes: [UInt8], masked: Bool, _ random: inout FuzzRandom) -> (events: [WebSocketEvent], error: WebSocketProtocolError?) {
        var decoder = WebSocketFrameDecoder(expectMasked: masked, maxMessageSize: maxMessage)
        var events: [WebSocketEvent] = []
        var offset = 0
        while offset < bytes.count {
            let end = min(bytes.count, offset + (random.chance(30) ? 1 : random.int(1...700)))
            decoder.append(bytes[offset..<end])
            offset = end
            do {
                while let event = try decoder.next() { events.append(event) }
            } catch {
                return (events, error)
            }
        }
        return (events, nil)
    }

    @Test("legal streams decode to exactly their messages, however the bytes are split", arguments: [false, true])
    func legalStreams(masked: Bool) {
        for seed in UInt64(1)...300 {
            var random = FuzzRandom(seed: seed &* 7919 &+ (masked ? 1 : 0))
            let (bytes, expected) = Self.legalStream(&random, masked: masked)
            let (events, error) = Self.decode(bytes, masked: masked, &random)
            #expect(error == nil, "seed \(seed): \(String(describing: error))")
            #expect(events == expected, "seed \(seed): \(events.count) events, \(expected.count) expected")
        }
    }

    @Test("mutated streams never crash the decoder: they decode, wait for more, or fail with a close code", arguments: [false, true])
    func mutatedStreams(masked: Bool) {
        let allowedCodes: Set<WebSocketCloseCode> = [.protocolError, .invalidPayload, .messageTooBig]
        var failures = 0
        for seed in UInt64(1)...600 {
            var random = FuzzRandom(seed: seed &* 104_729 &+ (masked ? 1 : 0))
            var (bytes, _) = Self.legalStream(&random, masked: masked)
            for _ in 0..<random.int(1...6) {
                let index = random.below(bytes.count)
                switch random.below(4) {
                case 0: bytes[index] ^= UInt8(1) << UInt8(random.below(8))  // flip a bit
                case 1: bytes[index] = UInt8(truncatingIfNeeded: random.next())  // a random byte
                case 2: bytes.insert(contentsOf: random.bytes(random.int(1...12)), at: index)  // garbage
                default: bytes.removeSubrange(index..<min(bytes.count, index + random.int(1...12)))  // a cut
                }
                if bytes.isEmpty { break }
            }
            let (events, error) = Self.decode(bytes, masked: masked, &random)
            if let error {
                failures += 1
                #expect(allowedCodes.contains(error.closeCode), "seed \(seed): \(error)")
            }
            for case .binary(let message) in events { #expect(message.count <= Self.maxMessage, "seed \(seed)") }
            for case .text(let message) in events { #expect(message.count <= Self.maxMessage, "seed \(seed)") }
            for case .ping(let payload) in events { #expect(payload.count <= 125, "seed \(seed)") }
            for case .pong(let payload) in events { #expect(payload.count <= 125, "seed \(seed)") }
        }
        // Most mutations hit a header or a mask bit: the fuzz must reach the error paths.
        #expect(failures > 100, "only \(failures) of 600 mutated streams failed to decode")
    }
}
