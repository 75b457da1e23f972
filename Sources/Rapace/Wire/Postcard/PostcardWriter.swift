/// Appends postcard v1 primitives to a growable byte buffer.
///
/// The first 16 bytes are kept inline in the writer itself, so small encodes (a control
/// message, most requests and results) allocate nothing; the writer moves its bytes to a
/// heap array the first time they no longer fit (or at once, when asked to reserve more).
/// ``payload`` hands the bytes over without a copy where it can.
///
/// The primitive writers never fail. ``encode(_:)`` writes any `Encodable` value through the
/// Codable mapping described on ``Postcard``.
///
/// ```swift
/// var writer = PostcardWriter(reservingCapacity: 64)
/// writer.writeVarint(300)          // ac 02
/// writer.writeString("hi")         // 02 68 69
/// try writer.encode([1, 2] as [UInt32])
/// send(writer.payload)
/// ```
public struct PostcardWriter: Sendable {
    /// The bytes while they fit in 16 (``isSpilled`` false).
    @usableFromInline var small: InlinePayload
    /// How many bytes of ``small`` are used.
    @usableFromInline var smallCount: UInt8
    /// Whether the bytes live in ``heap`` (every byte written, in order) instead of ``small``.
    @usableFromInline var isSpilled: Bool
    /// The bytes once they outgrew the inline storage; empty before.
    @usableFromInline var heap: [UInt8]

    /// Bytes kept inline before the writer allocates.
    public static let inlineCapacity = 16

    /// Creates an empty writer.
    /// - Parameter reservingCapacity: bytes to reserve up front, to avoid regrowth when the
    ///   final size is roughly known. Up to ``inlineCapacity`` nothing is allocated.
    @inlinable
    public init(reservingCapacity: Int = 0) {
        small = InlinePayload()
        smallCount = 0
        heap = []
        if reservingCapacity > PostcardWriter.inlineCapacity {
            heap.reserveCapacity(reservingCapacity)
            isSpilled = true
        } else {
            isSpilled = false
        }
    }

    /// Number of bytes written.
    @inlinable
    public var count: Int { isSpilled ? heap.count : Int(smallCount) }

    /// The bytes written so far, as an array (a new array while they are inline).
    ///
    /// Mutating them in place (`writer.bytes[i] = …`) moves the bytes to the heap first.
    @inlinable
    public var bytes: [UInt8] {
        get {
            if isSpilled { return heap }
            return small.withBytes(count: Int(smallCount)) { Array($0) }
        }
        set {
            heap = newValue
            isSpilled = true
        }
        _modify {
            if !isSpilled { spill(reserving: 0) }
            yield &heap
        }
    }

    /// The bytes written so far as a payload: inline (no allocation) while they fit,
    /// otherwise sharing the writer's array.
    @inlinable
    public var payload: Payload {
        if isSpilled { return Payload(heap) }
        return Payload(storage: .inline(small, count: smallCount))
    }

    /// Calls `body` with the bytes written so far. The pointer must not escape `body`.
    @inlinable
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        if isSpilled { return try heap.withUnsafeBytes(body) }
        return try small.withBytes(count: Int(smallCount), body)
    }

    /// Replaces the byte at `offset` (already written), wherever the bytes live: inline
    /// bytes stay inline.
    @inlinable
    mutating func setByte(_ byte: UInt8, at offset: Int) {
        precondition(offset >= 0 && offset < count, "setByte beyond the written bytes")
        if isSpilled {
            heap[offset] = byte
        } else {
            Swift.withUnsafeMutableBytes(of: &small) { $0[offset] = byte }
        }
    }

    /// Forgets the bytes from offset `count` on.
    @inlinable
    public mutating func truncate(to count: Int) {
        precondition(count >= 0 && count <= self.count, "truncate beyond the written bytes")
        if isSpilled {
            heap.removeSubrange(count...)
        } else {
            smallCount = UInt8(count)
        }
    }

    /// Moves the inline bytes to ``heap`` (reserving room for `extra` more), if not done yet.
    @inlinable @inline(never)
    mutating func spill(reserving extra: Int) {
        guard !isSpilled else { return }
        var array: [UInt8] = []
        array.reserveCapacity(Swift.max(2 * PostcardWriter.inlineCapacity, Int(smallCount) + extra))
        small.withBytes(count: Int(smallCount)) { array.append(contentsOf: $0) }
        heap = array
        isSpilled = true
    }

    /// Appends one byte: the inline fast path, else the heap.
    @inlinable
    mutating func append(_ byte: UInt8) {
        if !isSpilled && smallCount < PostcardWriter.inlineCapacity {
            let index = Int(smallCount)
            Swift.withUnsafeMutableBytes(of: &small) { $0[index] = byte }
            smallCount &+= 1
        } else {
            if !isSpilled { spill(reserving: 1) }  // the out-of-line call only once
            heap.append(byte)
        }
    }

    /// Appends raw bytes: inline while they fit, else the heap.
    @inlinable
    mutating func append(contentsOf raw: UnsafeRawBufferPointer) {
        let n = raw.count
        if !isSpilled && Int(smallCount) + n <= PostcardWriter.inlineCapacity {
            if n > 0 {
                let offset = Int(smallCount)
                Swift.withUnsafeMutableBytes(of: &small) { dest in
                    (dest.baseAddress! + offset).copyMemory(from: raw.baseAddress!, byteCount: n)
                }
                smallCount &+= UInt8(n)
            }
        } else {
            if !isSpilled { spill(reserving: n) }  // the out-of-line call only once
            heap.append(contentsOf: raw)
        }
    }

    /// Appends the elements of a collection of bytes: inline while they fit, else the heap.
    @inlinable
    mutating func append<C: Collection>(contentsOf c: C) where C.Element == UInt8 {
        let done: Void? = c.withContiguousStorageIfAvailable { append(contentsOf: UnsafeRawBufferPointer($0)) }
        if done != nil { return }
        let n = c.count
        if !isSpilled && Int(smallCount) + n <= PostcardWriter.inlineCapacity {
            for byte in c { append(byte) }
        } else {
            if !isSpilled { spill(reserving: n) }  // the out-of-line call only once
            heap.append(contentsOf: c)
        }
    }

    /// How many bytes ``writeVarint(_:)`` writes for `value`.
    static func varintSize(_ value: UInt64) -> Int { max(1, (64 - value.leadingZeroBitCount + 6) / 7) }

    /// Writes `v` as an unsigned LEB128 varint (1 to 10 bytes, 7 bits per byte, least
    /// significant group first, high bit set on every byte but the last).
    @inlinable
    public mutating func writeVarint(_ v: UInt64) {
        var value = v
        while value >= 0x80 {
            append(UInt8(truncatingIfNeeded: value) | 0x80)
            value &>>= 7
        }
        append(UInt8(truncatingIfNeeded: value))
    }

    /// Writes `v` zigzag-encoded (0, -1, 1, -2, … → 0, 1, 2, 3, …) as a varint.
    @inlinable
    public mutating func writeZigZag(_ v: Int64) {
        writeVarint(UInt64(bitPattern: (v &<< 1) ^ (v &>> 63)))
    }

    /// Writes one raw byte.
    @inlinable
    public mutating func writeByte(_ b: UInt8) {
        append(b)
    }

    /// Writes a Bool as one byte, `0x01` for true and `0x00` for false.
    @inlinable
    public mutating func writeBool(_ b: Bool) {
        append(b ? 1 : 0)
    }

    /// Appends the bytes of `c` as they are, without a length prefix.
    @inlinable
    public mutating func writeRawBytes<C: Collection>(_ c: C) where C.Element == UInt8 {
        append(contentsOf: c)
    }

    /// Appends the bytes of `p` as they are, without a length prefix.
    @inlinable
    public mutating func writeRawBytes(_ p: UnsafeRawBufferPointer) {
        append(contentsOf: p)
    }

    /// Writes a byte buffer: varint length, then the bytes.
    @inlinable
    public mutating func writeByteArray(_ b: [UInt8]) {
        writeVarint(UInt64(b.count))
        b.withUnsafeBytes { append(contentsOf: $0) }
    }

    /// Writes a byte buffer: varint length, then the bytes.
    @inlinable
    public mutating func writeByteArray(_ p: UnsafeRawBufferPointer) {
        writeVarint(UInt64(p.count))
        append(contentsOf: p)
    }

    /// Writes a string: varint length of its UTF-8 form in bytes, then the UTF-8 bytes.
    @inlinable
    public mutating func writeString(_ s: String) {
        let utf8 = s.utf8
        writeVarint(UInt64(utf8.count))
        append(contentsOf: utf8)
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
        Swift.withUnsafeBytes(of: v.littleEndian) { append(contentsOf: $0) }
    }

    /// Writes `v` as exactly 8 bytes, little-endian (not a varint).
    @inlinable
    internal mutating func writeUInt64LE(_ v: UInt64) {
        Swift.withUnsafeBytes(of: v.littleEndian) { append(contentsOf: $0) }
    }

    /// Appends `value` encoded with the postcard Codable mapping (see ``Postcard``).
    ///
    /// Primitives, `String` and `[UInt8]` take a direct path; everything else goes through
    /// an internal `Encoder` that writes straight into this writer. If encoding throws, the
    /// bytes are restored to what they were before the call.
    /// - Throws: ``PostcardError`` (for example `.unsupportedType`), or an error thrown by
    ///   the value's own `encode(to:)`.
    ///
    /// Inlinable for the same reason as ``PostcardReader/decode(_:)``.
    @inlinable
    public mutating func encode<T: Encodable>(_ value: T) throws {
        if _postcardEncodePrimitive(value, into: &self) { return }
        try _encodeComposite(value)
    }

    /// The Codable path of ``encode(_:)``, for everything that is not a primitive.
    @usableFromInline
    internal mutating func _encodeComposite<T: Encodable>(_ value: T) throws {
        let start = count
        // Move the buffer into the encoder so appends do not trigger a copy-on-write.
        var moved = PostcardWriter()
        swap(&moved, &self)
        let encoder = _PostcardEncoder(writer: consume moved)
        do {
            try encoder.encodeValue(value)
        } catch {
            self = encoder.takeWriter()
            truncate(to: start)
            throw error
        }
        self = encoder.takeWriter()
    }
}
