import CRapaceShim
import Synchronization

/// Allocates, validates and frees runs of contiguous slots in a segment's pool.
///
/// A slot's state word says who allocated it (0 free, 1 initiator/host, 2 acceptor/plugin).
/// The sender allocates a run (compare-and-swap 0 → its tag on every slot), stamps every
/// slot with the same new generation, writes the payload and publishes the descriptor. The
/// receiver checks state and generation of every slot in the run, reads the payload in
/// place, and frees the run (state → 0, release) when the last view of it is gone; if the
/// sender said it is waiting for slots, the receiver rings the sender's doorbell.
final class ShmSlotPool: @unchecked Sendable {
    // @unchecked Sendable: `hint` and `waiting` are loop-confined (allocation happens on the
    // loop); the segment's lease bitmap is a Mutex (leases end on any thread); the rest is
    // immutable.
    let segment: ShmSegment
    let side: ShmSide
    private var hint = 0
    /// What this side last stored in its `slot_waiters` word.
    private var waiting = false
    /// Rings the peer's doorbell (from any thread).
    let ringPeer: @Sendable () -> Void
    /// Rings our own doorbell (from any thread): a lease ended while we wait for slots.
    let ringSelf: @Sendable () -> Void

    init(segment: ShmSegment, side: ShmSide, ringPeer: @escaping @Sendable () -> Void, ringSelf: @escaping @Sendable () -> Void = {}) {
        self.segment = segment
        self.side = side
        self.ringPeer = ringPeer
        self.ringSelf = ringSelf
    }

    var slotSize: Int { Int(segment.config.slotSize) }
    var slotCount: Int { Int(segment.config.slotCount) }

    /// Slots needed for `bytes` starting at offset 0.
    func runLength(bytes: Int) -> Int { max(1, (bytes + slotSize - 1) / slotSize) }

    /// Allocates a run for `bytes`; nil when no run is free now.
    func allocate(bytes: Int) -> (slot: Int, count: Int, generation: UInt32)? {
        let count = runLength(bytes: bytes)
        guard count <= slotCount else { return nil }
        let tag = side.slotTag
        var start = hint
        var examined = 0
        while examined < slotCount {
            if start + count > slotCount {
                examined += slotCount - start
                start = 0
                continue
            }
            switch tryClaim(start, count, tag) {
            case .claimed(let run):
                hint = (start + count) % slotCount
                return run
            case .busy(let slot):
                // Nothing starting at or before a busy slot can fit: skip past it.
                examined += slot + 1 - start
                start = slot + 1
            }
        }
        return nil
    }

    private enum Claim {
        case claimed((slot: Int, count: Int, generation: UInt32))
        case busy(Int)
    }

    private func tryClaim(_ start: Int, _ count: Int, _ tag: UInt32) -> Claim {
        for slot in start..<(start + count) where rapace_load_acquire_u32(segment.slotStatePointer(slot)) != 0 {
            return .busy(slot)
        }
        var claimed = 0
        while claimed < count {
            if rapace_cas_u32(segment.slotStatePointer(start + claimed), 0, tag) == 0 { break }
            claimed += 1
        }
        guard claimed == count else {
            for slot in start..<(start + claimed) { rapace_store_release_u32(segment.slotStatePointer(slot), 0) }
            return .busy(start + claimed)
        }
        let generation = rapace_load_relaxed_u32(segment.slotGenerationPointer(start)) &+ 1
        for slot in start..<(start + count) {
            rapace_store_relaxed_u32(segment.slotGenerationPointer(slot), generation)
        }
        return .claimed((start, count, generation))
    }


    /// Checks a received descriptor's slot fields; returns the run it occupies.
    func validateIncoming(_ descriptor: FrameDescriptor) throws(ShmError) -> (slot: Int, count: Int) {
        let slot = Int(descriptor.payloadSlot)
        let offset = Int(descriptor.payloadOffset)
        let length = Int(descriptor.payloadLength)
        guard slot < slotCount else {
            throw ShmError(.protocolViolation, "descriptor names slot \(descriptor.payloadSlot); the pool has \(slotCount)")
        }
        guard offset < slotSize else {
            throw ShmError(.protocolViolation, "payload offset \(offset) is not inside the first slot (\(slotSize) bytes)")
        }
        let end = slot * slotSize + offset + length
        guard end <= slotCount * slotSize else {
            throw ShmError(.protocolViolation, "payload of \(length) bytes at slot \(slot) offset \(offset) runs past the end of the pool")
        }
        let count = runLength(bytes: offset + length)
        let peerTag = side.other.slotTag
        if count > 8 {
            // A long run's slot-table entries are often out of the cache (the sender just
            // wrote megabytes): ask for all their lines at once so the misses overlap.
            let first = segment.slotStatePointer(slot)
            var line = 0
            while line < count * ShmLayout.slotEntrySize {
                rapace_prefetch(first + line)
                line += 64
            }
        }
        for index in slot..<(slot + count) {
            let state = rapace_load_acquire_u32(segment.slotStatePointer(index))
            guard state == peerTag else {
                throw ShmError(.protocolViolation, "slot \(index) is not allocated by the peer (state \(state))")
            }
            let generation = rapace_load_relaxed_u32(segment.slotGenerationPointer(index))
            guard generation == descriptor.payloadGeneration else {
                throw ShmError(.protocolViolation, "stale generation for slot \(index): descriptor \(descriptor.payloadGeneration), slot \(generation)")
            }
        }
        let fresh = segment.leases.withLock { $0.claim(slot..<(slot + count)) }
        guard fresh else {
            throw ShmError(.protocolViolation, "slots \(slot)..<\(slot + count) are already held by an earlier payload")
        }
        return (slot, count)
    }

    /// Ends a lease: frees the run (if it still carries `generation`) and wakes a waiting sender.
    ///
    /// The slots are freed under the lease lock, like the lease bit: a reset for the next
    /// connection or a reclaim (which take the lock too) must not free them in between and
    /// have this late store free a slot that has been allocated again.
    func release(slot: Int, count: Int, generation: UInt32) {
        let peerTag = side.other.slotTag
        segment.leases.withLock { leases in
            leases.clear(slot..<(slot + count))
            for index in slot..<(slot + count) {
                let state = segment.slotStatePointer(index)
                if rapace_load_acquire_u32(state) == peerTag && rapace_load_relaxed_u32(segment.slotGenerationPointer(index)) == generation {
                    rapace_store_release_u32(state, 0)
                }
            }
        }
        rapace_fence_seq_cst()
        if rapace_load_seq_cst_u32(segment.slotWaitersPointer(side.other)) != 0 { ringPeer() }
        // Both directions share the pool: our own sender may be the one waiting.
        if rapace_load_seq_cst_u32(segment.slotWaitersPointer(side)) != 0 { ringSelf() }
    }

    /// Allocates a run for a buffer written in place before it is sent: held in the
    /// segment's leases until ``handOver(slot:count:)`` or ``freeOwnAndWake(slot:count:)``,
    /// so neither a reclaim after the peer's death nor the next connection frees it.
    func allocateHeld(bytes: Int) -> (slot: Int, count: Int, generation: UInt32)? {
        guard let run = allocate(bytes: bytes) else { return nil }
        _ = segment.leases.withLock { $0.claim(run.slot..<(run.slot + run.count)) }
        return run
    }

    /// An allocated run was published to the peer: the peer frees it from now on.
    func handOver(slot: Int, count: Int) {
        segment.leases.withLock { $0.clear(slot..<(slot + count)) }
    }

    /// Frees an allocated-but-unsent run and wakes our sender if it waits for slots.
    func freeOwnAndWake(slot: Int, count: Int) {
        // Under the lease lock, as in `release`.
        segment.leases.withLock { leases in
            leases.clear(slot..<(slot + count))
            for index in slot..<(slot + count) { rapace_store_release_u32(segment.slotStatePointer(index), 0) }
        }
        rapace_fence_seq_cst()
        if rapace_load_seq_cst_u32(segment.slotWaitersPointer(side)) != 0 { ringSelf() }
    }

    /// Slots currently free (for tests and diagnostics).
    var freeCount: Int {
        (0..<slotCount).reduce(0) { $0 + (rapace_load_acquire_u32(segment.slotStatePointer($1)) == 0 ? 1 : 0) }
    }

    /// Frees every slot this side sent and the peer did not free (after the peer died: it
    /// never will). Runs allocated here and not sent yet stay with their buffers.
    func reclaimOwn() {
        let tag = side.slotTag
        segment.leases.withLock { leases in
            for slot in 0..<slotCount where rapace_load_acquire_u32(segment.slotStatePointer(slot)) == tag && !leases.contains(slot) {
                rapace_store_release_u32(segment.slotStatePointer(slot), 0)
            }
        }
    }

    /// Marks that this side waits for slots; the caller re-checks for a free run afterwards
    /// (a release either sees the flag and rings, or freed the run before the re-check).
    func setWaiting() {
        waiting = true
        rapace_store_seq_cst_u32(segment.slotWaitersPointer(side), 1)
        rapace_fence_seq_cst()
    }

    /// Clears the flag if this side set it: while it is set, every release in either
    /// direction rings our doorbell. A store only then, so a sender that never waited does
    /// not write the header line the peer reads on every release.
    func clearWaiting() {
        guard waiting else { return }
        waiting = false
        rapace_store_release_u32(segment.slotWaitersPointer(side), 0)
    }
}

/// One bit per slot, set while this process holds that slot (``ShmSegment/leases``).
struct LeaseBitmap: ~Copyable {
    private var words: [UInt64]

    init(count: Int) { words = [UInt64](repeating: 0, count: (count + 63) / 64) }

    func contains(_ slot: Int) -> Bool { words[slot >> 6] & (1 << UInt64(slot & 63)) != 0 }

    /// Calls `body` with each (word index, mask) piece covering `range`, in order, until it
    /// returns false; false if it did. No allocation: this runs for every slot payload.
    @inline(__always)
    private static func forEachPiece(_ range: Range<Int>, _ body: (Int, UInt64) -> Bool) -> Bool {
        var index = range.lowerBound
        while index < range.upperBound {
            let bit = index & 63
            let span = min(64 - bit, range.upperBound - index)
            let mask: UInt64 = span == 64 ? .max : ((1 << UInt64(span)) - 1) << UInt64(bit)
            if !body(index >> 6, mask) { return false }
            index += span
        }
        return true
    }

    /// Sets every bit of `range`; false (and nothing set) when one was set already.
    mutating func claim(_ range: Range<Int>) -> Bool {
        guard Self.forEachPiece(range, { self.words[$0] & $1 == 0 }) else { return false }
        _ = Self.forEachPiece(range) { self.words[$0] |= $1; return true }
        return true
    }

    mutating func clear(_ range: Range<Int>) {
        _ = Self.forEachPiece(range) { self.words[$0] &= ~$1; return true }
    }
}
