import Rapace

/// Runs `body` with a fresh reactor on its own thread, shutting it down afterwards.
package func withReactor<T>(_ name: String = "test-reactor", _ body: (Reactor) async throws -> T) async throws -> T {
    let reactor = try Reactor.start(name: name)
    do {
        let value = try await body(reactor)
        reactor.shutdown()
        return value
    } catch {
        reactor.shutdown()
        throw error
    }
}

/// Runs `body` on the loop thread of `reactor` and returns its result (for loop-confined
/// values read from a test's task).
package func onLoop<T: Sendable>(_ reactor: Reactor, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        reactor.execute { continuation.resume(returning: body()) }
    }
}

/// ``onLoop(_:_:)`` for a body that throws.
package func onLoopThrowing<T: Sendable>(_ reactor: Reactor, _ body: @escaping @Sendable () throws -> T) async throws -> T {
    let result: Result<T, any Error> = await withCheckedContinuation { continuation in
        reactor.execute { continuation.resume(returning: Result { try body() }) }
    }
    return try result.get()
}
