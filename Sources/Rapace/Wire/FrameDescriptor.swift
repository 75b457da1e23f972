/// The 64-byte frame descriptor of rapace wire protocol v1 (spec section 1.1).
///
/// Every integer is little-endian on the wire, with no padding. A payload of 16 bytes or
/// fewer travels in ``inlinePayload``; a larger one lives elsewhere (after the descriptor
/// on stream transports, in shared-memory slots on SHM).
public struct FrameDescriptor: Hashable, Sendable {
    /// Size of an encoded descriptor.
    public static let size = 64
    /// Largest payload carried inline.
    public static let inlineCapacity = 16
    /// `payload_slot` value meaning "payload is inline".
    public static let inlineSlot: UInt32 = 0xFFFF_FFFF
    /// `payload_slot` value reserved by the spec; never sent.
    public static let reservedSlot: UInt32 = 0xFFFF_FFFE
    /// `deadline_ns` value meaning "no deadline".
    public static let noDeadline: UInt64 = .max

    /// `msg_id` (spec 1.3): the sender's next counter value (from 1), or, on a RESPONSE
    /// frame, the `msg_id` of the request it answers.
    public var messageID: UInt64
    /// `channel_id`: 0 for the control channel, else the channel the frame belongs to.
    public var channelID: UInt32
    /// The method hash, or the control verb on channel 0.
    public var methodID: UInt32
    /// `payload_slot`: ``inlineSlot`` for an inline payload; on shared memory the first
    /// slot of the payload's run; 0 elsewhere. Set by ``Frame/prepareForSending()``, then
    /// by the SHM transport when it places the payload.
    public var payloadSlot: UInt32
    /// `payload_generation`: the slot's generation on shared memory (an ABA guard), else 0.
    public var payloadGeneration: UInt32
    /// `payload_offset`: the payload's offset inside the slot run on shared memory, else 0.
    public var payloadOffset: UInt32
    /// `payload_len`: the payload's length in bytes.
    public var payloadLength: UInt32
    /// `flags` (spec 1.2).
    public var flags: FrameFlags
    /// `credit_grant`: bytes of credit for this frame's channel, valid only with
    /// ``FrameFlags/credits``. rapace never sends it (it grants with ``GrantCredits``).
    public var creditGrant: UInt32
    /// Absolute CLOCK_MONOTONIC deadline in nanoseconds, or ``noDeadline``.
    public var deadlineNanoseconds: UInt64
    /// Bytes 48..<64: the payload when inline, zero past `payloadLength`.
    public var inlinePayload: InlinePayload

    /// A descriptor; every field defaults to 0 or empty except ``payloadSlot`` (inline)
    /// and ``deadlineNanoseconds`` (no deadline). ``Frame/prepareForSending()`` sets the
    /// payload fields from the frame's payload.
    public init(
        messageID: UInt64 = 0, channelID: UInt32 = 0, methodID: UInt32 = 0,
        payloadSlot: UInt32 = FrameDescriptor.inlineSlot, payloadGeneration: UInt32 = 0,
        payloadOffset: UInt32 = 0, payloadLength: UInt32 = 0, flags: FrameFlags = [],
        creditGrant: UInt32 = 0, deadlineNanoseconds: UInt64 = FrameDescriptor.noDeadline,
        inlinePayload: InlinePayload = InlinePayload()
    ) {
        self.messageID = messageID
        self.channelID = channelID
        self.methodID = methodID
        self.payloadSlot = payloadSlot
        self.payloadGeneration = payloadGeneration
        self.payloadOffset = payloadOffset
        self.payloadLength = payloadLength
        self.flags = flags
        self.creditGrant = creditGrant
        self.deadlineNanoseconds = deadlineNanoseconds
        self.inlinePayload = inlinePayload
    }

    /// Whether the payload is carried in ``inlinePayload``.
    @inlinable
    public var isInline: Bool { payloadSlot == FrameDescriptor.inlineSlot }

    /// Whether this descriptor has a deadline.
    @inlinable
    public var hasDeadline: Bool { deadlineNanoseconds != FrameDescriptor.noDeadline }

    /// Writes the 64 bytes to `out` (which must have room for 64).
    @inlinable
    public func encode(into out: UnsafeMutableRawPointer) {
        out.storeBytes(of: messageID.littleEndian, toByteOffset: 0, as: UInt64.self)
        out.storeBytes(of: channelID.littleEndian, toByteOffset: 8, as: UInt32.self)
        out.storeBytes(of: methodID.littleEndian, toByteOffset: 12, as: UInt32.self)
        out.storeBytes(of: payloadSlot.littleEndian, toByteOffset: 16, as: UInt32.self)
        out.storeBytes(of: payloadGeneration.littleEndian, toByteOffset: 20, as: UInt32.self)
        out.storeBytes(of: payloadOffset.littleEndian, toByteOffset: 24, as: UInt32.self)
        out.storeBytes(of: payloadLength.littleEndian, toByteOffset: 28, as: UInt32.self)
        out.storeBytes(of: flags.rawValue.littleEndian, toByteOffset: 32, as: UInt32.self)
        out.storeBytes(of: creditGrant.littleEndian, toByteOffset: 36, as: UInt32.self)
        out.storeBytes(of: deadlineNanoseconds.littleEndian, toByteOffset: 40, as: UInt64.self)
        out.storeBytes(of: inlinePayload.low, toByteOffset: 48, as: UInt64.self)
        out.storeBytes(of: inlinePayload.high, toByteOffset: 56, as: UInt64.self)
    }

    /// Reads 64 bytes at `raw` (no alignment needed). Pure copy: never trusts the values.
    @inlinable
    public init(decoding raw: UnsafeRawPointer) {
        messageID = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        channelID = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        methodID = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 12, as: UInt32.self))
        payloadSlot = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        payloadGeneration = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 20, as: UInt32.self))
        payloadOffset = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt32.self))
        payloadLength = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 28, as: UInt32.self))
        flags = FrameFlags(rawValue: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 32, as: UInt32.self)))
        creditGrant = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 36, as: UInt32.self))
        deadlineNanoseconds = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 40, as: UInt64.self))
        inlinePayload = InlinePayload(
            low: raw.loadUnaligned(fromByteOffset: 48, as: UInt64.self),
            high: raw.loadUnaligned(fromByteOffset: 56, as: UInt64.self))
    }

    /// The 64 encoded bytes.
    public var encodedBytes: [UInt8] {
        [UInt8](unsafeUninitializedCapacity: 64) { buffer, count in
            encode(into: UnsafeMutableRawPointer(buffer.baseAddress!))
            count = 64
        }
    }
}

/// The 16 inline payload bytes of a descriptor, stored as two raw 64-bit words in wire
/// byte order (no heap allocation).
public struct InlinePayload: Hashable, Sendable {
    @usableFromInline var low: UInt64
    @usableFromInline var high: UInt64

    /// Sixteen zero bytes.
    @inlinable
    public init() { low = 0; high = 0 }

    @inlinable
    init(low: UInt64, high: UInt64) { self.low = low; self.high = high }

    /// Copies up to 16 bytes in; the rest stays zero.
    @inlinable
    public init(_ bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count <= 16, "inline payload holds at most 16 bytes")
        var value = InlinePayload()
        withUnsafeMutableBytes(of: &value) { dest in
            if let base = bytes.baseAddress, bytes.count > 0 { dest.baseAddress!.copyMemory(from: base, byteCount: bytes.count) }
        }
        self = value
    }

    /// Calls `body` with the first `count` bytes.
    @inlinable
    public func withBytes<R>(count: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        var copy = self
        return try withUnsafeBytes(of: &copy) { try body(UnsafeRawBufferPointer(rebasing: $0.prefix(Swift.min(count, 16)))) }
    }
}
