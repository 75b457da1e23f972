import EchoService
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

@Suite("Session over the in-memory transport", .sharesProcess)
struct SessionTests {
    @Test("every Echo method")
    func everyEchoMethod() async throws {
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor)
                let echo = EchoClient(pair.client)
                #expect(try await echo.echo("héllo") == "héllo")
                #expect(try await echo.add(2, 3) == 5)
                #expect(try await echo.add(.max, 1) == .min)
                await #expect(throws: RPCError(StatusCode(404), "nope")) { try await echo.fail(code: 404, message: "nope") }
                var items: [UInt32] = []
                for try await item in echo.countdown(from: 5) { items.append(item) }
                #expect(items == [5, 4, 3, 2, 1])
                #expect(try await echo.checksum(Array("abc".utf8)) == 0xE71F_A219_0541_574B)
                try await echo.sleep(milliseconds: 10)
                let blob = try await echo.blob(size: 1000)
                #expect(blob.count == 1000 && blob[250] == 250 && blob[251] == 0 && blob[999] == UInt8(999 % 251))
                await pair.client.closeAndWait()
                await pair.server.closed()
            }
        }
    }

    @Test("whenReady reports the handshake's outcome without starting the session: before start, after ready, after a close")
    func whenReady() async throws {
        try await withReactor { reactor in
            let (a, b) = InMemoryTransport.makePair(reactor, reactor)
            let server = try Session(transport: b, role: .acceptor, services: [EchoServer(DefaultEcho())])
            let client = try Session(transport: a, role: .initiator, services: [])
            let outcomes = Locked<[String]>([])
            let phase = await onLoop(reactor) {
                client.whenReady { result in outcomes.withLock { $0.append("early \((try? result.get()) != nil)") } }
                return client.phase
            }
            #expect(phase == .idle, "whenReady started the session")
            #expect(outcomes.withLock { $0 }.isEmpty)
            try await startTogether(client, server)
            await onLoop(reactor) {
                client.whenReady { result in outcomes.withLock { $0.append("late \((try? result.get()) != nil)") } }
            }
            #expect(outcomes.withLock { $0 } == ["early true", "late true"])
            await client.closeAndWait()
            await onLoop(reactor) {
                client.whenReady { result in outcomes.withLock { $0.append("closed \((try? result.get()) != nil)") } }
            }
            #expect(outcomes.withLock { $0 }.last == "closed false")

            // Closed before its handshake: the waiter gets the failure.
            let (c, d) = InMemoryTransport.makePair(reactor, reactor)
            let unstarted = try Session(transport: c, role: .initiator, services: [])
            _ = d
            let failed = Locked<RPCError?>(nil)
            await onLoop(reactor) {
                unstarted.whenReady { result in if case .failure(let error) = result { failed.withLock { $0 = error } } }
                unstarted.start { _ in }
                unstarted.close()
            }
            #expect(await waitUntil { failed.withLock { $0 } != nil }, "a handshake ended by a close reports a failure")
        }
    }

    @Test("unknown method answers UNIMPLEMENTED; undecodable arguments INVALID_ARGUMENT")
    func unknownMethodAndBadArguments() async throws {
        try await withReactor { reactor in
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor)
            await #expect {
                _ = try await pair.client.call(0x1234_5678, request: .empty)
            } throws: { ($0 as? RPCError)?.code == .unimplemented }
            await #expect {
                _ = try await pair.client.call(EchoMethods.add.id, request: Payload([0xFF, 0xFF]))
            } throws: { ($0 as? RPCError)?.code == .invalidArgument }
            await #expect {
                // Trailing bytes after the arguments are an error too.
                _ = try await pair.client.call(EchoMethods.add.id, request: Payload([0x04, 0x06, 0x00]))
            } throws: { ($0 as? RPCError)?.code == .invalidArgument }
            // The session still works.
            #expect(try await EchoClient(pair.client).add(1, 1) == 2)
            await pair.client.closeAndWait()
        }
    }

    @Test("a 10 000-item stream arrives in order; a slow consumer never has more than the window in flight")
    func streamFlowControl() async throws {
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor)
                let window: UInt32 = 64
                let stream = EchoClient(pair.client).countdown(from: 10_000, options: CallOptions(streamWindow: window))
                var expected: UInt32 = 10_000
                var received = 0
                for try await item in stream {
                    #expect(item == expected)
                    expected -= 1
                    received += 1
                    if received % 1000 == 0 { try await Task.sleep(for: .milliseconds(5)) }
                }
                #expect(received == 10_000)
                let inFlight = await onLoop(clientReactor) { pair.client.statistics.maxStreamBytesInFlight }
                #expect(inFlight > 0 && inFlight <= window)
                await pair.client.closeAndWait()
            }
        }
    }

    @Test("an item larger than the caller's window waits creditGrowthTimeout for a grant, then fails the stream with RESOURCE_EXHAUSTED")
    func itemLargerThanWindow() async throws {
        try await withReactor { reactor in
            let pair = try await SessionPair.make(
                clientReactor: reactor, serverReactor: reactor, serverConfiguration: Session.Configuration(creditGrowthTimeout: .milliseconds(300)))
            // countdown items are varints: 10 000 takes 2 bytes, which a 1-byte window cannot
            // carry, and this client grants only what it consumes.
            let stream = EchoClient(pair.client).countdown(from: 10_000, options: CallOptions(streamWindow: 1))
            let started = ContinuousClock.now
            var failure: RPCError?
            do {
                for try await _ in stream { Issue.record("an item arrived through a 1-byte window") }
            } catch let error as RPCError {
                failure = error
            }
            #expect(failure?.code == .resourceExhausted)
            #expect(failure?.message.contains("stream item of 2 bytes exceeds the caller's window of 1 bytes, and no grant raised it within") == true, "\(String(describing: failure))")
            #expect(ContinuousClock.now - started >= .milliseconds(300), "the item waited for a grant first")
            await pair.client.closeAndWait()
        }
    }

    @Test("a caller isolated to an actor gets results and errors, its isolation reaches the RPCCaller, and cancelling its task cancels the remote handler")
    func actorCaller() async throws {
        let observer = SleepObserver()
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor, serverServices: [EchoServer(observer.echo)])
                let noting = IsolationNotingCaller(pair.client)
                let caller = IsolatedCaller(EchoClient(noting))
                #expect(try await caller.add(2, 3) == 5)
                await #expect(throws: RPCError(StatusCode(404), "nope")) { try await caller.fail(404, "nope") }
                let task = Task { try await caller.sleep(milliseconds: 10_000) }
                try #require(await waitUntil(timeout: .seconds(10)) { await onLoop(serverReactor) { pair.server.incoming.count } == 1 })
                // The actor is free while its call waits.
                #expect(try await caller.add(40, 2) == 42)
                task.cancel()
                await #expect {
                    try await task.value
                } throws: { ($0 as? RPCError)?.code == .cancelled }
                #expect(try await observer.waitForEnd().cancelled)
                #expect(await caller.callsFinished == 3)
                // EchoClient's methods are nonisolated(nonsending): the actor's isolation is
                // what `RPCCaller.call` sees, not the generic executor's (nil).
                let isolations = noting.isolations
                #expect(isolations.count == 4)
                #expect(isolations.allSatisfy { $0 == ObjectIdentifier(caller) }, "isolations seen: \(isolations)")
                #expect(await onLoop(clientReactor) { pair.client.outgoing.count } == 0)
                await pair.client.closeAndWait()
            }
        }
    }

    @Test("cancelling the calling task cancels the remote handler within 100 ms", .ownsProcess("the handler must end within 100 ms"))
    func cancellation() async throws {
        let observer = SleepObserver()
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor, serverServices: [EchoServer(observer.echo)])
                let echo = EchoClient(pair.client)
                let task = Task { try await echo.sleep(milliseconds: 10_000) }
                // The call has reached the server (its channel is open there) before it is cancelled.
                try #require(await waitUntil(timeout: .seconds(10)) { await onLoop(serverReactor) { pair.server.incoming.count } == 1 })
                let cancelledAt = ContinuousClock.now
                task.cancel()
                await #expect {
                    try await task.value
                } throws: { ($0 as? RPCError)?.code == .cancelled }
                let event = try await observer.waitForEnd()
                #expect(event.cancelled)
                #expect(event.at - cancelledAt < .milliseconds(100))
                // Nothing is left pending on either side.
                #expect(await onLoop(clientReactor) { pair.client.outgoing.count } == 0)
                #expect(await onLoop(serverReactor) { pair.server.incoming.count } == 0)
                await pair.client.closeAndWait()
            }
        }
    }

    @Test(
        "a deadline shorter than the sleep gives DEADLINE_EXCEEDED and cancels the handler",
        .ownsProcess("the answer must come within 2 s"))
    func deadline() async throws {
        let observer = SleepObserver()
        try await withReactor { reactor in
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverServices: [EchoServer(observer.echo)])
            let started = ContinuousClock.now
            await #expect {
                try await EchoClient(pair.client).sleep(milliseconds: 5_000, options: .timeout(.milliseconds(150)))
            } throws: { ($0 as? RPCError)?.code == .deadlineExceeded }
            #expect(ContinuousClock.now - started < .seconds(2))
            let event = try await observer.waitForEnd()
            #expect(event.cancelled)
            await pair.client.closeAndWait()
        }
    }

    @Test("blob refuses a size above the server's max payload before allocating it; the session serves on")
    func blobLimit() async throws {
        try await withReactor { reactor in
            var server = Session.Configuration()
            server.limits.maxPayloadSize = 1100
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverServices: [EchoServer(DefaultEcho())], serverConfiguration: server)
            let echo = EchoClient(pair.client)
            #expect(try await echo.blob(size: 1000).count == 1000)
            await #expect {
                try await echo.blob(size: 1101)
            } throws: { ($0 as? RPCError) == RPCError(.resourceExhausted, "blob of 1101 bytes exceeds the max payload size of 1100 bytes") }
            await #expect {
                try await echo.blob(size: .max)
            } throws: { ($0 as? RPCError)?.code == .resourceExhausted }
            #expect(try await echo.add(1, 2) == 3)
            await pair.client.closeAndWait()
        }
    }

    @Test("a timeout too long for the clock is no deadline at all, not one already past")
    func hugeTimeoutSaturates() async throws {
        #expect(Deadline.after(.seconds(Int64.max)).monotonicNanoseconds == .max)
        #expect(CallOptions(timeout: .seconds(Int64.max)).effectiveDeadline(now: 5_000_000_000) == nil)
        // Seconds that fit in UInt64 nanoseconds, plus attoseconds, plus the clock's reading.
        #expect(CallOptions(timeout: .nanoseconds(Int64.max) * 2 + .nanoseconds(999)).effectiveDeadline(now: .max - 10) == nil)
        // An explicit deadline at the end of time is none as well; an earlier timeout still wins.
        #expect(CallOptions(deadline: Deadline(monotonicNanoseconds: .max)).effectiveDeadline(now: 7) == nil)
        #expect(CallOptions(timeout: .nanoseconds(3), deadline: Deadline(monotonicNanoseconds: .max)).effectiveDeadline(now: 7) == Deadline(monotonicNanoseconds: 10))
        try await withReactor { reactor in
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverServices: [EchoServer(DefaultEcho())])
            let client = EchoClient(pair.client)
            #expect(try await client.add(2, 3, options: .timeout(.seconds(Int64.max))) == 5)
            #expect(try await client.add(4, 5, options: CallOptions(deadline: .after(.seconds(Int64.max)))) == 9)
            await pair.client.closeAndWait()
        }
    }

    @Test("both peers serve and call on one connection; notifications arrive")
    func bidirectionalAndNotifications() async throws {
        let counter = CounterService()
        try await withReactor("a") { a in
            try await withReactor("b") { b in
                let pair = try await SessionPair.make(
                    clientReactor: a, serverReactor: b,
                    serverServices: [EchoServer(DefaultEcho())], clientServices: [counter])
                // The server calls the client's service.
                for _ in 0..<10 {
                    try await pair.server.notify(CounterService.bump, request: .encoding { $0.writeVarint(3) })
                }
                let total = try await pair.server.call(CounterService.total.id, request: .empty).decode { try $0.readVarint64() }
                #expect(total == 30)
                // The server's calls use even channel ids, the client's odd ones.
                #expect(await onLoop(b) { pair.server.nextChannelID % 2 } == 0)
                #expect(try await EchoClient(pair.client).echo("x") == "x")
                #expect(await onLoop(a) { pair.client.nextChannelID % 2 } == 1)
                await pair.client.closeAndWait()
            }
        }
    }

    @Test("100 concurrent calls on one connection")
    func concurrentCalls() async throws {
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor)
                let echo = EchoClient(pair.client)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for i in 0..<100 {
                        group.addTask {
                            let sum = try await echo.add(Int32(i), 1000)
                            let text = try await echo.echo("call \(i)")
                            #expect(sum == Int32(i) + 1000)
                            #expect(text == "call \(i)")
                        }
                    }
                    try await group.waitForAll()
                }
                await pair.client.closeAndWait()
            }
        }
    }

    @Test(
        "Ping is answered with Pong; keepalive keeps an idle session open",
        .ownsProcess("the round trip must take under 1 s, and a 500 ms keepalive timeout must not fire"))
    func pingAndKeepalive() async throws {
        try await withReactor { reactor in
            var configuration = Session.Configuration()
            configuration.keepalive = Session.Keepalive(interval: .milliseconds(20), timeout: .milliseconds(500))
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, clientConfiguration: configuration)
            let rtt: Result<Duration, RPCError> = await withCheckedContinuation { continuation in
                reactor.execute { pair.client.ping { continuation.resume(returning: $0) } }
            }
            #expect(try rtt.get() < .seconds(1))
            try await Task.sleep(for: .milliseconds(200))
            #expect(await onLoop(reactor) { pair.client.phase } == .ready)
            #expect(try await EchoClient(pair.client).add(1, 2) == 3)
            await pair.client.closeAndWait()
        }
    }

    @Test("GoAway: in-flight calls finish, new calls are refused, then the session closes")
    func gracefulShutdown() async throws {
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let held = HeldCallService()
                let pair = try await SessionPair.make(
                    clientReactor: clientReactor, serverReactor: serverReactor, serverServices: [EchoServer(DefaultEcho()), held])
                let echo = EchoClient(pair.client)
                // In flight until released: its handler is running when the GoAway goes out.
                let inFlight = Task { try await pair.client.call(HeldCallService.hold.id, request: .empty) }
                try await held.waitForEntries(1)
                let shutdown = Task { await pair.server.shutdownGracefully(grace: .seconds(30)) }
                #expect(
                    await waitUntil(timeout: .seconds(10)) { await onLoop(clientReactor) { pair.client.peerGoAway != nil } },
                    "the client hears the GoAway")
                await #expect {
                    _ = try await echo.add(1, 1)
                } throws: { ($0 as? RPCError)?.code == .unavailable }
                #expect(await onLoop(clientReactor) { pair.client.phase } != .closed, "the session waits for the call in flight")
                held.release()
                _ = try await value(of: inFlight, within: .seconds(10), "the call in flight")
                try await value(of: shutdown, within: .seconds(10), "the graceful shutdown")
                await pair.client.closed()
            }
        }
    }

    @Test("limits: oversized requests and too many pending calls fail locally with RESOURCE_EXHAUSTED")
    func limits() async throws {
        try await withReactor { reactor in
            var server = Session.Configuration()
            server.limits = Limits(maxPayloadSize: 1024, maxChannels: 0, maxPendingCalls: 4)
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverConfiguration: server)
            #expect(await onLoop(reactor) { pair.client.effectiveLimits } == Limits(maxPayloadSize: 1024, maxChannels: 8192, maxPendingCalls: 4))
            let echo = EchoClient(pair.client)
            await #expect {
                _ = try await echo.checksum([UInt8](repeating: 1, count: 2000))
            } throws: { ($0 as? RPCError)?.code == .resourceExhausted }
            // Sleeps far longer than any wait here, so all four are pending together however
            // loaded the machine is (1 s sleeps could end before the last one started).
            let sleepers = (0..<4).map { _ in Task { try await echo.sleep(milliseconds: 60_000) } }
            #expect(await waitUntil(timeout: .seconds(20)) { await onLoop(reactor) { pair.client.outgoing.count } == 4 })
            await #expect {
                _ = try await echo.add(1, 2)
            } throws: { ($0 as? RPCError)?.code == .resourceExhausted }
            for sleeper in sleepers { sleeper.cancel() }
            for sleeper in sleepers {
                guard case .failure(let error) = await sleeper.result else {
                    Issue.record("a cancelled 60 s sleep returned")
                    continue
                }
                #expect((error as? RPCError)?.code == .cancelled, "\(error)")
            }
            // A result larger than the limit is refused by the server, not sent.
            await #expect {
                _ = try await echo.blob(size: 4000)
            } throws: { ($0 as? RPCError)?.code == .resourceExhausted }
            #expect(try await echo.add(1, 2) == 3)
            await pair.client.closeAndWait()
        }
    }

    @Test("a handshake between two initiators is rejected on both sides")
    func sameRoleRejected() async throws {
        try await withReactor { reactor in
            let (a, b) = InMemoryTransport.makePair(reactor, reactor)
            let first = try Session(transport: a, role: .initiator)
            let second = try Session(transport: b, role: .initiator)
            let secondResult = Task { try await second.start() }
            await #expect(throws: RPCError.self) { try await first.start() }
            await #expect(throws: RPCError.self) { try await secondResult.value }
        }
    }

    @Test("closing fails pending calls with UNAVAILABLE")
    func closeFailsPending() async throws {
        try await withReactor { reactor in
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor)
            let pending = Task { try await EchoClient(pair.client).sleep(milliseconds: 5_000) }
            try await Task.sleep(for: .milliseconds(50))
            await pair.server.closeAndWait()
            await #expect {
                try await pending.value
            } throws: { ($0 as? RPCError)?.code == .unavailable }
        }
    }

    @Test("setService serves a hand-built session; after start it is refused")
    func setServiceOnHandBuiltSession() async throws {
        try await withReactor { reactor in
            let (a, b) = InMemoryTransport.makePair(reactor, reactor)
            let server = try Session(transport: b, role: .acceptor)
            try server.setService(EchoServer(DefaultEcho()), CounterService())
            #expect(throws: RPCError.self) { try server.setService(EchoServer(DefaultEcho()), EchoServer(DefaultEcho())) }
            let client = try Session(transport: a, role: .initiator)
            try await startTogether(client, server)
            #expect(try await EchoClient(client).add(40, 2) == 42)
            #expect(await onLoop(reactor) { client.peerHello?.methods.count } == EchoMethods.all.count + 2)
            let late = await onLoop(reactor) { () -> StatusCode? in
                do throws(RPCError) { try server.setService(CounterService()); return nil } catch { return error.code }
            }
            #expect(late == .failedPrecondition)
            await client.closeAndWait()
        }
    }

    /// A producer that continues only from `whenOutputDrained`, one notification per round,
    /// recording how deep the rounds nest. Loop-confined.
    final class DrainRounds: @unchecked Sendable {
        // @unchecked Sendable: touched only on the reactor's loop thread.
        let session: Session
        let rounds: Int
        var completed = 0
        var depth = 0
        var deepest = 0
        /// The rounds completed when work queued from the first round ran (nil: not yet).
        var otherWorkRanAfter: Int?
        var done: CheckedContinuation<Void, Never>?

        init(session: Session, rounds: Int) {
            self.session = session
            self.rounds = rounds
        }

        func round() {
            depth += 1
            deepest = max(deepest, depth)
            defer { depth -= 1 }
            completed += 1
            session.sendNotification(CounterService.bump.id, request: .encoding { $0.writeVarint(UInt64(1)) })
            if completed == 1 {
                session.reactor.execute { [self] in otherWorkRanAfter = completed }
            }
            if completed < rounds {
                session.whenOutputDrained { [self] in round() }
            } else {
                done?.resume()
                done = nil
            }
        }
    }

    @Test("whenOutputDrained never runs its body inside the call: re-registering rounds do not nest, and other work runs between them")
    func drainWaitersDoNotNest() async throws {
        try await withReactor { reactor in
            let counter = CounterService()
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverServices: [counter])
            // The in-memory transport hands each flush to the peer at once: the queue is empty
            // whenever a round registers, the fastest peer there is.
            let producer = DrainRounds(session: pair.client, rounds: 500)
            let ranInsideTheCall = await onLoop(reactor) { () -> Bool in
                pair.client.whenOutputDrained { producer.round() }
                return producer.completed > 0
            }
            try await withTimeout(.seconds(30), "500 rounds") {
                await withCheckedContinuation { continuation in
                    reactor.execute {
                        if producer.completed == producer.rounds { continuation.resume() } else { producer.done = continuation }
                    }
                }
            }
            let (deepest, otherWorkRanAfter) = await onLoop(reactor) { (producer.deepest, producer.otherWorkRanAfter) }
            #expect(!ranInsideTheCall, "the first round ran inside whenOutputDrained")
            #expect(deepest == 1, "rounds nested \(deepest) deep")
            #expect(otherWorkRanAfter == 1, "work queued in round 1 ran after round \(otherWorkRanAfter.map(String.init) ?? "none")")
            let total = try await pair.client.call(CounterService.total.id, request: .empty).decode { try $0.readVarint64() }
            #expect(total == 500)
            await pair.client.closeAndWait()
        }
    }
}

/// Forwards calls to a session and notes the isolation each arrives with (nil: none).
private final class IsolationNotingCaller: RPCCaller {
    let session: Session
    private let seen = Mutex<[ObjectIdentifier?]>([])

    init(_ session: Session) { self.session = session }

    var isolations: [ObjectIdentifier?] { seen.withLock { $0 } }

    nonisolated(nonsending) func call(_ method: MethodDescriptor, request: Payload, options: CallOptions) async throws(RPCError) -> Payload {
        note(#isolation)
        return try await session.call(method, request: request, options: options)
    }

    func serverStream(_ method: MethodDescriptor, request: Payload, options: CallOptions) -> RawStream {
        session.serverStream(method, request: request, options: options)
    }

    nonisolated(nonsending) func notify(_ method: MethodDescriptor, request: Payload) async throws(RPCError) {
        note(#isolation)
        try await session.notify(method, request: request)
    }

    private func note(_ isolation: (any Actor)?) {
        seen.withLock { $0.append(isolation.map { ObjectIdentifier($0) }) }
    }
}

/// Calls Echo from an actor; counts the calls that returned or threw back on it.
private actor IsolatedCaller {
    let echo: EchoClient
    private(set) var callsFinished = 0

    init(_ echo: EchoClient) { self.echo = echo }

    func add(_ a: Int32, _ b: Int32) async throws -> Int32 {
        defer { callsFinished += 1 }
        return try await echo.add(a, b)
    }

    func fail(_ code: UInt32, _ message: String) async throws {
        defer { callsFinished += 1 }
        try await echo.fail(code: code, message: message)
    }

    /// Not counted: it ends by cancellation.
    func sleep(milliseconds: UInt32) async throws {
        try await echo.sleep(milliseconds: milliseconds)
    }
}
