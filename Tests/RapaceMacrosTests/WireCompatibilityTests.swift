import EchoService
import Foundation
import GeneratedEcho
import RapaceMacros
import RapaceTestSupport
import Synchronization
import Testing

@testable import RapaceMacrosImplementation


/// Method ids of the protocol's vectors (`name` → `id`), from the committed copy.
private func vectorIDs() throws -> [String: UInt32] {
    let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("RapaceTests/Vectors/vectors.json")
    let root = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any])
    let entries = try #require(root["method_ids"] as? [[String: String]])
    var ids: [String: UInt32] = [:]
    for entry in entries {
        let name = try #require(entry["name"])
        guard let hex = entry["id"]?.dropFirst(2), let id = UInt32(hex, radix: 16) else {
            throw TestFailure("bad id in vector \(name)")
        }
        ids[name] = id
    }
    return ids
}

/// Generated wire names and ids equal the vectors (so Swift services hash like their Rust
/// twins), and generated code interoperates with the hand-written Echo.
@Suite("@Service: wire names, ids and interoperability", .sharesProcess)
struct WireCompatibilityTests {
    @Test("TracingSink.new_span gets id 0xEF2001DF through the macro")
    func tracingSinkNewSpan() {
        #expect(TracingSinkMethods.newSpan.fullName == "TracingSink.new_span")
        #expect(TracingSinkMethods.newSpan.id == 0xEF20_01DF)
        #expect(TracingSinkMethods.newSpan.kind == .unary)
    }

    @Test("every generated id equals the vectors: Echo, TracingSink, TracingConfig, Calculator")
    func idsEqualVectors() throws {
        let vectors = try vectorIDs()
        let generated =
            GeneratedEcho.EchoMethods.all + TracingSinkMethods.all + TracingConfigMethods.all + CalculatorMethods.all
        for method in generated {
            #expect(vectors[method.fullName] == method.id, "\(method)")
        }
        #expect(Set(generated.map(\.fullName)) == Set(vectors.keys))
    }

    @Test("the generated Echo table equals the hand-written one")
    func echoTables() {
        #expect(GeneratedEcho.EchoMethods.all == EchoService.EchoMethods.all)
    }

    @Test("the service and method wire-name overrides")
    func overrides() {
        #expect(LegacyEchoMethods.say == MethodDescriptor(service: "Echo", method: "echo", id: 0x3E89_5C50, kind: .unary))
        #expect(LegacyEchoMethods.plus.id == EchoService.EchoMethods.add.id)
        #expect(LegacyEchoMethods.countDown.id == EchoService.EchoMethods.countdown.id)
        #expect(LegacyEchoMethods.countDown.kind == .serverStream)
    }

    @Test("the macro's snake_case and hash agree with the runtime's MethodID")
    func macroAgreesWithRuntime() {
        let names = [
            "newSpan", "getStatus", "parseURLQuickly", "add", "a", "ABC", "x2y", "userID", "HTTPServer", "é",
            "snake_case", "twoWordsHere", "already_snake", "getV2Data", "m2976258814",
        ]
        for name in names {
            #expect(WireNames.snakeCase(name) == MethodID.snakeCase(name), "\(name)")
            #expect(WireNames.methodID("S." + name) == MethodID.compute("S." + name), "\(name)")
        }
        #expect(WireNames.methodID("Zero.m2976258814") == 0)
    }

    @Test("the generated client against the hand-written server, and the reverse", arguments: TestTransport.allCases)
    func generatedAndHandWrittenInteroperate(transport: TestTransport) async throws {
        try await withConnection(transport, serving: [EchoService.EchoServer(EchoService.DefaultEcho())]) { (session: Session) async throws in
            let echo = GeneratedEcho.EchoClient(session)
            #expect(try await echo.echo("héllo") == "héllo")
            #expect(try await echo.add(.max, 1) == .min)
            #expect(await rpcError { try await echo.fail(code: 404, message: "nope") } == RPCError(StatusCode(404), "nope"))
            var items: [UInt32] = []
            for try await item in try echo.countdown(from: 3) { items.append(item) }
            #expect(items == [3, 2, 1])
            #expect(try await echo.checksum(Array("abc".utf8)) == 0xE71F_A219_0541_574B)
            // Refused before allocating 4 GiB; the session serves on.
            #expect(await rpcError { _ = try await echo.blob(size: .max) } == RPCError(.resourceExhausted, "blob of 4294967295 bytes exceeds the max payload size of 16777216 bytes"))
            try await echo.sleep(milliseconds: 1)
            #expect(try await echo.blob(size: 300).last == UInt8(299 % 251))

            let legacy = LegacyEchoClient(session)
            #expect(try await legacy.say("old") == "old")
            #expect(try await legacy.plus(20, 22) == 42)
            var legacyItems: [UInt32] = []
            for try await item in try legacy.countDown(from: 2) { legacyItems.append(item) }
            #expect(legacyItems == [2, 1])
        }
        try await withConnection(transport, serving: [GeneratedEcho.EchoServer(GeneratedEcho.DefaultEcho())]) { (session: Session) async throws in
            let echo = EchoService.EchoClient(session)
            #expect(try await echo.echo("héllo") == "héllo")
            #expect(try await echo.add(.max, 1) == .min)
            #expect(await rpcError { try await echo.fail(code: 404, message: "nope") } == RPCError(StatusCode(404), "nope"))
            var items: [UInt32] = []
            for try await item in echo.countdown(from: 3) { items.append(item) }
            #expect(items == [3, 2, 1])
            let data = (0..<70_000).map { UInt8(truncatingIfNeeded: $0) }
            #expect(try await echo.checksum(data) == MethodID.fnv1a64(data))
            #expect(await rpcError { _ = try await echo.blob(size: .max) } == RPCError(.resourceExhausted, "blob of 4294967295 bytes exceeds the max payload size of 16777216 bytes"))
            try await echo.sleep(milliseconds: 1)
            let blob = try await echo.blob(size: 1 << 20)
            #expect(blob.count == 1 << 20 && blob[251] == 0)
        }
    }

    @Test("a byte-buffer argument is read as a view of a borrowed payload, without a copy")
    func byteBufferIsNotCopied() throws {
        final class Slot: PayloadStorage, @unchecked Sendable {
            // @unchecked Sendable: immutable after init; freed in deinit.
            let bytes: UnsafeRawBufferPointer
            init(_ contents: [UInt8]) {
                let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: contents.count, alignment: 8)
                contents.withUnsafeBytes { memory.copyMemory(from: $0) }
                bytes = UnsafeRawBufferPointer(memory)
            }
            deinit { bytes.deallocate() }
        }
        // Arguments of `slice(_:from:count:)`: a 5-byte buffer, then 1 and 3.
        let slot = Slot([0x05, 10, 20, 30, 40, 50, 0x01, 0x03])
        let request = Payload(borrowing: slot)
        let (data, start, count) = try request.decodeArguments {
            (try $0.readByteBuffer(), try $0.read(UInt32.self), try $0.read(UInt32.self))
        }
        #expect(data.bytes == [10, 20, 30, 40, 50] && start == 1 && count == 3)
        let view = try #require(data.externalStorage)
        #expect(view.bytes.baseAddress == slot.bytes.baseAddress.map { $0 + 1 })
    }

    @Test("the primitives' fast paths encode and decode exactly as the postcard coder does")
    func primitiveFastPaths() throws {
        func check<T: Codable & Sendable & Equatable>(_ values: [T], sourceLocation: SourceLocation = #_sourceLocation) throws {
            for value in values {
                let fast = try Payload.encodingArguments { try $0.write(value) }
                let reference = try Payload.encoding(value)
                #expect(fast.bytes == reference.bytes, "\(T.self) \(value)", sourceLocation: sourceLocation)
                #expect(try fast.decodeArguments { try $0.read(T.self) } == value, sourceLocation: sourceLocation)
                #expect(try reference.decode(as: T.self) == value, sourceLocation: sourceLocation)
            }
        }
        try check(["", "héllo", String(repeating: "x", count: 300)])
        try check([UInt8.min, 1, 127, 128, .max])
        try check([Int8.min, -1, 0, 1, .max])
        try check([UInt16.min, 127, 128, .max])
        try check([Int16.min, -65, 64, .max])
        try check([UInt32.min, 127, 128, 300, .max])
        try check([Int32.min, -1, 0, 1, .max])
        try check([UInt64.min, 1 << 35, .max])
        try check([Int64.min, -(1 << 40), .max])
        try check([Int.min, -1, 0, .max])
        try check([UInt.min, .max])
        try check([false, true])
        try check([0.0, -1.5, Double.greatestFiniteMagnitude, .infinity])
        try check([Float(0), -2.25, .leastNonzeroMagnitude])
        try check([[UInt8](), [0, 1, 255]])
        try check([Point(x: -1, y: 1)])
        try check([[Point(x: 1, y: 2)], []])
        try check([Int32?.none, 5])

        // Out of range for the declared type: rejected like the generic decoder does.
        let large = try Payload.encodingArguments { try $0.write(UInt64(UInt32.max) + 1) }
        #expect(throws: RPCError.self) { _ = try large.decodeArguments { try $0.read(UInt32.self) } }
        #expect(throws: RPCError.self) { _ = try large.decodeArguments { try $0.read(Int16.self) } }
        #expect(throws: RPCError.self) { _ = try Payload([0x02]).decodeArguments { try $0.read(Bool.self) } }
        #expect(throws: RPCError.self) { _ = try Payload([0x01, 0xFF]).decodeArguments { try $0.read(String.self) } }
    }

    @Test("generated coding maps failures to the status each side should see")
    func codingErrors() {
        #expect(throws: RPCError.self) { try Payload([0x80]).decodeNoArguments() }
        do throws(RPCError) {
            _ = try Payload([0x80]).decodeArguments { try $0.read(UInt32.self) }
        } catch {
            #expect(error.code == .invalidArgument)
        }
        do throws(RPCError) {
            _ = try Payload([0x01, 0x02]).decodeResult { try $0.read(UInt8.self) }
        } catch {
            #expect(error.code == .decodeError)
        }
        do throws(RPCError) {
            try Payload([0x00]).decodeEmptyResult()
        } catch {
            #expect(error.code == .decodeError)
        }
    }
}
