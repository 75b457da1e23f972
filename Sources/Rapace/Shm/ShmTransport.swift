#if canImport(Glibc)
import Glibc
#endif
import CRapaceShim
import Synchronization

/// The shared-memory transport (spec 8.4, layout in Docs/shm.md): descriptors travel
/// through two single-producer/single-consumer rings in a mapped segment, payloads over 16
/// bytes live in slots of the segment, and eventfd doorbells on the reactor wake the peer —
/// only when it said it is going to sleep.
///
/// Received payloads are ``ShmBuffer`` views into the peer's slots (no copy); a payload that
/// borrows a buffer from ``allocateBuffer(count:)`` (or its throwing and waiting forms,
/// ``allocateBufferNow(count:)`` and ``allocateBuffer(count:timeout:)``) is sent without a
/// copy. A bootstrap Unix socket beside the segment carries the doorbells (SCM_RIGHTS) and
/// tells each side when the other dies. Loop-confined, like every transport.
public final class ShmTransport: FrameTransport, ReactorRegistration, ReactorIdleHandler {
    public let reactor: Reactor
    public var sharesMonotonicClock: Bool { true }
    public var maxIncomingPayload: UInt32
    public let peerDescription: String
    /// The pool: no payload can be larger.
    public var payloadCapacity: UInt32? { UInt32(clamping: segment.config.poolBytes) }
    /// Which side of the segment this is.
    public let side: ShmSide
    /// The mapped segment.
    public let segment: ShmSegment
    /// Stall limit: how long queued frames may wait without any progress. A frame that
    /// waited this long for free slots (the peer keeps its leases) is refused: its call fails
    /// `RESOURCE_EXHAUSTED` and the connection goes on. A ring the peer has not consumed from
    /// for this long (it is hung) closes the connection.
    public var stallTimeout: Duration = .seconds(10)
    /// Whether to spin on the incoming ring before the reactor blocks (``ShmSpinPolicy``;
    /// off by default). Set it on the loop thread; both sides choose independently.
    public var spinPolicy: ShmSpinPolicy = .disabled

    let pool: ShmSlotPool
    private let bells: ShmDoorbells
    private let doorbell: Int32       // the peer rings it; we watch it
    private let peerDoorbell: Int32   // we ring it (on the loop, while open: no lock needed)
    private let socket: Int32         // bootstrap socket: liveness
    // The transport's own state below is loop-confined and `@exclusivity(unchecked)`: the
    // runtime check (`swift_beginAccess`, several per frame) could never fire. Only the loop
    // thread touches it, and no access stays open while other code runs: the handler is
    // called with `handler` copied out, frames are taken out of `pending` before they are
    // placed, and the close callbacks run from a copy of `onClose`.
    @exclusivity(unchecked) private var doorbellWatcher: IOWatcher?
    @exclusivity(unchecked) private var socketWatcher: IOWatcher?
    @exclusivity(unchecked) private var handler: (any FrameTransportHandler)?
    @exclusivity(unchecked) private var pending: [Frame] = []
    @exclusivity(unchecked) private var pendingStart = 0
    @exclusivity(unchecked) private var pendingBytes = 0
    @exclusivity(unchecked) private var tail: UInt64 = 0      // producer index of our outgoing ring
    /// The consumer's index of our outgoing ring as last read: reread only when the ring
    /// looks full from it (it only grows, so the real ring has at least this much room).
    @exclusivity(unchecked) private var peerHead: UInt64 = 0
    @exclusivity(unchecked) private var head: UInt64 = 0      // consumer index of our incoming ring
    @exclusivity(unchecked) private var stallTimer: ReactorTimer?
    /// Why the transport closed (nil while open): what allocations made later fail with.
    @exclusivity(unchecked) private(set) var closeError: TransportError?
    var isClosed: Bool { closeError != nil }
    /// Allocations waiting for a run of slots, oldest first (`ShmTransport+Allocation.swift`).
    @exclusivity(unchecked) var allocationWaiters: [PendingAllocation] = []
    /// The bootstrap socket reported the peer's end: nothing it holds will be freed by it.
    @exclusivity(unchecked) private var peerGone = false
    @exclusivity(unchecked) private var readingStopped = false
    /// Frames had to wait (ring full or no slots) and `pending` has not been empty since.
    @exclusivity(unchecked) private var backlogged = false
    /// What the oldest waiting frame waits for, and the descriptors published when the
    /// stall timer was armed (progress since then re-arms it instead of acting).
    @exclusivity(unchecked) private var stallCause = StallCause.ring
    @exclusivity(unchecked) private var tailWhenStallArmed: UInt64 = 0
    private let capacity: UInt64
    @exclusivity(unchecked) private var onClose: [() -> Void] = []
    private let incomingRing: UnsafeMutableRawPointer
    private let outgoingRing: UnsafeMutableRawPointer
    /// Mirrors our `consumer_sleeping` flag (we are its only writer): saves a store per wake.
    @exclusivity(unchecked) private var announcedSleeping = false
    /// An idle look is requested from the reactor (spin mode).
    @exclusivity(unchecked) private var idleRequested = false
    /// This idle turn spins (the budget said so).
    @exclusivity(unchecked) private var spinning = false
    /// The peer corrupted our ring's head index: nothing is published any more (even a
    /// handler that answers the failure with a graceful close gets no goodbye frames out).
    @exclusivity(unchecked) private var writingStopped = false
    /// This idle turn's spin cleared `producer_waiting` to watch for room itself: it must be
    /// set again (and the ring looked at once more) before the loop blocks.
    @exclusivity(unchecked) private var waitingFlagClearedBySpin = false
    /// Spins in a row that saw nothing, and idle turns still to skip because of them.
    @exclusivity(unchecked) private var spinMisses = 0
    @exclusivity(unchecked) private var spinSkips = 0
    /// 1 + the CPU we last published, 0 = none yet.
    @exclusivity(unchecked) private var publishedCPU: UInt32 = 0

    /// Counters for tests and benchmarks.
    public struct Statistics: Sendable {
        /// Doorbells rung (eventfd writes) by this side.
        public var doorbellsRung: UInt64 = 0
        /// Times this side's reactor woke for its own doorbell (rung by the peer, or by a
        /// free in this process while this side waits for slots).
        public var doorbellWakes: UInt64 = 0
        /// Payload bytes copied into slots on send (zero-copy sends add nothing).
        public var bytesCopiedIn: UInt64 = 0
        /// Payloads sent from an allocated ShmBuffer without a copy.
        public var zeroCopySends: UInt64 = 0
        /// Times a send waited for ring space or slots.
        public var stalls: UInt64 = 0
        /// Frames refused because no slots came free within `stallTimeout`.
        public var framesRefused: UInt64 = 0
        /// Idle turns that spun on the ring (spin mode).
        public var spins: UInt64 = 0
        /// Spins that saw a new descriptor before their budget ran out.
        public var spinHits: UInt64 = 0

        /// All zero.
        public init() {}
    }
    /// Counters, updated by the transport as it works (see ``Statistics``). Loop thread only.
    @exclusivity(unchecked) public private(set) var statistics = Statistics()

    init(reactor: Reactor, side: ShmSide, segment: ShmSegment, doorbell: Int32, peerDoorbell: Int32, socket: Int32, peerDescription: String) {
        reactor.preconditionInLoop()
        self.reactor = reactor
        self.side = side
        self.segment = segment
        self.doorbell = doorbell
        self.peerDoorbell = peerDoorbell
        self.socket = socket
        self.peerDescription = peerDescription
        self.capacity = UInt64(segment.config.ringCapacity)
        self.maxIncomingPayload = UInt32(clamping: segment.config.poolBytes)
        let bells = ShmDoorbells(own: doorbell, peer: peerDoorbell)
        self.bells = bells
        // A lease may end after this connection did: the pool rings the doorbells of the
        // connection that uses the segment then (its senders wait for those slots).
        segment.doorbells.withLock { $0 = bells }
        self.pool = ShmSlotPool(segment: segment, side: side)
        let incoming = segment.ringBase(side.other.outgoingRing)
        let outgoing = segment.ringBase(side.outgoingRing)
        incomingRing = incoming
        outgoingRing = outgoing
        head = rapace_load_acquire_u64(incoming + ShmLayout.ringHead)
        tail = rapace_load_acquire_u64(outgoing + ShmLayout.ringTail)
        peerHead = rapace_load_acquire_u64(outgoing + ShmLayout.ringHead)
        if !(peerHead <= tail && tail - peerHead <= capacity) {
            // Nonsense in the segment: treat the ring as full, so the first send rereads the
            // index and reports the corruption.
            peerHead = tail &- capacity
        }
        announcedSleeping = rapace_load_acquire_u32(incoming + ShmLayout.ringConsumerSleeping) != 0
        // Edge-triggered: every doorbell write is a new edge, so a wake costs no read. The
        // counter is drained now and then so it can never saturate.
        doorbellWatcher = IOWatcher(reactor: reactor, fd: doorbell, edgeTriggered: true, onReadable: {})
        socketWatcher = IOWatcher(reactor: reactor, fd: socket, onReadable: {})
        doorbellWatcher?.onReadable = { [unowned self] in self.doorbellRang() }
        socketWatcher?.onReadable = { [unowned self] in self.socketReadable() }
        reactor.register(self)
    }

    /// Runs `body` once the transport has closed (used by the host listener to recycle the segment).
    func whenClosed(_ body: @escaping () -> Void) {
        if isClosed { body() } else { onClose.append(body) }
    }

    // MARK: FrameTransport

    public func start(handler: any FrameTransportHandler) {
        reactor.preconditionInLoop()
        guard !isClosed else {
            handler.transportDidClose(TransportError(.closed, "transport already closed"))
            return
        }
        self.handler = handler
        doorbellWatcher?.setReadEnabled(true)
        socketWatcher?.setReadEnabled(true)
        drainIncoming()
    }

    public func send(_ frame: consuming Frame) {
        guard !isClosed else { return }
        // Not for 16 bytes or fewer: those travel in the descriptor, a copy made now.
        if !frame.descriptor.isInline, let origin = frame.payload.shmOrigin {
            if origin.buffer.pool !== pool {
                // Another segment's buffer: copied now, while it is ours to read. Sent over
                // its own segment later, before this queue is flushed, it no longer would be.
                frame.payload = frame.payload.ownedCopy()
            } else if origin.whole {
                // Ours, whole, moves to the peer: taken now, so that a second send of it is
                // seen at once (the session refuses one: `wasSent`). A slice of it is copied
                // at `place`, before the buffer's own frame (queued behind) is published.
                precondition(origin.buffer.takeForSending(), "rapace: ShmBuffer sent twice (a sent buffer belongs to the peer)")
            }
        }
        pendingBytes += FrameDescriptor.size + frame.payload.count
        pending.append(frame)
    }

    public var queuedOutputBytes: Int { pendingBytes }

    public func flush() {
        guard !isClosed, !writingStopped, pendingStart < pending.count else { return }
        let ring = outgoingRing
        var pushed = 0
        var published = tail
        while pendingStart < pending.count {
            if tail &- peerHead == capacity {
                // Full as far as we know: read the consumer's index (only now, so a batch
                // does not pull the consumer's cache line over once per frame).
                let head = rapace_load_acquire_u64(ring + ShmLayout.ringHead)
                guard head <= tail, tail - head <= capacity, head >= peerHead else {
                    let why = "the peer corrupted the head index of our ring (head \(head), tail \(tail))"
                    // The descriptors this batch wrote and has not published never will be:
                    // their runs are still ours, and nobody else would free them.
                    takeBackUnpublished(since: published)
                    writingStopped = true
                    fail(why)
                    return
                }
                peerHead = head
                if tail - peerHead == capacity {
                    // Really full: publish what we wrote, say we wait, then look once more
                    // (the consumer may have just made room).
                    if published != tail {
                        rapace_store_release_u64(ring + ShmLayout.ringTail, tail)
                        published = tail
                    }
                    publishCPU()  // the consumer wakes us sooner when we are on another CPU
                    rapace_store_seq_cst_u32(ring + ShmLayout.ringProducerWaiting, 1)
                    rapace_fence_seq_cst()
                    if rapace_load_acquire_u64(ring + ShmLayout.ringHead) == peerHead {
                        stalled(.ring)
                        break
                    }
                    rapace_store_seq_cst_u32(ring + ShmLayout.ringProducerWaiting, 0)
                    continue
                }
            }
            // Moved out, not copied: a copy retained the payload's storage here and the
            // reset below released it again.
            var frame = Frame(descriptor: FrameDescriptor(), payload: .empty)
            swap(&frame, &pending[pendingStart])
            if !frame.descriptor.isInline {
                guard place(&frame) else {
                    swap(&frame, &pending[pendingStart])  // back at the head of the queue
                    stalled(.slots)
                    break
                }
            }
            let slot = ring + ShmLayout.ringDescriptors + Int(tail & (capacity - 1)) * FrameDescriptor.size
            frame.descriptor.encode(into: slot)
            tail += 1
            // A long batch is published in steps, so the consumer can start on it meanwhile.
            if tail - published == Self.publishStep {
                rapace_store_release_u64(ring + ShmLayout.ringTail, tail)
                published = tail
            }
            pendingBytes -= FrameDescriptor.size + frame.payload.count
            pendingStart += 1
            pushed += 1
        }
        if published != tail { rapace_store_release_u64(ring + ShmLayout.ringTail, tail) }
        let drained = pendingStart == pending.count && queueEmptied()
        if pushed > 0 {
            rapace_fence_seq_cst()
            if rapace_load_seq_cst_u32(ring + ShmLayout.ringConsumerSleeping) != 0 {
                ringPeer()
            }
            // An answer may come back soon: a look before the loop blocks can spin for it.
            if spinPolicy.isEnabled { requestIdle() }
        }
        if drained { handler?.transportDidDrainOutput() }
    }

    /// How many descriptors a side handles before it publishes its ring index mid-batch
    /// (the rest is published when the batch ends): each store pulls the index's cache line
    /// away from the peer, so one per descriptor would cost a transfer per frame.
    static let publishStep: UInt64 = 32

    /// Ends a batch that a failure cut short: frees the runs of the descriptors written since
    /// `published` (copied payloads, and adopted buffers already handed over) and moves
    /// `tail` back to it, so that nothing ever publishes them. The descriptors are read back
    /// from the ring, which the peer can write too: ``ShmSlotPool/takeBack(_:)`` frees only
    /// runs of ours that this process does not hold.
    private func takeBackUnpublished(since published: UInt64) {
        var index = published
        while index != tail {
            let entry = outgoingRing + ShmLayout.ringDescriptors + Int(index & (capacity - 1)) * FrameDescriptor.size
            let descriptor = FrameDescriptor(decoding: UnsafeRawPointer(entry))
            if !descriptor.isInline { pool.takeBack(descriptor) }
            index += 1
        }
        tail = published
    }

    /// Puts a large payload into slots (or adopts an allocated buffer); false when no slots are free.
    private func place(_ frame: inout Frame) -> Bool {
        let count = frame.payload.count
        if let (buffer, lead) = frame.payload.shmAllocation, buffer.pool === pool {
            // Taken by `send`; published now.
            pool.handOver(slot: buffer.slot, count: buffer.slotCount)
            buffer.markHandedOver()
            frame.descriptor.payloadSlot = UInt32(buffer.slot)
            frame.descriptor.payloadGeneration = buffer.generation
            frame.descriptor.payloadOffset = UInt32(buffer.offset - lead)
            statistics.zeroCopySends &+= 1
            return true
        }
        var run = pool.allocate(bytes: count)
        if run == nil {
            pool.setWaiting()
            run = pool.allocate(bytes: count)
            if run == nil { return false }
        }
        // Not `stopWantingSlotsIfNothingWaits()`: this frame has its run, but `backlogged`
        // says frames wait until the queue drains. A frame behind it that finds no run sets
        // the flag again; only waiting allocations keep it now.
        if allocationWaiters.isEmpty { pool.clearWaiting() }
        let (slot, _, generation) = run!
        frame.payload.withUnsafeBytes { source in
            segment.slotData(slot).copyMemory(from: source.baseAddress!, byteCount: count)
        }
        statistics.bytesCopiedIn &+= UInt64(count)
        frame.descriptor.payloadSlot = UInt32(slot)
        frame.descriptor.payloadGeneration = generation
        frame.descriptor.payloadOffset = 0
        return true
    }

    /// The queue has just emptied: resets it and the stall timer; true when it had been
    /// backlogged (the handler is then told, ``FrameTransportHandler/transportDidDrainOutput()``).
    private func queueEmptied() -> Bool {
        pending.removeAll(keepingCapacity: pending.count < 1024)
        pendingStart = 0
        // A frame refused for want of slots may have left it set.
        stopWantingSlotsIfNothingWaits()
        stallTimer?.cancel()
        stallTimer = nil
        defer { backlogged = false }
        return backlogged
    }

    private enum StallCause { case ring, slots }

    /// The frame at the head of the queue waits for a run of slots: it goes before any
    /// allocation (`ShmTransport+Allocation.swift`).
    var framesWaitForSlots: Bool { backlogged && stallCause == .slots && pendingStart < pending.count }

    /// Clears our `wants_slots` flag unless something of ours still waits for slots: a
    /// waiting allocation, or the frame at the head of the queue (Docs/shm.md, "Slots").
    /// While it is set, every release in either direction rings our doorbell.
    func stopWantingSlotsIfNothingWaits() {
        if !isClosed && allocationWaiters.isEmpty && !framesWaitForSlots { pool.clearWaiting() }
    }

    /// Frames wait for room in the peer's full ring (a spinning loop watches for it).
    private var framesWaitForRingRoom: Bool { backlogged && stallCause == .ring && pendingStart < pending.count }

    private func stalled(_ cause: StallCause) {
        statistics.stalls &+= 1
        backlogged = true
        stallCause = cause
        // The consumer may make room within the spin budget: watch for it before blocking.
        if cause == .ring && spinPolicy.isEnabled { requestIdle() }
        guard stallTimer == nil else { return }
        armStallTimer()
    }

    private func armStallTimer() {
        tailWhenStallArmed = tail
        stallTimer = reactor.schedule(after: stallTimeout) { [unowned self] in
            stallTimer = nil
            stallTimedOut()
        }
    }

    /// Nothing moved for `stallTimeout`... or did it? Progress re-arms the timer; a hung
    /// peer's full ring closes the connection; a frame still without slots is refused.
    private func stallTimedOut() {
        guard !isClosed, pendingStart < pending.count else { return }
        if tail != tailWhenStallArmed {
            armStallTimer()
            return
        }
        switch stallCause {
        case .ring:
            close(error: TransportError(.timeout, "the peer consumed nothing from the ring for \(stallTimeout)"))
        case .slots:
            // The head frame is the one waiting for a run of slots. Frames of its channel
            // behind it go too: the peer must not see a stream with a hole in it.
            let refused = pending[pendingStart]
            let channel = refused.descriptor.channelID
            var kept: [Frame] = []
            kept.reserveCapacity(pending.count - pendingStart)
            var dropped: [Frame] = []
            for index in (pendingStart + 1)..<pending.count {
                if channel != 0 && pending[index].descriptor.channelID == channel { dropped.append(pending[index]) } else { kept.append(pending[index]) }
            }
            pending = kept
            pendingStart = 0
            pendingBytes = pending.reduce(0) { $0 + FrameDescriptor.size + $1.payload.count }
            statistics.framesRefused &+= UInt64(1 + dropped.count)
            let reason = "no run of \(pool.runLength(bytes: refused.payload.count)) free slots for \(stallTimeout): the pool is held by payloads not yet released"
            // Every frame given up on is reported: one dropped behind the head may be what
            // ends its channel (a stream's terminal frame), and the peer must still learn the end.
            for frame in [refused] + dropped where !isClosed { handler?.transportDidRefuse(frame, reason: reason) }
            if pendingStart < pending.count {
                flush()
            } else if !isClosed && queueEmptied() {
                // Nothing else was waiting (the handler may have queued nothing): the backlog is gone.
                handler?.transportDidDrainOutput()
            }
            // The refused frame went first; allocations behind it may find their run now.
            if !allocationWaiters.isEmpty { serveAllocationWaiters() }
        }
    }

    /// Slots currently free in the pool (both directions share it).
    public var freeSlotCount: Int { pool.freeCount }

    /// Frames queued because the ring was full or no slots were free. Loop thread only.
    public var pendingFrameCount: Int { pending.count - pendingStart }

    public func close(error: TransportError?) {
        guard !isClosed else { return }
        if error == nil { flush() }
        let closeError = error ?? TransportError(.closed, "the transport was closed")
        self.closeError = closeError
        stallTimer?.cancel()
        stallTimer = nil
        doorbellWatcher?.close()
        doorbellWatcher = nil
        socketWatcher?.close()
        socketWatcher = nil
        segment.doorbells.withLock { if $0 === bells { $0 = nil } }
        bells.close()  // leases that outlive us must not write to a recycled descriptor
        Sys.close(socket)
        pending = []
        pendingBytes = 0
        pool.clearWaiting()
        // A dead peer will never free what we sent it: take it back. A peer that is still
        // there (we closed first: GoAway, an error of ours) may still be reading the ring on
        // its way out, as the bootstrap's deferred reset knows: it frees what it reads, and
        // the reset before the next connection takes back the rest.
        if side == .host && peerGone { pool.reclaimOwn() }
        reactor.unregister(self)
        // No doorbell will wake them any more.
        let waiters = allocationWaiters
        allocationWaiters.removeAll()
        for waiter in waiters { waiter.finish(.failure(closeError)) }
        let handler = self.handler
        self.handler = nil
        handler?.transportDidClose(error)
        let closers = onClose
        onClose.removeAll()
        for closer in closers { closer() }
    }

    func reactorWillShutDown() { close(error: TransportError(.closed, "reactor shut down")) }

    // MARK: Receiving

    /// Loop only. `bells` closes the descriptors only in `close`, after `isClosed` is set.
    private func ringPeer() {
        guard !isClosed else { return }
        statistics.doorbellsRung &+= 1
        Sys.eventfdSignal(peerDoorbell)
    }

    private func doorbellRang() {
        statistics.doorbellWakes &+= 1
        if statistics.doorbellWakes & 0xFFFF == 0 { _ = Sys.eventfdDrain(doorbell) }
        // Room may have appeared in our outgoing ring or the pool. (A store only when the
        // flag is set: a store would pull the line from the consumer on every wake.)
        if rapace_load_acquire_u32(outgoingRing + ShmLayout.ringProducerWaiting) != 0 {
            rapace_store_seq_cst_u32(outgoingRing + ShmLayout.ringProducerWaiting, 0)
        }
        if pendingStart < pending.count { flush() }
        // After the frames: they go first (`ShmTransport+Allocation.swift`).
        if !allocationWaiters.isEmpty { serveAllocationWaiters() }
        drainIncoming()
    }

    private func socketReadable() {
        // The protocol sends nothing on it after the bootstrap: a byte is ignored.
        guard Sys.discardByteAndCheckPeerGone(socket) else { return }
        // The peer closed or died: take what it published, then report the end.
        peerGone = true
        drainIncoming()
        close(error: TransportError(.closed, "the peer process closed the connection or died"))
    }

    private func fail(_ why: String) {
        guard !isClosed else { return }
        readingStopped = true
        let error = TransportError(.protocolViolation, why)
        if let handler { handler.transportDidFailFraming(error) } else { close(error: error) }
    }

    private func drainIncoming() {
        // One reference to the handler for the whole batch (a close ends the loop below).
        guard !isClosed, !readingStopped, let handler else { return }
        let ring = incomingRing
        publishCPU()
        if announcedSleeping {
            rapace_store_seq_cst_u32(ring + ShmLayout.ringConsumerSleeping, 0)
            announcedSleeping = false
        }
        var delivered = 0
        var published = head  // the producer's index as last read
        var released = head   // our index as last published
        while !isClosed && !readingStopped {
            if published == head {
                // Caught up with what we read: publish our index (the producer may wait for
                // room), then read the producer's once more. Reading and writing the indices
                // only here and every `publishStep` descriptors keeps their cache lines from
                // moving between the CPUs once per frame.
                if released != head {
                    rapace_store_release_u64(ring + ShmLayout.ringHead, head)
                    released = head
                }
                published = rapace_load_acquire_u64(ring + ShmLayout.ringTail)
                if published == head {
                    // Empty. The flag stays clear until the reactor is about to block
                    // (`reactorWillBlock`, after this turn's replies are out; it may spin first):
                    // a peer that publishes before then needs no doorbell, and we need no wake.
                    requestIdle()
                    break
                }
                guard published > head, published - head <= capacity else {
                    fail("the peer corrupted the tail index of its ring (tail \(published), head \(head), capacity \(capacity))")
                    return
                }
            }
            // Copy the descriptor out of shared memory before looking at it.
            let entry = ring + ShmLayout.ringDescriptors + Int(head & (capacity - 1)) * FrameDescriptor.size
            let descriptor = FrameDescriptor(decoding: UnsafeRawPointer(entry))
            head += 1
            delivered += 1
            if head - released == Self.publishStep {
                rapace_store_release_u64(ring + ShmLayout.ringHead, head)
                released = head
                // A producer waiting for room on another CPU is woken now, so it refills the
                // ring while we work through the rest. One on our CPU would take the CPU from
                // us at once (the woken task preempts), write a few descriptors and block
                // again: a pair of context switches per step. It is woken when the batch ends.
                if peerPlacement != .ourCPU { wakeWaitingProducer(ring) }
            }
            guard let frame = frame(for: descriptor) else { return }
            handler.transportDidReceive(frame)
        }
        if released != head { rapace_store_release_u64(ring + ShmLayout.ringHead, head) }
        if delivered > 0 {
            wakeWaitingProducer(ring)
            if !isClosed { handler.transportDidFinishReceiveBatch() }
        }
    }

    /// After a spin for room that cleared `producer_waiting`: true when the ring is still
    /// full with the flag set again (step 2 of producing: set, fence, look once more), so we
    /// may block; false when room appeared (the flag stays clear).
    private func announceWaitingAndRecheck() -> Bool {
        if peerHeadMoved() { return false }
        rapace_store_seq_cst_u32(outgoingRing + ShmLayout.ringProducerWaiting, 1)
        rapace_fence_seq_cst()
        if !peerHeadMoved() { return true }
        rapace_store_seq_cst_u32(outgoingRing + ShmLayout.ringProducerWaiting, 0)
        return false
    }

    /// Sets `consumer_sleeping`, then looks at the tail once more (the producer checks the
    /// flag after publishing, so one of us sees the other). True when the ring is still
    /// empty: the flag stays set and we may block. False: it moved, the flag is clear again.
    private func announceSleepingAndRecheck() -> Bool {
        let ring = incomingRing
        rapace_store_seq_cst_u32(ring + ShmLayout.ringConsumerSleeping, 1)
        rapace_fence_seq_cst()
        if rapace_load_seq_cst_u64(ring + ShmLayout.ringTail) == head {
            announcedSleeping = true
            return true
        }
        rapace_store_seq_cst_u32(ring + ShmLayout.ringConsumerSleeping, 0)
        return false
    }

    /// Where the peer's loop last ran (the CPU it published) against the CPU we last published.
    private var peerPlacement: PeerPlacement {
        let peer = rapace_load_acquire_u32(segment.runningCPUPointer(side.other))
        if peer == 0 || publishedCPU == 0 { return .unknown }
        return peer == publishedCPU ? .ourCPU : .otherCPU
    }

    private enum PeerPlacement { case unknown, ourCPU, otherCPU }

    /// Publishes the CPU this loop runs on (a spinning peer never spins against us on it).
    @inline(__always)
    private func publishCPU() {
        guard let cpu = Sys.currentCPU() else { return }
        let value = cpu &+ 1
        if value != publishedCPU {
            publishedCPU = value
            rapace_store_release_u32(segment.runningCPUPointer(side), value)
        }
    }

    // MARK: Spinning (ReactorIdleHandler)

    private func requestIdle() {
        guard !idleRequested else { return }
        idleRequested = true
        reactor.requestIdle(self)
    }

    func idleSpinBudget() -> UInt64 {
        guard spinPolicy.isEnabled, !isClosed, !readingStopped, handler != nil else { return 0 }
        if spinSkips > 0 {
            spinSkips -= 1
            return 0
        }
        guard Sys.onlineCPUCount > 1 else { return 0 }
        publishCPU()
        // Unknown, or on our CPU: the peer needs this CPU to answer, so sleep instead.
        guard peerPlacement == .otherCPU else { return 0 }
        if announcedSleeping {
            // Spin visibly: a producer that sees the flag clear publishes without ringing.
            rapace_store_seq_cst_u32(incomingRing + ShmLayout.ringConsumerSleeping, 0)
            announcedSleeping = false
        }
        if framesWaitForRingRoom {
            // Watch for room instead of waiting for the doorbell: the consumer need not ring.
            rapace_store_seq_cst_u32(outgoingRing + ShmLayout.ringProducerWaiting, 0)
            waitingFlagClearedBySpin = true
        }
        spinning = true
        statistics.spins &+= 1
        return spinPolicy.maximumNanoseconds
    }

    func idleHasWork() -> Bool {
        incomingArrived() || ringRoomAppeared()
    }

    /// The producer has published descriptors we have not read.
    private func incomingArrived() -> Bool {
        rapace_load_acquire_u64(incomingRing + ShmLayout.ringTail) != head
    }

    /// Frames wait for room, and the consumer has moved its head since they found the ring full.
    private func ringRoomAppeared() -> Bool {
        framesWaitForRingRoom && peerHeadMoved()
    }

    private func peerHeadMoved() -> Bool {
        rapace_load_acquire_u64(outgoingRing + ShmLayout.ringHead) != peerHead
    }

    func reactorWillBlock(after spin: ReactorIdleSpin) -> Bool {
        idleRequested = false
        guard !isClosed, !readingStopped, handler != nil else { return false }
        // Only input counts here: room for frames whose `producer_waiting` is still set
        // comes with the consumer's doorbell, as it did before spinning for room existed.
        let arrived = incomingArrived()
        if spinning {
            spinning = false
            if spin == .found && (arrived || ringRoomAppeared()) {
                statistics.spinHits &+= 1
                spinMisses = 0
            } else if spin == .timedOut {
                // Nothing came: back off exponentially (1, 3, 7, … up to 1023 idle turns).
                spinMisses = min(spinMisses + 1, 10)
                spinSkips = (1 << spinMisses) - 1
            }
        }
        if waitingFlagClearedBySpin {
            waitingFlagClearedBySpin = false
            if framesWaitForRingRoom && !announceWaitingAndRecheck() {
                flush()
                drainIncoming()
                return true
            }
        }
        if !arrived && announceSleepingAndRecheck() { return false }
        drainIncoming()
        return true
    }

    private func wakeWaitingProducer(_ ring: UnsafeMutableRawPointer) {
        rapace_fence_seq_cst()
        if rapace_load_seq_cst_u32(ring + ShmLayout.ringProducerWaiting) != 0 {
            rapace_store_seq_cst_u32(ring + ShmLayout.ringProducerWaiting, 0)
            ringPeer()
        }
    }

    /// Validates a descriptor's payload fields and builds the frame (nil after a violation).
    private func frame(for descriptor: FrameDescriptor) -> Frame? {
        if descriptor.isInline {
            guard descriptor.payloadLength <= UInt32(FrameDescriptor.inlineCapacity) else {
                fail("inline payload of \(descriptor.payloadLength) bytes (at most 16 fit)")
                return nil
            }
            let payload = descriptor.inlinePayload.withBytes(count: Int(descriptor.payloadLength)) { Payload(inline: $0) }
            return Frame(descriptor: descriptor, payload: payload)
        }
        guard descriptor.payloadLength <= maxIncomingPayload else {
            fail("payload of \(descriptor.payloadLength) bytes exceeds the max payload size of \(maxIncomingPayload) bytes")
            return nil
        }
        let run: (slot: Int, count: Int)
        do throws(ShmError) {
            run = try pool.validateIncoming(descriptor)
        } catch {
            fail(error.message)
            return nil
        }
        let buffer = ShmBuffer(
            pool: pool, kind: .received, slot: run.slot, slotCount: run.count, generation: descriptor.payloadGeneration,
            offset: Int(descriptor.payloadOffset), count: Int(descriptor.payloadLength))
        return Frame(descriptor: descriptor, payload: Payload(borrowing: buffer))
    }
}

/// The two doorbell descriptors of a connection, rung from any thread (a lease ending on a
/// handler's thread rings them) and closed exactly once: after `close()` ringing is a no-op,
/// so a late lease never writes into a descriptor number the process has reused.
final class ShmDoorbells: Sendable {
    private let fds: Mutex<(own: Int32, peer: Int32)?>

    init(own: Int32, peer: Int32) { fds = Mutex((own, peer)) }

    func ringPeer() { fds.withLock { if let fds = $0 { Sys.eventfdSignal(fds.peer) } } }
    func ringOwn() { fds.withLock { if let fds = $0 { Sys.eventfdSignal(fds.own) } } }

    func close() {
        fds.withLock { state in
            if let fds = state {
                Sys.close(fds.own)
                Sys.close(fds.peer)
            }
            state = nil
        }
    }
}
