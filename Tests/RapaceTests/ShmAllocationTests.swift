import CRapaceShim
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

/// Allocating a buffer for a zero-copy send when it cannot be had at once: the error that
/// says why (never, or not now), and the wait for slots the peer releases, in order, bounded
/// by a timeout, ended by the transport's close or the task's cancellation.
///
/// Every test runs a host and a plugin in this process over an 8-slot pool of 4 KiB slots
/// (32 768 bytes). The host's `Keeper` keeps the payloads the plugin sends (views into the
/// plugin's slots, which stay taken) until the test lets them go; the plugin's transport is
/// the one that allocates.
@Suite("Shared memory: allocation", .sharesProcess)
struct ShmAllocationTests {
    static let config = ShmConfig(ringCapacity: 16, slotSize: 4096, slotCount: 8)

    /// Keeps each request payload it is sent (a view into the sender's slots): a call, or a
    /// notification (which sends nothing back).
    final class Keeper: RPCService, Sendable {
        static let keep = MethodDescriptor(service: "Keeper", method: "keep", kind: .unary)
        static let keepQuietly = MethodDescriptor(service: "Keeper", method: "keep_quietly", kind: .notification)
        let kept = Mutex<[Payload]>([])

        var methods: [MethodDescriptor] { [Self.keep, Self.keepQuietly] }

        func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
            guard method == Self.keep.id || method == Self.keepQuietly.id else { throw RPCError(.unimplemented, "no such method") }
            kept.withLock { $0.append(request) }
            return .empty
        }
    }

    /// The plugin's side of a connected pair (its session, its reactor, its transport) and
    /// the host's keeper.
    struct Pair {
        let session: Session
        let reactor: Reactor
        let transport: SendableBox<ShmTransport>
        let keeper: Keeper

        /// Has the host keep a payload of `slots` slots (4 KiB each) of the plugin's pool.
        func keep(slots: Int) async throws {
            _ = try await session.call(Keeper.keep.id, request: Payload([UInt8](repeating: 1, count: slots * 4096 - 100)))
        }

        /// Lets go of the oldest payload the host keeps, or of all of them: the host frees
        /// their slots (from this thread) and rings the plugin if it waits for slots.
        func releaseFirst() { _ = keeper.kept.withLock { $0.removeFirst() } }
        func releaseAll() { keeper.kept.withLock { $0.removeAll() } }

        func freeSlots() async -> Int { await onLoop(reactor) { transport.value.freeSlotCount } }
        func waiters() async -> Int { await onLoop(reactor) { transport.value.allocationWaiters.count } }
        /// Whether the plugin's `wants_slots` flag is set: every release rings its doorbell.
        var wantsSlots: Bool { rapace_load_seq_cst_u32(transport.value.segment.slotWaitersPointer(.plugin)) != 0 }

        /// Allocates on the loop, at once.
        func allocateNow(_ count: Int, byteBuffer: Bool = false) async -> Result<SendableBox<ShmBuffer>, ShmError> {
            await onLoop(reactor) {
                Result { () throws(ShmError) in
                    SendableBox(byteBuffer ? try transport.value.allocateByteBufferNow(count: count) : try transport.value.allocateBufferNow(count: count))
                }
            }
        }

        /// The waiting allocation of `count` bytes in a task of its own.
        func waitingAllocation(_ count: Int, timeout: Duration = .seconds(30)) -> Task<SendableBox<ShmBuffer>, any Error> {
            let transport = self.transport
            return Task { SendableBox(try await transport.value.allocateBuffer(count: count, timeout: timeout)) }
        }
    }

    /// A host serving `Keeper` and a plugin session connected to it (``withShmHost``).
    private func withPair(_ tag: String, _ body: (Pair) async throws -> Void) async throws {
        let keeper = Keeper()
        try await withShmHost(tag, config: Self.config, services: [keeper]) { path, _, _, pluginReactor in
            let session = try await Session.connect(shm: path.path, reactor: pluginReactor)
            let transport = await onLoop(pluginReactor) { SendableBox(session.frameTransport as! ShmTransport) }
            defer { keeper.kept.withLock { $0.removeAll() } }
            try await body(Pair(session: session, reactor: pluginReactor, transport: transport, keeper: keeper))
            await session.closeAndWait()
        }
    }

    /// The error of a task that should fail, within a generous bound.
    private func failure(of task: Task<SendableBox<ShmBuffer>, any Error>, _ what: String) async throws -> any Error {
        do {
            _ = try await value(of: task, within: .seconds(30), what)
        } catch let error as TestFailure {
            throw error
        } catch {
            return error
        }
        throw TestFailure("\(what) succeeded")
    }

    @Test("a size no run of the pool can hold fails at once with sizeOutOfRange, naming the sizes")
    func sizeOutOfRange() async throws {
        try await withPair("alloc-range") { pair in
            for count in [0, -1, 32_769, Int.max] {
                guard case .failure(let error) = await pair.allocateNow(count) else {
                    Issue.record("allocating \(count) bytes succeeded")
                    continue
                }
                #expect(error.code == .sizeOutOfRange)
                #expect(error.message.contains("a buffer of \(count) bytes"), "\(error)")
                #expect(error.message.contains("a pool of 32768 bytes (8 slots of 4096 bytes)"), "\(error)")
                #expect(error.message.contains("holds 1 to 32768 bytes"), "\(error)")
            }
            // A byte buffer keeps 16 bytes before its own: the whole pool is too much for it.
            guard case .failure(let error) = await pair.allocateNow(32_768, byteBuffer: true) else {
                Issue.record("a byte buffer of the whole pool")
                return
            }
            #expect(error.code == .sizeOutOfRange)
            #expect(error.message.contains("16 bytes of headroom, a run of 9 slots"), "\(error)")
            #expect(error.message.contains("holds 1 to 32752 bytes"), "\(error)")
            // The nil forms say nothing more, and the largest buffers still fit.
            #expect(await onLoop(pair.reactor) { pair.transport.value.allocateBuffer(count: 0) == nil })
            #expect(try await pair.allocateNow(32_768).get().value.slotCount == 8)
            #expect(try await pair.allocateNow(32_752, byteBuffer: true).get().value.slotCount == 8)
            // Waiting does not help: the waiting form fails at once.
            let started = ContinuousClock.now
            let waited = try await failure(of: pair.waitingAllocation(40_000), "the waiting allocation")
            #expect((waited as? ShmError)?.code == .sizeOutOfRange, "\(waited)")
            #expect(ContinuousClock.now - started < .seconds(5))
        }
    }

    @Test("a pool held by payloads not yet released fails with poolExhausted, naming the free slots")
    func poolExhausted() async throws {
        try await withPair("alloc-exhausted") { pair in
            try await pair.keep(slots: 7)
            #expect(await pair.freeSlots() == 1)
            guard case .failure(let error) = await pair.allocateNow(5000) else {
                Issue.record("two slots were allocated from one")
                return
            }
            #expect(error.code == .poolExhausted)
            #expect(error.message.contains("no run of 2 free slots for a buffer of 5000 bytes (0 bytes of headroom)"), "\(error)")
            #expect(error.message.contains("1 of the pool's 8 slots of 4096 bytes (32768 bytes) are free"), "\(error)")
            #expect(await onLoop(pair.reactor) { pair.transport.value.allocateBuffer(count: 5000) == nil })
            // A wait of zero tries once.
            let waited = try await failure(of: pair.waitingAllocation(5000, timeout: .zero), "the allocation that does not wait")
            #expect((waited as? ShmError)?.code == .poolExhausted, "\(waited)")
            // What fits still fits.
            #expect(try await pair.allocateNow(4096).get().value.slotCount == 1)
            #expect(!pair.wantsSlots, "an allocation that does not wait set the flag")
            pair.releaseAll()
        }
    }

    @Test("a waiting allocation gets its run when the peer releases the payload holding it")
    func waiterWokenByTheReleaseOfAView() async throws {
        try await withPair("alloc-wake") { pair in
            try await pair.keep(slots: 8)
            #expect(await pair.freeSlots() == 0)
            let allocation = pair.waitingAllocation(10_000)
            #expect(await waitUntil { await pair.waiters() == 1 }, "the allocation does not wait")
            #expect(pair.wantsSlots, "the plugin does not say it waits for slots")
            // The host's release rings the plugin's doorbell: nothing else wakes it (the
            // allocation would fail with poolExhausted after its 30 s).
            let released = ContinuousClock.now
            pair.releaseAll()
            let buffer = try await value(of: allocation, within: .seconds(20), "the waiting allocation")
            #expect(ContinuousClock.now - released < .seconds(5))
            #expect(buffer.value.count == 10_000 && buffer.value.slotCount == 3)
            #expect(await pair.waiters() == 0)
            #expect(!pair.wantsSlots, "the flag stays set after the last allocation was served")
        }
    }

    @Test("frames sent while an allocation waits leave it waiting for the next release, which wakes it")
    func framesSentWhileWaiting() async throws {
        try await withPair("alloc-frames-meanwhile") { pair in
            try await pair.keep(slots: 6)
            let allocation = pair.waitingAllocation(10_000)  // three slots; two are free
            #expect(await waitUntil { await pair.waiters() == 1 })
            // A copied payload takes the free slots meanwhile; the host keeps it and answers
            // nothing, so nothing rings the plugin after the frame was placed.
            try await pair.session.notify(Keeper.keepQuietly.id, request: Payload([UInt8](repeating: 2, count: 2 * 4096 - 100)))
            #expect(await waitUntil { pair.keeper.kept.withLock { $0.count } == 2 })
            #expect(await pair.freeSlots() == 0)
            #expect(pair.wantsSlots, "a frame placed while an allocation waits cleared the flag")
            // Only the release can ring it now.
            pair.releaseAll()
            let buffer = try await value(of: allocation, within: .seconds(20), "the waiting allocation")
            #expect(buffer.value.slotCount == 3)
        }
    }

    @Test("a waiting allocation that gets no run within its timeout fails with poolExhausted")
    func waiterTimesOut() async throws {
        try await withPair("alloc-timeout") { pair in
            try await pair.keep(slots: 8)
            let started = ContinuousClock.now
            let error = try await failure(of: pair.waitingAllocation(100, timeout: .milliseconds(200)), "the waiting allocation")
            let elapsed = ContinuousClock.now - started
            let shmError = try #require(error as? ShmError, "\(error)")
            #expect(shmError.code == .poolExhausted)
            #expect(shmError.message.contains("no run of 1 free slots for a buffer of 100 bytes (0 bytes of headroom) within 0.2 seconds"), "\(shmError)")
            #expect(elapsed >= .milliseconds(200) && elapsed < .seconds(5), "\(elapsed)")
            #expect(await pair.waiters() == 0)
            #expect(!pair.wantsSlots, "the flag stays set after the last waiting allocation timed out")
            pair.releaseAll()
        }
    }

    @Test("closing the transport fails a waiting allocation with the close error at once")
    func closeWhileWaiting() async throws {
        try await withPair("alloc-close") { pair in
            try await pair.keep(slots: 8)
            let allocation = pair.waitingAllocation(100)
            #expect(await waitUntil { await pair.waiters() == 1 })
            let closed = ContinuousClock.now
            await onLoop(pair.reactor) { pair.transport.value.close(error: TransportError(.io, "closed by the test")) }
            let error = try await failure(of: allocation, "the waiting allocation")
            #expect(ContinuousClock.now - closed < .seconds(5))
            #expect(error as? TransportError == TransportError(.io, "closed by the test"), "\(error)")
            // Later ones fail at once with the same error; a clean close fails them `.closed`.
            let later = try await failure(of: pair.waitingAllocation(100), "an allocation after the close")
            #expect(later as? TransportError == TransportError(.io, "closed by the test"), "\(later)")
        }
    }

    @Test("cancelling the waiting task throws CancellationError and leaves the queue")
    func cancelWhileWaiting() async throws {
        try await withPair("alloc-cancel") { pair in
            try await pair.keep(slots: 8)
            let allocation = pair.waitingAllocation(100)
            #expect(await waitUntil { await pair.waiters() == 1 })
            allocation.cancel()
            let error = try await failure(of: allocation, "the cancelled allocation")
            #expect(error is CancellationError, "\(error)")
            #expect(await pair.waiters() == 0)
            #expect(!pair.wantsSlots)
            // A task cancelled before it asks does not wait either.
            let early = Task {
                withUnsafeCurrentTask { $0?.cancel() }
                return SendableBox(try await pair.transport.value.allocateBuffer(count: 100, timeout: .seconds(30)))
            }
            #expect(try await failure(of: early, "the allocation of a cancelled task") is CancellationError)
            pair.releaseAll()
        }
    }

    @Test("waiting allocations are served oldest first: a smaller later one does not overtake, nor does one that does not wait")
    func waitersInOrder() async throws {
        try await withPair("alloc-order") { pair in
            try await pair.keep(slots: 1)
            try await pair.keep(slots: 7)
            // On the loop, with the callback form: the first wants 8 slots, the second 1.
            let results = Mutex<[String]>([])
            let held = Mutex<[SendableBox<ShmBuffer>]>([])
            await onLoop(pair.reactor) {
                for (name, count) in [("large", 30_000), ("small", 100)] {
                    pair.transport.value.allocateBuffer(count: count, timeout: .seconds(30)) { result in
                        switch result {
                        case .success(let buffer):
                            held.withLock { $0.append(SendableBox(buffer)) }
                            results.withLock { $0.append(name) }
                        case .failure(let error):
                            results.withLock { $0.append("\(name) failed: \(error)") }
                        }
                    }
                }
            }
            #expect(await pair.waiters() == 2)
            // One slot comes free: the small one would fit, but the large one is first.
            pair.releaseFirst()
            #expect(await waitUntil { await pair.freeSlots() == 1 })
            try await Task.sleep(for: .milliseconds(100))
            #expect(results.withLock { $0 }.isEmpty, "\(results.withLock { $0 })")
            guard case .failure(let refused) = await pair.allocateNow(100) else {
                Issue.record("an allocation that does not wait took the slot the waiting ones wait for")
                return
            }
            #expect(refused.message.contains("and 2 earlier allocations wait for slots first"), "\(refused)")
            #expect(await onLoop(pair.reactor) { pair.transport.value.allocateBuffer(count: 100) == nil })
            // The rest comes free: the large one gets the whole pool, the small one waits on.
            pair.releaseAll()
            #expect(await waitUntil { results.withLock { $0 } == ["large"] }, "\(results.withLock { $0 })")
            #expect(await pair.waiters() == 1)
            // Its buffer is released unsent: the small one's turn.
            held.withLock { $0.removeAll() }
            #expect(await waitUntil { results.withLock { $0 } == ["large", "small"] }, "\(results.withLock { $0 })")
            #expect(await pair.waiters() == 0)
            #expect(!pair.wantsSlots)
        }
    }

    @Test("a frame refused for want of slots lets the waiting allocation behind it through")
    func refusedFrameLetsWaitersThrough() async throws {
        try await withPair("alloc-refused") { pair in
            try await pair.keep(slots: 2)
            try await pair.keep(slots: 6)
            let call = Locked<Result<Payload, RPCError>?>(nil)
            let allocation = Locked<Result<SendableBox<ShmBuffer>, any Error>?>(nil)
            // In one turn of the plugin's loop, so that the 300 ms stall limit cannot run out
            // before all of it is in place, however late this task gets to run: a 3-slot
            // request queues for slots, a 1-slot allocation queues behind it, and the host lets
            // go of two slots, too few for the request (its ring of the plugin's doorbell is
            // read after this turn).
            let setUp = await onLoop(pair.reactor) { () -> (requestWaits: Bool, waiters: Int) in
                let transport = pair.transport.value
                transport.stallTimeout = .milliseconds(300)
                _ = pair.session.startCall(Keeper.keep.id, request: Payload([UInt8](repeating: 1, count: 3 * 4096 - 100))) { result in
                    call.withLock { $0 = result }
                }
                transport.flush()
                let requestWaits = transport.framesWaitForSlots
                _ = transport.allocateBuffer(count: 100, timeout: .seconds(30)) { result in
                    allocation.withLock { $0 = result.map { SendableBox($0) } }
                }
                let waiters = transport.allocationWaiters.count
                pair.releaseFirst()
                return (requestWaits, waiters)
            }
            #expect(setUp.requestWaits, "the request does not wait")
            #expect(setUp.waiters == 1, "the allocation does not wait")
            // The request is refused at the stall limit; then the allocation gets one of the
            // two free slots (no release rings the plugin after that).
            #expect(await waitUntil(timeout: .seconds(20)) { allocation.withLock { $0 } != nil }, "the waiting allocation")
            guard case .success(let buffer)? = allocation.withLock({ $0 }) else {
                Issue.record("the allocation failed: \(String(describing: allocation.withLock { $0 }))")
                return
            }
            #expect(buffer.value.slotCount == 1)
            #expect(await waitUntil(timeout: .seconds(20)) { call.withLock { $0 } != nil }, "the refused request")
            guard case .failure(let error)? = call.withLock({ $0 }) else {
                Issue.record("the request was not refused: \(String(describing: call.withLock { $0 }))")
                return
            }
            #expect(error.code == .resourceExhausted, "\(error)")
        }
    }

    @Test("a frame queued for sending takes the slots before a waiting allocation, even one that would fit first")
    func framesBeforeWaiters() async throws {
        try await withPair("alloc-frames") { pair in
            try await pair.keep(slots: 2)
            try await pair.keep(slots: 6)
            // A 3-slot request waits for slots in the send queue...
            let call = Task { try await pair.keep(slots: 3) }
            #expect(await waitUntil { await onLoop(pair.reactor) { pair.transport.value.framesWaitForSlots } }, "the request does not wait")
            // ...and then an allocation of one slot.
            let allocation = pair.waitingAllocation(100)
            #expect(await waitUntil { await pair.waiters() == 1 })
            // Two slots come free: too few for the frame, enough for the allocation, which
            // must leave them to the frame.
            pair.releaseFirst()
            #expect(await waitUntil { await pair.freeSlots() == 2 })
            try await Task.sleep(for: .milliseconds(100))
            #expect(await pair.waiters() == 1, "the allocation took slots a queued frame waits for")
            #expect(await pair.freeSlots() == 2)
            // The rest comes free: the frame goes (the host keeps its 3 slots), then the allocation.
            pair.releaseAll()
            try await value(of: call, within: .seconds(20), "the queued request")
            let buffer = try await value(of: allocation, within: .seconds(20), "the waiting allocation")
            #expect(buffer.value.slotCount == 1)
            #expect(pair.keeper.kept.withLock { $0.count } == 1)
        }
    }
}

