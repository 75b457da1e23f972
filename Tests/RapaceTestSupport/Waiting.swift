import Synchronization

/// Fails with a ``TestFailure`` if `body` takes longer than `limit`.
///
/// Returns or throws at the limit even when `body` ignores cancellation (it awaits a
/// continuation nobody resumes, or another task's `value`): `body` runs in a task of its
/// own, which is cancelled at the limit and not waited for. A task group could not do
/// that, as it always awaits its children. Cancelling the calling task cancels `body` and
/// throws `CancellationError` at once, likewise without waiting for it.
package func withTimeout<T: Sendable>(
    _ limit: Duration, _ what: String = "operation", _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    let race = TimeoutRace<T>()
    return try await withTaskCancellationHandler {
        try await withCheckedThrowingContinuation { continuation in
            race.begin(continuation, limit: limit, what: what, body: body)
        }
    } onCancel: {
        race.finish(.failure(CancellationError()))
    }
}

/// The value of `task`, waiting at most `limit` (``withTimeout(_:_:_:)``); at the limit, or
/// when the caller is cancelled, `task` is cancelled (not waited for) and this throws. So a
/// test that gives up on a task does not leave it running.
@discardableResult
package func value<T: Sendable, Failure: Error>(of task: Task<T, Failure>, within limit: Duration, _ what: String = "task") async throws -> T {
    do {
        return try await withTimeout(limit, what) { try await task.value }
    } catch {
        task.cancel()  // nothing, if the task itself threw
        throw error
    }
}

/// The state of one ``withTimeout(_:_:_:)``: its continuation, resumed exactly once by
/// whichever of the body, the timer and cancellation comes first, and the two tasks that
/// race, cancelled by the winner.
private final class TimeoutRace<T: Sendable>: Sendable {
    private enum State {
        /// Not begun yet.
        case idle
        /// The tasks are running; `tasks` is empty until both exist.
        case racing(CheckedContinuation<T, any Error>, tasks: [Task<Void, Never>])
        /// Decided (the continuation is resumed, or, cancelled before it began, is to be).
        case finished(Result<T, any Error>)
    }

    private let state = Mutex(State.idle)

    func begin(_ continuation: CheckedContinuation<T, any Error>, limit: Duration, what: String, body: @escaping @Sendable () async throws -> T) {
        let cancelledEarly: Result<T, any Error>? = state.withLock { state in
            switch state {
            case .idle:
                state = .racing(continuation, tasks: [])
                return nil
            case .finished(let result):
                return result
            case .racing:
                preconditionFailure("a timeout race begun twice")
            }
        }
        if let cancelledEarly {
            continuation.resume(with: cancelledEarly)
            return
        }
        let work = Task {
            do { finish(.success(try await body())) } catch { finish(.failure(error)) }
        }
        let timer = Task {
            do { try await Task.sleep(for: limit) } catch { return }  // the race was decided
            finish(.failure(TestFailure("\(what) did not finish within \(limit)")))
        }
        let decided = state.withLock { state -> Bool in
            guard case .racing(let continuation, _) = state else { return true }
            state = .racing(continuation, tasks: [work, timer])
            return false
        }
        if decided {
            work.cancel()
            timer.cancel()
        }
    }

    /// Decides the race with `result` unless it is decided already: resumes the
    /// continuation and cancels both tasks (the body's is not waited for).
    func finish(_ result: Result<T, any Error>) {
        let winner: (CheckedContinuation<T, any Error>, [Task<Void, Never>])? = state.withLock { state in
            switch state {
            case .idle:
                state = .finished(result)  // `begin` resumes at once
                return nil
            case .racing(let continuation, let tasks):
                state = .finished(result)
                return (continuation, tasks)
            case .finished:
                return nil
            }
        }
        guard let (continuation, tasks) = winner else { return }
        continuation.resume(with: result)
        for task in tasks { task.cancel() }
    }
}

/// Waits (bounded) until `condition` holds, polling every `interval`; returns whether it
/// did. The condition is checked once more at the deadline.
package func waitUntil(
    timeout: Duration = .seconds(5), interval: Duration = .milliseconds(2), _ condition: () async throws -> Bool
) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: interval)
    }
    return try await condition()
}
