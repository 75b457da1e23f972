import Foundation
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

/// A reactor's loop held inside a callback, so that what other threads submit meanwhile (a
/// shutdown's teardown, reports, waits) queues up behind it in a known order; ``release()``
/// lets the loop run it all in one batch. Release it however the test ends.
package final class HeldLoop: Sendable {
    private let reactor: Reactor
    private let released = Locked(false)
    private let shutDownReturned = Locked(false)

    private init(_ reactor: Reactor) { self.reactor = reactor }

    /// Holds `reactor`'s loop; nil, after recording an issue, if the loop never ran the holder.
    package static func hold(_ reactor: Reactor, sourceLocation: SourceLocation = #_sourceLocation) async -> HeldLoop? {
        let hold = HeldLoop(reactor)
        let holding = Locked(false)
        reactor.execute {
            holding.withLock { $0 = true }
            while !hold.released.withLock({ $0 }) { usleep(1000) }
        }
        guard await waitUntil({ holding.withLock { $0 } }) else {
            hold.release()
            Issue.record("the loop never ran the holder", sourceLocation: sourceLocation)
            return nil
        }
        return hold
    }

    /// Calls `shutdown()` on a thread of its own: it queues the teardown behind the hold, then
    /// waits for the loop thread to end.
    package func shutDownFromAnotherThread() {
        let (reactor, returned) = (self.reactor, shutDownReturned)
        Thread {
            reactor.shutdown()
            returned.withLock { $0 = true }
        }.start()
    }

    /// Lets the loop go on.
    package func release() { released.withLock { $0 = true } }

    /// Waits (bounded) until the shutdown begun by ``shutDownFromAnotherThread()`` returned.
    package func shutDownReturns(within timeout: Duration = .seconds(10)) async -> Bool {
        await waitUntil(timeout: timeout) { self.shutDownReturned.withLock { $0 } }
    }
}
