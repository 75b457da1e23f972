// MARK: - Direct paths for primitives

/// Reads a value directly if `T` is one of the primitives with a fixed postcard form
/// (integers, Bool, floating point, String, [UInt8]); returns nil for any other type.
/// Inlinable, so generated service code specialised for a primitive compiles down to the
/// one reader call (the type tests fold away).
@inlinable @inline(__always)
internal func _postcardDecodePrimitive<T>(
    _ type: T.Type, from reader: inout PostcardReader
) throws(PostcardError) -> T? {
    // Each `unsafeBitCast` is between identical types, checked just before.
    if T.self == String.self {
        return unsafeBitCast(try reader.readString(), to: T.self)
    } else if T.self == UInt32.self {
        return unsafeBitCast(try reader.readVarint32(), to: T.self)
    } else if T.self == UInt64.self {
        return unsafeBitCast(try reader.readVarint64(), to: T.self)
    } else if T.self == Int.self {
        let start = reader.offset
        let value = try reader.readZigZag64()
        guard let int = Int(exactly: value) else {
            throw PostcardError.outOfRange(signed: value, at: start, type: "Int")
        }
        return unsafeBitCast(int, to: T.self)
    } else if T.self == [UInt8].self {
        return unsafeBitCast(try reader.readByteArray(), to: T.self)
    } else if T.self == Bool.self {
        return unsafeBitCast(try reader.readBool(), to: T.self)
    } else if T.self == UInt8.self {
        return unsafeBitCast(try reader.readByte(), to: T.self)
    } else if T.self == Int32.self {
        return unsafeBitCast(try reader.readZigZag32(), to: T.self)
    } else if T.self == Int64.self {
        return unsafeBitCast(try reader.readZigZag64(), to: T.self)
    } else if T.self == UInt16.self {
        return unsafeBitCast(try reader.readVarint16(), to: T.self)
    } else if T.self == Int16.self {
        return unsafeBitCast(try reader.readZigZag16(), to: T.self)
    } else if T.self == Int8.self {
        return unsafeBitCast(Int8(bitPattern: try reader.readByte()), to: T.self)
    } else if T.self == UInt.self {
        return unsafeBitCast(try reader.readUInt(), to: T.self)
    } else if T.self == Double.self {
        return unsafeBitCast(try reader.readDouble(), to: T.self)
    } else if T.self == Float.self {
        return unsafeBitCast(try reader.readFloat(), to: T.self)
    }
    return nil
}

extension PostcardReader {
    /// Reads a varint as `UInt` (64-bit on the wire).
    @inlinable
    internal mutating func readUInt() throws(PostcardError) -> UInt {
        let start = _offset
        let value = try readVarint64()
        guard let result = UInt(exactly: value) else {
            throw PostcardError.outOfRange(value, at: start, type: "UInt")
        }
        return result
    }

    /// Reads an `Int` (zigzag, 64-bit on the wire).
    @inlinable
    internal mutating func readInt() throws(PostcardError) -> Int {
        let start = _offset
        let value = try readZigZag64()
        guard let result = Int(exactly: value) else {
            throw PostcardError.outOfRange(signed: value, at: start, type: "Int")
        }
        return result
    }

    /// Reads an Optional tag: true if a value follows (`01`), false for nil (`00`).
    @inlinable
    public mutating func readOptionalTag() throws(PostcardError) -> Bool {
        let tag = try readByte()
        switch tag {
        case 0: return false
        case 1: return true
        default: throw PostcardError.invalidOptionalTag(tag, at: _offset &- 1)
        }
    }

    /// Reads an enum case index (a varint that must fit in 32 bits).
    internal mutating func readEnumIndex() throws(PostcardError) -> Int {
        Int(try readVarint32())
    }
}

// MARK: - Types that need a count prefix or a tag

/// Standard-library types whose postcard form differs from what their own `init(from:)`
/// would read through the containers. Detected at every generic entry point.
internal protocol _PostcardDecodableSpecial {
    static func _postcardDecode(from decoder: _PostcardDecoder) throws -> Self
}

extension _PostcardDecodableSpecial {
    /// Decodes a value of type `V`, which is `Self`. Returning `V` rather than an
    /// existential avoids boxing the result.
    static func _postcardDecode<V>(as type: V.Type, from decoder: _PostcardDecoder) throws -> V {
        // `V` is `Self`: this is only called through `V.self as? any _PostcardDecodableSpecial.Type`.
        unsafeBitCast(try _postcardDecode(from: decoder), to: V.self)
    }
}

/// At most this many elements are reserved up front for a decoded collection, whatever
/// count the input claims; larger collections grow as elements actually arrive.
private let _postcardMaxReservation = 4096

extension Optional: _PostcardDecodableSpecial where Wrapped: Decodable {
    static func _postcardDecode(from decoder: _PostcardDecoder) throws -> Self {
        guard try decoder.reader.readOptionalTag() else { return nil }
        return try decoder.decodeValue(Wrapped.self)
    }
}

extension Array: _PostcardDecodableSpecial where Element: Decodable {
    static func _postcardDecode(from decoder: _PostcardDecoder) throws -> Self {
        if Element.self == UInt8.self {
            // Identical types, checked just before.
            return unsafeBitCast(try decoder.reader.readByteArray(), to: Self.self)
        }
        let count = try decoder.reader.readLength("array count")
        if let result = try decoder.decodePrimitiveElements(Element.self, count: count) { return result }
        var result = Self()
        result.reserveCapacity(Swift.min(count, _postcardMaxReservation))
        for index in 0..<count {
            result.append(try decoder.decodeValue(Element.self, forKey: _PostcardIndexKey(index)))
        }
        return result
    }
}

extension ContiguousArray: _PostcardDecodableSpecial where Element: Decodable {
    static func _postcardDecode(from decoder: _PostcardDecoder) throws -> Self {
        let count = try decoder.reader.readLength("array count")
        var result = Self()
        if Element.self == UInt8.self {
            let bytes = try decoder.reader.readRawBytes(count: count)
            result.reserveCapacity(count)
            for byte in bytes {
                // Identical types, checked just before.
                result.append(unsafeBitCast(byte, to: Element.self))
            }
            return result
        }
        result.reserveCapacity(Swift.min(count, _postcardMaxReservation))
        for index in 0..<count {
            result.append(try decoder.decodeValue(Element.self, forKey: _PostcardIndexKey(index)))
        }
        return result
    }
}

extension Set: _PostcardDecodableSpecial where Element: Decodable {
    static func _postcardDecode(from decoder: _PostcardDecoder) throws -> Self {
        let count = try decoder.reader.readLength("set count")
        var result = Self(minimumCapacity: Swift.min(count, _postcardMaxReservation))
        for index in 0..<count {
            result.insert(try decoder.decodeValue(Element.self, forKey: _PostcardIndexKey(index)))
        }
        return result
    }
}

extension Dictionary: _PostcardDecodableSpecial where Key: Decodable, Value: Decodable {
    static func _postcardDecode(from decoder: _PostcardDecoder) throws -> Self {
        let count = try decoder.reader.readLength("dictionary count")
        var result = Self(minimumCapacity: Swift.min(count, _postcardMaxReservation))
        for index in 0..<count {
            let key = try decoder.decodeValue(Key.self, forKey: _PostcardIndexKey(index))
            let value = try decoder.decodeValue(Value.self, forKey: _PostcardIndexKey(index))
            result[key] = value
        }
        return result
    }
}

// MARK: - The Decoder

/// The enum case index most recently read by `allKeys`, so that the following
/// `nestedContainer(forKey:)` does not read it again.
internal struct _PostcardEnumIndexRead {
    /// The keyed container that read it.
    var containerID: Int
    /// Reader offset of the index.
    var start: Int
    /// Reader offset just after the index.
    var end: Int
    var index: Int
    /// Whether a nested container has already taken it as its case index.
    var claimed: Bool
}

/// The `Decoder` behind ``PostcardReader/decode(_:)``. Every container reads from the one
/// shared ``reader``.
internal final class _PostcardDecoder: Decoder {
    @exclusivity(unchecked)
    var reader: PostcardReader

    var codingPath: [any CodingKey] = []

    var userInfo: [CodingUserInfoKey: Any] { [:] }

    /// An error detected where the Codable protocols do not allow throwing (`allKeys`,
    /// single-value `decodeNil()`); thrown when the current value finishes decoding.
    var deferredError: PostcardError?

    var lastContainerID = 0
    var enumIndexRead: _PostcardEnumIndexRead?

    init(reader: PostcardReader) {
        self.reader = reader
    }

    // MARK: Decoder

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        makeKeyedContainer(Key.self, codingPath: codingPath)
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        try _PostcardUnkeyedDecodingContainer(decoder: self, codingPath: codingPath)
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer {
        _PostcardSingleValueDecodingContainer(decoder: self, codingPath: codingPath)
    }

    func makeKeyedContainer<Key: CodingKey>(
        _ type: Key.Type, codingPath: [any CodingKey]
    ) -> KeyedDecodingContainer<Key> {
        lastContainerID &+= 1
        return KeyedDecodingContainer(_PostcardKeyedDecodingContainer<Key>(
            decoder: self, codingPath: codingPath, id: lastContainerID, start: reader.offset))
    }

    // MARK: Entry points

    /// Decodes any value: primitives directly, sequences/Optional/Dictionary through
    /// ``_PostcardDecodableSpecial``, everything else through its `init(from:)`.
    func decodeValue<T: Decodable>(_ type: T.Type) throws -> T {
        do {
            if let value = try _postcardDecodePrimitive(T.self, from: &reader) { return value }
        } catch {
            throw error.addingCodingPath(codingPath)
        }
        return try decodeComposite(T.self)
    }

    /// Like ``decodeValue(_:)``, with `key` on the coding path while the value decodes.
    func decodeValue<T: Decodable, K: CodingKey>(_ type: T.Type, forKey key: K) throws -> T {
        do {
            if let value = try _postcardDecodePrimitive(T.self, from: &reader) { return value }
        } catch {
            throw error.addingCodingPath(codingPath + [key])
        }
        codingPath.append(key)
        defer { codingPath.removeLast() }
        return try decodeComposite(T.self)
    }

    private func decodeComposite<T: Decodable>(_ type: T.Type) throws -> T {
        do {
            let value: T
            if let special = T.self as? any _PostcardDecodableSpecial.Type {
                value = try special._postcardDecode(as: T.self, from: self)
            } else {
                value = try T(from: self)
            }
            if let error = deferredError {
                deferredError = nil
                throw error
            }
            return value
        } catch {
            if let deferred = deferredError {
                // The type reacted to a problem we could not throw at the time (for
                // example an empty `allKeys`); ours is the real cause.
                deferredError = nil
                throw deferred.addingCodingPath(codingPath)
            }
            throw normalize(error)
        }
    }

    /// Reads `count` elements into an array if `E` is a primitive, with a loop specialized
    /// for that type; returns nil for any other type.
    func decodePrimitiveElements<E>(_ type: E.Type, count: Int) throws -> [E]? {
        // Each `unsafeBitCast` is between identical types, checked just before.
        if E.self == String.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readString() }, to: [E].self)
        } else if E.self == UInt32.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readVarint32() }, to: [E].self)
        } else if E.self == UInt64.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readVarint64() }, to: [E].self)
        } else if E.self == Int.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readInt() }, to: [E].self)
        } else if E.self == Int32.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readZigZag32() }, to: [E].self)
        } else if E.self == Int64.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readZigZag64() }, to: [E].self)
        } else if E.self == UInt16.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readVarint16() }, to: [E].self)
        } else if E.self == Int16.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readZigZag16() }, to: [E].self)
        } else if E.self == UInt.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readUInt() }, to: [E].self)
        } else if E.self == Int8.self {
            return unsafeBitCast(
                try readElements(count) { r throws(PostcardError) in Int8(bitPattern: try r.readByte()) }, to: [E].self)
        } else if E.self == Bool.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readBool() }, to: [E].self)
        } else if E.self == Double.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readDouble() }, to: [E].self)
        } else if E.self == Float.self {
            return unsafeBitCast(try readElements(count) { r throws(PostcardError) in try r.readFloat() }, to: [E].self)
        }
        return nil
    }

    /// Reads `count` primitives with `read`, adding the element's coding path to a failure.
    @inline(__always)
    private func readElements<P>(
        _ count: Int, _ read: (inout PostcardReader) throws(PostcardError) -> P
    ) throws -> [P] {
        var result: [P] = []
        result.reserveCapacity(Swift.min(count, _postcardMaxReservation))
        var index = 0
        do throws(PostcardError) {
            while index < count {
                result.append(try read(&reader))
                index += 1
            }
        } catch {
            throw error.addingCodingPath(codingPath + [_PostcardIndexKey(index)])
        }
        return result
    }

    // MARK: Enum case indices

    /// `allKeys` of a keyed container: reads the enum case index (once) and returns the
    /// matching key.
    func enumCaseKeys<Key: CodingKey>(
        _ type: Key.Type, containerID: Int, start: Int, codingPath: [any CodingKey]
    ) -> [Key] {
        let index: Int
        do throws(PostcardError) {
            if let read = enumIndexRead, read.containerID == containerID {
                index = read.index
            } else if reader.offset == start {
                index = try reader.readEnumIndex()
                enumIndexRead = _PostcardEnumIndexRead(
                    containerID: containerID, start: start, end: reader.offset, index: index, claimed: false)
            } else {
                // Asked late, after the container has read on: look without consuming.
                var peek = reader
                peek._offset = start
                index = try peek.readEnumIndex()
            }
        } catch {
            recordDeferred(error.addingCodingPath(codingPath))
            return []
        }
        guard let key = Key(intValue: index) else {
            recordDeferred(PostcardError(
                code: .invalidEnumIndex,
                message: "enum case index \(index) at offset \(start) names no case of \(Key.self) "
                    + "(an enum needs `enum CodingKeys: Int, CodingKey` with its cases in declaration order)",
                offset: start
            ).addingCodingPath(codingPath))
            return []
        }
        return [key]
    }

    /// Called by `nestedContainer(forKey:)`/`nestedUnkeyedContainer(forKey:)` of a keyed
    /// container: takes the case index `allKeys` just read, or reads it now, and checks it
    /// is `key`'s.
    func consumeEnumIndex<Key: CodingKey>(
        forKey key: Key, containerID: Int, codingPath: [any CodingKey]
    ) throws(PostcardError) {
        guard let wanted = key.intValue, wanted >= 0 else {
            throw PostcardError(
                code: .unsupportedType,
                message: "cannot decode enum case '\(key.stringValue)' of \(Key.self) at offset \(reader.offset): "
                    + "postcard reads the case index, "
                    + "but the coding key has no integer value; declare `enum CodingKeys: Int, CodingKey { case … }` "
                    + "listing every case in declaration order (0-based)",
                offset: reader.offset
            ).addingCodingPath(codingPath)
        }
        let start: Int
        let found: Int
        if var read = enumIndexRead, read.containerID == containerID, !read.claimed, read.end == reader.offset {
            read.claimed = true
            enumIndexRead = read
            start = read.start
            found = read.index
        } else {
            start = reader.offset
            do throws(PostcardError) {
                found = try reader.readEnumIndex()
            } catch {
                throw error.addingCodingPath(codingPath + [key])
            }
        }
        guard found == wanted else {
            throw PostcardError(
                code: .invalidEnumIndex,
                message: "expected enum case index \(wanted) ('\(key.stringValue)') but found \(found) at offset \(start)",
                offset: start
            ).addingCodingPath(codingPath)
        }
    }

    // MARK: Errors

    func recordDeferred(_ error: PostcardError) {
        if deferredError == nil { deferredError = error }
    }

    private func normalize(_ error: any Error) -> any Error {
        if let error = error as? PostcardError {
            return error.addingCodingPath(codingPath)
        }
        guard let error = error as? DecodingError else { return error }
        let offset = reader.offset
        let problem: String
        let context: DecodingError.Context
        switch error {
        case .typeMismatch(let type, let c):
            problem = "type mismatch for \(type)"
            context = c
        case .valueNotFound(let type, let c):
            problem = "value of type \(type) not found"
            context = c
        case .keyNotFound(let key, let c):
            problem = "key '\(key.stringValue)' not found"
            context = c
        case .dataCorrupted(let c):
            problem = "data corrupted"
            context = c
        @unknown default:
            return PostcardError(
                code: .invalidValue, message: "\(error) (near offset \(offset))", offset: offset
            ).addingCodingPath(codingPath)
        }
        return PostcardError(
            code: .invalidValue,
            message: "\(problem) near offset \(offset): \(context.debugDescription)",
            offset: offset
        ).addingCodingPath(context.codingPath.isEmpty ? codingPath : context.codingPath)
    }
}

// MARK: - Containers

internal struct _PostcardKeyedDecodingContainer<Key: CodingKey>: KeyedDecodingContainerProtocol {
    let decoder: _PostcardDecoder
    let codingPath: [any CodingKey]
    /// Identifies this container for the enum case index bookkeeping.
    let id: Int
    /// Reader offset when the container was created.
    let start: Int

    var allKeys: [Key] {
        decoder.enumCaseKeys(Key.self, containerID: id, start: start, codingPath: codingPath)
    }

    func contains(_ key: Key) -> Bool { true }

    /// Runs a primitive read, adding the field's coding path to a failure.
    @inline(__always)
    private func read<R>(
        _ key: Key, _ body: (inout PostcardReader) throws(PostcardError) -> R
    ) throws -> R {
        do throws(PostcardError) {
            return try body(&decoder.reader)
        } catch {
            throw error.addingCodingPath(codingPath + [key])
        }
    }

    /// Reads the Optional tag, then the value if one follows.
    @inline(__always)
    private func readIfPresent<R>(
        _ key: Key, _ body: (inout PostcardReader) throws(PostcardError) -> R
    ) throws -> R? {
        do throws(PostcardError) {
            guard try decoder.reader.readOptionalTag() else { return nil }
            return try body(&decoder.reader)
        } catch {
            throw error.addingCodingPath(codingPath + [key])
        }
    }

    func decodeNil(forKey key: Key) throws -> Bool {
        try read(key) { reader throws(PostcardError) in try !reader.readOptionalTag() }
    }

    func decode(_ type: Bool.Type, forKey key: Key) throws -> Bool {
        try read(key) { reader throws(PostcardError) in try reader.readBool() }
    }
    func decode(_ type: String.Type, forKey key: Key) throws -> String {
        try read(key) { reader throws(PostcardError) in try reader.readString() }
    }
    func decode(_ type: Double.Type, forKey key: Key) throws -> Double {
        try read(key) { reader throws(PostcardError) in try reader.readDouble() }
    }
    func decode(_ type: Float.Type, forKey key: Key) throws -> Float {
        try read(key) { reader throws(PostcardError) in try reader.readFloat() }
    }
    func decode(_ type: Int.Type, forKey key: Key) throws -> Int {
        try read(key) { reader throws(PostcardError) in try reader.readInt() }
    }
    func decode(_ type: Int8.Type, forKey key: Key) throws -> Int8 {
        try read(key) { reader throws(PostcardError) in Int8(bitPattern: try reader.readByte()) }
    }
    func decode(_ type: Int16.Type, forKey key: Key) throws -> Int16 {
        try read(key) { reader throws(PostcardError) in try reader.readZigZag16() }
    }
    func decode(_ type: Int32.Type, forKey key: Key) throws -> Int32 {
        try read(key) { reader throws(PostcardError) in try reader.readZigZag32() }
    }
    func decode(_ type: Int64.Type, forKey key: Key) throws -> Int64 {
        try read(key) { reader throws(PostcardError) in try reader.readZigZag64() }
    }
    func decode(_ type: UInt.Type, forKey key: Key) throws -> UInt {
        try read(key) { reader throws(PostcardError) in try reader.readUInt() }
    }
    func decode(_ type: UInt8.Type, forKey key: Key) throws -> UInt8 {
        try read(key) { reader throws(PostcardError) in try reader.readByte() }
    }
    func decode(_ type: UInt16.Type, forKey key: Key) throws -> UInt16 {
        try read(key) { reader throws(PostcardError) in try reader.readVarint16() }
    }
    func decode(_ type: UInt32.Type, forKey key: Key) throws -> UInt32 {
        try read(key) { reader throws(PostcardError) in try reader.readVarint32() }
    }
    func decode(_ type: UInt64.Type, forKey key: Key) throws -> UInt64 {
        try read(key) { reader throws(PostcardError) in try reader.readVarint64() }
    }

    func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
        try decoder.decodeValue(T.self, forKey: key)
    }

    func decodeIfPresent(_ type: Bool.Type, forKey key: Key) throws -> Bool? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readBool() }
    }
    func decodeIfPresent(_ type: String.Type, forKey key: Key) throws -> String? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readString() }
    }
    func decodeIfPresent(_ type: Double.Type, forKey key: Key) throws -> Double? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readDouble() }
    }
    func decodeIfPresent(_ type: Float.Type, forKey key: Key) throws -> Float? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readFloat() }
    }
    func decodeIfPresent(_ type: Int.Type, forKey key: Key) throws -> Int? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readInt() }
    }
    func decodeIfPresent(_ type: Int8.Type, forKey key: Key) throws -> Int8? {
        try readIfPresent(key) { reader throws(PostcardError) in Int8(bitPattern: try reader.readByte()) }
    }
    func decodeIfPresent(_ type: Int16.Type, forKey key: Key) throws -> Int16? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readZigZag16() }
    }
    func decodeIfPresent(_ type: Int32.Type, forKey key: Key) throws -> Int32? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readZigZag32() }
    }
    func decodeIfPresent(_ type: Int64.Type, forKey key: Key) throws -> Int64? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readZigZag64() }
    }
    func decodeIfPresent(_ type: UInt.Type, forKey key: Key) throws -> UInt? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readUInt() }
    }
    func decodeIfPresent(_ type: UInt8.Type, forKey key: Key) throws -> UInt8? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readByte() }
    }
    func decodeIfPresent(_ type: UInt16.Type, forKey key: Key) throws -> UInt16? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readVarint16() }
    }
    func decodeIfPresent(_ type: UInt32.Type, forKey key: Key) throws -> UInt32? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readVarint32() }
    }
    func decodeIfPresent(_ type: UInt64.Type, forKey key: Key) throws -> UInt64? {
        try readIfPresent(key) { reader throws(PostcardError) in try reader.readVarint64() }
    }

    func decodeIfPresent<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T? {
        let present = try read(key) { reader throws(PostcardError) in try reader.readOptionalTag() }
        guard present else { return nil }
        return try decoder.decodeValue(T.self, forKey: key)
    }

    func nestedContainer<NestedKey: CodingKey>(
        keyedBy type: NestedKey.Type, forKey key: Key
    ) throws -> KeyedDecodingContainer<NestedKey> {
        try decoder.consumeEnumIndex(forKey: key, containerID: id, codingPath: codingPath)
        return decoder.makeKeyedContainer(NestedKey.self, codingPath: codingPath + [key])
    }

    func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
        try decoder.consumeEnumIndex(forKey: key, containerID: id, codingPath: codingPath)
        return try _PostcardUnkeyedDecodingContainer(decoder: decoder, codingPath: codingPath + [key])
    }

    func superDecoder() throws -> any Decoder { decoder }

    func superDecoder(forKey key: Key) throws -> any Decoder { decoder }
}

internal struct _PostcardUnkeyedDecodingContainer: UnkeyedDecodingContainer {
    let decoder: _PostcardDecoder
    let codingPath: [any CodingKey]
    /// The element count read from the wire.
    let total: Int
    private(set) var currentIndex = 0

    /// Reads the element count.
    init(decoder: _PostcardDecoder, codingPath: [any CodingKey]) throws {
        self.decoder = decoder
        self.codingPath = codingPath
        do throws(PostcardError) {
            self.total = try decoder.reader.readLength("sequence count")
        } catch {
            throw error.addingCodingPath(codingPath)
        }
    }

    var count: Int? { total }

    var isAtEnd: Bool { currentIndex >= total }

    private var currentKey: _PostcardIndexKey { _PostcardIndexKey(currentIndex) }

    private func ensureNotAtEnd() throws {
        guard currentIndex < total else {
            throw PostcardError(
                code: .unexpectedEnd,
                message: "unkeyed container at offset \(decoder.reader.offset) has no element left: "
                    + "all \(total) element(s) were already decoded",
                offset: decoder.reader.offset
            ).addingCodingPath(codingPath)
        }
    }

    /// Runs a primitive read of the next element, adding its coding path to a failure.
    @inline(__always)
    private mutating func read<R>(_ body: (inout PostcardReader) throws(PostcardError) -> R) throws -> R {
        try ensureNotAtEnd()
        let value: R
        do throws(PostcardError) {
            value = try body(&decoder.reader)
        } catch {
            throw error.addingCodingPath(codingPath + [currentKey])
        }
        currentIndex += 1
        return value
    }

    /// Reads the Optional tag of the next element, then its value if one follows. Returns
    /// nil without reading when the container is exhausted.
    @inline(__always)
    private mutating func readIfPresent<R>(
        _ body: (inout PostcardReader) throws(PostcardError) -> R
    ) throws -> R? {
        guard !isAtEnd else { return nil }
        let value: R?
        do throws(PostcardError) {
            value = try decoder.reader.readOptionalTag() ? try body(&decoder.reader) : nil
        } catch {
            throw error.addingCodingPath(codingPath + [currentKey])
        }
        currentIndex += 1
        return value
    }

    mutating func decodeNil() throws -> Bool {
        try ensureNotAtEnd()
        let present: Bool
        do throws(PostcardError) {
            present = try decoder.reader.readOptionalTag()
        } catch {
            throw error.addingCodingPath(codingPath + [currentKey])
        }
        if !present { currentIndex += 1 }
        return !present
    }

    mutating func decode(_ type: Bool.Type) throws -> Bool {
        try read { reader throws(PostcardError) in try reader.readBool() }
    }
    mutating func decode(_ type: String.Type) throws -> String {
        try read { reader throws(PostcardError) in try reader.readString() }
    }
    mutating func decode(_ type: Double.Type) throws -> Double {
        try read { reader throws(PostcardError) in try reader.readDouble() }
    }
    mutating func decode(_ type: Float.Type) throws -> Float {
        try read { reader throws(PostcardError) in try reader.readFloat() }
    }
    mutating func decode(_ type: Int.Type) throws -> Int {
        try read { reader throws(PostcardError) in try reader.readInt() }
    }
    mutating func decode(_ type: Int8.Type) throws -> Int8 {
        try read { reader throws(PostcardError) in Int8(bitPattern: try reader.readByte()) }
    }
    mutating func decode(_ type: Int16.Type) throws -> Int16 {
        try read { reader throws(PostcardError) in try reader.readZigZag16() }
    }
    mutating func decode(_ type: Int32.Type) throws -> Int32 {
        try read { reader throws(PostcardError) in try reader.readZigZag32() }
    }
    mutating func decode(_ type: Int64.Type) throws -> Int64 {
        try read { reader throws(PostcardError) in try reader.readZigZag64() }
    }
    mutating func decode(_ type: UInt.Type) throws -> UInt {
        try read { reader throws(PostcardError) in try reader.readUInt() }
    }
    mutating func decode(_ type: UInt8.Type) throws -> UInt8 {
        try read { reader throws(PostcardError) in try reader.readByte() }
    }
    mutating func decode(_ type: UInt16.Type) throws -> UInt16 {
        try read { reader throws(PostcardError) in try reader.readVarint16() }
    }
    mutating func decode(_ type: UInt32.Type) throws -> UInt32 {
        try read { reader throws(PostcardError) in try reader.readVarint32() }
    }
    mutating func decode(_ type: UInt64.Type) throws -> UInt64 {
        try read { reader throws(PostcardError) in try reader.readVarint64() }
    }

    mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try ensureNotAtEnd()
        let value = try decoder.decodeValue(T.self, forKey: currentKey)
        currentIndex += 1
        return value
    }

    mutating func decodeIfPresent(_ type: Bool.Type) throws -> Bool? {
        try readIfPresent { reader throws(PostcardError) in try reader.readBool() }
    }
    mutating func decodeIfPresent(_ type: String.Type) throws -> String? {
        try readIfPresent { reader throws(PostcardError) in try reader.readString() }
    }
    mutating func decodeIfPresent(_ type: Double.Type) throws -> Double? {
        try readIfPresent { reader throws(PostcardError) in try reader.readDouble() }
    }
    mutating func decodeIfPresent(_ type: Float.Type) throws -> Float? {
        try readIfPresent { reader throws(PostcardError) in try reader.readFloat() }
    }
    mutating func decodeIfPresent(_ type: Int.Type) throws -> Int? {
        try readIfPresent { reader throws(PostcardError) in try reader.readInt() }
    }
    mutating func decodeIfPresent(_ type: Int8.Type) throws -> Int8? {
        try readIfPresent { reader throws(PostcardError) in Int8(bitPattern: try reader.readByte()) }
    }
    mutating func decodeIfPresent(_ type: Int16.Type) throws -> Int16? {
        try readIfPresent { reader throws(PostcardError) in try reader.readZigZag16() }
    }
    mutating func decodeIfPresent(_ type: Int32.Type) throws -> Int32? {
        try readIfPresent { reader throws(PostcardError) in try reader.readZigZag32() }
    }
    mutating func decodeIfPresent(_ type: Int64.Type) throws -> Int64? {
        try readIfPresent { reader throws(PostcardError) in try reader.readZigZag64() }
    }
    mutating func decodeIfPresent(_ type: UInt.Type) throws -> UInt? {
        try readIfPresent { reader throws(PostcardError) in try reader.readUInt() }
    }
    mutating func decodeIfPresent(_ type: UInt8.Type) throws -> UInt8? {
        try readIfPresent { reader throws(PostcardError) in try reader.readByte() }
    }
    mutating func decodeIfPresent(_ type: UInt16.Type) throws -> UInt16? {
        try readIfPresent { reader throws(PostcardError) in try reader.readVarint16() }
    }
    mutating func decodeIfPresent(_ type: UInt32.Type) throws -> UInt32? {
        try readIfPresent { reader throws(PostcardError) in try reader.readVarint32() }
    }
    mutating func decodeIfPresent(_ type: UInt64.Type) throws -> UInt64? {
        try readIfPresent { reader throws(PostcardError) in try reader.readVarint64() }
    }

    mutating func decodeIfPresent<T: Decodable>(_ type: T.Type) throws -> T? {
        guard !isAtEnd else { return nil }
        let present: Bool
        do throws(PostcardError) {
            present = try decoder.reader.readOptionalTag()
        } catch {
            throw error.addingCodingPath(codingPath + [currentKey])
        }
        let value = present ? try decoder.decodeValue(T.self, forKey: currentKey) : nil
        currentIndex += 1
        return value
    }

    mutating func nestedContainer<NestedKey: CodingKey>(
        keyedBy type: NestedKey.Type
    ) throws -> KeyedDecodingContainer<NestedKey> {
        try ensureNotAtEnd()
        let key = currentKey
        currentIndex += 1
        return decoder.makeKeyedContainer(NestedKey.self, codingPath: codingPath + [key])
    }

    mutating func nestedUnkeyedContainer() throws -> any UnkeyedDecodingContainer {
        try ensureNotAtEnd()
        let key = currentKey
        currentIndex += 1
        return try _PostcardUnkeyedDecodingContainer(decoder: decoder, codingPath: codingPath + [key])
    }

    mutating func superDecoder() throws -> any Decoder {
        try ensureNotAtEnd()
        currentIndex += 1
        return decoder
    }
}

internal struct _PostcardSingleValueDecodingContainer: SingleValueDecodingContainer {
    let decoder: _PostcardDecoder
    let codingPath: [any CodingKey]

    /// Runs a primitive read, adding the coding path to a failure.
    @inline(__always)
    private func read<R>(_ body: (inout PostcardReader) throws(PostcardError) -> R) throws -> R {
        do throws(PostcardError) {
            return try body(&decoder.reader)
        } catch {
            throw error.addingCodingPath(codingPath)
        }
    }

    /// Consumes the Optional tag: true for `00`, false for `01` (the value follows). An
    /// invalid tag or the end of input is reported when the value finishes decoding (this
    /// requirement cannot throw); it returns true so nothing more is read.
    func decodeNil() -> Bool {
        do throws(PostcardError) {
            return try !decoder.reader.readOptionalTag()
        } catch {
            decoder.recordDeferred(error.addingCodingPath(codingPath))
            return true
        }
    }

    func decode(_ type: Bool.Type) throws -> Bool {
        try read { reader throws(PostcardError) in try reader.readBool() }
    }
    func decode(_ type: String.Type) throws -> String {
        try read { reader throws(PostcardError) in try reader.readString() }
    }
    func decode(_ type: Double.Type) throws -> Double {
        try read { reader throws(PostcardError) in try reader.readDouble() }
    }
    func decode(_ type: Float.Type) throws -> Float {
        try read { reader throws(PostcardError) in try reader.readFloat() }
    }
    func decode(_ type: Int.Type) throws -> Int {
        try read { reader throws(PostcardError) in try reader.readInt() }
    }
    func decode(_ type: Int8.Type) throws -> Int8 {
        try read { reader throws(PostcardError) in Int8(bitPattern: try reader.readByte()) }
    }
    func decode(_ type: Int16.Type) throws -> Int16 {
        try read { reader throws(PostcardError) in try reader.readZigZag16() }
    }
    func decode(_ type: Int32.Type) throws -> Int32 {
        try read { reader throws(PostcardError) in try reader.readZigZag32() }
    }
    func decode(_ type: Int64.Type) throws -> Int64 {
        try read { reader throws(PostcardError) in try reader.readZigZag64() }
    }
    func decode(_ type: UInt.Type) throws -> UInt {
        try read { reader throws(PostcardError) in try reader.readUInt() }
    }
    func decode(_ type: UInt8.Type) throws -> UInt8 {
        try read { reader throws(PostcardError) in try reader.readByte() }
    }
    func decode(_ type: UInt16.Type) throws -> UInt16 {
        try read { reader throws(PostcardError) in try reader.readVarint16() }
    }
    func decode(_ type: UInt32.Type) throws -> UInt32 {
        try read { reader throws(PostcardError) in try reader.readVarint32() }
    }
    func decode(_ type: UInt64.Type) throws -> UInt64 {
        try read { reader throws(PostcardError) in try reader.readVarint64() }
    }

    func decode<T: Decodable>(_ type: T.Type) throws -> T {
        try decoder.decodeValue(T.self)
    }
}
