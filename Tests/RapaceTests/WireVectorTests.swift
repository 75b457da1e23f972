import Foundation
import RapaceTestSupport
import Testing

@testable import Rapace

/// Loads `vectors.json`: the shared contract beside the repository when present,
/// otherwise the committed copy (which must then equal the contract).
enum Vectors {
    static let sharedURL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("shared/spec/vectors.json")
    static let copyURL = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Vectors/vectors.json")

    static func load() throws -> [String: Any] {
        let url = FileManager.default.fileExists(atPath: sharedURL.path) ? sharedURL : copyURL
        let data = try Data(contentsOf: url)
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw TestFailure("vectors.json is not an object")
        }
        return object
    }

    static func hex(_ text: String) -> [UInt8] {
        var bytes: [UInt8] = []
        var index = text.startIndex
        while index < text.endIndex {
            let next = text.index(index, offsetBy: 2)
            bytes.append(UInt8(text[index..<next], radix: 16)!)
            index = next
        }
        return bytes
    }
}

func hexString(_ bytes: [UInt8]) -> String { bytes.map { String(format: "%02x", $0) }.joined() }

@Suite("Wire protocol vectors", .sharesProcess)
struct WireVectorTests {
    @Test("the committed copy of vectors.json equals the shared contract")
    func copyMatchesContract() throws {
        guard FileManager.default.fileExists(atPath: Vectors.sharedURL.path) else { return }
        #expect(try Data(contentsOf: Vectors.sharedURL) == Data(contentsOf: Vectors.copyURL))
    }

    @Test("every method id vector")
    func methodIDs() throws {
        let vectors = try #require(try Vectors.load()["method_ids"] as? [[String: String]])
        #expect(vectors.count >= 15)
        for vector in vectors {
            let name = try #require(vector["name"])
            let expected = try #require(UInt32(vector["id"]!.dropFirst(2), radix: 16))
            #expect(MethodID.compute(name) == expected, "\(name)")
            // The Swift spelling maps to the same wire name.
            let parts = name.split(separator: ".")
            let camel = parts[1].split(separator: "_").enumerated().map { $0.offset == 0 ? String($0.element) : $0.element.capitalized }.joined()
            #expect(MethodID.compute(service: String(parts[0]), method: camel) == expected, "\(name) from \(camel)")
        }
    }

    @Test("snake_case conversion")
    func snakeCase() {
        #expect(MethodID.snakeCase("getStatus") == "get_status")
        #expect(MethodID.snakeCase("newSpan") == "new_span")
        #expect(MethodID.snakeCase("echo") == "echo")
        #expect(MethodID.snakeCase("parseURLQuickly") == "parse_url_quickly")
        #expect(MethodID.snakeCase("setFilter") == "set_filter")
    }

    @Test("every control payload vector encodes and decodes")
    func controlPayloads() throws {
        let vectors = try #require(try Vectors.load()["control_payloads"] as? [String: String])
        var checked = 0
        for (name, hex) in vectors {
            let bytes = Vectors.hex(hex)
            let message: any WireMessage
            switch name {
            case "Hello(initiator, required=0x2, supported=0xE, limits=(16 MiB,0,0), methods=[], params=[])":
                message = Hello(role: .initiator, requiredFeatures: FeatureSet(rawValue: 0x2), supportedFeatures: FeatureSet(rawValue: 0xE), limits: Limits(maxPayloadSize: 16 << 20, maxChannels: 0, maxPendingCalls: 0))
            case "Hello(acceptor, same features, methods=[Echo.echo, zero hash, name])":
                message = Hello(role: .acceptor, requiredFeatures: FeatureSet(rawValue: 0x2), supportedFeatures: FeatureSet(rawValue: 0xE), limits: Limits(maxPayloadSize: 16 << 20, maxChannels: 0, maxPendingCalls: 0), methods: [MethodInfo(methodID: 0x3E89_5C50, name: "Echo.echo")])
            case "OpenChannel(channel 1, kind Call, attach None, metadata [], initial_credits u32::MAX)":
                message = OpenChannel(channelID: 1, kind: .call, initialCredits: .max)
            case "OpenChannel(channel 3, kind Stream, attach None, metadata [(\"rapace.deadline_remaining_ms\", 1500 as u32 LE)], initial_credits 65536)":
                message = OpenChannel(channelID: 3, kind: .stream, metadata: [MetadataEntry("rapace.deadline_remaining_ms", [0xDC, 0x05, 0, 0])], initialCredits: 65536)
            case "CancelChannel(channel 5, DeadlineExceeded)":
                message = CancelChannel(channelID: 5, reason: .deadlineExceeded)
            case "GrantCredits(channel 3, 4096)":
                message = GrantCredits(channelID: 3, bytes: 4096)
            case "CloseChannel(channel 7, Normal)":
                message = CloseChannel(channelID: 7, reason: .normal)
            case "CloseChannel(channel 7, Error(\"boom\"))":
                message = CloseChannel(channelID: 7, reason: .error("boom"))
            case "GoAway(Shutdown, last_channel_id 9, \"bye\", [])":
                message = GoAway(reason: .shutdown, lastChannelID: 9, message: "bye")
            case "Ping payload":
                // Ping carries 8 raw bytes, echoed by Pong: checked through a session below.
                #expect(bytes.count == 8)
                checked += 1
                continue
            default:
                Issue.record("unmapped control vector: \(name)")
                continue
            }
            #expect(hexString(message.encoded()) == hex, "\(name)")
            let decoded = try type(of: message).init(decoding: bytes)
            #expect(hexString(decoded.encoded()) == hex, "\(name) round trip")
            #expect(String(describing: decoded) == String(describing: message), "\(name) decodes to the value")
            checked += 1
        }
        #expect(checked == vectors.count)
    }

    @Test("every call result vector")
    func callResults() throws {
        let vectors = try #require(try Vectors.load()["call_results"] as? [String: String])
        for (name, hex) in vectors {
            let expected: CallResult
            switch name {
            case "CallResult OK, body = postcard(Int32 5)": expected = CallResult(status: .ok, body: [0x0A])
            case "CallResult OK, unit return (body = empty bytes)": expected = CallResult(status: .ok, body: [])
            case "CallResult UNIMPLEMENTED(12) \"unknown method\", body None": expected = CallResult(status: Status(code: .unimplemented, message: "unknown method"), body: nil)
            case "CallResult INTERNAL(13) \"oops\", trailers [(\"k\", [1])], body None": expected = CallResult(status: Status(code: .internal, message: "oops"), trailers: [MetadataEntry("k", [1])], body: nil)
            default:
                Issue.record("unmapped call result vector: \(name)")
                continue
            }
            #expect(hexString(expected.encoded()) == hex, "\(name)")
            #expect(try CallResult(decoding: Vectors.hex(hex)) == expected, "\(name)")
            // The session's decoder agrees.
            let decoded = Session.decodeCallResult(Payload(Vectors.hex(hex)))
            switch (decoded, expected.body) {
            case (.success(let body), let expectedBody?): #expect(body.bytes == expectedBody)
            case (.failure(let error), nil):
                #expect(error.code == expected.status.code)
                #expect(error.message == expected.status.message)
                #expect(error.trailers == expected.trailers)
            default: Issue.record("session decoded \(name) wrongly: \(decoded)")
            }
        }
        // The fast success encoder writes the same bytes.
        var writer = PostcardWriter()
        [UInt8]([0x0A]).withUnsafeBytes { CallResult.encodeSuccess(body: $0, into: &writer) }
        #expect(hexString(writer.bytes) == "0000000001010a")
    }

    @Test("every frame vector: stream framing and the WebSocket message")
    func frames() throws {
        let vectors = try #require(try Vectors.load()["frames"] as? [String: String])
        let helloPayload = Vectors.hex("80800400020e8080800800000000")
        for (name, hex) in vectors {
            var frame: Frame
            var websocket = false
            switch name {
            case "initiator Hello, msg_id 1, channel 0, method 0, flags CONTROL (stream framing)":
                frame = Frame(descriptor: FrameDescriptor(messageID: 1, channelID: 0, methodID: 0, flags: .control), payload: Payload(helloPayload))
            case "OpenChannel(1, Call), msg_id 2, channel 0, method 1, flags CONTROL (stream framing)":
                frame = Frame(descriptor: FrameDescriptor(messageID: 2, channelID: 0, methodID: 1, flags: .control), payload: Payload(OpenChannel(channelID: 1, kind: .call).encoded()))
            case "Echo.add(2, 3) request, msg_id 3, channel 1, flags DATA|EOS (stream framing)":
                frame = Frame(descriptor: FrameDescriptor(messageID: 3, channelID: 1, methodID: 0x2651_F994, flags: [.data, .endOfStream]), payload: Payload([0x04, 0x06]))
            case "Echo.add response, echoes msg_id 3, channel 1, same method id, flags DATA|EOS|RESPONSE (stream framing)":
                frame = Frame(descriptor: FrameDescriptor(messageID: 3, channelID: 1, methodID: 0x2651_F994, flags: [.data, .endOfStream, .response]), payload: Payload(CallResult(status: .ok, body: [0x0A]).encoded()))
            case "20-byte payload on channel 1, msg_id 4, flags DATA: not inline (slot 0, inline area zero), payload after descriptor (stream framing)":
                frame = Frame(descriptor: FrameDescriptor(messageID: 4, channelID: 1, methodID: 0, flags: .data), payload: Payload(Array(0..<20)))
            case "WebSocket binary message for the Echo.add request above (no length prefix)":
                frame = Frame(descriptor: FrameDescriptor(messageID: 3, channelID: 1, methodID: 0x2651_F994, flags: [.data, .endOfStream]), payload: Payload([0x04, 0x06]))
                websocket = true
            default:
                Issue.record("unmapped frame vector: \(name)")
                continue
            }
            frame.prepareForSending()
            let expected = Vectors.hex(hex)
            if websocket {
                let message = frame.descriptor.encodedBytes + frame.payload.bytes
                #expect(hexString(message) == hex, "\(name)")
                let decoded = expected.withUnsafeBytes { FrameDescriptor(decoding: $0.baseAddress!) }
                #expect(decoded == frame.descriptor)
                continue
            }
            var out: [UInt8] = []
            StreamFrameDecoder.encode(frame, into: &out)
            #expect(hexString(out) == hex, "\(name)")
            // Decoding gives the same descriptor and payload.
            var decoder = StreamFrameDecoder(maxPayload: 16 << 20)
            _ = decoder.withWritableSpace { space in
                space.copyBytes(from: expected)
                return expected.count
            }
            let decoded = try #require(try decoder.next())
            #expect(decoded.descriptor == frame.descriptor, "\(name)")
            #expect(decoded.payload.bytes == frame.payload.bytes, "\(name)")
            #expect(try decoder.next() == nil)
        }
    }

    @Test("descriptor round trip keeps every field")
    func descriptorRoundTrip() {
        var descriptor = FrameDescriptor(messageID: 0x0102_0304_0506_0708, channelID: 0x1122_3344, methodID: 0xDEAD_BEEF, payloadSlot: 7, payloadGeneration: 9, payloadOffset: 11, payloadLength: 1234, flags: [.data, .credits, .highPriority], creditGrant: 77, deadlineNanoseconds: 42)
        descriptor.inlinePayload = [UInt8](1...16).withUnsafeBytes { InlinePayload($0) }
        let bytes = descriptor.encodedBytes
        #expect(bytes.count == 64)
        let decoded = bytes.withUnsafeBytes { FrameDescriptor(decoding: $0.baseAddress!) }
        #expect(decoded == descriptor)
        #expect(Array(bytes[48..<64]) == Array(1...16))
    }
}
