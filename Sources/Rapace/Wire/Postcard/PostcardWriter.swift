/// Appends postcard v1 primitives to a growable byte array.
///
/// The primitive writers never fail. ``encode(_:)`` writes any `Encodable` value through the
/// Codable mapping described on ``Postcard``.
///
/// ```swift
/// var writer = PostcardWriter(reservingCapacity: 64)
/// writer.writeVarint(300)          // ac 02
/// writer.writeString("hi")         // 02 68 69
/// try writer.encode([1, 2] as [UInt32])
/// send(writer.bytes)
/// ```
public struct PostcardWriter: Sendable {
    /// The bytes written so far.
    public var bytes: [UInt8]

    /// Creates an empty writer.
    /// - Parameter reservingCapacity: bytes to reserve up front, to avoid regrowth when the
    ///   final size is roughly known.
    @inlinable
    public init(reservingCapacity: Int = 0) {
        bytes = []
        if reservingCapacity > 0 {
            bytes.reserveCapacity(reservingCapacity)
        }
    }

    /// Writes `v` as an unsigned LEB128 varint (1 to 10 bytes, 7 bits per byte, least
    /// significant group first, high bit set on every byte but the last).
    @inlinable
    public mutating func writeVarint(_ v: UInt64) {
        var value = v
        while value >= 0x80 {
            bytes.append(UInt8(truncatingIfNeeded: value) | 0x80)
            value &>>= 7
        }
        bytes.append(UInt8(truncatingIfNeeded: value))
    }

    /// Writes `v` zigzag-encoded (0, -1, 1, -2, … → 0, 1, 2, 3, …) as a varint.
    @inlinable
    public mutating func writeZigZag(_ v: Int64) {
        writeVarint(UInt64(bitPattern: (v &<< 1) ^ (v &>> 63)))
    }

    /// Writes one raw byte.
    @inlinable
    public mutating func writeByte(_ b: UInt8) {
        bytes.append(b)
    }

    /// Writes a Bool as one byte, `0x01` for true and `0x00` for false.
    @inlinable
    public mutating func writeBool(_ b: Bool) {
        bytes.append(b ? 1 : 0)
    }

    /// Appends the bytes of `c` as they are, without a length prefix.
    @inlinable
    public mutating func writeRawBytes<C: Collection>(_ c: C) where C.Element == UInt8 {
        bytes.append(contentsOf: c)
    }

    /// Appends the bytes of `p` as they are, without a length prefix.
    @inlinable
    public mutating func writeRawBytes(_ p: UnsafeRawBufferPointer) {
        bytes.append(contentsOf: p)
    }

    /// Writes a byte buffer: varint length, then the bytes.
    @inlinable
    public mutating func writeByteArray(_ b: [UInt8]) {
        writeVarint(UInt64(b.count))
        bytes.append(contentsOf: b)
    }

    /// Writes a byte buffer: varint length, then the bytes.
    @inlinable
    public mutating func writeByteArray(_ p: UnsafeRawBufferPointer) {
        writeVarint(UInt64(p.count))
        bytes.append(contentsOf: p)
    }

    /// Writes a string: varint length of its UTF-8 form in bytes, then the UTF-8 bytes.
    @inlinable
    public mutating func writeString(_ s: String) {
        let utf8 = s.utf8
        writeVarint(UInt64(utf8.count))
        bytes.append(contentsOf: utf8)
    }

    /// Writes a Float as 4 bytes, IEEE-754 binary32, little-endian.
    @inlinable
    public mutating func writeFloat(_ f: Float) {
        writeUInt32LE(f.bitPattern)
    }

    /// Writes a Double as 8 bytes, IEEE-754 binary64, little-endian.
    @inlinable
    public mutating func writeDouble(_ d: Double) {
        writeUInt64LE(d.bitPattern)
    }

    /// Writes `v` as exactly 4 bytes, little-endian (not a varint).
    @inlinable
    public mutating func writeUInt32LE(_ v: UInt32) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Writes `v` as exactly 8 bytes, little-endian (not a varint).
    @inlinable
    internal mutating func writeUInt64LE(_ v: UInt64) {
        withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Appends `value` encoded with the postcard Codable mapping (see ``Postcard``).
    ///
    /// Primitives, `String` and `[UInt8]` take a direct path; everything else goes through
    /// an internal `Encoder` that writes straight into ``bytes``. If encoding throws,
    /// ``bytes`` is restored to what it was before the call.
    /// - Throws: ``PostcardError`` (for example `.unsupportedType`), or an error thrown by
    ///   the value's own `encode(to:)`.
    public mutating func encode<T: Encodable>(_ value: T) throws {
        if _postcardEncodePrimitive(value, into: &self) { return }
        let start = bytes.count
        // Move the buffer into the encoder so appends do not trigger a copy-on-write.
        var moved = PostcardWriter()
        swap(&moved, &self)
        let encoder = _PostcardEncoder(writer: consume moved)
        do {
            try encoder.encodeValue(value)
        } catch {
            self = encoder.takeWriter()
            bytes.removeSubrange(start...)
            throw error
        }
        self = encoder.takeWriter()
    }
}
