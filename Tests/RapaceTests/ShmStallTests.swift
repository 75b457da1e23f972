import EchoService
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// What happens when shared memory stays full (`ShmTransport.stallTimeout`): a frame that
/// waits too long for slots is refused and only its call fails `RESOURCE_EXHAUSTED`; a peer
/// that consumes nothing at all loses the connection.
@Suite("Shared memory: stalls", .sharesProcess)
struct ShmStallTests {
    /// Keeps the request payloads it is sent (views into the caller's slots: their leases
    /// stay taken) until told to let them go; also hands out results of a given size.
    final class Hoarder: RPCService, Sendable {
        static let keep = MethodDescriptor(service: "Hoarder", method: "keep", kind: .unary)
        static let releaseAll = MethodDescriptor(service: "Hoarder", method: "release_all", kind: .unary)
        static let give = MethodDescriptor(service: "Hoarder", method: "give", kind: .unary)
        /// A server stream of one item of the requested size; returns as soon as it is queued.
        static let giveStream = MethodDescriptor(service: "Hoarder", method: "give_stream", kind: .serverStream)
        let kept = Mutex<[Payload]>([])

        var methods: [MethodDescriptor] { [Self.keep, Self.releaseAll, Self.give, Self.giveStream] }

        func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
            switch method {
            case Self.keep.id:
                kept.withLock { $0.append(request) }
                return .empty
            case Self.releaseAll.id:
                kept.withLock { $0.removeAll() }
                return .empty
            case Self.give.id:
                let size = try request.decode { try $0.readVarint64() }
                return Payload([UInt8](repeating: 9, count: Int(size)))
            case Self.giveStream.id:
                let size = try request.decode { try $0.readVarint64() }
                try await context.send(encoded: Payload([UInt8](repeating: 7, count: Int(size))))
                return .empty
            default:
                throw RPCError(.unimplemented, "no such method")
            }
        }
    }

    /// A host serving `Hoarder` and Echo on its own reactor, and a plugin session on
    /// another; both transports use `stall` as their stall limit. Pool: 4 slots of 4 KiB.
    private func withPair(
        _ tag: String, stall: Duration, _ body: (Session, Reactor, Reactor, Hoarder) async throws -> Void
    ) async throws {
        let hoarder = Hoarder()
        try await withShmHost(
            tag, config: ShmConfig(ringCapacity: 16, slotSize: 4096, slotCount: 4), services: [hoarder, EchoServer(DefaultEcho())],
            prepare: { transport in transport.stallTimeout = stall }
        ) { path, hostReactor, _, pluginReactor in
            let session = try await Session.connect(shm: path.path, reactor: pluginReactor)
            await onLoop(pluginReactor) { (session.frameTransport as! ShmTransport).stallTimeout = stall }
            try await body(session, hostReactor, pluginReactor, hoarder)
            await session.closeAndWait()
        }
    }

    private static let threeKiB = Payload([UInt8](repeating: 3, count: 3000))

    @Test("a request that finds no free slots in time fails RESOURCE_EXHAUSTED; the connection and other calls go on")
    func requestRefused() async throws {
        try await withPair("stall-request", stall: .milliseconds(300)) { session, _, reactor, hoarder in
            // The host keeps four requests: their four slots (the whole pool) stay leased.
            for _ in 0..<4 { _ = try await session.call(Hoarder.keep.id, request: Self.threeKiB) }
            #expect(hoarder.kept.withLock { $0.count } == 4)
            let started = ContinuousClock.now
            async let refused: Result<Payload, RPCError> = {
                do throws(RPCError) { return .success(try await session.call(Hoarder.keep.id, request: Self.threeKiB)) } catch { return .failure(error) }
            }()
            // Queued behind the waiting frame: sent once it is refused.
            let sum = try await EchoClient(session).add(20, 22)
            guard case .failure(let error) = await refused else {
                Issue.record("the call that found no slots succeeded")
                return
            }
            #expect(sum == 42)
            #expect(error.code == .resourceExhausted)
            #expect(error.message.contains("free slots"), "\(error.message)")
            #expect(ContinuousClock.now - started >= .milliseconds(250))
            let (phase, refusedFrames) = await onLoop(reactor) { (session.phase, (session.frameTransport as! ShmTransport).statistics.framesRefused) }
            #expect(phase == .ready && refusedFrames == 1)
            // Once the host lets go, payloads travel again on the same connection.
            _ = try await session.call(Hoarder.releaseAll.id, request: .empty)
            #expect(try await EchoClient(session).checksum([UInt8](repeating: 1, count: 3000)) == MethodID.fnv1a64([UInt8](repeating: 1, count: 3000)))
        }
    }

    @Test("a sender waiting for slots while the pool stays full wakes only when slots are freed, not in a loop of its own rings")
    func waitingSenderDoesNotSpin() async throws {
        try await withPair("stall-quiet", stall: .milliseconds(800)) { session, _, reactor, hoarder in
            // The host keeps four requests: their four slots (the whole pool) stay leased.
            for _ in 0..<4 { _ = try await session.call(Hoarder.keep.id, request: Self.threeKiB) }
            let transport = await onLoop(reactor) { SendableBox(session.frameTransport as! ShmTransport) }
            // The fifth request, sent in the same turn of the loop as the check that it waits
            // for a slot (wants_slots set): its wait lasts the 800 ms stall limit, which a
            // check from this task, a hop later, could miss on a loaded machine.
            let refused = Locked<Result<Payload, RPCError>?>(nil)
            let (before, waits) = await onLoop(reactor) { () -> (ShmTransport.Statistics, Bool) in
                let before = transport.value.statistics
                _ = session.startCall(Hoarder.keep.id, request: Self.threeKiB) { result in refused.withLock { $0 = result } }
                transport.value.flush()
                return (before, transport.value.pendingFrameCount > 0)
            }
            #expect(waits, "the fifth request does not wait for a slot")
            // However late this reads, the counts cover the wait from its start.
            try await Task.sleep(for: .milliseconds(300))
            let during = await onLoop(reactor) { transport.value.statistics }
            let wakes = during.doorbellWakes - before.doorbellWakes
            #expect(wakes < 20, "the waiting sender woke \(wakes) times in 300 ms with nothing freed")
            #expect(await waitUntil(timeout: .seconds(20)) { refused.withLock { $0 } != nil }, "the waiting request never ended")
            guard case .failure(let error)? = refused.withLock({ $0 }) else {
                Issue.record("the call that found no slots succeeded")
                return
            }
            #expect(error.code == .resourceExhausted)
            #expect(hoarder.kept.withLock { $0.count } == 4)
        }
    }

    @Test("a result that finds no free slots in time reaches the caller as RESOURCE_EXHAUSTED")
    func resultRefused() async throws {
        try await withPair("stall-result", stall: .milliseconds(300)) { session, _, reactor, _ in
            let size = Payload.encoding { $0.writeVarint(3000) }
            // The plugin keeps four results: their slots stay leased.
            var results: [Payload] = []
            for _ in 0..<4 { results.append(try await session.call(Hoarder.give.id, request: size)) }
            #expect(results.allSatisfy { $0.count == 3000 })
            do throws(RPCError) {
                _ = try await session.call(Hoarder.give.id, request: size)
                Issue.record("a result that found no slots arrived")
            } catch {
                #expect(error.code == .resourceExhausted)
            }
            #expect(try await EchoClient(session).add(1, 2) == 3)
            results.removeAll()
            #expect(try await session.call(Hoarder.give.id, request: size).count == 3000)
            #expect(await onLoop(reactor) { session.phase } == .ready)
        }
    }

    @Test("a stream whose item finds no free slots, behind which its handler already ended it, ends RESOURCE_EXHAUSTED")
    func streamEndRefusedWithItsItem() async throws {
        try await withPair("stall-stream", stall: .milliseconds(300)) { session, _, reactor, _ in
            let size = Payload.encoding { $0.writeVarint(3000) }
            // The plugin keeps four results: their slots (the whole pool) stay leased.
            var results: [Payload] = []
            for _ in 0..<4 { results.append(try await session.call(Hoarder.give.id, request: size)) }
            // The item waits for slots; the handler has returned, so the stream's terminal
            // frame waits behind it and is given up on with it. The caller must still learn
            // the end (a deadline bounds the test: without it the stream would never end).
            var items = 0
            do {
                for try await _ in session.serverStream(Hoarder.giveStream.id, request: size, options: .timeout(.seconds(5))) { items += 1 }
                Issue.record("the stream ended normally")
            } catch let error as RPCError {
                #expect(error.code == .resourceExhausted, "\(error)")
            }
            #expect(items == 0)
            results.removeAll()
            #expect(try await EchoClient(session).add(1, 2) == 3)
            #expect(await onLoop(reactor) { session.phase } == .ready)
        }
    }

    @Test(
        "a peer that consumes nothing for the stall limit loses the connection: calls fail UNAVAILABLE",
        .ownsProcess("the connection must end at the stall limit (200 ms), while the host's loop still sleeps (1 s)"))
    func hungPeer() async throws {
        try await withPair("stall-hung", stall: .milliseconds(200)) { session, hostReactor, reactor, _ in
            // The host's loop hangs; 40 calls need 80 descriptors and the ring holds 16. The
            // calls start only once it sleeps, so it can have answered none of them.
            let asleep = Mutex(false)
            hostReactor.execute {
                asleep.withLock { $0 = true }
                usleep(1_000_000)
            }
            #expect(await waitUntil(timeout: .seconds(5)) { asleep.withLock { $0 } }, "the host's loop never ran the sleep")
            let outcomes = await withTaskGroup(of: RPCError?.self) { group in
                for index in 0..<40 {
                    group.addTask {
                        do {
                            _ = try await EchoClient(session).add(Int32(index), 1)
                            return nil
                        } catch { return error as? RPCError ?? RPCError(.unknown, "\(error)") }
                    }
                }
                var errors: [RPCError?] = []
                for await outcome in group { errors.append(outcome) }
                return errors
            }
            // The connection ended while the host still slept: once awake it answers calls and
            // consumes the ring, and then neither could every call fail nor the stall limit end it.
            let failures = outcomes.compactMap { $0 }
            #expect(failures.count == 40, "\(40 - failures.count) of 40 calls succeeded against a host that slept throughout")
            #expect(failures.allSatisfy { $0.code == .unavailable }, "\(failures.filter { $0.code != .unavailable })")
            #expect(failures.contains { $0.message.contains("consumed nothing") }, "\(failures.first.map(\.message) ?? "")")
            #expect(await onLoop(reactor) { session.phase } == .closed)
        }
    }
}
