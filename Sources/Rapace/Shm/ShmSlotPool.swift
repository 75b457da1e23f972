import CRapaceShim
import Synchronization

/// Allocates, validates and frees runs of contiguous slots in a segment's pool.
///
/// A slot's state is a two-bit field of the slot table's state words (``SlotStates``): 0
/// free, 1 allocated by the initiator/host, 2 by the acceptor/plugin. The sender allocates a
/// run (compare-and-swap of each state word it covers, 0 → its tag in every field of the
/// run), stamps the run's first slot with a new generation, writes the payload and publishes
/// the descriptor. The receiver checks the run's fields (one load per 32 slots) and the
/// first slot's generation, reads the payload in place, and frees the run (fields → 0,
/// release) when the last view of it is gone; if the sender said it is waiting for slots,
/// the receiver rings the sender's doorbell. A run of hundreds of slots so costs the
/// receiver a few cache lines of slot table, not one per slot.
final class ShmSlotPool: @unchecked Sendable {
    // @unchecked Sendable: `hint`, `waiting` and `leaseConflicts` are loop-confined (allocation happens on the
    // loop); the segment's lease bitmap is a Mutex (leases end on any thread); the rest is
    // immutable.
    let segment: ShmSegment
    let side: ShmSide
    private var hint = 0
    /// What this side last stored in its `slot_waiters` word.
    private var waiting = false
    /// Runs ``allocateHeld(bytes:)`` found free in the slot table but held by this process
    /// (a protocol violation: the peer cleared fields of a run it did not own any more).
    private(set) var leaseConflicts = 0
    /// How many runs ``allocateHeld(bytes:)`` tries before it gives up on such conflicts.
    static let heldAllocationAttempts = 8

    init(segment: ShmSegment, side: ShmSide) {
        self.segment = segment
        self.side = side
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
        /// The last busy slot of the run in the first of its state words that had one.
        case busy(Int)
    }

    private func tryClaim(_ start: Int, _ count: Int, _ tag: UInt32) -> Claim {
        let run = start..<(start + count)
        var busy = -1
        func noteBusy(_ word: Int, _ taken: UInt64) { busy = word * SlotStates.slotsPerWord + (63 - taken.leadingZeroBitCount) / 2 }
        // A run over several words is looked at first (one load per word): claiming its
        // first words before finding a later one busy would show the peer slots that were
        // never going to be used, and cost two exchanges per word.
        if start / SlotStates.slotsPerWord != (start + count - 1) / SlotStates.slotsPerWord {
            let free = SlotStates.forEachWord(run) { word, mask in
                let taken = rapace_load_acquire_u64(segment.slotStateWord(word)) & mask
                if taken != 0 { noteBusy(word, taken) }
                return taken == 0
            }
            guard free else { return .busy(busy) }
        }
        let pattern = SlotStates.pattern(tag)
        var failedWord = -1
        let claimed = SlotStates.forEachWord(run) { word, mask in
            let pointer = segment.slotStateWord(word)
            var found = rapace_load_acquire_u64(pointer)
            // A failed exchange may only mean the peer changed other fields of this word.
            while found & mask == 0 {
                if rapace_cas_u64(pointer, &found, found | (pattern & mask)) != 0 { return true }
            }
            noteBusy(word, found & mask)
            failedWord = word
            return false
        }
        guard claimed else {
            // Give back the words claimed before the one that failed (a race with the peer
            // since the look): the peer may have seen them taken and begun to wait. Nothing
            // was claimed if the first word failed — always so for a run inside one word —
            // and then nothing is given back and nobody is woken: a waiting sender that
            // rang its own doorbell for every busy slot it tried would wake itself, try
            // again and ring again, in a loop, while the pool stays full.
            guard failedWord != start / SlotStates.slotsPerWord else { return .busy(busy) }
            _ = SlotStates.forEachWord(run) { word, mask in
                guard word != failedWord else { return false }
                rapace_fetch_and_release_u64(segment.slotStateWord(word), ~mask)
                return true
            }
            wakeWaitingSenders()
            return .busy(busy)
        }
        let generation = rapace_load_relaxed_u32(segment.slotGenerationPointer(start)) &+ 1
        rapace_store_relaxed_u32(segment.slotGenerationPointer(start), generation)
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
        let generationPointer = segment.slotGenerationPointer(slot)
        rapace_prefetch(generationPointer)  // its miss overlaps the state words'
        // The handler reads the payload's start first (a length prefix, a header): a payload
        // written long ago or in bulk is out of the caches, and this miss (with its page
        // walk) then overlaps the checks and the dispatch (Docs/performance.md, fifteenth pass).
        rapace_prefetch(segment.slotData(slot) + offset)
        let peerPattern = SlotStates.pattern(side.other.slotTag)
        var wrong: (slot: Int, state: UInt64)?
        _ = SlotStates.forEachWord(slot..<(slot + count)) { word, mask in
            let found = rapace_load_acquire_u64(segment.slotStateWord(word))
            let differing = (found ^ peerPattern) & mask
            if differing == 0 { return true }
            let field = differing.trailingZeroBitCount / 2
            wrong = (word * SlotStates.slotsPerWord + field, (found >> UInt64(2 * field)) & 3)
            return false
        }
        if let wrong {
            throw ShmError(.protocolViolation, "slot \(wrong.slot) is not allocated by the peer (state \(wrong.state))")
        }
        let generation = rapace_load_relaxed_u32(generationPointer)
        guard generation == descriptor.payloadGeneration else {
            throw ShmError(.protocolViolation, "stale generation for slot \(slot): descriptor \(descriptor.payloadGeneration), slot \(generation)")
        }
        let fresh = segment.leases.withLock { $0.claim(slot..<(slot + count)) }
        guard fresh else {
            throw ShmError(.protocolViolation, "slots \(slot)..<\(slot + count) are already held by an earlier payload")
        }
        return (slot, count)
    }

    /// Ends a hold on a run — a received view (allocated by the peer) or an allocated run
    /// never sent (allocated here) — and wakes whichever sender waits for slots.
    ///
    /// The run is freed only if its first slot still carries `generation`, and then only
    /// the fields that still hold the allocator's tag: a reset or reclaim that freed the
    /// slots meanwhile bumped their generations, so a late release never frees a run
    /// allocated since. The fields are cleared under the lease lock, like the lease bits: a
    /// reset or a reclaim of this process (which take the lock too) cannot free them in
    /// between. The lock is per process: the other process's reset can still come between
    /// this generation check and the clear (the old plugin releasing a view while the host
    /// prepares the segment for the next one) — see Docs/shm.md, "Ownership".
    func release(slot: Int, count: Int, generation: UInt32, allocatedBy allocator: ShmSide) {
        let tag = allocator.slotTag
        segment.leases.withLock { leases in
            leases.clear(slot..<(slot + count))
            guard rapace_load_relaxed_u32(segment.slotGenerationPointer(slot)) == generation else { return }
            // One snapshot and one AND per word: inside a run this side leases, a field holding
            // the allocator's tag changes only through the peer's reset of the segment (the
            // window Docs/shm.md states under "Ownership"), which a compare-and-swap would
            // not close either; the word's other fields are left as they are.
            _ = SlotStates.forEachWord(slot..<(slot + count)) { word, mask in
                let pointer = segment.slotStateWord(word)
                let held = SlotStates.fields(of: rapace_load_acquire_u64(pointer), equalTo: tag) & mask
                if held != 0 { rapace_fetch_and_release_u64(pointer, ~held) }
                return true
            }
        }
        wakeWaitingSenders()
    }

    /// After slots were freed: rings each side whose `wants_slots` is set (the pool is
    /// shared, so our own sender may be the one waiting). Rings the connection that uses
    /// the segment now, which is not the one the slots came from if that has ended.
    private func wakeWaitingSenders() {
        rapace_fence_seq_cst()
        let peerWaits = rapace_load_seq_cst_u32(segment.slotWaitersPointer(side.other)) != 0
        let selfWaits = rapace_load_seq_cst_u32(segment.slotWaitersPointer(side)) != 0
        guard peerWaits || selfWaits, let bells = segment.doorbells.withLock({ $0 }) else { return }
        if peerWaits { bells.ringPeer() }
        if selfWaits { bells.ringOwn() }
    }

    /// Allocates a run for a buffer written in place before it is sent: held in the
    /// segment's leases until ``handOver(slot:count:)`` or its release, so neither a
    /// reclaim after the peer's death nor the next connection frees it.
    ///
    /// The slot table is shared with the peer: one that clears the fields of a run this
    /// process still holds (it views the run, or its buffer is unsent) lets ``allocate(bytes:)``
    /// claim slots whose lease is taken. Such a run stays claimed with our tag and unused —
    /// later allocations skip it; a reset or a reclaim frees it once it is no longer held —
    /// and another run is tried, up to ``heldAllocationAttempts`` in all; then nil, as for a
    /// full pool. (A plain ``allocate(bytes:)`` over such slots can only garble the bytes
    /// of the held run, which are read through bounds-checked views.)
    func allocateHeld(bytes: Int) -> (slot: Int, count: Int, generation: UInt32)? {
        for _ in 0..<Self.heldAllocationAttempts {
            guard let run = allocate(bytes: bytes) else { return nil }
            // All or nothing: a claim that overlaps a held slot sets no bit.
            if segment.leases.withLock({ $0.claim(run.slot..<(run.slot + run.count)) }) { return run }
            leaseConflicts += 1
        }
        return nil
    }

    /// An allocated run was published to the peer: the peer frees it from now on.
    func handOver(slot: Int, count: Int) {
        segment.leases.withLock { $0.clear(slot..<(slot + count)) }
    }

    /// Frees the run of a descriptor this side wrote and never published (a batch that a
    /// failure cut short): the peer never saw it, so nobody else will. The descriptor is
    /// read back from our ring, where a broken peer can write too, so only a run inside the
    /// pool that this process does not hold is freed (held: a view, or a buffer not handed
    /// over), and `release` frees it only if it still has the descriptor's generation and
    /// our tag. A run of ours the peer owns (published before) it could free itself anyway.
    func takeBack(_ descriptor: FrameDescriptor) {
        let slot = Int(descriptor.payloadSlot)
        let count = runLength(bytes: Int(descriptor.payloadOffset) + Int(descriptor.payloadLength))
        // Held while it is freed, like any release: the claim fails if a bit is set already.
        guard slot < slotCount, count <= slotCount - slot, segment.leases.withLock({ $0.claim(slot..<(slot + count)) }) else { return }
        release(slot: slot, count: count, generation: descriptor.payloadGeneration, allocatedBy: side)
    }

    /// Slots currently free (for tests and diagnostics).
    var freeCount: Int {
        var free = 0
        _ = SlotStates.forEachWord(0..<slotCount) { word, mask in
            free += (SlotStates.fields(of: rapace_load_acquire_u64(segment.slotStateWord(word)), equalTo: 0) & mask).nonzeroBitCount / 2
            return true
        }
        return free
    }

    /// Frees every slot this side sent and the peer did not free (after the peer died: it
    /// never will). Runs allocated here and not sent yet stay with their buffers.
    func reclaimOwn() {
        let tag = side.slotTag
        // A field holding our tag changes only by the peer freeing it (it closed its socket:
        // gone, or done with the connection), which AND-clearing tolerates, or on this loop;
        // clearing the snapshot's fields clears nothing else.
        segment.freeUnheldFields { SlotStates.fields(of: $0, equalTo: tag) }
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

/// The slot table's state words (Docs/shm.md, "Slot table"): slot `i`'s state is bits
/// `2 × (i mod 32)` and `2 × (i mod 32) + 1` of little-endian u64 word `i / 32`; 0 free,
/// 1 allocated by the host, 2 by the plugin (3 is never written).
enum SlotStates {
    static let slotsPerWord = 32
    /// The low bit of every field.
    static let lowBits: UInt64 = 0x5555_5555_5555_5555

    /// `tag` in every field of a word.
    static func pattern(_ tag: UInt32) -> UInt64 { lowBits &* UInt64(tag & 3) }

    /// Calls `body` with each (state word, mask of the fields of `range` in it), in order,
    /// until it returns false; false if it did.
    @inline(__always)
    static func forEachWord(_ range: Range<Int>, _ body: (Int, UInt64) -> Bool) -> Bool {
        forEachWordPiece(range, bitsPerSlot: 2, body)
    }

    /// Both bits of every field of `word` that holds `tag`.
    static func fields(of word: UInt64, equalTo tag: UInt32) -> UInt64 {
        let difference = word ^ pattern(tag)
        let equal = ~(difference | (difference >> 1)) & lowBits
        return equal | (equal << 1)
    }

    /// Both bits of the field of every slot whose bit is set in `bits` (one bit per slot,
    /// the 32 slots of one state word).
    static func fieldMask(ofSlotBits bits: UInt32) -> UInt64 {
        var spread = UInt64(bits)
        spread = (spread | (spread << 16)) & 0x0000_FFFF_0000_FFFF
        spread = (spread | (spread << 8)) & 0x00FF_00FF_00FF_00FF
        spread = (spread | (spread << 4)) & 0x0F0F_0F0F_0F0F_0F0F
        spread = (spread | (spread << 2)) & 0x3333_3333_3333_3333
        spread = (spread | (spread << 1)) & lowBits
        return spread | (spread << 1)
    }
}

/// One bit per slot, set while this process holds that slot (``ShmSegment/leases``).
struct LeaseBitmap: ~Copyable {
    private var words: [UInt64]

    init(count: Int) { words = [UInt64](repeating: 0, count: (count + 63) / 64) }

    /// Sets every bit of `range`; false (and nothing set) when one was set already.
    mutating func claim(_ range: Range<Int>) -> Bool {
        guard forEachWordPiece(range, bitsPerSlot: 1, { self.words[$0] & $1 == 0 }) else { return false }
        _ = forEachWordPiece(range, bitsPerSlot: 1) { self.words[$0] |= $1; return true }
        return true
    }

    /// The bits of the 32 slots of slot-state word `word` (``SlotStates``).
    func bits(ofStateWord word: Int) -> UInt32 {
        UInt32(truncatingIfNeeded: words[word >> 1] >> UInt64(32 * (word & 1)))
    }

    mutating func clear(_ range: Range<Int>) {
        _ = forEachWordPiece(range, bitsPerSlot: 1) { self.words[$0] &= ~$1; return true }
    }
}

/// Calls `body` with each (word index, mask) piece of `range` in an array of u64 words
/// holding `bitsPerSlot` bits per slot (1 or 2), in order, until it returns false; false if
/// it did. No allocation: it runs for every shared-memory payload.
@inline(__always)
func forEachWordPiece(_ range: Range<Int>, bitsPerSlot: Int, _ body: (Int, UInt64) -> Bool) -> Bool {
    let slotsPerWord = 64 / bitsPerSlot
    var slot = range.lowerBound
    while slot < range.upperBound {
        let first = slot % slotsPerWord
        let span = min(slotsPerWord - first, range.upperBound - slot)
        let bits = span * bitsPerSlot
        let mask: UInt64 = bits == 64 ? .max : ((1 << UInt64(bits)) - 1) << UInt64(first * bitsPerSlot)
        if !body(slot / slotsPerWord, mask) { return false }
        slot += span
    }
    return true
}
