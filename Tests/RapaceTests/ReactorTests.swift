import CRapaceShim
import EchoService
import Foundation
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

@Suite("Reactor", .sharesProcess)
struct ReactorTests {
    @Test("work submitted from many threads runs on the loop thread, all of it")
    func executeFromThreads() async throws {
        try await withReactor { reactor in
            let count = Locked(0)
            let offLoop = Locked(0)
            await withTaskGroup(of: Void.self) { group in
                for _ in 0..<4 {
                    group.addTask {
                        for _ in 0..<1000 {
                            reactor.execute {
                                if !reactor.inLoop { offLoop.withLock { $0 += 1 } }
                                count.withLock { $0 += 1 }
                            }
                        }
                    }
                }
            }
            let deadline = ContinuousClock.now + .seconds(5)
            while count.withLock({ $0 }) < 4000 && ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(1))
            }
            #expect(count.withLock { $0 } == 4000)
            #expect(offLoop.withLock { $0 } == 0)
        }
    }

    @Test("timers fire once, after their delay; cancelled timers never fire; delays too long to represent mean never")
    func timers() async throws {
        try await withReactor { reactor in
            let (fired, registrationsLeft): ([String], Int) = try await withTimeout(.seconds(5)) {
                await withCheckedContinuation { continuation in
                    reactor.execute {
                        var order: [String] = []
                        let started = ContinuousClock.now
                        let cancelled = reactor.schedule(after: .milliseconds(10)) { order.append("cancelled") }
                        // Saturate instead of wrapping round to a short delay.
                        let never = [
                            reactor.schedule(afterNanoseconds: .max) { order.append("UInt64.max ns") },
                            reactor.schedule(after: .seconds(Int64.max)) { order.append("Int64.max s") },
                        ]
                        reactor.schedule(after: .milliseconds(30)) {
                            order.append("30ms")
                            if ContinuousClock.now - started < .milliseconds(29) { order.append("too early") }
                        }
                        reactor.schedule(after: .milliseconds(5)) {
                            order.append("5ms")
                            cancelled.cancel()
                        }
                        reactor.schedule(after: .milliseconds(60)) {
                            for timer in never { timer.cancel() }
                            // Counted here, asserted on the test's task.
                            continuation.resume(returning: (order, reactor.registrationCount))
                        }
                    }
                }
            }
            #expect(fired == ["5ms", "30ms"])
            #expect(registrationsLeft == 0, "timers still registered once all fired or were cancelled")
        }
    }

    @Test("a task preferring the reactor runs on the loop thread before and after a call")
    func executorNoHop() async throws {
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor)
                let onLoop = try await clientReactor.run {
                    var checks = [clientReactor.inLoop]
                    let sum = try await EchoClient(pair.client).add(2, 3)
                    checks.append(clientReactor.inLoop)
                    checks.append(sum == 5)
                    return checks
                }
                #expect(onLoop == [true, true, true])
                await pair.client.closeAndWait()
            }
        }
    }

    @Test("the callback API completes on the loop without any task")
    func callbackAPI() async throws {
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor)
                let results: [Int32] = try await withTimeout(.seconds(5)) {
                    await withCheckedContinuation { continuation in
                        clientReactor.execute {
                            var sums: [Int32] = []
                            func next(_ i: Int32) {
                                let request = Payload.encoding { $0.writeZigZag(Int64(i)); $0.writeZigZag(1) }
                                pair.client.startCall(EchoMethods.add.id, request: request) { result in
                                    precondition(clientReactor.inLoop)
                                    sums.append((try? result.get().decode { try $0.decode(Int32.self) }) ?? -1)
                                    if i < 9 { next(i + 1) } else { continuation.resume(returning: sums) }
                                }
                            }
                            next(0)
                        }
                    }
                }
                #expect(results == Array(1...10))
                await pair.client.closeAndWait()
            }
        }
    }

    @Test("attached to an event_base the test creates and runs itself")
    func attachedToApplicationBase() async throws {
        // The application's loop: its own base, on its own thread, driven by the application.
        let base = try #require(rapace_event_base_new())
        let reactor = try Reactor.attach(to: base, name: "app-loop")
        let loopThread = Thread { _ = rapace_event_base_loop_forever(reactor.base) }
        loopThread.start()

        try await withReactor("server") { serverReactor in
            let server = RapaceServer(reactor: serverReactor, services: [EchoServer(DefaultEcho())])
            let path = temporarySocketPath("attached")
            let address = try await server.listen(on: .unix(path: path))
            let session = try await Session.connect(to: address, reactor: reactor)
            let echo = EchoClient(session)
            #expect(try await echo.add(40, 2) == 42)
            let items = try await reactor.run {
                var items: [UInt32] = []
                for try await item in echo.countdown(from: 100) { items.append(item) }
                return items
            }
            #expect(items == Array((1...100).reversed()))
            await session.closeAndWait()
            await server.shutdownGracefully()
        }
        // Detach on the application's loop thread, then stop the application's loop.
        let stopped = Locked(false)
        reactor.execute {
            reactor.shutdown()
            _ = rapace_event_base_loopbreak(reactor.base)
            stopped.withLock { $0 = true }
        }
        let deadline = ContinuousClock.now + .seconds(5)
        while !stopped.withLock({ $0 }) && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(1)) }
        #expect(stopped.withLock { $0 })
        try await Task.sleep(for: .milliseconds(20))
        rapace_event_base_free(base)
    }

    @Test("start and shutdown leave no thread, descriptor or event behind")
    func shutdownLeavesNothing() async {
        // Runs in a child process so other tests' descriptors don't interfere with the count.
        await #expect(processExitsWith: .success) {
            func count() -> Int { DescriptorSnapshot.of(pid: getpid()).withoutTimers.count }
            func threads() -> Int {
                (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? -1
            }
            // Warm up lazily created runtime state first.
            let warm = try! Reactor.start()
            warm.shutdown()
            let fds = count()
            let threadCount = threads()
            for _ in 0..<20 {
                let reactor = try! Reactor.start()
                let path = temporarySocketPath("shutdown")
                let done = Locked(false)
                reactor.execute {
                    let listener = try! StreamListener(reactor: reactor, address: .unix(path: path)) { (_: StreamTransport) in }
                    _ = listener
                    reactor.schedule(after: .seconds(60)) {}
                    done.withLock { $0 = true }
                }
                while !done.withLock({ $0 }) { usleep(100) }
                reactor.shutdown()  // closes the listener and the timer it still holds
                if access(path, F_OK) == 0 { exit(3) }
            }
            var settled = false
            for _ in 0..<100 where !settled {
                usleep(10_000)
                settled = count() == fds && threads() == threadCount
            }
            if count() != fds { exit(1) }
            if threads() != threadCount { exit(2) }
        }
    }

    @Test("suspendOnLoop evaluates its shutdown value only once the reactor is gone, off the loop too")
    func shutDownValueIsLazy() async throws {
        let reactor = try Reactor.start(name: "lazy-shut-down-value")
        defer { reactor.shutdown() }
        let evaluated = Locked(0)
        @Sendable func gone() -> String {
            evaluated.withLock { $0 += 1 }
            return "shut down"
        }
        #expect(!reactor.inLoop)
        let running = try await withTimeout(.seconds(10), "suspendOnLoop on a running reactor") {
            await reactor.suspendOnLoop(orIfShutDown: gone()) { $0.resume(returning: "body ran") }
        }
        #expect(running == "body ran")
        #expect(evaluated.withLock { $0 } == 0, "the shutdown value was built for a call the loop ran")
        reactor.shutdown()
        let after = try await withTimeout(.seconds(10), "suspendOnLoop on a shut-down reactor") {
            await reactor.suspendOnLoop(orIfShutDown: gone()) { $0.resume(returning: "body ran") }
        }
        #expect(after == "shut down")
        #expect(evaluated.withLock { $0 } == 1)
    }

    @Test("after shutdown, async session calls, streams and waits fail or return at once instead of hanging", .timeLimit(.minutes(1)))
    func sessionAfterShutdown() async throws {
        let clientReactor = try Reactor.start(name: "client")
        let serverReactor = try Reactor.start(name: "server")
        defer { serverReactor.shutdown() }
        let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor)
        let echo = EchoClient(pair.client)
        #expect(try await echo.add(1, 2) == 3)
        let accepted = clientReactor.execute {}
        #expect(accepted)
        clientReactor.shutdown()
        let refused = !clientReactor.execute {}
        #expect(refused)
        await #expect(throws: RPCError.self) { try await echo.add(1, 2) }
        do {
            _ = try await echo.add(1, 2)
        } catch let error as RPCError {
            #expect(error.code == .unavailable, "\(error)")
        }
        await #expect(throws: RPCError.self) { try await pair.client.notify(EchoMethods.echo.id, request: .empty) }
        var iterator = echo.countdown(from: 3).makeAsyncIterator()
        await #expect(throws: RPCError.self) { _ = try await iterator.next() }
        await pair.client.closed()  // returns: shutdown closed it
        await pair.server.closed()
    }

    @Test(
        "work submitted before a shutdown and run by its teardown gets the shut-down answer: its body never runs after the hooks and the sweep",
        .timeLimit(.minutes(1)))
    func suspendOnLoopDuringTeardown() async throws {
        let reactor = try Reactor.start(name: "teardown-race")
        // The loop is held inside a callback while the teardown and the two waits queue up
        // behind it, in that order; released, it runs them as one batch: the teardown first.
        let hold = try #require(await HeldLoop.hold(reactor))
        defer { hold.release() }  // never leave the loop held
        hold.shutDownFromAnotherThread()
        #expect(await waitUntil { reactor.remoteBacklog == 1 }, "the teardown was not queued")
        let direct = Task { await reactor.suspendOnLoop(orIfShutDown: "shut down") { $0.resume(returning: "body ran") } }
        // Without the check its body adds a shutdown hook after the hooks ran: a wait forever.
        let signal = Task { await SignalWatcher.waitForAny(of: [SIGUSR2], on: reactor) }
        #expect(await waitUntil { reactor.remoteBacklog == 3 }, "the waits were not queued behind the teardown")
        hold.release()
        #expect(try await value(of: direct, within: .seconds(10), "suspendOnLoop during teardown") == "shut down")
        let signalled = try await value(of: signal, within: .seconds(10), "waitForAny during teardown")
        #expect(signalled == nil)
        #expect(await hold.shutDownReturns(), "shutdown did not return")
    }
}
