/// Reads postcard v1 primitives from borrowed bytes.
///
/// The reader never reads outside its buffer: every read checks the bytes that remain first
/// and throws ``PostcardError`` instead. Length prefixes are checked against ``remaining``
/// before anything is allocated, so a hostile length cannot cause a large allocation.
///
/// The reader borrows its buffer: it must not outlive the pointer it was created with
/// (typically the closure of `withUnsafeBytes`).
///
/// ```swift
/// let (id, name) = try bytes.withUnsafeBytes { raw in
///     var reader = PostcardReader(raw)
///     let id = try reader.readVarint32()
///     let name = try reader.readString()
///     try reader.finish()
///     return (id, name)
/// }
/// ```
public struct PostcardReader {
    @usableFromInline
    internal let buffer: UnsafeRawBufferPointer

    @usableFromInline
    internal var _offset: Int

    /// Creates a reader positioned at the start of `buffer`.
    @inlinable
    public init(_ buffer: UnsafeRawBufferPointer) {
        self.buffer = buffer
        self._offset = 0
    }

    /// The number of bytes consumed so far.
    @inlinable
    public var offset: Int { _offset }

    /// The number of bytes not yet consumed.
    @inlinable
    public var remaining: Int { buffer.count &- _offset }

    /// Whether every byte has been consumed.
    @inlinable
    public var isAtEnd: Bool { _offset >= buffer.count }

    // MARK: Varints

    /// Reads an unsigned LEB128 varint of up to 10 bytes.
    ///
    /// Overlong encodings (such as `80 00` for 0) are accepted.
    /// - Throws: `.unexpectedEnd` if the input ends inside the varint, `.varintTooLong` if it
    ///   runs past 10 bytes, `.valueOutOfRange` if the value exceeds `UInt64.max`.
    @inlinable
    public mutating func readVarint64() throws(PostcardError) -> UInt64 {
        let start = _offset
        let end = buffer.count
        guard start < end else {
            throw PostcardError.unexpectedEnd(at: start, needed: 1, remaining: 0)
        }
        let first = buffer[start]
        if first < 0x80 {
            _offset = start &+ 1
            return UInt64(first)
        }
        return try readVarint64Slow(start: start)
    }

    @usableFromInline
    internal mutating func readVarint64Slow(start: Int) throws(PostcardError) -> UInt64 {
        var result: UInt64 = 0
        var position = start
        var shift: UInt64 = 0
        while true {
            guard position < buffer.count else {
                throw PostcardError.unexpectedEnd(at: position, needed: 1, remaining: 0)
            }
            let byte = buffer[position]
            position += 1
            if shift == 63 {
                // Tenth byte: only its lowest bit still fits in 64 bits, and it must end
                // the varint.
                if byte & 0x80 != 0 { throw PostcardError.varintTooLong(at: start) }
                if byte > 1 { throw PostcardError.varintOverflow(at: start) }
            }
            result |= UInt64(byte & 0x7f) << shift
            if byte & 0x80 == 0 {
                _offset = position
                return result
            }
            shift += 7
        }
    }

    /// Reads a varint that must fit in 32 bits.
    /// - Throws: as ``readVarint64()``, and `.valueOutOfRange` if the value exceeds
    ///   `UInt32.max`.
    @inlinable
    public mutating func readVarint32() throws(PostcardError) -> UInt32 {
        let start = _offset
        let value = try readVarint64()
        guard value <= UInt64(UInt32.max) else {
            throw PostcardError.outOfRange(value, at: start, type: "UInt32")
        }
        return UInt32(truncatingIfNeeded: value)
    }

    /// Reads a varint that must fit in 16 bits.
    @inlinable
    internal mutating func readVarint16() throws(PostcardError) -> UInt16 {
        let start = _offset
        let value = try readVarint64()
        guard value <= UInt64(UInt16.max) else {
            throw PostcardError.outOfRange(value, at: start, type: "UInt16")
        }
        return UInt16(truncatingIfNeeded: value)
    }

    /// Reads a zigzag-encoded signed varint (0, 1, 2, 3, … → 0, -1, 1, -2, …).
    /// - Throws: as ``readVarint64()``.
    @inlinable
    public mutating func readZigZag64() throws(PostcardError) -> Int64 {
        let value = try readVarint64()
        return Int64(bitPattern: (value &>> 1) ^ (0 &- (value & 1)))
    }

    /// Reads a zigzag varint that must fit in 32 bits.
    @inlinable
    internal mutating func readZigZag32() throws(PostcardError) -> Int32 {
        let start = _offset
        let value = try readVarint64()
        guard value <= UInt64(UInt32.max) else {
            throw PostcardError.outOfRange(value, at: start, type: "Int32 (zigzag)")
        }
        return Int32(truncatingIfNeeded: Int64(bitPattern: (value &>> 1) ^ (0 &- (value & 1))))
    }

    /// Reads a zigzag varint that must fit in 16 bits.
    @inlinable
    internal mutating func readZigZag16() throws(PostcardError) -> Int16 {
        let start = _offset
        let value = try readVarint64()
        guard value <= UInt64(UInt16.max) else {
            throw PostcardError.outOfRange(value, at: start, type: "Int16 (zigzag)")
        }
        return Int16(truncatingIfNeeded: Int64(bitPattern: (value &>> 1) ^ (0 &- (value & 1))))
    }

    /// Reads a varint length or count and checks that at least that many bytes remain
    /// (every postcard element takes at least one byte).
    @inlinable
    internal mutating func readLength(_ what: String) throws(PostcardError) -> Int {
        let start = _offset
        let length = try readVarint64()
        guard length <= UInt64(remaining) else {
            throw PostcardError.lengthTooLarge(length, at: start, remaining: remaining, what: what)
        }
        return Int(truncatingIfNeeded: length)
    }

    // MARK: Fixed-size values

    /// Reads one raw byte.
    /// - Throws: `.unexpectedEnd` at the end of the input.
    @inlinable
    public mutating func readByte() throws(PostcardError) -> UInt8 {
        let position = _offset
        guard position < buffer.count else {
            throw PostcardError.unexpectedEnd(at: position, needed: 1, remaining: 0)
        }
        _offset = position &+ 1
        return buffer[position]
    }

    /// Reads a Bool byte.
    /// - Throws: `.invalidBool` for any byte other than `0x00` and `0x01`.
    @inlinable
    public mutating func readBool() throws(PostcardError) -> Bool {
        let byte = try readByte()
        switch byte {
        case 0: return false
        case 1: return true
        default: throw PostcardError.invalidBool(byte, at: _offset &- 1)
        }
    }

    /// Returns the next `count` bytes as a view into the reader's buffer (no copy) and
    /// advances past them. The view is valid as long as the buffer is.
    /// - Throws: `.unexpectedEnd` if fewer than `count` bytes remain.
    @inlinable
    public mutating func readRawBytes(count: Int) throws(PostcardError) -> UnsafeRawBufferPointer {
        let position = _offset
        guard count >= 0 else { throw PostcardError.negativeCount(count, at: position) }
        guard count <= remaining else {
            throw PostcardError.unexpectedEnd(at: position, needed: count, remaining: remaining)
        }
        _offset = position &+ count
        return UnsafeRawBufferPointer(rebasing: buffer[position..<(position &+ count)])
    }

    /// Reads a byte buffer (varint length, then the bytes) into a new array.
    /// - Throws: `.lengthTooLarge` if the length exceeds the bytes that remain (checked
    ///   before allocating).
    @inlinable
    public mutating func readByteArray() throws(PostcardError) -> [UInt8] {
        let length = try readLength("byte array length")
        return [UInt8](try readRawBytes(count: length))
    }

    /// Reads a string (varint length, then UTF-8 bytes).
    /// - Throws: `.lengthTooLarge` if the length exceeds the bytes that remain,
    ///   `.invalidUTF8` if the bytes are not well-formed UTF-8.
    @inlinable
    public mutating func readString() throws(PostcardError) -> String {
        let length = try readLength("string length")
        let start = _offset
        let raw = try readRawBytes(count: length)
        if let bad = _postcardFirstInvalidUTF8Index(raw) {
            throw PostcardError.invalidUTF8(stringAt: start, length: length, badByteAt: start + bad)
        }
        return String(decoding: raw, as: UTF8.self)
    }

    /// Reads a Float: 4 bytes, IEEE-754 binary32, little-endian.
    @inlinable
    public mutating func readFloat() throws(PostcardError) -> Float {
        Float(bitPattern: try readUInt32LE())
    }

    /// Reads a Double: 8 bytes, IEEE-754 binary64, little-endian.
    @inlinable
    public mutating func readDouble() throws(PostcardError) -> Double {
        Double(bitPattern: try readUInt64LE())
    }

    /// Reads exactly 4 bytes as a little-endian `UInt32` (not a varint).
    @inlinable
    public mutating func readUInt32LE() throws(PostcardError) -> UInt32 {
        let raw = try readRawBytes(count: 4)
        return UInt32(littleEndian: raw.loadUnaligned(as: UInt32.self))
    }

    /// Reads exactly 8 bytes as a little-endian `UInt64` (not a varint).
    @inlinable
    internal mutating func readUInt64LE() throws(PostcardError) -> UInt64 {
        let raw = try readRawBytes(count: 8)
        return UInt64(littleEndian: raw.loadUnaligned(as: UInt64.self))
    }

    // MARK: Codable and completion

    /// Decodes one `Decodable` value with the postcard Codable mapping (see ``Postcard``)
    /// and advances past it. Trailing bytes are left for the caller; call ``finish()`` to
    /// reject them.
    /// - Throws: ``PostcardError``, or an error thrown by the type's own `init(from:)`.
    ///   On failure the reader's position is left where it was before the call.
    ///
    /// Inlinable: a caller in another module (generated service code) is specialised for
    /// `T`, so a primitive argument compiles down to one reader call instead of a chain of
    /// runtime type comparisons (each of which looked up generic metadata).
    @inlinable
    public mutating func decode<T: Decodable>(_ type: T.Type) throws -> T {
        let start = _offset
        do throws(PostcardError) {
            if let value = try _postcardDecodePrimitive(T.self, from: &self) { return value }
        } catch {
            _offset = start
            throw error
        }
        return try _decodeComposite(T.self)
    }

    /// The Codable path of ``decode(_:)``, for everything that is not a primitive.
    @usableFromInline
    internal mutating func _decodeComposite<T: Decodable>(_ type: T.Type) throws -> T {
        let decoder = _PostcardDecoder(reader: self)
        let value = try decoder.decodeValue(T.self)
        _offset = decoder.reader._offset
        return value
    }

    /// Checks that every byte has been consumed.
    /// - Throws: `.trailingBytes` if any byte is left.
    @inlinable
    public func finish() throws(PostcardError) {
        guard isAtEnd else { throw PostcardError.trailingBytes(remaining, at: _offset) }
    }
}

/// Returns the offset of the first byte that makes `bytes` ill-formed UTF-8 (per the
/// Unicode standard, table 3-7: no overlong forms, no surrogates, nothing above U+10FFFF),
/// or nil if all of it is well-formed.
@usableFromInline
internal func _postcardFirstInvalidUTF8Index(_ bytes: UnsafeRawBufferPointer) -> Int? {
    let count = bytes.count
    var i = 0
    while i < count {
        // ASCII fast path, eight bytes at a time.
        if count &- i >= 8 {
            let word = bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)
            if word & 0x8080_8080_8080_8080 == 0 {
                i &+= 8
                continue
            }
        }
        let lead = bytes[i]
        if lead < 0x80 {
            i &+= 1
            continue
        }
        let length: Int
        var low: UInt8 = 0x80
        var high: UInt8 = 0xBF
        switch lead {
        case 0xC2...0xDF:
            length = 2
        case 0xE0:
            length = 3; low = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF:
            length = 3
        case 0xED:
            length = 3; high = 0x9F
        case 0xF0:
            length = 4; low = 0x90
        case 0xF1...0xF3:
            length = 4
        case 0xF4:
            length = 4; high = 0x8F
        default:
            return i  // continuation byte without a lead, C0, C1, F5…FF
        }
        guard count &- i >= length else { return i }
        let second = bytes[i &+ 1]
        guard second >= low, second <= high else { return i }
        var k = 2
        while k < length {
            guard bytes[i &+ k] & 0xC0 == 0x80 else { return i }
            k &+= 1
        }
        i &+= length
    }
    return nil
}
