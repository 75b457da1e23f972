/// Fails with a ``TestFailure`` if `body` takes longer than `limit`.
package func withTimeout<T: Sendable>(
    _ limit: Duration, _ what: String = "operation", _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: limit)
            throw TestFailure("\(what) did not finish within \(limit)")
        }
        let first = try await group.next()!
        group.cancelAll()
        return first
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
