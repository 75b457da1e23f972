import RapaceTestSupport
import Synchronization
import Testing

/// `withTimeout` and `waitUntil`: bounded whatever the body does.
@Suite("Bounded waits", .sharesProcess)
struct WaitingTests {
    /// A continuation that a body awaits without regard to cancellation, resumed once by
    /// `open()`, whether that comes before or after the body starts waiting.
    final class Latch: Sendable {
        private enum State {
            case closed
            case waiting(CheckedContinuation<Void, Never>)
            case open
        }
        private let state = Mutex(State.closed)
        private let passedCount = Atomic(0)

        /// Waits until `open()`; cancellation does not end the wait.
        func wait() async {
            await withCheckedContinuation { continuation in
                let resumeNow = state.withLock { state -> Bool in
                    guard case .closed = state else { return true }
                    state = .waiting(continuation)
                    return false
                }
                if resumeNow { continuation.resume() }
            }
            passedCount.add(1, ordering: .relaxed)
        }

        func open() {
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                defer { state = .open }
                if case .waiting(let continuation) = state { return continuation }
                return nil
            }
            waiter?.resume()
        }

        /// True once a `wait()` has begun waiting (and until `open()`).
        var isWaiting: Bool {
            state.withLock { state in
                if case .waiting = state { return true }
                return false
            }
        }

        /// How many waits have ended.
        var passed: Int { passedCount.load(ordering: .relaxed) }
    }

    /// Runs `body` with a latch that is opened when `body` ends, and after 20 s at the
    /// latest: should `withTimeout` wait for its body after all, a test fails (late)
    /// instead of hanging.
    private func withLatch(_ body: (Latch) async throws -> Void) async rethrows {
        let latch = Latch()
        let safetyNet = Task {
            try? await Task.sleep(for: .seconds(20))
            latch.open()
        }
        defer {
            latch.open()
            safetyNet.cancel()
        }
        try await body(latch)
    }

    @Test("a body that ignores cancellation: withTimeout throws at the limit without waiting for it")
    func bodyIgnoringCancellation() async throws {
        try await withLatch { latch in try await bodyIgnoringCancellation(latch) }
    }

    private func bodyIgnoringCancellation(_ latch: Latch) async throws {
        let limit = Duration.milliseconds(200)
        let started = ContinuousClock.now
        await #expect(throws: TestFailure.self) {
            try await withTimeout(limit, "a body awaiting a latch") {
                await latch.wait()
                return 1
            }
        }
        let elapsed = ContinuousClock.now - started
        #expect(elapsed >= limit, "withTimeout gave up before its limit: \(elapsed)")
        // Nothing opens the latch before the safety net (20 s): had withTimeout waited for
        // its body, the body would have passed it.
        #expect(latch.passed == 0, "withTimeout waited for a body that ignores cancellation")
        // The body, left behind, ends once the latch opens.
        latch.open()
        #expect(await waitUntil(timeout: .seconds(10)) { latch.passed == 1 })
    }

    @Test("a body awaiting an unrelated task's value: withTimeout throws at the limit")
    func bodyAwaitingATaskValue() async throws {
        await withLatch { latch in
            let unrelated = Task { await latch.wait() }
            await #expect(throws: TestFailure.self) {
                try await withTimeout(.milliseconds(100), "an unrelated task") { await unrelated.value }
            }
            // The unrelated task still waits: withTimeout did not wait for it.
            #expect(latch.passed == 0, "withTimeout waited for the unrelated task")
            latch.open()
            await unrelated.value
        }
    }

    @Test("the body's value and error come through; a cancellable body is cancelled at the limit")
    func resultsAndCancellation() async throws {
        #expect(try await withTimeout(.seconds(30)) { 42 } == 42)
        // The body's own TestFailure, not the timer's.
        let thrown = await #expect(throws: TestFailure.self) {
            try await withTimeout(.seconds(30)) { () async throws -> Int in throw TestFailure("the body's own") }
        }
        #expect(thrown?.description == "the body's own")
        let sawCancellation = Atomic(false)
        await #expect(throws: TestFailure.self) {
            try await withTimeout(.milliseconds(50)) {
                do { try await Task.sleep(for: .seconds(30)) } catch is CancellationError { sawCancellation.store(true, ordering: .relaxed) }
            }
        }
        #expect(await waitUntil(timeout: .seconds(10)) { sawCancellation.load(ordering: .relaxed) }, "the body was not cancelled at the limit")
    }

    @Test("cancelling the caller ends withTimeout at once, even with a body that ignores cancellation")
    func callerCancelled() async throws {
        try await withLatch { latch in try await callerCancelled(latch) }
    }

    private func callerCancelled(_ latch: Latch) async throws {
        let caller = Task {
            try await withTimeout(.seconds(60), "a body awaiting a latch") {
                await latch.wait()
                return 1
            }
        }
        // Cancel once the body waits on the latch (a fixed sleep could cancel the caller
        // before its body started, and the latch would then never be passed). The bounds are
        // generous: at the start of a full run on a loaded machine, synchronous tests can keep
        // the cooperative threads from the caller's and the body's tasks for over 10 s.
        #expect(await waitUntil(timeout: .seconds(60)) { latch.isWaiting }, "the body did not reach the latch")
        caller.cancel()
        await #expect(throws: CancellationError.self) {
            // Bounded in turn: if the caller waited for its body (which waits on the latch
            // until after this), this fails in 60 s.
            try await withTimeout(.seconds(60), "the cancelled caller") { try await caller.value }
        }
        // The body still waits: the caller ended without waiting for it.
        #expect(latch.passed == 0, "the cancelled caller waited for its body")
        latch.open()
        #expect(await waitUntil(timeout: .seconds(60)) { latch.passed == 1 })
    }

    @Test("value(of:within:) gives the task's value or error, and cancels the task at the limit")
    func valueOfATask() async throws {
        #expect(try await value(of: Task { 42 }, within: .seconds(30)) == 42)
        let failing = Task<Int, any Error> { throw TestFailure("the task's own") }
        let thrown = await #expect(throws: TestFailure.self) { try await value(of: failing, within: .seconds(30)) }
        #expect(thrown?.description == "the task's own")
        let sleeper = Task<Bool, Never> {
            do {
                try await Task.sleep(for: .seconds(30))
                return false
            } catch {
                return true  // cancelled
            }
        }
        await #expect(throws: TestFailure.self) { try await value(of: sleeper, within: .milliseconds(50), "a sleeping task") }
        // Cancelled at the limit: it ends long before its 30 s sleep would.
        #expect(try await withTimeout(.seconds(10), "the cancelled task") { await sleeper.value }, "the task was not cancelled")
    }

    @Test("waitUntil returns whether the condition came true within the limit")
    func waitUntilResult() async {
        #expect(await waitUntil(timeout: .seconds(5)) { true })
        let started = ContinuousClock.now
        #expect(await waitUntil(timeout: .milliseconds(50)) { false } == false)
        #expect(ContinuousClock.now - started >= .milliseconds(50))
    }
}
