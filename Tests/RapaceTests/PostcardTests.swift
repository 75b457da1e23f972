import Foundation
import RapaceTestSupport
import Testing

@testable import Rapace

// MARK: - Helpers

private func bytes(fromHex hex: String) -> [UInt8]? {
    let digits = Array(hex.utf8)
    guard digits.count % 2 == 0 else { return nil }
    var result: [UInt8] = []
    result.reserveCapacity(digits.count / 2)
    var index = 0
    while index < digits.count {
        guard let byte = UInt8(String(decoding: digits[index..<index + 2], as: UTF8.self), radix: 16) else {
            return nil
        }
        result.append(byte)
        index += 2
    }
    return result
}

private func hex(_ bytes: [UInt8]) -> String {
    bytes.map { byte in
        let digits = String(byte, radix: 16)
        return digits.count == 1 ? "0" + digits : digits
    }.joined()
}

/// Runs `body` and checks that it throws a `PostcardError` with `code`.
@discardableResult
private func expectPostcardError(
    _ code: PostcardError.Code,
    _ comment: Comment? = nil,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> Void
) -> PostcardError? {
    do {
        try body()
        Issue.record("expected PostcardError.\(code), nothing was thrown. \(comment?.rawValue ?? "")",
                     sourceLocation: sourceLocation)
        return nil
    } catch let error as PostcardError {
        #expect(error.code == code, "\(error) \(comment?.rawValue ?? "")", sourceLocation: sourceLocation)
        return error
    } catch {
        Issue.record("expected PostcardError.\(code), got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Checks that `body` throws a `PostcardError` (of any code).
private func expectAnyPostcardError(
    _ comment: Comment? = nil,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> Void
) {
    do {
        try body()
        Issue.record("expected a PostcardError, nothing was thrown. \(comment?.rawValue ?? "")",
                     sourceLocation: sourceLocation)
    } catch is PostcardError {
    } catch {
        Issue.record("expected a PostcardError, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
}

/// Encodes `value`, checks the bytes if given, decodes them back and checks equality.
private func roundTrip<T: Codable & Equatable>(
    _ value: T,
    hex expectedHex: String? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let encoded = try Postcard.encode(value)
    if let expectedHex {
        #expect(hex(encoded) == expectedHex, "encoding of \(value)", sourceLocation: sourceLocation)
    }
    let decoded = try Postcard.decode(T.self, from: encoded)
    #expect(decoded == value, sourceLocation: sourceLocation)
}

/// A small deterministic generator (SplitMix64) so property loops are reproducible.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Random 64-bit patterns whose bit lengths are spread evenly over 0…64, so every varint
/// length is exercised, plus the edges.
private func randomPatterns(count: Int, seed: UInt64) -> [UInt64] {
    var rng = SplitMix64(seed: seed)
    var values: [UInt64] = [0, 1, 0x7f, 0x80, 0x3fff, 0x4000, .max, .max - 1, 1 << 63, (1 << 63) - 1]
    for _ in 0..<count {
        let bits = Int.random(in: 0...64, using: &rng)
        let raw = rng.next()
        values.append(bits == 64 ? raw : raw & ((1 << UInt64(bits)) &- 1))
    }
    return values
}

private func varintLength(_ value: UInt64) -> Int {
    value == 0 ? 1 : (64 - value.leadingZeroBitCount + 6) / 7
}

private func encodeVarint(_ value: UInt64) -> [UInt8] {
    var writer = PostcardWriter()
    writer.writeVarint(value)
    return writer.bytes
}

// MARK: - Fixtures

/// Test types, namespaced so they cannot clash with other test files of the target.
enum PostcardFixtures {
    /// A struct with one field of type `T`.
    struct Field<T: Codable & Equatable>: Codable, Equatable {
        var value: T
    }

    /// The spec vector `enum Shape { circle(r: f64) = 0, square(side: u32) = 1 }`.
    enum Shape: Codable, Equatable, Hashable {
        case circle(r: Double)
        case square(side: UInt32)
        enum CodingKeys: Int, CodingKey { case circle, square }
    }

    /// Arguments of `add(a: i32, b: i32)` as a tuple struct.
    struct AddArgs: Codable, Equatable {
        var a: Int32
        var b: Int32
    }

    enum ChannelKind: Codable, Equatable {
        case call, stream, tunnel
        enum CodingKeys: Int, CodingKey { case call, stream, tunnel }
    }

    enum CloseReason: Codable, Equatable {
        case normal
        case error(String)
        enum CodingKeys: Int, CodingKey { case normal, error }
    }

    struct CloseChannel: Codable, Equatable {
        var channelID: UInt32
        var reason: CloseReason
    }

    /// `(String, [u8])` pairs of the control payloads.
    struct MetadataEntry: Codable, Equatable {
        var key: String
        var value: [UInt8]
    }

    struct OpenChannel: Codable, Equatable {
        var channelID: UInt32
        var kind: ChannelKind
        var attach: UInt8?  // always None in the vectors used here
        var metadata: [MetadataEntry]
        var initialCredits: UInt32
    }

    /// `[u8; 32]`: 32 raw bytes, no length, written through a keyed container.
    struct Hash32: Codable, Equatable {
        var bytes: [UInt8]

        init(_ bytes: [UInt8]) { self.bytes = bytes }

        private struct Index: CodingKey {
            var intValue: Int?
            var stringValue: String { "\(intValue ?? 0)" }
            init(intValue: Int) { self.intValue = intValue }
            init?(stringValue: String) { return nil }
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: Index.self)
            for (index, byte) in bytes.enumerated() {
                try container.encode(byte, forKey: Index(intValue: index))
            }
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: Index.self)
            bytes = try (0..<32).map { try container.decode(UInt8.self, forKey: Index(intValue: $0)) }
        }
    }

    enum Role: Codable, Equatable {
        case initiator, acceptor
        enum CodingKeys: Int, CodingKey { case initiator, acceptor }
    }

    struct Limits: Codable, Equatable {
        var maxPayloadSize: UInt32
        var maxChannels: UInt32
        var maxPendingCalls: UInt32
    }

    struct MethodInfo: Codable, Equatable {
        var methodID: UInt32
        var sigHash: Hash32
        var name: String?
    }

    struct Hello: Codable, Equatable {
        var protocolVersion: UInt32
        var role: Role
        var requiredFeatures: UInt64
        var supportedFeatures: UInt64
        var limits: Limits
        var methods: [MethodInfo]
        var params: [MetadataEntry]
    }

    /// A recursive enum with labeled, unlabeled, multi-value and empty cases.
    indirect enum Expr: Codable, Equatable, Hashable {
        case literal(Int64)
        case negate(Expr)
        case add(Expr, Expr)
        case variable(name: String, scope: UInt8?)
        case empty
        enum CodingKeys: Int, CodingKey { case literal, negate, add, variable, empty }
    }

    /// An enum whose CodingKeys have no integer values: not representable in postcard.
    enum StringKeyed: Codable, Equatable {
        case one(UInt8)
        case two
    }

    enum Level: UInt8, Codable {
        case low = 1, high = 2
    }

    struct Inner: Codable, Equatable, Hashable {
        var id: UInt64
        var tags: [String]
        var score: Double?
    }

    struct Everything: Codable, Equatable {
        var flag: Bool
        var i8: Int8
        var i16: Int16
        var i32: Int32
        var i64: Int64
        var int: Int
        var u8: UInt8
        var u16: UInt16
        var u32: UInt32
        var u64: UInt64
        var uint: UInt
        var float: Float
        var double: Double
        var text: String
        var blob: [UInt8]
        var inner: Inner?
        var doubleOptional: Int??
        var optionalList: [UInt32?]
        var inners: [Inner]
        var map: [String: [UInt32]]
        var intMap: [Int: Inner]
        var set: Set<Int16>
        var shape: Shape
        var shapes: [Shape?]
        var expr: Expr
        var contiguous: ContiguousArray<UInt16>
        var nestedLists: [[String]]
        var optFlag: Bool?
        var optI8: Int8?
        var optI16: Int16?
        var optI32: Int32?
        var optI64: Int64?
        var optInt: Int?
        var optU8: UInt8?
        var optU16: UInt16?
        var optU32: UInt32?
        var optU64: UInt64?
        var optUInt: UInt?
        var optFloat: Float?
        var optDouble: Double?
        var optText: String?
        var optInner: Inner?
    }

    static func everything(seed: UInt64, present: Bool) -> Everything {
        var rng = SplitMix64(seed: seed)
        let inner = Inner(id: rng.next(), tags: ["a", "βγ", ""], score: present ? -2.25 : nil)
        return Everything(
            flag: present, i8: -5, i16: .min, i32: -123_456, i64: .min, int: .max, u8: 255, u16: .max,
            u32: 70_000, u64: .max, uint: 12_345, float: 3.5, double: -0.0, text: "héllo ✓ 🎉",
            blob: [0, 1, 2, 255], inner: present ? inner : nil, doubleOptional: present ? .some(nil) : .some(9),
            optionalList: [1, nil, 300], inners: [inner, inner], map: ["x": [1, 2], "": []],
            intMap: [-1: inner], set: [1, -1, 300], shape: .circle(r: 1.5),
            shapes: [.square(side: 4), nil], expr: .add(.literal(-7), .negate(.variable(name: "x", scope: 3))),
            contiguous: [1, 500], nestedLists: [[], ["a"], ["b", "c"]],
            optFlag: present ? false : nil, optI8: present ? -1 : nil, optI16: present ? 300 : nil,
            optI32: present ? .min : nil, optI64: present ? .max : nil, optInt: present ? -1 : nil,
            optU8: present ? 7 : nil, optU16: present ? 65_535 : nil, optU32: present ? 0 : nil,
            optU64: present ? 1 << 40 : nil, optUInt: present ? 5 : nil, optFloat: present ? .infinity : nil,
            optDouble: present ? .pi : nil, optText: present ? "" : nil, optInner: present ? inner : nil)
    }

    /// A hand-written sequence type going through an unkeyed container (count prefixed).
    struct Samples: Codable, Equatable {
        var values: [UInt16]
        var groups: [[Int8]]

        init(values: [UInt16], groups: [[Int8]]) {
            self.values = values
            self.groups = groups
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.unkeyedContainer()
            for value in values { try container.encode(value) }
            var nested = container.nestedUnkeyedContainer()
            for group in groups {
                var inner = nested.nestedUnkeyedContainer()
                for element in group { try inner.encode(element) }
            }
        }

        init(from decoder: any Decoder) throws {
            var container = try decoder.unkeyedContainer()
            guard let count = container.count else { throw PostcardError(code: .unsupportedType, message: "no count") }
            values = []
            while container.count.map({ container.currentIndex < $0 - 1 }) ?? false {
                values.append(try container.decode(UInt16.self))
            }
            #expect(values.count == count - 1)
            var nested = try container.nestedUnkeyedContainer()
            groups = []
            while !nested.isAtEnd {
                var inner = try nested.nestedUnkeyedContainer()
                var group: [Int8] = []
                while !inner.isAtEnd { group.append(try inner.decode(Int8.self)) }
                groups.append(group)
            }
            #expect(container.isAtEnd)
        }
    }

    /// An enum with a hand-written conformance using `nestedUnkeyedContainer(forKey:)` and
    /// asking `allKeys` more than once, and late.
    enum Op: Codable, Equatable {
        case push([UInt8])
        case pop
        enum CodingKeys: Int, CodingKey { case push, pop }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            switch self {
            case .push(let bytes):
                var payload = container.nestedUnkeyedContainer(forKey: .push)
                for byte in bytes { try payload.encode(byte) }
            case .pop:
                _ = container.nestedContainer(keyedBy: CodingKeys.self, forKey: .pop)
            }
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            guard container.allKeys.count == 1, let key = container.allKeys.first else {
                throw DecodingError.dataCorruptedError(
                    forKey: CodingKeys.pop, in: container, debugDescription: "not exactly one key")
            }
            switch key {
            case .push:
                var payload = try container.nestedUnkeyedContainer(forKey: .push)
                var bytes: [UInt8] = []
                while !payload.isAtEnd { bytes.append(try payload.decode(UInt8.self)) }
                #expect(container.allKeys == [.push])  // asked again after reading on
                self = .push(bytes)
            case .pop:
                _ = try container.nestedContainer(keyedBy: CodingKeys.self, forKey: .pop)
                self = .pop
            }
        }
    }

    /// A struct that groups a field in a nested keyed container without `allKeys`: the
    /// nested container's key index is written and read back.
    struct Grouped: Codable, Equatable {
        var x: UInt8
        var y: UInt8
        enum CodingKeys: Int, CodingKey { case x, group }

        init(x: UInt8, y: UInt8) {
            self.x = x
            self.y = y
        }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(x, forKey: .x)
            var group = container.nestedContainer(keyedBy: CodingKeys.self, forKey: .group)
            try group.encode(y, forKey: .x)
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            x = try container.decode(UInt8.self, forKey: .x)
            let group = try container.nestedContainer(keyedBy: CodingKeys.self, forKey: .group)
            y = try group.decode(UInt8.self, forKey: .x)
        }
    }

    class Base: Codable {
        var a: UInt8
        init(a: UInt8) { self.a = a }
    }

    final class Derived: Base, Equatable {
        var b: String

        init(a: UInt8, b: String) {
            self.b = b
            super.init(a: a)
        }

        private enum CodingKeys: String, CodingKey { case b }

        override func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(b, forKey: .b)
            try super.encode(to: container.superEncoder())
        }

        required init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            b = try container.decode(String.self, forKey: .b)
            try super.init(from: container.superDecoder())
        }

        static func == (lhs: Derived, rhs: Derived) -> Bool { lhs.a == rhs.a && lhs.b == rhs.b }
    }

    /// Reads an Optional through a single-value container's `decodeNil()`.
    struct ManualOptional: Decodable, Equatable {
        var value: UInt32?
        init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            value = container.decodeNil() ? nil : try container.decode(UInt32.self)
        }
        init(value: UInt32?) { self.value = value }
    }

    /// A type whose own `init(from:)` rejects a value with a `DecodingError`.
    struct Even: Codable, Equatable {
        var value: UInt8
        init(_ value: UInt8) { self.value = value }
        init(from decoder: any Decoder) throws {
            let container = try decoder.singleValueContainer()
            value = try container.decode(UInt8.self)
            guard value % 2 == 0 else {
                throw DecodingError.dataCorruptedError(in: container, debugDescription: "\(value) is odd")
            }
        }
        func encode(to encoder: any Encoder) throws {
            var container = encoder.singleValueContainer()
            try container.encode(value)
        }
    }
}

private typealias F = PostcardFixtures

// MARK: - Vectors

@Suite("Postcard spec vectors", .sharesProcess)
struct PostcardVectorTests {
    struct Vector {
        var type: String
        var value: Any
        var hex: String
    }

    /// `/work/shared/spec/vectors.json` in the checkout layout (the package root's parent
    /// holds `shared/`), else the copy in `Vectors/` beside this file.
    static func vectorsURL() -> URL? {
        let testFile = URL(fileURLWithPath: #filePath)
        let testDirectory = testFile.deletingLastPathComponent()
        let packageRoot = testDirectory.deletingLastPathComponent().deletingLastPathComponent()
        let candidates = [
            packageRoot.deletingLastPathComponent().appendingPathComponent("shared/spec/vectors.json"),
            testDirectory.appendingPathComponent("Vectors/vectors.json"),
        ]
        return candidates.first { FileManager.default.fileExists(atPath: $0.path) }
    }

    static func loadVectors() throws -> [Vector] {
        let url = try #require(vectorsURL(), "vectors.json not found")
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: url))
        let root = try #require(json as? [String: Any])
        let entries = try #require(root["postcard"] as? [[String: Any]], "no \"postcard\" array")
        return try entries.map { entry in
            Vector(
                type: try #require(entry["type"] as? String),
                value: try #require(entry["value"]),
                hex: try #require(entry["hex"] as? String))
        }
    }

    /// Encodes `value` (which must equal the vector's hex), decodes the hex (which must give
    /// `value`), and does the same with the value inside a struct field and an array.
    private func check<T: Codable & Equatable>(
        _ value: T?, _ vector: Vector, sourceLocation: SourceLocation = #_sourceLocation
    ) throws {
        let value = try #require(value, "cannot read value \(vector.value) of \(vector.type)",
                                 sourceLocation: sourceLocation)
        let expected = try #require(bytes(fromHex: vector.hex), "bad hex", sourceLocation: sourceLocation)
        #expect(try Postcard.encode(value) == expected, "encode \(vector.type)", sourceLocation: sourceLocation)
        #expect(try Postcard.decode(T.self, from: expected) == value, "decode \(vector.type)",
                sourceLocation: sourceLocation)

        // The same value as a struct field (keyed-container overloads) and as the only
        // element of an array (count prefix + generic entry point).
        typealias Field = PostcardFixtures.Field<T>
        #expect(try Postcard.encode(Field(value: value)) == expected, sourceLocation: sourceLocation)
        #expect(try Postcard.decode(Field.self, from: expected) == Field(value: value), sourceLocation: sourceLocation)
        #expect(try Postcard.encode([value]) == [1] + expected, sourceLocation: sourceLocation)
        #expect(try Postcard.decode([T].self, from: [1] + expected) == [value], sourceLocation: sourceLocation)

        // Through a reader positioned after other data.
        let framed: [UInt8] = [0xAA] + expected
        try framed.withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            #expect(try reader.readByte() == 0xAA)
            #expect(try reader.decode(T.self) == value, sourceLocation: sourceLocation)
            try reader.finish()
        }
    }

    @Test("every postcard vector encodes and decodes exactly")
    func allVectors() throws {
        let vectors = try Self.loadVectors()
        #expect(vectors.count >= 17)
        for vector in vectors {
            let v = vector.value
            switch vector.type {
            case "bool": try check(v as? Bool, vector)
            case "u8": try check(v as? UInt8, vector)
            case "u16": try check(v as? UInt16, vector)
            case "u32": try check(v as? UInt32, vector)
            case "u64": try check(v as? UInt64, vector)
            case "i8": try check(v as? Int8, vector)
            case "i16": try check(v as? Int16, vector)
            case "i32": try check(v as? Int32, vector)
            case "i64": try check(v as? Int64, vector)
            case "f32": try check(v as? Float, vector)
            case "f64": try check(v as? Double, vector)
            case "String": try check(v as? String, vector)
            case "[UInt8]": try check((v as? [Any])?.compactMap { $0 as? UInt8 }, vector)
            case "[String]": try check(v as? [String], vector)
            case "Optional<u32>":
                if v is NSNull {
                    try check(Optional<UInt32?>.some(nil), vector)
                } else {
                    try check((v as? UInt32).map { UInt32?.some($0) }, vector)
                }
            case "(i32, i32) as args of add(2, 3)":
                let pair = (v as? [Any])?.compactMap { $0 as? Int32 } ?? []
                try check(pair.count == 2 ? F.AddArgs(a: pair[0], b: pair[1]) : nil, vector)
            case "enum Shape { circle(r: f64) = 0, square(side: u32) = 1 } value square(side: 4)":
                #expect(v as? String == "square(4)")
                try check(F.Shape.square(side: 4), vector)
            default:
                Issue.record("vector type \"\(vector.type)\" has no Swift mapping in PostcardVectorTests")
            }
        }
    }

    @Test("control payload vectors built from Codable types")
    func controlPayloads() throws {
        try roundTrip(F.CloseChannel(channelID: 7, reason: .normal), hex: "0700")
        try roundTrip(F.CloseChannel(channelID: 7, reason: .error("boom")), hex: "070104626f6f6d")
        try roundTrip(
            F.OpenChannel(channelID: 1, kind: .call, attach: nil, metadata: [], initialCredits: .max),
            hex: "01000000ffffffff0f")
        var deadline = PostcardWriter()
        deadline.writeUInt32LE(1500)
        try roundTrip(
            F.OpenChannel(
                channelID: 3, kind: .stream, attach: nil,
                metadata: [F.MetadataEntry(key: "rapace.deadline_remaining_ms", value: deadline.bytes)],
                initialCredits: 65536),
            hex: "030100011c7261706163652e646561646c696e655f72656d61696e696e675f6d7304dc050000808004")
        let limits = F.Limits(maxPayloadSize: 16 << 20, maxChannels: 0, maxPendingCalls: 0)
        try roundTrip(
            F.Hello(protocolVersion: 0x0001_0000, role: .initiator, requiredFeatures: 2, supportedFeatures: 0xE,
                    limits: limits, methods: [], params: []),
            hex: "80800400020e8080800800000000")
        try roundTrip(
            F.Hello(protocolVersion: 0x0001_0000, role: .acceptor, requiredFeatures: 2, supportedFeatures: 0xE,
                    limits: limits,
                    methods: [F.MethodInfo(methodID: 0x3E89_5C50, sigHash: F.Hash32(Array(repeating: 0, count: 32)),
                                           name: "Echo.echo")],
                    params: []),
            hex: "80800401020e80808008000001d0b8a5f403" + String(repeating: "00", count: 32)
                + "01094563686f2e6563686f00")
    }
}

// MARK: - Round trips

@Suite("Postcard Codable round trips", .sharesProcess)
struct PostcardRoundTripTests {
    @Test func everythingRoundTrips() throws {
        for seed in 0..<4 as Range<UInt64> {
            try roundTrip(F.everything(seed: seed, present: true))
            try roundTrip(F.everything(seed: seed, present: false))
        }
    }

    @Test func optionalsHaveTags() throws {
        struct Opts: Codable, Equatable {
            var a: UInt32?
            var b: String?
            var c: Int??
            var d: Int??
        }
        try roundTrip(Opts(a: 7, b: nil, c: .some(nil), d: nil), hex: "0107000100" + "00")
        try roundTrip(Opts(a: nil, b: "x", c: .some(-1), d: .some(.some(1))), hex: "00" + "010178" + "010101" + "010102")
        try roundTrip(UInt32?.none, hex: "00")
        try roundTrip(UInt32?.some(7), hex: "0107")
        try roundTrip(UInt32??.some(nil), hex: "0100")
        try roundTrip(UInt32??.none, hex: "00")
        try roundTrip([1, nil, 3] as [UInt32?], hex: "03010100" + "0103")
        try roundTrip([nil, "a"] as [String?], hex: "0200010161")
        try roundTrip(F.Inner?.some(F.Inner(id: 1, tags: [], score: nil)), hex: "01010000")
    }

    @Test func decodeNilThroughSingleValueContainer() throws {
        #expect(try Postcard.decode(F.ManualOptional.self, from: [0x00]) == F.ManualOptional(value: nil))
        #expect(try Postcard.decode(F.ManualOptional.self, from: [0x01, 0x07]) == F.ManualOptional(value: 7))
        expectPostcardError(.invalidOptionalTag) { _ = try Postcard.decode(F.ManualOptional.self, from: [0x02, 0x07]) }
        expectPostcardError(.unexpectedEnd) { _ = try Postcard.decode(F.ManualOptional.self, from: []) }
        // The standard library's own Optional.init(from:) reads the tag through decodeNil().
        let value = try [UInt8](arrayLiteral: 0x01, 0x2a).withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            let decoder = _PostcardDecoder(reader: reader)
            let value = try UInt32?(from: decoder)
            reader = decoder.reader
            try reader.finish()
            return value
        }
        #expect(value == 42)
    }

    @Test func sequencesAndMaps() throws {
        try roundTrip([] as [UInt32], hex: "00")
        try roundTrip([1, 300] as [UInt32], hex: "0201ac02")
        try roundTrip(["a", "bc"], hex: "020161026263")
        try roundTrip([-1, 1] as [Int8], hex: "02ff01")
        try roundTrip(ContiguousArray<UInt8>([9, 8]), hex: "020908")
        try roundTrip(ContiguousArray<Int64>([-1]), hex: "0101")
        try roundTrip([[1], [2, 3]] as [[UInt8]], hex: "02010102" + "0203")
        try roundTrip([5: "a"] as [UInt8: String], hex: "01050161")
        try roundTrip(["k": true] as [String: Bool], hex: "01016b01")
        try roundTrip([-2: [1]] as [Int: [UInt16]], hex: "01030101")
        try roundTrip(Set<UInt8>([4]), hex: "0104")
        try roundTrip(Set(["x", "y", "z"]))
        try roundTrip(Set([F.Inner(id: 1, tags: ["t"], score: 1), F.Inner(id: 2, tags: [], score: nil)]))
        try roundTrip([[F.Shape.circle(r: 0)]: [F.Expr.empty]] as [[F.Shape]: [F.Expr]])
        let big = (0..<1000).map { UInt32($0 * 7919) }
        try roundTrip(big)
        let dictionary = Dictionary(uniqueKeysWithValues: (0..<300).map { ("key\($0)", $0) })
        try roundTrip(dictionary)
        try roundTrip(Array(repeating: F.Inner(id: 9, tags: ["q"], score: 0.5), count: 130))
    }

    @Test func enums() throws {
        try roundTrip(F.Shape.square(side: 4), hex: "0104")
        try roundTrip(F.Shape.circle(r: 1.5), hex: "00000000000000f83f")
        try roundTrip(F.ChannelKind.call, hex: "00")
        try roundTrip(F.ChannelKind.tunnel, hex: "02")
        try roundTrip(F.CloseReason.error("e"), hex: "010165")
        try roundTrip(F.Expr.empty, hex: "04")
        try roundTrip(F.Expr.literal(-2), hex: "0003")
        try roundTrip(F.Expr.add(.literal(1), .negate(.literal(-1))), hex: "02" + "0002" + "01" + "0001")
        try roundTrip(F.Expr.variable(name: "v", scope: nil), hex: "03017600")
        try roundTrip(F.Expr.variable(name: "v", scope: 5), hex: "0301760105")
        var deep = F.Expr.literal(0)
        for index in 0..<50 { deep = index % 2 == 0 ? .negate(deep) : .add(deep, .empty) }
        try roundTrip(deep)
        try roundTrip([F.Shape.square(side: 1), .circle(r: -1)])
        try roundTrip([F.Shape.square(side: 2): F.Expr.empty])
        try roundTrip(F.Level.high, hex: "02")
    }

    @Test func enumErrors() throws {
        expectPostcardError(.invalidEnumIndex) { _ = try Postcard.decode(F.Shape.self, from: [0x02, 0x00]) }
        expectPostcardError(.valueOutOfRange) {
            _ = try Postcard.decode(F.ChannelKind.self, from: [0x80, 0x80, 0x80, 0x80, 0x10])
        }
        expectPostcardError(.unexpectedEnd) { _ = try Postcard.decode(F.ChannelKind.self, from: []) }
        let encodeError = expectPostcardError(.unsupportedType) { _ = try Postcard.encode(F.StringKeyed.two) }
        #expect(encodeError?.message.contains("enum CodingKeys: Int, CodingKey") == true)
        expectPostcardError(.unsupportedType) { _ = try Postcard.encode([F.StringKeyed.one(1)]) }
        expectPostcardError(.invalidEnumIndex) { _ = try Postcard.decode(F.StringKeyed.self, from: [0x00, 0x01]) }
        // A raw-value enum meeting an unknown raw value: the stdlib's DecodingError becomes
        // a PostcardError.
        expectPostcardError(.invalidValue) { _ = try Postcard.decode(F.Level.self, from: [0x07]) }
        expectPostcardError(.invalidValue) { _ = try Postcard.decode(F.Even.self, from: [0x03]) }
        #expect(try Postcard.decode(F.Even.self, from: [0x04]) == F.Even(4))
    }

    @Test func unkeyedContainersAreCountPrefixed() throws {
        let samples = F.Samples(values: Array(0..<200), groups: [[1, -1], [], Array(repeating: 5, count: 130)])
        let encoded = try Postcard.encode(samples)
        // 200 values + the nested container = 201 elements, a two-byte count.
        #expect(Array(encoded.prefix(3)) == [0xC9, 0x01, 0x00])
        #expect(try Postcard.decode(F.Samples.self, from: encoded) == samples)
        try roundTrip(F.Samples(values: [], groups: []), hex: "0100")
        try roundTrip(F.Samples(values: [7], groups: [[3]]), hex: "0207" + "01" + "0103")
        try roundTrip(1..<5 as Range<Int>, hex: "02020a")
        try roundTrip(-3...3 as ClosedRange<Int64>, hex: "020506")
        try roundTrip([F.Samples(values: [1], groups: [])])
    }

    @Test func handWrittenEnumsAndNestedContainers() throws {
        try roundTrip(F.Op.push([1, 2]), hex: "00020102")
        try roundTrip(F.Op.pop, hex: "01")
        try roundTrip([F.Op.pop, .push([]), .push(Array(repeating: 9, count: 200))])
        try roundTrip(F.Grouped(x: 5, y: 6), hex: "050106")
        expectPostcardError(.invalidEnumIndex) { _ = try Postcard.decode(F.Grouped.self, from: [0x05, 0x00, 0x06]) }
        expectPostcardError(.invalidEnumIndex) { _ = try Postcard.decode(F.Op.self, from: [0x07]) }
    }

    @Test func foundationDataIsAByteBuffer() throws {
        try roundTrip(Data([1, 2, 3]), hex: "03010203")
        try roundTrip(Data(), hex: "00")
        let large = Data((0..<300).map { UInt8(truncatingIfNeeded: $0) })
        let encoded = try Postcard.encode(large)
        #expect(encoded == (try Postcard.encode(Array(large))))
        #expect(try Postcard.decode(Data.self, from: encoded) == large)
    }

    @Test func classesWithSuperEncoder() throws {
        let value = F.Derived(a: 3, b: "hi")
        let encoded = try Postcard.encode(value)
        #expect(hex(encoded) == "02686903")
        let decoded = try Postcard.decode(F.Derived.self, from: encoded)
        #expect(decoded == value)
    }

    @Test func writerEncodeAppendsAndRollsBack() throws {
        var writer = PostcardWriter(reservingCapacity: 16)
        writer.writeByte(0xEE)
        try writer.encode(UInt32(300))
        try writer.encode(F.Shape.square(side: 1))
        #expect(hex(writer.bytes) == "eeac020101")
        do {
            try writer.encode(F.everything(seed: 1, present: true))
            try writer.encode([F.StringKeyed.two])
            Issue.record("expected an error")
        } catch let error as PostcardError {
            #expect(error.code == .unsupportedType)
        }
        // (Set and Dictionary order differs between instances, so compare decoded values.)
        #expect(Array(writer.bytes.prefix(5)) == [0xEE, 0xAC, 0x02, 0x01, 0x01])
        #expect(writer.bytes.count == 5 + (try Postcard.encode(F.everything(seed: 1, present: true))).count)

        // Several values back to back, read with one reader.
        try writer.bytes.withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            #expect(try reader.readByte() == 0xEE)
            #expect(try reader.decode(UInt32.self) == 300)
            #expect(try reader.decode(F.Shape.self) == .square(side: 1))
            #expect(try reader.decode(F.Everything.self) == F.everything(seed: 1, present: true))
            #expect(reader.isAtEnd)
            try reader.finish()
        }
    }

    @Test func floatsKeepTheirBits() throws {
        for value: Double in [0, -0.0, .infinity, -.infinity, .nan, .signalingNaN, .leastNonzeroMagnitude,
                              .greatestFiniteMagnitude, 1.5] {
            let decoded = try Postcard.decode(Double.self, from: try Postcard.encode(value))
            #expect(decoded.bitPattern == value.bitPattern)
        }
        for value: Float in [0, -0.0, .infinity, .nan, .leastNonzeroMagnitude, .greatestFiniteMagnitude, 1.5] {
            let decoded = try Postcard.decode(Float.self, from: try Postcard.encode(value))
            #expect(decoded.bitPattern == value.bitPattern)
        }
        #expect(hex(try Postcard.encode(Float(1.5))) == "0000c03f")
    }
}

// MARK: - Properties over random values

@Suite("Postcard varint and zigzag properties", .sharesProcess)
struct PostcardPropertyTests {
    @Test func unsignedVarints() throws {
        for pattern in randomPatterns(count: 3000, seed: 0xC0FFEE) {
            let encoded = encodeVarint(pattern)
            #expect(encoded.count == varintLength(pattern))
            #expect(encoded.dropLast().allSatisfy { $0 & 0x80 != 0 } && encoded.last.map { $0 & 0x80 == 0 } == true)
            #expect(try Postcard.encode(pattern) == encoded)
            #expect(try Postcard.decode(UInt64.self, from: encoded) == pattern)
            #expect(try Postcard.decode(UInt.self, from: encoded) == UInt(pattern))
            encoded.withUnsafeBytes { raw in
                var reader = PostcardReader(raw)
                #expect((try? reader.readVarint64()) == pattern)
                #expect(reader.isAtEnd)
            }

            // Narrower widths: exact when the value fits, valueOutOfRange when it does not.
            if let value = UInt32(exactly: pattern) {
                #expect(try Postcard.encode(value) == encoded)
                #expect(try Postcard.decode(UInt32.self, from: encoded) == value)
            } else {
                expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(UInt32.self, from: encoded) }
            }
            if let value = UInt16(exactly: pattern) {
                #expect(try Postcard.encode(value) == encoded)
                #expect(try Postcard.decode(UInt16.self, from: encoded) == value)
            } else {
                expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(UInt16.self, from: encoded) }
            }

            // Overlong forms up to 10 bytes decode to the same value.
            if encoded.count < 10 {
                var overlong = encoded
                overlong[overlong.count - 1] |= 0x80
                overlong += Array(repeating: 0x80, count: 9 - encoded.count) + [0x00]
                #expect(overlong.count == 10)
                #expect(try Postcard.decode(UInt64.self, from: overlong) == pattern)
            }
        }
    }

    @Test func signedZigZag() throws {
        for pattern in randomPatterns(count: 3000, seed: 0xBADC0DE) {
            let value = Int64(bitPattern: pattern)
            let zigzag = UInt64(bitPattern: (value << 1) ^ (value >> 63))
            #expect(zigzag >> 1 == UInt64(value.magnitude) - (value < 0 ? 1 : 0))
            var writer = PostcardWriter()
            writer.writeZigZag(value)
            #expect(writer.bytes == encodeVarint(zigzag))
            #expect(try Postcard.encode(value) == writer.bytes)
            #expect(try Postcard.encode(Int(value)) == writer.bytes)
            #expect(try Postcard.decode(Int64.self, from: writer.bytes) == value)
            #expect(try Postcard.decode(Int.self, from: writer.bytes) == Int(value))
            writer.bytes.withUnsafeBytes { raw in
                var reader = PostcardReader(raw)
                #expect((try? reader.readZigZag64()) == value)
            }

            if let narrow = Int32(exactly: value) {
                let reference = UInt32(bitPattern: (narrow << 1) ^ (narrow >> 31))
                #expect(try Postcard.encode(narrow) == encodeVarint(UInt64(reference)))
                #expect(try Postcard.decode(Int32.self, from: writer.bytes) == narrow)
            } else {
                expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(Int32.self, from: writer.bytes) }
            }
            if let narrow = Int16(exactly: value) {
                let reference = UInt16(bitPattern: (narrow << 1) ^ (narrow >> 15))
                #expect(try Postcard.encode(narrow) == encodeVarint(UInt64(reference)))
                #expect(try Postcard.decode(Int16.self, from: writer.bytes) == narrow)
            } else {
                expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(Int16.self, from: writer.bytes) }
            }
        }
    }

    @Test func singleByteTypes() throws {
        for byte in UInt8.min...UInt8.max {
            #expect(try Postcard.encode(byte) == [byte])
            #expect(try Postcard.decode(UInt8.self, from: [byte]) == byte)
            #expect(try Postcard.encode(Int8(bitPattern: byte)) == [byte])
            #expect(try Postcard.decode(Int8.self, from: [byte]) == Int8(bitPattern: byte))
            if byte > 1 {
                expectPostcardError(.invalidBool) { _ = try Postcard.decode(Bool.self, from: [byte]) }
                expectPostcardError(.invalidOptionalTag) { _ = try Postcard.decode(UInt8?.self, from: [byte, 0]) }
            }
        }
        #expect(try Postcard.encode(true) == [1])
        #expect(try Postcard.encode(false) == [0])
    }

    @Test func randomStructsRoundTrip() throws {
        var rng = SplitMix64(seed: 42)
        for _ in 0..<200 {
            let inner = F.Inner(
                id: rng.next(),
                tags: (0..<Int.random(in: 0...4, using: &rng)).map { _ in String(rng.next() % 100_000) },
                score: Bool.random(using: &rng) ? Double(bitPattern: rng.next() & 0x7FEF_FFFF_FFFF_FFFF) : nil)
            try roundTrip(inner)
            try roundTrip([inner.id: inner])
        }
    }

    @Test func randomMutationsNeverCrash() throws {
        let valid = try Postcard.encode(F.everything(seed: 3, present: true))
        var rng = SplitMix64(seed: 7)
        for _ in 0..<1500 {
            var mutated = valid
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                mutated[Int.random(in: 0..<mutated.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            }
            do {
                _ = try Postcard.decode(F.Everything.self, from: mutated)
            } catch is PostcardError {
            } catch {
                Issue.record("non-Postcard error \(error)")
            }
        }
    }
}

// MARK: - Rejection of malformed input

@Suite("Postcard rejects malformed input", .sharesProcess)
struct PostcardRejectionTests {
    @Test func varintLimits() throws {
        // 11 bytes.
        expectPostcardError(.varintTooLong) {
            _ = try Postcard.decode(UInt64.self, from: Array(repeating: 0x80, count: 10) + [0x00])
        }
        // 10 bytes whose last one carries bits above 2^64.
        expectPostcardError(.valueOutOfRange) {
            _ = try Postcard.decode(UInt64.self, from: Array(repeating: 0xFF, count: 9) + [0x02])
        }
        #expect(try Postcard.decode(UInt64.self, from: Array(repeating: 0xFF, count: 9) + [0x01]) == .max)
        // u32 of 0x1_0000_0000.
        let tooBig: [UInt8] = [0x80, 0x80, 0x80, 0x80, 0x10]
        expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(UInt32.self, from: tooBig) }
        tooBig.withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            expectPostcardError(.valueOutOfRange) { _ = try reader.readVarint32() }
        }
        #expect(try Postcard.decode(UInt64.self, from: tooBig) == 1 << 32)
        expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(UInt16.self, from: [0x80, 0x80, 0x04]) }
        expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(Int16.self, from: [0x80, 0x80, 0x04]) }
        expectPostcardError(.valueOutOfRange) { _ = try Postcard.decode(Int32.self, from: tooBig) }
        // Overlong encodings are accepted.
        #expect(try Postcard.decode(UInt32.self, from: [0x80, 0x00]) == 0)
        #expect(try Postcard.decode(UInt64.self, from: [0x80, 0x00]) == 0)
        #expect(try Postcard.decode(Int64.self, from: [0x80, 0x00]) == 0)
        #expect(try Postcard.decode(UInt16.self, from: [0x81, 0x80, 0x00]) == 1)
        #expect(try Postcard.decode(String.self, from: [0x81, 0x00, 0x61]) == "a")
        #expect(try Postcard.decode([UInt8].self, from: [0x80, 0x00]) == [])
        // u8: one raw byte, nothing more and nothing less.
        expectPostcardError(.unexpectedEnd) { _ = try Postcard.decode(UInt8.self, from: []) }
        expectPostcardError(.trailingBytes) { _ = try Postcard.decode(UInt8.self, from: [0x01, 0x02]) }
        // A varint cut short.
        expectPostcardError(.unexpectedEnd) { _ = try Postcard.decode(UInt64.self, from: [0xFF, 0xFF]) }
    }

    @Test func boolsAndTags() throws {
        expectPostcardError(.invalidBool) { _ = try Postcard.decode(Bool.self, from: [0x02]) }
        struct Flags: Codable { var a: Bool; var b: Bool? }
        let error = expectPostcardError(.invalidBool) { _ = try Postcard.decode(Flags.self, from: [0x01, 0x01, 0x02]) }
        #expect(error?.message.contains("offset 2") == true)
        #expect(error?.message.contains("coding path: b") == true, "\(error?.message ?? "")")
        #expect(error?.offset == 2)
        expectPostcardError(.invalidOptionalTag) { _ = try Postcard.decode(Flags.self, from: [0x01, 0x02, 0x01]) }
        expectPostcardError(.invalidOptionalTag) { _ = try Postcard.decode(UInt32?.self, from: [0x02]) }
        expectPostcardError(.invalidOptionalTag) { _ = try Postcard.decode([UInt32?].self, from: [0x01, 0x05]) }
        expectPostcardError(.invalidOptionalTag) { _ = try Postcard.decode(F.Inner?.self, from: [0xFF]) }
    }

    @Test func invalidUTF8() throws {
        let invalid: [[UInt8]] = [
            [0xFF], [0x80], [0xC0, 0x80], [0xC1, 0xBF], [0xE0, 0x80, 0x80], [0xED, 0xA0, 0x80],
            [0xF0, 0x80, 0x80, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xF5, 0x80, 0x80, 0x80], [0xF0, 0x9F, 0x98],
            [0xC3], [0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0xE2, 0x82], [0xE2, 0x28, 0xA1],
        ]
        for sequence in invalid {
            expectPostcardError(.invalidUTF8, "\(hex(sequence))") {
                _ = try Postcard.decode(String.self, from: [UInt8(sequence.count)] + sequence)
            }
            struct Named: Codable { var name: String }
            expectPostcardError(.invalidUTF8) { _ = try Postcard.decode(Named.self, from: [UInt8(sequence.count)] + sequence) }
            #expect(_postcardFirstInvalidUTF8Index(UnsafeRawBufferPointer(start: nil, count: 0)) == nil)
        }
        let valid = ["", "ascii only, longer than eight bytes", "é", "€", "𝄞", "\u{10FFFF}", "\u{D7FF}\u{E000}",
                     "mixed ascii and ü and 🎉 and more ascii"]
        for string in valid {
            try roundTrip(string)
            let utf8 = Array(string.utf8)
            #expect(utf8.withUnsafeBytes { _postcardFirstInvalidUTF8Index($0) } == nil)
        }
    }

    @Test func trailingBytes() throws {
        expectPostcardError(.trailingBytes) { _ = try Postcard.decode(UInt32.self, from: [0x01, 0x00]) }
        expectPostcardError(.trailingBytes) { _ = try Postcard.decode(F.Shape.self, from: [0x01, 0x04, 0x00]) }
        expectPostcardError(.trailingBytes) { _ = try Postcard.decode([String].self, from: [0x00, 0x00]) }
        [UInt8](arrayLiteral: 1, 2, 3).withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            _ = try? reader.readByte()
            let error = expectPostcardError(.trailingBytes) { try reader.finish() }
            #expect(error?.message.contains("2 trailing byte(s)") == true)
        }
    }

    @Test func everyTruncationThrows() throws {
        let values: [[UInt8]] = [
            try Postcard.encode(F.everything(seed: 5, present: true)),
            try Postcard.encode(F.everything(seed: 6, present: false)),
        ]
        for encoded in values {
            for length in 0..<encoded.count {
                expectAnyPostcardError("prefix of \(length) bytes") {
                    _ = try Postcard.decode(F.Everything.self, from: Array(encoded.prefix(length)))
                }
            }
        }
        let samples = try Postcard.encode(F.Samples(values: [1, 2, 300], groups: [[1], [2, 3]]))
        for length in 0..<samples.count {
            expectAnyPostcardError { _ = try Postcard.decode(F.Samples.self, from: Array(samples.prefix(length))) }
        }
        let shape = try Postcard.encode(F.Expr.add(.literal(1), .variable(name: "abc", scope: 1)))
        for length in 0..<shape.count {
            expectAnyPostcardError { _ = try Postcard.decode(F.Expr.self, from: Array(shape.prefix(length))) }
        }
    }

    @Test func hostileLengthsThrowWithoutAllocating() throws {
        // Length 2^40 followed by 3 bytes of data.
        let hostile = encodeVarint(1 << 40) + [1, 2, 3]
        let errorOfBytes = expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode([UInt8].self, from: hostile) }
        #expect(errorOfBytes?.message.contains("1099511627776") == true)
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode(String.self, from: hostile) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode([UInt32].self, from: hostile) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode([F.Inner].self, from: hostile) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode(ContiguousArray<UInt8>.self, from: hostile) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode(Set<UInt8>.self, from: hostile) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode([String: UInt8].self, from: hostile) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode(F.Samples.self, from: hostile) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode(F.MetadataEntry.self, from: [0x01, 0x61] + hostile) }
        hostile.withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            expectPostcardError(.lengthTooLarge) { _ = try reader.readByteArray() }
            reader = PostcardReader(raw)
            expectPostcardError(.lengthTooLarge) { _ = try reader.readString() }
            reader = PostcardReader(raw)
            expectPostcardError(.unexpectedEnd) { _ = try reader.readRawBytes(count: 1 << 40) }
            expectPostcardError(.valueOutOfRange) { _ = try reader.readRawBytes(count: -1) }
        }
        // A huge count of small elements that are really there is bounded by the input.
        let maximal = encodeVarint(UInt64.max) + [0]
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode([UInt8].self, from: maximal) }
        expectPostcardError(.lengthTooLarge) { _ = try Postcard.decode([Bool].self, from: maximal) }
    }

    @Test func unkeyedContainerOverrun() throws {
        struct Pair: Decodable {
            init(from decoder: any Decoder) throws {
                var container = try decoder.unkeyedContainer()
                _ = try container.decode(UInt8.self)
                _ = try container.decode(UInt8.self)
            }
        }
        expectPostcardError(.unexpectedEnd) { _ = try Postcard.decode(Pair.self, from: [0x01, 0x05, 0x06]) }
    }
}

// MARK: - Reader and writer primitives

@Suite("Postcard reader and writer primitives", .sharesProcess)
struct PostcardPrimitiveTests {
    @Test func writerPrimitives() throws {
        var writer = PostcardWriter()
        writer.writeVarint(300)
        writer.writeZigZag(-300)
        writer.writeBool(true)
        writer.writeByte(0xAB)
        writer.writeRawBytes([1, 2] as ArraySlice<UInt8>)
        [UInt8](arrayLiteral: 3, 4).withUnsafeBytes { writer.writeRawBytes($0) }
        writer.writeByteArray([5])
        [UInt8](arrayLiteral: 6, 7).withUnsafeBytes { writer.writeByteArray($0) }
        writer.writeString("hé")
        writer.writeFloat(1.5)
        writer.writeDouble(1.5)
        writer.writeUInt32LE(0x0403_0201)
        #expect(hex(writer.bytes) == "ac02d70401ab0102030401050206070368c3a90000c03f000000000000f83f01020304")

        try writer.bytes.withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            #expect(reader.remaining == raw.count)
            #expect(try reader.readVarint64() == 300)
            #expect(try reader.readZigZag64() == -300)
            #expect(try reader.readBool())
            #expect(try reader.readByte() == 0xAB)
            let borrowed = try reader.readRawBytes(count: 4)
            #expect(Array(borrowed) == [1, 2, 3, 4])
            #expect(borrowed.baseAddress == raw.baseAddress.map { $0 + 6 })
            #expect(reader.offset == 10)
            #expect(try reader.readByteArray() == [5])
            #expect(try reader.readByteArray() == [6, 7])
            #expect(try reader.readString() == "hé")
            #expect(try reader.readFloat() == 1.5)
            #expect(try reader.readDouble() == 1.5)
            #expect(!reader.isAtEnd)
            #expect(try reader.readUInt32LE() == 0x0403_0201)
            #expect(reader.isAtEnd)
            #expect(reader.remaining == 0)
            try reader.finish()
            expectPostcardError(.unexpectedEnd) { _ = try reader.readByte() }
            expectPostcardError(.unexpectedEnd) { _ = try reader.readUInt32LE() }
            #expect(try reader.readRawBytes(count: 0).count == 0)
        }
    }

    @Test func failedDecodeLeavesReaderInPlace() throws {
        let input: [UInt8] = [0x07, 0x03, 0x61, 0xFF, 0x62, 0x05]
        try input.withUnsafeBytes { raw throws in
            var reader = PostcardReader(raw)
            #expect(try reader.decode(UInt8.self) == 7)
            expectPostcardError(.invalidUTF8) { _ = try reader.decode(String.self) }
            #expect(reader.offset == 1)
            expectPostcardError(.invalidUTF8) { _ = try reader.decode(F.MetadataEntry.self) }
            #expect(reader.offset == 1)
            #expect(try reader.decode([UInt8].self) == [0x61, 0xFF, 0x62])
            expectPostcardError(.invalidOptionalTag) { _ = try reader.decode(F.ChannelKind?.self) }
            #expect(reader.offset == 5)
            expectPostcardError(.invalidEnumIndex) { _ = try reader.decode(F.ChannelKind.self) }
            #expect(try reader.decode(UInt8.self) == 5)
            try reader.finish()
        }
    }

    @Test func emptyBufferReader() throws {
        let reader = PostcardReader(UnsafeRawBufferPointer(start: nil, count: 0))
        #expect(reader.isAtEnd)
        try reader.finish()
        var copy = reader
        expectPostcardError(.unexpectedEnd) { _ = try copy.readVarint64() }
        expectPostcardError(.unexpectedEnd) { _ = try Postcard.decode(F.Inner.self, from: []) }
    }

    @Test func errorDescriptions() throws {
        let error = PostcardError(code: .invalidBool, message: "bad", offset: 3)
        #expect(error.description == "PostcardError.invalidBool: bad")
        #expect(PostcardError.Code.lengthTooLarge.description == "lengthTooLarge")
        #expect(error == PostcardError(code: .invalidBool, message: "bad", offset: 3))
        #expect(error != PostcardError(code: .invalidUTF8, message: "bad", offset: 3))
        let codes: Set<PostcardError.Code> = [
            .unexpectedEnd, .varintTooLong, .valueOutOfRange, .invalidBool, .invalidUTF8, .trailingBytes,
            .invalidOptionalTag, .unsupportedType, .invalidEnumIndex, .lengthTooLarge, .invalidValue,
        ]
        #expect(codes.count == 11)

        struct Deep: Codable { var list: [F.Inner] }
        let encoded = try Postcard.encode(Deep(list: [F.Inner(id: 1, tags: ["ok", "no"], score: nil)]))
        var corrupt = encoded
        corrupt[corrupt.count - 2] = 0xFF  // inside "no"
        let thrown = expectPostcardError(.invalidUTF8) { _ = try Postcard.decode(Deep.self, from: corrupt) }
        #expect(thrown?.message.contains("list[0].tags[1]") == true, "\(thrown?.message ?? "")")
        #expect(thrown?.message.contains("offset \(corrupt.count - 2)") == true)
    }

    @Test("OpenChannel with an extra metadata entry encodes as the message with that entry appended")
    func openChannelExtraEntry() {
        let metadata = [MetadataEntry("a", [1]), MetadataEntry("bb", [2, 3])]
        let extra = MetadataEntry(Session.deadlineMetadataKey, [0x10, 0x27, 0, 0])
        for (given, added) in [([MetadataEntry](), extra), (metadata, extra), (metadata, nil)] as [([MetadataEntry], MetadataEntry?)] {
            var direct = PostcardWriter()
            OpenChannel.encode(channelID: 7, kind: .stream, metadata: given, extra: added, initialCredits: 4096, into: &direct)
            var built = PostcardWriter()
            OpenChannel(channelID: 7, kind: .stream, metadata: given + (added.map { [$0] } ?? []), initialCredits: 4096).encode(into: &built)
            #expect(direct.bytes == built.bytes, "\(given.count) entries, extra \(added != nil)")
            let decoded = direct.bytes.withUnsafeBytes { raw -> OpenChannel? in
                var reader = PostcardReader(raw)
                return try? OpenChannel(from: &reader)
            }
            #expect(decoded?.metadata == given + (added.map { [$0] } ?? []))
        }
    }
}

@Suite("CallResult inline encoding", .sharesProcess)
struct CallResultInlineTests {
    @Test("a success payload has the encoder's bytes, and is inline up to 10 body bytes")
    func sameBytes() throws {
        for size in [0, 1, 5, 10, 11, 12, 200] {
            let body = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 1) }
            var writer = PostcardWriter(reservingCapacity: 1024)
            body.withUnsafeBytes { CallResult.encodeSuccess(body: $0, into: &writer) }
            let payload = CallResult.successPayload(body: Payload(body))
            #expect(payload.bytes == writer.bytes, "body of \(size) bytes")
            #expect(payload.externalStorage == nil)
            let isInline: Bool
            if case .inline = payload.storage { isInline = true } else { isInline = false }
            #expect(isInline == (size <= 10), "body of \(size) bytes")
        }
    }
}
