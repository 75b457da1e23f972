// Buffers allocated in the pool for a payload written in place (zero-copy sending): at once
// (nil, or an error that says why), or waiting for slots to be released.

extension ShmTransport {
    // MARK: Allocating now

    /// Allocates a buffer of `count` bytes in the segment for a payload written in place and
    /// sent without a copy: `Payload(borrowing: buffer)` is the whole payload of the frame
    /// (for a byte-buffer argument of a service method, see ``allocateByteBuffer(count:)``).
    ///
    /// Returns nil when the buffer cannot be allocated now, whether it never can (`count` is
    /// not positive, or larger than the pool) or no run of slots is free right now; use
    /// ``allocateBufferNow(count:)`` to learn which, and ``allocateBuffer(count:timeout:)``
    /// to wait for slots. Loop thread only.
    public func allocateBuffer(count: Int) -> ShmBuffer? {
        allocateIfFree(count: count, headroom: 0)
    }

    /// Allocates a buffer of `count` bytes for a byte-buffer value (`Payload`) of a service
    /// method, written in place: passed as the only argument of a generated client's method,
    /// or returned as a handler's result, `Payload(borrowing: buffer)` is sent without a
    /// copy. The buffer keeps room before its bytes, where the encoding around them (the
    /// postcard length, a result's CallResult fields) is written when it is sent.
    ///
    /// Returns nil when the buffer cannot be allocated now, as ``allocateBuffer(count:)``
    /// does; ``allocateByteBufferNow(count:)`` says why, and
    /// ``allocateByteBuffer(count:timeout:)`` waits for slots. Loop thread only.
    public func allocateByteBuffer(count: Int) -> ShmBuffer? {
        allocateIfFree(count: count, headroom: ShmBuffer.encodingHeadroom)
    }

    /// Allocates a buffer as ``allocateBuffer(count:)`` does, or throws why it cannot:
    ///
    /// - ``ShmError/Code/sizeOutOfRange``: it never can: `count` is not positive, or is
    ///   larger than the pool (``ShmConfig/poolBytes``). Do not retry.
    /// - ``ShmError/Code/poolExhausted``: no run of slots long enough is free now (payloads
    ///   not yet released hold them), or frames or waiting allocations are ahead of this one
    ///   for slots (see ``allocateBuffer(count:timeout:)`` for the order). It may succeed
    ///   later; ``allocateBuffer(count:timeout:)`` waits for that.
    ///
    /// The message names the sizes: the count, the headroom, the pool, the run of slots
    /// needed and how many are free. Like ``allocateBuffer(count:)`` it does not look at
    /// whether the transport is open: a buffer allocated after it closed cannot be sent over
    /// it (the session refuses the call), and is freed when released. Loop thread only.
    public func allocateBufferNow(count: Int) throws(ShmError) -> ShmBuffer {
        try allocateNow(count: count, headroom: 0)
    }

    /// Allocates a byte buffer as ``allocateByteBuffer(count:)`` does, or throws why it
    /// cannot, as ``allocateBufferNow(count:)`` does (the largest such buffer is the pool
    /// less the headroom the buffer keeps, 16 bytes). Loop thread only.
    public func allocateByteBufferNow(count: Int) throws(ShmError) -> ShmBuffer {
        try allocateNow(count: count, headroom: ShmBuffer.encodingHeadroom)
    }

    // MARK: Waiting for slots

    /// Allocates a buffer as ``allocateBuffer(count:)`` does, waiting up to `timeout` for
    /// slots to be released when no run is free now; from any task (it runs on the loop).
    ///
    /// While it waits it is woken by every release of slots in either direction (the
    /// segment's `wants_slots` flag: Docs/shm.md, "Slots"), with no polling. Slots go, in
    /// this order, to frames already queued for sending (a send was made, and the order of
    /// frames on the connection matters; they wait at most ``stallTimeout``), then to waiting
    /// allocations, oldest first: a later allocation, waiting or not, never takes a run while
    /// an earlier one waits, even when its smaller run would fit. Frames queued later still
    /// go before a waiting allocation: under a steady flow of copied payloads a large one
    /// may wait until its timeout.
    ///
    /// - Throws: ``ShmError`` with ``ShmError/Code/sizeOutOfRange`` at once when the buffer
    ///   can never fit the pool, ``ShmError/Code/poolExhausted`` when no run came free within
    ///   `timeout` (a `timeout` of zero or less tries once); the transport's close error
    ///   (``TransportError``, `.closed` for a clean close or the reactor's shutdown) when it
    ///   is closed, or closes while this waits; `CancellationError` when the calling task is
    ///   cancelled (a handler that lets it escape answers `CANCELLED`).
    public func allocateBuffer(count: Int, timeout: Duration) async throws -> ShmBuffer {
        try await allocateWaiting(count: count, headroom: 0, timeout: timeout)
    }

    /// Allocates a byte buffer as ``allocateByteBuffer(count:)`` does, waiting up to
    /// `timeout` for slots as ``allocateBuffer(count:timeout:)`` does (same order, same
    /// errors); from any task.
    public func allocateByteBuffer(count: Int, timeout: Duration) async throws -> ShmBuffer {
        try await allocateWaiting(count: count, headroom: ShmBuffer.encodingHeadroom, timeout: timeout)
    }

    /// The callback form of ``allocateBuffer(count:timeout:)``, for code on the loop that
    /// runs no task: `completion` runs on the loop exactly once, with the buffer or the
    /// error (the same errors; `CancellationError` after ``PendingAllocation/cancel()``).
    /// It runs before this returns when the buffer is allocated at once or cannot be.
    /// Loop thread only.
    @discardableResult
    public func allocateBuffer(
        count: Int, timeout: Duration, completion: @escaping (Result<ShmBuffer, any Error>) -> Void
    ) -> PendingAllocation {
        reactor.preconditionInLoop()
        let request = PendingAllocation(transport: self, count: count, headroom: 0, timeout: timeout)
        beginAllocation(request, completion)
        return request
    }

    /// The callback form of ``allocateByteBuffer(count:timeout:)``, as
    /// ``allocateBuffer(count:timeout:completion:)``. Loop thread only.
    @discardableResult
    public func allocateByteBuffer(
        count: Int, timeout: Duration, completion: @escaping (Result<ShmBuffer, any Error>) -> Void
    ) -> PendingAllocation {
        reactor.preconditionInLoop()
        let request = PendingAllocation(transport: self, count: count, headroom: ShmBuffer.encodingHeadroom, timeout: timeout)
        beginAllocation(request, completion)
        return request
    }

    /// An allocation that may wait for slots
    /// (``ShmTransport/allocateBuffer(count:timeout:completion:)``): the way to give up on
    /// it before its timeout.
    public final class PendingAllocation: @unchecked Sendable {
        // @unchecked Sendable: the mutable fields are touched only on the transport's loop
        // thread (the async form hands the request to the loop, and cancels it there).
        // @exclusivity(unchecked) for the same reason, and no access stays open while other
        // code runs (`finish` takes the completion out before calling it).
        let transport: ShmTransport
        let count: Int
        let headroom: Int
        let timeout: Duration
        @exclusivity(unchecked) var completion: ((Result<ShmBuffer, any Error>) -> Void)?
        @exclusivity(unchecked) var timer: ReactorTimer?
        @exclusivity(unchecked) var cancelled = false

        init(transport: ShmTransport, count: Int, headroom: Int, timeout: Duration) {
            self.transport = transport
            self.count = count
            self.headroom = headroom
            self.timeout = timeout
        }

        /// Gives up: unless the allocation has completed already, it leaves the queue and
        /// its completion runs now with `CancellationError`; the allocations behind it may
        /// then be served. Loop thread only.
        public func cancel() {
            transport.reactor.preconditionInLoop()
            cancelled = true
            transport.withdraw(self, error: CancellationError())
        }

        /// Completes it (once: later results are dropped, a buffer with them freed).
        func finish(_ result: Result<ShmBuffer, any Error>) {
            timer?.cancel()
            timer = nil
            completion.take()?(result)
        }
    }

    // MARK: Machinery

    /// The async form: the callback form on the loop, cancelled there when the task is.
    private func allocateWaiting(count: Int, headroom: Int, timeout: Duration) async throws -> ShmBuffer {
        try Task.checkCancellation()
        let request = PendingAllocation(transport: self, count: count, headroom: headroom, timeout: timeout)
        let reactor = self.reactor
        let result = await withTaskCancellationHandler {
            await reactor.suspendOnLoop(with: request, orIfShutDown: Result<ShmBuffer, any Error>.failure(Reactor.shutDownError)) { request, continuation in
                request.transport.beginAllocation(request) { continuation.resume(returning: $0) }
            }
        } onCancel: {
            // Before or after it began: `beginAllocation` sees the flag, the queue loses it.
            reactor.execute { request.cancel() }
        }
        return try result.get()
    }

    /// Starts a waiting allocation: served at once when its run is free and nothing waits
    /// ahead of it, failed at once when it never can be (or the transport is closed),
    /// otherwise queued until a release lets it through, its timeout, its cancellation or
    /// the transport's close.
    private func beginAllocation(_ request: PendingAllocation, _ completion: @escaping (Result<ShmBuffer, any Error>) -> Void) {
        request.completion = completion
        let (count, headroom) = (request.count, request.headroom)
        let immediate: Result<ShmBuffer, any Error>?
        if request.cancelled {
            immediate = .failure(CancellationError())
        } else if let error = rangeError(count: count, headroom: headroom) {
            immediate = .failure(error)
        } else if let closeError {
            immediate = .failure(closeError)
        } else if allocationWaiters.isEmpty && !framesWaitForSlots, let buffer = takeRun(count: count, headroom: headroom) {
            immediate = .success(buffer)
        } else if request.timeout <= .zero {
            immediate = .failure(exhaustedError(count: count, headroom: headroom, waited: nil, ahead: allocationWaiters.count))
        } else {
            immediate = nil
        }
        if let immediate {
            request.finish(immediate)
            return
        }
        allocationWaiters.append(request)
        // Says we wait (every release rings our doorbell from now on) and looks once more.
        serveAllocationWaiters()
        guard request.completion != nil else { return }  // served by that look
        request.timer = reactor.schedule(after: request.timeout) { [self] in
            request.timer = nil
            withdraw(request) { ahead in exhaustedError(count: count, headroom: headroom, waited: request.timeout, ahead: ahead) }
        }
    }

    /// Takes `request` out of the queue (its timeout, its cancellation) and completes it with
    /// `error`; the allocations behind it may fit now. Nothing if it is not queued (completed,
    /// or not begun: a cancellation before the async form reached the loop).
    private func withdraw(_ request: PendingAllocation, error: any Error) {
        withdraw(request) { _ in error }
    }

    /// ``withdraw(_:error:)`` with the error made from how many allocations wait ahead.
    private func withdraw(_ request: PendingAllocation, error: (_ ahead: Int) -> any Error) {
        guard let index = allocationWaiters.firstIndex(where: { $0 === request }) else { return }
        allocationWaiters.remove(at: index)
        request.finish(.failure(error(index)))
        if index == 0 { serveAllocationWaiters() }
    }

    /// Gives runs to the waiting allocations, oldest first, while they fit and no frame
    /// waits for slots (frames go first); stops at the first that does not fit. While any
    /// waits, our `wants_slots` flag stays set, so every release rings our doorbell
    /// (`doorbellRang`, which flushes the frames first, then calls this): a release either
    /// sees the flag and rings, or came before the second look in `takeRun`.
    func serveAllocationWaiters() {
        while !isClosed, let first = allocationWaiters.first {
            // The frames' wait keeps the flag set.
            guard !framesWaitForSlots else { return }
            guard let buffer = takeRun(count: first.count, headroom: first.headroom, waiting: true) else { return }
            allocationWaiters.removeFirst()
            first.finish(.success(buffer))  // may re-enter: allocate, cancel, close
        }
        // Unless something still waits for slots, releases stop ringing us.
        stopWantingSlotsIfNothingWaits()
    }

    /// ``allocateBuffer(count:)`` and ``allocateByteBuffer(count:)``: nil for every failure,
    /// and no message made (a producer may call it in a loop).
    private func allocateIfFree(count: Int, headroom: Int) -> ShmBuffer? {
        reactor.preconditionInLoop()
        guard isInRange(count: count, headroom: headroom), allocationWaiters.isEmpty, !framesWaitForSlots else { return nil }
        return takeRun(count: count, headroom: headroom)
    }

    private func allocateNow(count: Int, headroom: Int) throws(ShmError) -> ShmBuffer {
        reactor.preconditionInLoop()
        if let error = rangeError(count: count, headroom: headroom) { throw error }
        guard allocationWaiters.isEmpty, !framesWaitForSlots, let buffer = takeRun(count: count, headroom: headroom) else {
            throw exhaustedError(count: count, headroom: headroom, waited: nil, ahead: allocationWaiters.count)
        }
        return buffer
    }

    /// Whether `headroom + count` bytes can ever be one run of this pool.
    private func isInRange(count: Int, headroom: Int) -> Bool {
        // Compared in UInt64: `headroom + count` could overflow Int.
        count > 0 && UInt64(count) <= segment.config.poolBytes - UInt64(headroom)
    }

    /// A held run for `headroom + count` bytes (in range), the buffer starting after the
    /// headroom; nil when none is free. `waiting`: on failure set our `wants_slots` flag and
    /// look once more (a release after the flag rings us; one before it shows in the look).
    private func takeRun(count: Int, headroom: Int, waiting: Bool = false) -> ShmBuffer? {
        var run = pool.allocateHeld(bytes: headroom + count)
        if run == nil && waiting {
            pool.setWaiting()
            run = pool.allocateHeld(bytes: headroom + count)
        }
        guard let run else { return nil }
        return ShmBuffer(pool: pool, kind: .allocated, slot: run.slot, slotCount: run.count, generation: run.generation, offset: headroom, count: count)
    }

    /// The permanent error for a size no run of this pool can hold, or nil.
    private func rangeError(count: Int, headroom: Int) -> ShmError? {
        guard !isInRange(count: count, headroom: headroom) else { return nil }
        let config = segment.config
        let largest = config.poolBytes - UInt64(headroom)
        // In UInt64: `headroom + count` could overflow Int.
        let run = count > 0 ? (UInt64(headroom) + UInt64(count) + UInt64(config.slotSize) - 1) / UInt64(config.slotSize) : 0
        let needs = count > 0 ? ", a run of \(run) slots" : ""
        return ShmError(
            .sizeOutOfRange,
            "cannot allocate a buffer of \(count) bytes (\(headroom) bytes of headroom\(needs)) in a pool of \(config.poolBytes) bytes "
                + "(\(config.slotCount) slots of \(config.slotSize) bytes): a buffer holds 1 to \(largest) bytes")
    }

    /// The transient error: no run free now, or within `waited`; `ahead` allocations wait
    /// before this one.
    private func exhaustedError(count: Int, headroom: Int, waited: Duration?, ahead: Int) -> ShmError {
        let config = segment.config
        var why = "no run of \(pool.runLength(bytes: headroom + count)) free slots for a buffer of \(count) bytes (\(headroom) bytes of headroom)"
        if let waited { why += " within \(waited)" }
        why += ": \(pool.freeCount) of the pool's \(config.slotCount) slots of \(config.slotSize) bytes (\(config.poolBytes) bytes) are free"
        if framesWaitForSlots {
            why += ", and frames queued for sending wait for slots first"
        } else if ahead > 0 {
            why += ", and \(ahead) earlier allocation\(ahead == 1 ? "" : "s") wait\(ahead == 1 ? "s" : "") for slots first"
        } else {
            why += "; payloads not yet released hold the others"
        }
        return ShmError(.poolExhausted, why)
    }
}
