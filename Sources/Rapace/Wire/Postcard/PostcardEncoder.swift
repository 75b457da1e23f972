/// Postcard v1 serialization of `Codable` values.
///
/// The mapping from Swift to the postcard wire format:
///
/// | Swift | wire |
/// |---|---|
/// | `Bool` | 1 byte, `00` or `01` |
/// | `UInt8`, `Int8` | 1 raw byte |
/// | `UInt16`, `UInt32`, `UInt64`, `UInt` | LEB128 varint (`UInt` as 64-bit) |
/// | `Int16`, `Int32`, `Int64`, `Int` | zigzag, then varint (`Int` as 64-bit) |
/// | `Float`, `Double` | 4 / 8 bytes IEEE-754 little-endian |
/// | `String` | varint byte length + UTF-8 |
/// | `[UInt8]` | varint length + bytes |
/// | `Array`, `ContiguousArray`, `Set` | varint count + elements |
/// | `Dictionary` | varint count + key, value, key, value, … |
/// | `Optional` | `00` for nil, `01` + the value |
/// | struct (keyed container) | the fields in order, keys ignored, nothing between |
/// | enum with associated values | varint case index + the associated values in order |
///
/// Notes for hand-written `Codable` conformances:
/// - Keys are not on the wire: `init(from:)` must decode the fields in the order
///   `encode(to:)` encoded them.
/// - An enum's case index is its `CodingKeys.intValue`. Synthesized enum conformances need
///   `enum CodingKeys: Int, CodingKey { case first, second, … }` listing the cases in
///   declaration order; without integer keys encoding throws `.unsupportedType`.
/// - `nestedContainer(keyedBy:forKey:)` and `nestedUnkeyedContainer(forKey:)` on a keyed
///   container write the key's integer value (they are how enums encode their case).
/// - An unkeyed container is a sequence: it is written as a varint count followed by the
///   elements, and decoding reads the count back (`count`, `isAtEnd`). So Foundation's
///   `Data` comes out as a byte buffer. For a postcard tuple, tuple struct or fixed-size
///   array (`[u8; N]`), use a keyed container instead (any keys: they are not written).
/// - `encodeIfPresent`/`decodeIfPresent` write and read the Optional tag, so optional
///   properties of synthesized conformances are encoded as `00` or `01` + value.
///   `encodeNil()` writes `00`; `decodeNil()` consumes the tag byte and returns false for
///   `01`. A hand-written conformance should encode an optional as the `Optional` value
///   itself (`encode(optional)`, `encodeIfPresent`), which writes the `01` tag; writing
///   the wrapped value after checking for nil would omit it.
/// - A raw-value enum (`enum E: UInt8, Codable`) is written as its raw value, as its
///   standard-library conformance says; only enums using the keyed-container conformance
///   are written as a case index.
/// - `superEncoder()`/`superDecoder()` continue in the same byte stream.
/// - A count or length prefix larger than the bytes left in the input is rejected
///   (`.lengthTooLarge`) before anything is allocated. This assumes every element takes at
///   least one byte, so sequences of zero-size values (e.g. empty structs) cannot be
///   decoded unless they are empty.
/// - `Dictionary` and `Set` are written in their iteration order, which is not stable
///   across processes.
/// - Every error thrown by the codec is a ``PostcardError``; an `EncodingError` or
///   `DecodingError` thrown by a type's own conformance is converted to a
///   ``PostcardError`` with code `.invalidValue`. Other errors thrown by a type's own
///   conformance pass through unchanged.
public enum Postcard {
    /// Encodes `value` into a new byte array.
    /// - Throws: ``PostcardError``.
    public static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        var writer = PostcardWriter()
        try writer.encode(value)
        return writer.bytes
    }

    /// Decodes a value of type `type` that must occupy all of `bytes`.
    /// - Throws: ``PostcardError``; `.trailingBytes` if bytes are left after the value.
    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8]) throws -> T {
        try bytes.withUnsafeBytes { buffer in
            try decode(type, from: buffer)
        }
    }

    /// Decodes a value of type `type` that must occupy all of `buffer`.
    /// - Throws: ``PostcardError``; `.trailingBytes` if bytes are left after the value.
    public static func decode<T: Decodable>(_ type: T.Type, from buffer: UnsafeRawBufferPointer) throws -> T {
        var reader = PostcardReader(buffer)
        let value = try reader.decode(type)
        try reader.finish()
        return value
    }
}

// MARK: - Direct paths for primitives

/// Writes `value` directly if its type is one of the primitives with a fixed postcard form
/// (integers, Bool, floating point, String, [UInt8]) and returns true; returns false for
/// any other type. Inlinable for the same reason as `_postcardDecodePrimitive`.
@inlinable @inline(__always)
internal func _postcardEncodePrimitive<T>(_ value: T, into writer: inout PostcardWriter) -> Bool {
    // Each `unsafeBitCast` is between identical types, checked just before.
    if T.self == String.self {
        writer.writeString(unsafeBitCast(value, to: String.self))
    } else if T.self == UInt32.self {
        writer.writeVarint(UInt64(unsafeBitCast(value, to: UInt32.self)))
    } else if T.self == UInt64.self {
        writer.writeVarint(unsafeBitCast(value, to: UInt64.self))
    } else if T.self == Int.self {
        writer.writeZigZag(Int64(unsafeBitCast(value, to: Int.self)))
    } else if T.self == [UInt8].self {
        writer.writeByteArray(unsafeBitCast(value, to: [UInt8].self))
    } else if T.self == Bool.self {
        writer.writeBool(unsafeBitCast(value, to: Bool.self))
    } else if T.self == UInt8.self {
        writer.writeByte(unsafeBitCast(value, to: UInt8.self))
    } else if T.self == Int32.self {
        writer.writeZigZag(Int64(unsafeBitCast(value, to: Int32.self)))
    } else if T.self == Int64.self {
        writer.writeZigZag(unsafeBitCast(value, to: Int64.self))
    } else if T.self == UInt16.self {
        writer.writeVarint(UInt64(unsafeBitCast(value, to: UInt16.self)))
    } else if T.self == Int16.self {
        writer.writeZigZag(Int64(unsafeBitCast(value, to: Int16.self)))
    } else if T.self == Int8.self {
        writer.writeByte(UInt8(bitPattern: unsafeBitCast(value, to: Int8.self)))
    } else if T.self == UInt.self {
        writer.writeVarint(UInt64(unsafeBitCast(value, to: UInt.self)))
    } else if T.self == Double.self {
        writer.writeDouble(unsafeBitCast(value, to: Double.self))
    } else if T.self == Float.self {
        writer.writeFloat(unsafeBitCast(value, to: Float.self))
    } else {
        return false
    }
    return true
}

/// Writes the elements of `array` (no count) if its element type is a primitive, with a
/// loop specialized for that type, and returns true; returns false for any other type.
internal func _postcardEncodePrimitiveElements<E>(_ array: [E], into writer: inout PostcardWriter) -> Bool {
    // Each `unsafeBitCast` is between identical types, checked just before.
    if E.self == String.self {
        for value in unsafeBitCast(array, to: [String].self) { writer.writeString(value) }
    } else if E.self == UInt32.self {
        for value in unsafeBitCast(array, to: [UInt32].self) { writer.writeVarint(UInt64(value)) }
    } else if E.self == UInt64.self {
        for value in unsafeBitCast(array, to: [UInt64].self) { writer.writeVarint(value) }
    } else if E.self == Int.self {
        for value in unsafeBitCast(array, to: [Int].self) { writer.writeZigZag(Int64(value)) }
    } else if E.self == Int32.self {
        for value in unsafeBitCast(array, to: [Int32].self) { writer.writeZigZag(Int64(value)) }
    } else if E.self == Int64.self {
        for value in unsafeBitCast(array, to: [Int64].self) { writer.writeZigZag(value) }
    } else if E.self == UInt16.self {
        for value in unsafeBitCast(array, to: [UInt16].self) { writer.writeVarint(UInt64(value)) }
    } else if E.self == Int16.self {
        for value in unsafeBitCast(array, to: [Int16].self) { writer.writeZigZag(Int64(value)) }
    } else if E.self == UInt.self {
        for value in unsafeBitCast(array, to: [UInt].self) { writer.writeVarint(UInt64(value)) }
    } else if E.self == Bool.self {
        for value in unsafeBitCast(array, to: [Bool].self) { writer.writeBool(value) }
    } else if E.self == Double.self {
        for value in unsafeBitCast(array, to: [Double].self) { writer.writeDouble(value) }
    } else if E.self == Float.self {
        for value in unsafeBitCast(array, to: [Float].self) { writer.writeFloat(value) }
    } else {
        return false
    }
    return true
}

// MARK: - Types that need a count prefix or a tag

/// Standard-library types whose postcard form differs from what their own `encode(to:)`
/// would produce through the containers: sequences need a count prefix, `Optional` needs a
/// tag, `Dictionary` needs count + pairs. Detected at every generic entry point.
internal protocol _PostcardEncodableSpecial {
    func _postcardEncode(into encoder: _PostcardEncoder) throws
}

extension _PostcardEncodableSpecial {
    /// Encodes `value`, whose type is `Self`. Dispatching on the metatype
    /// (`T.self as? any _PostcardEncodableSpecial.Type`) avoids boxing the value in an
    /// existential just to find out whether it is special.
    static func _postcardEncode<V>(value: V, into encoder: _PostcardEncoder) throws {
        // `V` is `Self`: this is only called through `V.self as? any _PostcardEncodableSpecial.Type`.
        try unsafeBitCast(value, to: Self.self)._postcardEncode(into: encoder)
    }
}

extension Optional: _PostcardEncodableSpecial where Wrapped: Encodable {
    func _postcardEncode(into encoder: _PostcardEncoder) throws {
        switch self {
        case .none:
            encoder.writer.writeByte(0)
        case .some(let wrapped):
            encoder.writer.writeByte(1)
            try encoder.encodeValue(wrapped)
        }
    }
}

extension Array: _PostcardEncodableSpecial where Element: Encodable {
    func _postcardEncode(into encoder: _PostcardEncoder) throws {
        if Element.self == UInt8.self || Element.self == Int8.self {
            withUnsafeBytes { encoder.writer.writeByteArray($0) }
            return
        }
        encoder.writer.writeVarint(UInt64(count))
        if _postcardEncodePrimitiveElements(self, into: &encoder.writer) { return }
        for index in indices {
            try encoder.encodeValue(self[index], forKey: _PostcardIndexKey(index))
        }
    }
}

extension ContiguousArray: _PostcardEncodableSpecial where Element: Encodable {
    func _postcardEncode(into encoder: _PostcardEncoder) throws {
        if Element.self == UInt8.self || Element.self == Int8.self {
            withUnsafeBytes { encoder.writer.writeByteArray($0) }
            return
        }
        encoder.writer.writeVarint(UInt64(count))
        for index in indices {
            try encoder.encodeValue(self[index], forKey: _PostcardIndexKey(index))
        }
    }
}

extension Set: _PostcardEncodableSpecial where Element: Encodable {
    func _postcardEncode(into encoder: _PostcardEncoder) throws {
        encoder.writer.writeVarint(UInt64(count))
        var position = 0
        for element in self {
            try encoder.encodeValue(element, forKey: _PostcardIndexKey(position))
            position += 1
        }
    }
}

extension Dictionary: _PostcardEncodableSpecial where Key: Encodable, Value: Encodable {
    func _postcardEncode(into encoder: _PostcardEncoder) throws {
        encoder.writer.writeVarint(UInt64(count))
        var position = 0
        for (key, value) in self {
            try encoder.encodeValue(key, forKey: _PostcardIndexKey(position))
            try encoder.encodeValue(value, forKey: _PostcardIndexKey(position))
            position += 1
        }
    }
}

// MARK: - The Encoder

/// A count placeholder of an unkeyed container, patched once the value that created the
/// container has finished encoding.
internal struct _PostcardPendingCount {
    var position: Int
    var count: Int
}

/// The `Encoder` behind ``PostcardWriter/encode(_:)``. Every container writes straight into
/// the one shared ``writer``.
internal final class _PostcardEncoder: Encoder {
    @exclusivity(unchecked)
    var writer: PostcardWriter

    var codingPath: [any CodingKey] = []

    var userInfo: [CodingUserInfoKey: Any] { [:] }

    /// Count placeholders of unkeyed containers still open, in creation order (and so in
    /// increasing position).
    var pendingCounts: [_PostcardPendingCount] = []

    /// An error detected where the Codable protocols do not allow throwing; thrown when
    /// the current value finishes encoding.
    var deferredError: PostcardError?

    init(writer: PostcardWriter) {
        self.writer = writer
    }

    /// Hands the writer back, leaving an empty one behind.
    func takeWriter() -> PostcardWriter {
        var taken = PostcardWriter()
        swap(&taken, &writer)
        return taken
    }

    // MARK: Encoder

    func container<Key: CodingKey>(keyedBy type: Key.Type) -> KeyedEncodingContainer<Key> {
        KeyedEncodingContainer(_PostcardKeyedEncodingContainer<Key>(encoder: self, codingPath: codingPath))
    }

    func unkeyedContainer() -> any UnkeyedEncodingContainer {
        makeUnkeyedContainer(codingPath: codingPath)
    }

    func singleValueContainer() -> any SingleValueEncodingContainer {
        _PostcardSingleValueEncodingContainer(encoder: self, codingPath: codingPath)
    }

    // MARK: Entry points

    /// Encodes any value: primitives directly, sequences/Optional/Dictionary through
    /// ``_PostcardEncodableSpecial``, everything else through its `encode(to:)`.
    func encodeValue<T: Encodable>(_ value: T) throws {
        if _postcardEncodePrimitive(value, into: &writer) { return }
        try encodeComposite(value)
    }

    /// Like ``encodeValue(_:)``, with `key` on the coding path while the value encodes.
    func encodeValue<T: Encodable, K: CodingKey>(_ value: T, forKey key: K) throws {
        if _postcardEncodePrimitive(value, into: &writer) { return }
        codingPath.append(key)
        defer { codingPath.removeLast() }
        try encodeComposite(value)
    }

    private func encodeComposite<T: Encodable>(_ value: T) throws {
        let start = writer.count
        let pendingBase = pendingCounts.count
        do {
            if let special = T.self as? any _PostcardEncodableSpecial.Type {
                try special._postcardEncode(value: value, into: self)
            } else {
                try value.encode(to: self)
            }
            if let error = deferredError {
                deferredError = nil
                throw error
            }
        } catch {
            // Leave the stream as it was, so a caller that recovers from the error does
            // not find half a value in it.
            if writer.count > start { writer.truncate(to: start) }
            if pendingCounts.count > pendingBase { pendingCounts.removeSubrange(pendingBase...) }
            throw normalize(error)
        }
        if pendingCounts.count > pendingBase {
            finalizePendingCounts(downTo: pendingBase)
        }
    }

    // MARK: Unkeyed containers and their counts

    func makeUnkeyedContainer(codingPath: [any CodingKey]) -> _PostcardUnkeyedEncodingContainer {
        let position = writer.count
        // One byte covers counts below 128; larger counts are widened when patched.
        writer.writeByte(0)
        pendingCounts.append(_PostcardPendingCount(position: position, count: 0))
        return _PostcardUnkeyedEncodingContainer(
            encoder: self, codingPath: codingPath, slot: pendingCounts.count - 1, position: position)
    }

    /// Records one more element in the unkeyed container whose placeholder is at
    /// `position`, and returns its count so far.
    func incrementCount(slot: Int, position: Int, codingPath: [any CodingKey]) -> Int {
        guard slot < pendingCounts.count, pendingCounts[slot].position == position else {
            recordDeferred(PostcardError(
                code: .unsupportedType,
                message: "an unkeyed encoding container was used at output offset \(writer.count), "
                    + "after the value that created it had finished encoding",
                offset: writer.count
            ).addingCodingPath(codingPath))
            return 0
        }
        pendingCounts[slot].count += 1
        return pendingCounts[slot].count
    }

    func currentCount(slot: Int, position: Int) -> Int? {
        guard slot < pendingCounts.count, pendingCounts[slot].position == position else { return nil }
        return pendingCounts[slot].count
    }

    /// Writes the final counts of the placeholders above `base`, last first, so a count
    /// that needs more than one byte shifts only bytes whose placeholders are done.
    private func finalizePendingCounts(downTo base: Int) {
        while pendingCounts.count > base {
            let pending = pendingCounts.removeLast()
            if pending.count < 0x80 {
                writer.setByte(UInt8(truncatingIfNeeded: pending.count), at: pending.position)
            } else {
                var varint = PostcardWriter(reservingCapacity: 10)
                varint.writeVarint(UInt64(pending.count))
                writer.bytes.replaceSubrange(pending.position..<(pending.position + 1), with: varint.bytes)
            }
        }
    }

    // MARK: Enum case indices

    /// Writes the case index of an enum (the key's `intValue`) as a varint.
    func writeEnumIndex<K: CodingKey>(_ key: K, codingPath: [any CodingKey]) {
        guard let index = key.intValue, index >= 0 else {
            recordDeferred(PostcardError(
                code: .unsupportedType,
                message: "cannot encode enum case '\(key.stringValue)' of \(K.self) at output offset \(writer.count): "
                    + "postcard writes the case index, "
                    + "but the coding key has no integer value; declare `enum CodingKeys: Int, CodingKey { case … }` "
                    + "listing every case in declaration order (0-based)",
                offset: writer.count
            ).addingCodingPath(codingPath))
            return
        }
        writer.writeVarint(UInt64(index))
    }

    // MARK: Errors

    func recordDeferred(_ error: PostcardError) {
        if deferredError == nil { deferredError = error }
    }

    private func normalize(_ error: any Error) -> any Error {
        if let error = error as? PostcardError {
            return error.addingCodingPath(codingPath)
        }
        if let error = error as? EncodingError, case .invalidValue(let value, let context) = error {
            return PostcardError(
                code: .invalidValue,
                message: "invalid value of type \(type(of: value)) at output offset \(writer.count): \(context.debugDescription)",
                offset: writer.count
            ).addingCodingPath(context.codingPath.isEmpty ? codingPath : context.codingPath)
        }
        return error
    }
}

// MARK: - Containers

internal struct _PostcardKeyedEncodingContainer<Key: CodingKey>: KeyedEncodingContainerProtocol {
    let encoder: _PostcardEncoder
    let codingPath: [any CodingKey]

    mutating func encodeNil(forKey key: Key) throws { encoder.writer.writeByte(0) }
    mutating func encode(_ value: Bool, forKey key: Key) throws { encoder.writer.writeBool(value) }
    mutating func encode(_ value: String, forKey key: Key) throws { encoder.writer.writeString(value) }
    mutating func encode(_ value: Double, forKey key: Key) throws { encoder.writer.writeDouble(value) }
    mutating func encode(_ value: Float, forKey key: Key) throws { encoder.writer.writeFloat(value) }
    mutating func encode(_ value: Int, forKey key: Key) throws { encoder.writer.writeZigZag(Int64(value)) }
    mutating func encode(_ value: Int8, forKey key: Key) throws { encoder.writer.writeByte(UInt8(bitPattern: value)) }
    mutating func encode(_ value: Int16, forKey key: Key) throws { encoder.writer.writeZigZag(Int64(value)) }
    mutating func encode(_ value: Int32, forKey key: Key) throws { encoder.writer.writeZigZag(Int64(value)) }
    mutating func encode(_ value: Int64, forKey key: Key) throws { encoder.writer.writeZigZag(value) }
    mutating func encode(_ value: UInt, forKey key: Key) throws { encoder.writer.writeVarint(UInt64(value)) }
    mutating func encode(_ value: UInt8, forKey key: Key) throws { encoder.writer.writeByte(value) }
    mutating func encode(_ value: UInt16, forKey key: Key) throws { encoder.writer.writeVarint(UInt64(value)) }
    mutating func encode(_ value: UInt32, forKey key: Key) throws { encoder.writer.writeVarint(UInt64(value)) }
    mutating func encode(_ value: UInt64, forKey key: Key) throws { encoder.writer.writeVarint(value) }

    mutating func encode<T: Encodable>(_ value: T, forKey key: Key) throws {
        try encoder.encodeValue(value, forKey: key)
    }

    /// Writes the Optional tag and reports whether a value follows.
    private func writeTag<V>(_ value: V?) -> V? {
        encoder.writer.writeByte(value == nil ? 0 : 1)
        return value
    }

    mutating func encodeIfPresent(_ value: Bool?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeBool(v) }
    }
    mutating func encodeIfPresent(_ value: String?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeString(v) }
    }
    mutating func encodeIfPresent(_ value: Double?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeDouble(v) }
    }
    mutating func encodeIfPresent(_ value: Float?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeFloat(v) }
    }
    mutating func encodeIfPresent(_ value: Int?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeZigZag(Int64(v)) }
    }
    mutating func encodeIfPresent(_ value: Int8?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeByte(UInt8(bitPattern: v)) }
    }
    mutating func encodeIfPresent(_ value: Int16?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeZigZag(Int64(v)) }
    }
    mutating func encodeIfPresent(_ value: Int32?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeZigZag(Int64(v)) }
    }
    mutating func encodeIfPresent(_ value: Int64?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeZigZag(v) }
    }
    mutating func encodeIfPresent(_ value: UInt?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeVarint(UInt64(v)) }
    }
    mutating func encodeIfPresent(_ value: UInt8?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeByte(v) }
    }
    mutating func encodeIfPresent(_ value: UInt16?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeVarint(UInt64(v)) }
    }
    mutating func encodeIfPresent(_ value: UInt32?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeVarint(UInt64(v)) }
    }
    mutating func encodeIfPresent(_ value: UInt64?, forKey key: Key) throws {
        if let v = writeTag(value) { encoder.writer.writeVarint(v) }
    }
    mutating func encodeIfPresent<T: Encodable>(_ value: T?, forKey key: Key) throws {
        if let v = writeTag(value) { try encoder.encodeValue(v, forKey: key) }
    }

    mutating func nestedContainer<NestedKey: CodingKey>(
        keyedBy keyType: NestedKey.Type, forKey key: Key
    ) -> KeyedEncodingContainer<NestedKey> {
        encoder.writeEnumIndex(key, codingPath: codingPath)
        return KeyedEncodingContainer(
            _PostcardKeyedEncodingContainer<NestedKey>(encoder: encoder, codingPath: codingPath + [key]))
    }

    mutating func nestedUnkeyedContainer(forKey key: Key) -> any UnkeyedEncodingContainer {
        encoder.writeEnumIndex(key, codingPath: codingPath)
        return encoder.makeUnkeyedContainer(codingPath: codingPath + [key])
    }

    mutating func superEncoder() -> any Encoder { encoder }

    mutating func superEncoder(forKey key: Key) -> any Encoder { encoder }
}

internal struct _PostcardUnkeyedEncodingContainer: UnkeyedEncodingContainer {
    let encoder: _PostcardEncoder
    let codingPath: [any CodingKey]
    /// Index of this container's placeholder in `encoder.pendingCounts`.
    let slot: Int
    /// Byte offset of this container's count placeholder.
    let position: Int
    private var localCount = 0

    init(encoder: _PostcardEncoder, codingPath: [any CodingKey], slot: Int, position: Int) {
        self.encoder = encoder
        self.codingPath = codingPath
        self.slot = slot
        self.position = position
    }

    var count: Int { encoder.currentCount(slot: slot, position: position) ?? localCount }

    private mutating func didEncode() {
        localCount = encoder.incrementCount(slot: slot, position: position, codingPath: codingPath)
    }

    private var nextKey: _PostcardIndexKey { _PostcardIndexKey(count) }

    mutating func encodeNil() throws { encoder.writer.writeByte(0); didEncode() }
    mutating func encode(_ value: Bool) throws { encoder.writer.writeBool(value); didEncode() }
    mutating func encode(_ value: String) throws { encoder.writer.writeString(value); didEncode() }
    mutating func encode(_ value: Double) throws { encoder.writer.writeDouble(value); didEncode() }
    mutating func encode(_ value: Float) throws { encoder.writer.writeFloat(value); didEncode() }
    mutating func encode(_ value: Int) throws { encoder.writer.writeZigZag(Int64(value)); didEncode() }
    mutating func encode(_ value: Int8) throws { encoder.writer.writeByte(UInt8(bitPattern: value)); didEncode() }
    mutating func encode(_ value: Int16) throws { encoder.writer.writeZigZag(Int64(value)); didEncode() }
    mutating func encode(_ value: Int32) throws { encoder.writer.writeZigZag(Int64(value)); didEncode() }
    mutating func encode(_ value: Int64) throws { encoder.writer.writeZigZag(value); didEncode() }
    mutating func encode(_ value: UInt) throws { encoder.writer.writeVarint(UInt64(value)); didEncode() }
    mutating func encode(_ value: UInt8) throws { encoder.writer.writeByte(value); didEncode() }
    mutating func encode(_ value: UInt16) throws { encoder.writer.writeVarint(UInt64(value)); didEncode() }
    mutating func encode(_ value: UInt32) throws { encoder.writer.writeVarint(UInt64(value)); didEncode() }
    mutating func encode(_ value: UInt64) throws { encoder.writer.writeVarint(value); didEncode() }

    mutating func encode<T: Encodable>(_ value: T) throws {
        try encoder.encodeValue(value, forKey: nextKey)
        didEncode()
    }

    mutating func nestedContainer<NestedKey: CodingKey>(
        keyedBy keyType: NestedKey.Type
    ) -> KeyedEncodingContainer<NestedKey> {
        let key = nextKey
        didEncode()
        return KeyedEncodingContainer(
            _PostcardKeyedEncodingContainer<NestedKey>(encoder: encoder, codingPath: codingPath + [key]))
    }

    mutating func nestedUnkeyedContainer() -> any UnkeyedEncodingContainer {
        let key = nextKey
        didEncode()
        return encoder.makeUnkeyedContainer(codingPath: codingPath + [key])
    }

    mutating func superEncoder() -> any Encoder {
        didEncode()
        return encoder
    }
}

internal struct _PostcardSingleValueEncodingContainer: SingleValueEncodingContainer {
    let encoder: _PostcardEncoder
    let codingPath: [any CodingKey]

    mutating func encodeNil() throws { encoder.writer.writeByte(0) }
    mutating func encode(_ value: Bool) throws { encoder.writer.writeBool(value) }
    mutating func encode(_ value: String) throws { encoder.writer.writeString(value) }
    mutating func encode(_ value: Double) throws { encoder.writer.writeDouble(value) }
    mutating func encode(_ value: Float) throws { encoder.writer.writeFloat(value) }
    mutating func encode(_ value: Int) throws { encoder.writer.writeZigZag(Int64(value)) }
    mutating func encode(_ value: Int8) throws { encoder.writer.writeByte(UInt8(bitPattern: value)) }
    mutating func encode(_ value: Int16) throws { encoder.writer.writeZigZag(Int64(value)) }
    mutating func encode(_ value: Int32) throws { encoder.writer.writeZigZag(Int64(value)) }
    mutating func encode(_ value: Int64) throws { encoder.writer.writeZigZag(value) }
    mutating func encode(_ value: UInt) throws { encoder.writer.writeVarint(UInt64(value)) }
    mutating func encode(_ value: UInt8) throws { encoder.writer.writeByte(value) }
    mutating func encode(_ value: UInt16) throws { encoder.writer.writeVarint(UInt64(value)) }
    mutating func encode(_ value: UInt32) throws { encoder.writer.writeVarint(UInt64(value)) }
    mutating func encode(_ value: UInt64) throws { encoder.writer.writeVarint(value) }

    mutating func encode<T: Encodable>(_ value: T) throws {
        try encoder.encodeValue(value)
    }
}
