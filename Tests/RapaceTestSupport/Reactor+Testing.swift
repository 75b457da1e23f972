import Rapace
import Testing

#if canImport(Glibc)
import Glibc
#endif

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

/// Runs `body` with a fresh reactor (shut down afterwards), then checks that the test left
/// nothing behind: every process whose pid `body` returns is gone, no plugin segment or
/// socket file of this process is left in /dev/shm, and, with `checkDescriptors`, every
/// descriptor opened since the reactor started is closed again. When `body` throws, the
/// checks are skipped and the error is rethrown.
///
/// The checks read process-wide state: the test must own the process (`.ownsProcess`).
package func withLeakCheckedReactor(
    _ name: String = "plugin-test", checkDescriptors: Bool = true, sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (Reactor) async throws -> [pid_t]
) async throws {
    let reactor = try Reactor.start(name: name)
    defer { reactor.shutdown() }
    let descriptors = checkDescriptors ? await DescriptorSnapshot.take(sourceLocation: sourceLocation) : nil
    let pids = try await body(reactor)
    for pid in pids {
        #expect(await waitGone(pid), "pid \(pid) outlived the test", sourceLocation: sourceLocation)
    }
    let leftovers = leftoverPluginFiles(sourceLocation: sourceLocation)
    #expect(leftovers.isEmpty, "\(leftovers)", sourceLocation: sourceLocation)
    if let descriptors { await expectNoDescriptorLeak(since: descriptors, sourceLocation: sourceLocation) }
}
