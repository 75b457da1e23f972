import Synchronization

/// Bytes that live in a shared-memory segment's slot pool: the zero-copy payload of rapace.
///
/// Two kinds exist:
/// - **Received**: a byte-buffer payload that arrived over SHM is handed to the handler as a
///   view into the peer's slots, with no copy. The slots return to the pool when the last
///   ``Payload`` (or slice) referring to this buffer is released — also when the handler
///   throws or is cancelled, because the lease is tied to the object's lifetime.
/// - **Allocated**: ``ShmTransport/allocateBuffer(count:)`` reserves slots for a payload the
///   sender writes in place (``withUnsafeMutableBytes(_:)``); sending a ``Payload`` that
///   borrows it moves the slots to the peer without a copy. An allocated buffer that is
///   never sent is freed when released.
///
/// Access is scoped: the pointers handed to the closures must not escape them.
///
/// Sending an allocated buffer over its own segment moves its slots to the peer, which frees
/// them when it is done: the buffer can be sent once. From the send on, writing it traps and
/// sending it again is refused (`FAILED_PRECONDITION`); once its frame is published to the
/// peer, reading it traps too (its memory may already hold another payload). Allocate a new
/// buffer for a retry. Sending it over another transport copies the bytes and leaves it as
/// it was.
public final class ShmBuffer: PayloadStorage, @unchecked Sendable {
    // @unchecked Sendable: the memory is shared and accessed only through the scoped
    // accessors; the state word is an atomic.
    enum Kind { case received, allocated }

    let pool: ShmSlotPool
    let kind: Kind
    let slot: Int
    let slotCount: Int
    let generation: UInt32
    let offset: Int
    private let memory: UnsafeRawBufferPointer
    /// Allocated buffers: ``owned``, ``queued`` or ``handedOver``.
    private let state = Atomic<UInt8>(ShmBuffer.owned)
    /// Owned here: readable and writable, freed when released.
    private static let owned: UInt8 = 0
    /// Taken by a send: the transport queued its frame. Freed here if that frame is dropped
    /// (the connection closed first), since the frame's release is then this buffer's.
    private static let queued: UInt8 = 1
    /// Published to the peer, which frees the slots.
    private static let handedOver: UInt8 = 2

    init(pool: ShmSlotPool, kind: Kind, slot: Int, slotCount: Int, generation: UInt32, offset: Int, count: Int) {
        self.pool = pool
        self.kind = kind
        self.slot = slot
        self.slotCount = slotCount
        self.generation = generation
        self.offset = offset
        let start = pool.segment.slotData(slot) + offset
        self.memory = UnsafeRawBufferPointer(start: start, count: count)
    }

    /// The segment this buffer lives in.
    public var segment: ShmSegment { pool.segment }

    /// Number of bytes (also after the buffer was sent).
    public var count: Int { memory.count }

    /// The bytes in the segment: the payload's part of its slot run. Valid while this
    /// buffer lives and, for an allocated buffer, until its frame is published to the peer
    /// (reading it later traps; a copy of it sent before is made before that: at once over
    /// another transport, ahead of the buffer's own frame over its segment); prefer the
    /// scoped accessors below.
    public var bytes: UnsafeRawBufferPointer {
        if kind == .allocated {
            precondition(state.load(ordering: .acquiring) != Self.handedOver, "rapace: ShmBuffer read after it was sent (its slots belong to the peer)")
        }
        return memory
    }

    /// Whether this allocated buffer was taken by a send over its segment: it cannot be
    /// written or sent again. (Also when that frame was then dropped unsent: the connection
    /// closed, or no slots came free for the frames before it.)
    public var wasSent: Bool { kind == .allocated && state.load(ordering: .acquiring) != Self.owned }

    /// Bytes of the run before ``offset`` kept free for the encoding around a byte buffer
    /// (``ShmTransport/allocateByteBuffer(count:)``): 0 for a buffer from
    /// ``ShmTransport/allocateBuffer(count:)``, and for a received one.
    var headroom: Int { kind == .allocated ? offset : 0 }

    /// Reads the bytes in place (an allocated buffer: until its frame is published).
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(bytes)
    }

    /// Writes the bytes in place (allocated buffers, before they are sent).
    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        precondition(kind == .allocated, "rapace: a received ShmBuffer is read-only")
        precondition(state.load(ordering: .acquiring) == Self.owned, "rapace: ShmBuffer written after it was sent")
        return try body(UnsafeMutableRawBufferPointer(mutating: memory))
    }

    /// Takes an allocated buffer for a send over its segment; false if a send took it already.
    func takeForSending() -> Bool {
        guard kind == .allocated else { return false }
        return state.compareExchange(expected: Self.owned, desired: Self.queued, ordering: .acquiringAndReleasing).exchanged
    }

    /// The frame that took it is published: the peer frees the slots from now on.
    func markHandedOver() {
        state.store(Self.handedOver, ordering: .releasing)
    }

    /// The most bytes put before a byte buffer (``prefixed(with:)``, then
    /// ``ShmBufferView/prefixed(with:)``): a CallResult's five one-byte fields, the body's
    /// length and the buffer's length, two varints of a 32-bit size.
    static let encodingHeadroom = 16

    /// This buffer's bytes with `prefix` written just before them (in the headroom), as a
    /// payload that sends without a copy; nil when the headroom is too small or the buffer
    /// is no longer writable here.
    func prefixed(with prefix: UnsafeRawBufferPointer) -> ShmBufferView? {
        view(lead: prefix.count, writing: prefix)
    }

    /// A view reaching `lead` bytes before this buffer's own, `prefix` written at its start.
    fileprivate func view(lead: Int, writing prefix: UnsafeRawBufferPointer) -> ShmBufferView? {
        guard lead <= headroom, state.load(ordering: .acquiring) == Self.owned else { return nil }
        UnsafeMutableRawPointer(mutating: memory.baseAddress! - lead).copyMemory(from: prefix.baseAddress!, byteCount: prefix.count)
        return ShmBufferView(buffer: self, lead: lead)
    }

    /// The memory from `lead` bytes before the buffer's own to its end (through the state check).
    func bytes(lead: Int) -> UnsafeRawBufferPointer {
        let own = bytes
        return UnsafeRawBufferPointer(start: own.baseAddress.map { $0 - lead }, count: lead + own.count)
    }

    deinit {
        switch kind {
        case .received:
            pool.release(slot: slot, count: slotCount, generation: generation, allocatedBy: pool.side.other)
        case .allocated:
            if state.load(ordering: .acquiring) != Self.handedOver { pool.release(slot: slot, count: slotCount, generation: generation, allocatedBy: pool.side) }
        }
    }
}

/// An allocated ``ShmBuffer`` together with encoding bytes written before it in its
/// headroom (a byte buffer's postcard length, a result's CallResult fields): what a request
/// or a reply whose only content is that buffer sends, without a copy.
final class ShmBufferView: PayloadStorage, @unchecked Sendable {
    // @unchecked Sendable: immutable; the memory is reached through the buffer's checks.
    let buffer: ShmBuffer
    /// Bytes before the buffer's own.
    let lead: Int

    init(buffer: ShmBuffer, lead: Int) {
        self.buffer = buffer
        self.lead = lead
    }

    var bytes: UnsafeRawBufferPointer { buffer.bytes(lead: lead) }
    var count: Int { lead + buffer.count }

    /// These bytes with `prefix` written just before them, as ``ShmBuffer/prefixed(with:)``.
    func prefixed(with prefix: UnsafeRawBufferPointer) -> ShmBufferView? {
        buffer.view(lead: lead + prefix.count, writing: prefix)
    }
}

extension Payload {
    /// The allocated ``ShmBuffer`` behind this payload: the payload is it, a view of it with
    /// encoding bytes before it (`lead` of them), or a slice of either (`whole` false).
    /// Casts only borrowed storage, a received buffer's in one step.
    var shmOrigin: (buffer: ShmBuffer, lead: Int, whole: Bool)? {
        guard case .external(var owner) = storage else { return nil }
        var whole = true
        while true {
            if let buffer = owner as? ShmBuffer { return buffer.kind == .allocated ? (buffer, 0, whole) : nil }
            if let view = owner as? ShmBufferView { return (view.buffer, view.lead, whole) }
            guard let slice = owner as? PayloadSlice else { return nil }
            owner = slice.base
            whole = false
        }
    }

    /// The allocated buffer that this payload is as a whole (itself or a view of it), which
    /// a send over its segment publishes without a copy, and the bytes before its own.
    var shmAllocation: (buffer: ShmBuffer, lead: Int)? {
        guard let origin = shmOrigin, origin.whole else { return nil }
        return (origin.buffer, origin.lead)
    }

    /// Whether the payload borrows an ``ShmBuffer`` already taken by a send over its
    /// segment: its bytes are the peer's, so it cannot be sent or read again.
    var borrowsSentBuffer: Bool { shmOrigin?.buffer.wasSent ?? false }

    /// The same bytes in memory of their own: what a transport that reads the payload after
    /// `send` returns keeps of one that borrows an allocated buffer it does not publish.
    func ownedCopy() -> Payload { withUnsafeBytes { Payload(Array($0)) } }
}
