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
/// Access is scoped: the pointers handed to the closures must not escape them. After the
/// buffer has been sent, writing to it traps.
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
    /// The bytes in the segment: the payload's part of its slot run. Valid while this
    /// buffer lives; prefer the scoped accessors below.
    public let bytes: UnsafeRawBufferPointer
    /// Allocated buffers: 0 = owned here, 1 = handed to the transport.
    private let handedOff = Atomic<Bool>(false)

    init(pool: ShmSlotPool, kind: Kind, slot: Int, slotCount: Int, generation: UInt32, offset: Int, count: Int) {
        self.pool = pool
        self.kind = kind
        self.slot = slot
        self.slotCount = slotCount
        self.generation = generation
        self.offset = offset
        let start = pool.segment.slotData(slot) + offset
        self.bytes = UnsafeRawBufferPointer(start: start, count: count)
    }

    /// The segment this buffer lives in.
    public var segment: ShmSegment { pool.segment }

    /// Number of bytes.
    public var count: Int { bytes.count }

    /// Reads the bytes in place.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(bytes)
    }

    /// Writes the bytes in place (allocated buffers, before they are sent).
    public func withUnsafeMutableBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E) -> R {
        precondition(kind == .allocated, "rapace: a received ShmBuffer is read-only")
        precondition(!handedOff.load(ordering: .acquiring), "rapace: ShmBuffer written after it was sent")
        return try body(UnsafeMutableRawBufferPointer(mutating: bytes))
    }

    /// Marks an allocated buffer as sent; false if it was already (then it must be copied).
    func takeForSending() -> Bool {
        guard kind == .allocated else { return false }
        return handedOff.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged
    }

    deinit {
        switch kind {
        case .received:
            pool.release(slot: slot, count: slotCount, generation: generation, allocatedBy: pool.side.other)
        case .allocated:
            if !handedOff.load(ordering: .acquiring) { pool.release(slot: slot, count: slotCount, generation: generation, allocatedBy: pool.side) }
        }
    }
}
