import Synchronization
import Testing

/// A process-wide async readers–writer gate: tests that may run alongside others hold it
/// shared; a test that reads process-wide state or asserts a timing bound holds it
/// exclusively, so no other test of this process runs meanwhile.
///
/// Tests do not call it directly: they take it through ``ProcessGateTrait`` (see there for
/// the rule of which access a test needs). Helpers that read process-wide state call
/// ``expectExclusive(_:sourceLocation:)`` to check that the rule was followed.
///
/// Waiters are served phase-fairly, in arrival order among exclusive waiters:
/// - shared access is granted at once unless a test holds or waits for exclusive access;
/// - when the last shared holder leaves, the first exclusive waiter goes;
/// - when an exclusive holder leaves, every shared waiter goes (even those that arrived
///   after the next exclusive waiter), then the next exclusive waiter waits for them.
///
/// So neither side starves: a shared waiter waits for at most one exclusive test, and an
/// exclusive waiter for the tests running when it arrived plus the exclusive tests ahead of
/// it.
///
/// The gate is reentrant within a task (a task-local records what the task holds of which
/// gate; child tasks and unstructured tasks a test starts inherit it): asking
/// again for access the task already holds, or for shared access while holding exclusive,
/// runs at once. Asking for exclusive access while holding shared access would wait for
/// itself, so it fails instead.
package final class ProcessGate: Sendable {
    /// How a test holds the gate.
    package enum Access: Sendable, Hashable, CustomStringConvertible {
        /// Other tests holding shared access run at the same time.
        case shared
        /// No other test runs.
        case exclusive

        package var description: String {
            switch self {
            case .shared: "shared"
            case .exclusive: "exclusive"
            }
        }
    }

    /// The one gate of this process: every test target links this module once into the
    /// test process, so all suites of all targets meet here.
    package static let process = ProcessGate()

    /// What the current task holds, by gate.
    @TaskLocal private static var held: [ObjectIdentifier: Access] = [:]

    /// The access the current task holds of this gate, if any.
    package var heldAccess: Access? { Self.held[ObjectIdentifier(self)] }

    /// The access the current task holds of the process gate, if any.
    package static var currentAccess: Access? { process.heldAccess }

    private let state = Mutex(State())

    package init() {}

    /// Runs `body` holding the gate with `access`, waiting (in a suspended task, never a
    /// blocked thread) until it is granted.
    ///
    /// - Throws: `CancellationError` if the task is cancelled while waiting; a
    ///   ``ProcessGateError`` when a task holding shared access asks for exclusive access;
    ///   whatever `body` throws.
    package func withAccess<T>(_ access: Access, _ body: () async throws -> T) async throws -> T {
        switch (heldAccess, access) {
        case (.exclusive, _), (.shared, .shared):
            return try await body()
        case (.shared, .exclusive):
            throw ProcessGateError(
                "a test holding the process gate shared asked for it exclusively: it would wait for itself "
                    + "(put the exclusive trait on the test, not inside a scope that already holds the gate)")
        case (nil, _):
            break
        }
        try await acquire(access)
        do {
            var held = Self.held
            held[ObjectIdentifier(self)] = access
            let value = try await Self.$held.withValue(held) { try await body() }
            release(access)
            return value
        } catch {
            release(access)
            throw error
        }
    }

    /// Records an issue unless the current task holds the process gate exclusively.
    ///
    /// Helpers that read process-wide state (this process's descriptors, segment files or
    /// memory) call it, so a test that forgets ``ProcessGateTrait/ownsProcess(_:)`` fails
    /// every time rather than only when another test happens to disturb it.
    package static func expectExclusive(_ what: String, sourceLocation: SourceLocation = #_sourceLocation) {
        let held = currentAccess
        guard held != .exclusive else { return }
        Issue.record(
            "\(what) reads process-wide state: the test must hold the process gate exclusively (.ownsProcess(…)); it holds \(held.map { "\($0)" } ?? "nothing")",
            sourceLocation: sourceLocation)
    }

    /// A snapshot for tests of the gate itself: holders and waiters by access.
    package var statistics: Statistics { state.withLock { $0.statistics } }

    package struct Statistics: Sendable, Equatable {
        package var sharedHolders = 0
        package var exclusiveHeld = false
        package var sharedWaiters = 0
        package var exclusiveWaiters = 0

        package init(sharedHolders: Int = 0, exclusiveHeld: Bool = false, sharedWaiters: Int = 0, exclusiveWaiters: Int = 0) {
            self.sharedHolders = sharedHolders
            self.exclusiveHeld = exclusiveHeld
            self.sharedWaiters = sharedWaiters
            self.exclusiveWaiters = exclusiveWaiters
        }
    }

    // MARK: Waiting

    private func acquire(_ access: Access) async throws {
        guard let id = state.withLock({ $0.tryAcquire(access) ? nil : $0.makeWaiterID() }) else { return }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                enum Outcome { case cancelled, granted, queued }
                let outcome = state.withLock { state -> Outcome in
                    // Cancelled before the waiter was queued: the cancellation handler found
                    // nothing to remove (the flag is set before the handler runs).
                    if Task.isCancelled { return .cancelled }
                    // Released meanwhile: go at once rather than wait.
                    if state.tryAcquire(access) { return .granted }
                    state.enqueue(State.Waiter(id: id, access: access, continuation: continuation))
                    return .queued
                }
                switch outcome {
                case .cancelled: continuation.resume(throwing: CancellationError())
                case .granted: continuation.resume()
                case .queued: break
                }
            }
        } onCancel: {
            let (removed, granted) = state.withLock { $0.cancel(id) }
            removed?.resume(throwing: CancellationError())
            for waiter in granted { waiter.resume() }
        }
    }

    private func release(_ access: Access) {
        let granted = state.withLock { $0.release(access) }
        for waiter in granted { waiter.resume() }
    }
}

/// A misuse of ``ProcessGate`` that would deadlock.
package struct ProcessGateError: Error, CustomStringConvertible {
    package let description: String
    init(_ description: String) { self.description = description }
}

extension ProcessGate {
    /// Who holds the gate and who waits. Mutated only under the gate's lock; its methods
    /// return the continuations to resume, which the caller resumes after unlocking.
    struct State {
        struct Waiter {
            let id: UInt64
            let access: Access
            let continuation: CheckedContinuation<Void, any Error>
        }

        enum Holders {
            case none
            case shared(Int)
            case exclusive
        }

        private(set) var holders = Holders.none
        /// Waiters in arrival order.
        private var queue: [Waiter] = []
        private var nextID: UInt64 = 0

        var statistics: Statistics {
            var statistics = Statistics()
            switch holders {
            case .none: break
            case .shared(let count): statistics.sharedHolders = count
            case .exclusive: statistics.exclusiveHeld = true
            }
            statistics.sharedWaiters = queue.count { $0.access == .shared }
            statistics.exclusiveWaiters = queue.count { $0.access == .exclusive }
            return statistics
        }

        private var exclusiveWaiting: Bool { queue.contains { $0.access == .exclusive } }

        mutating func makeWaiterID() -> UInt64 {
            nextID += 1
            return nextID
        }

        /// Takes the gate if `access` may go now without overtaking an exclusive waiter.
        mutating func tryAcquire(_ access: Access) -> Bool {
            switch (holders, access) {
            case (.none, .shared) where !exclusiveWaiting:
                holders = .shared(1)
                return true
            case (.shared(let count), .shared) where !exclusiveWaiting:
                holders = .shared(count + 1)
                return true
            case (.none, .exclusive) where queue.isEmpty:
                holders = .exclusive
                return true
            case (.none, _), (.shared, _), (.exclusive, _):
                return false
            }
        }

        mutating func enqueue(_ waiter: Waiter) {
            queue.append(waiter)
        }

        /// Gives up `access`; returns the waiters that now hold the gate.
        mutating func release(_ access: Access) -> [CheckedContinuation<Void, any Error>] {
            switch (holders, access) {
            case (.shared(let count), .shared) where count > 1:
                holders = .shared(count - 1)
                return []
            case (.shared, .shared):
                holders = .none
                return grant(sharedFirst: false)
            case (.exclusive, .exclusive):
                holders = .none
                return grant(sharedFirst: true)
            case (.none, _), (.shared, .exclusive), (.exclusive, .shared):
                preconditionFailure("released \(access) access to a gate held \(holders)")
            }
        }

        /// Removes a cancelled waiter; returns it (nil if it was granted already) and the
        /// waiters its departure lets in (shared waiters queued only behind it).
        mutating func cancel(_ id: UInt64) -> (CheckedContinuation<Void, any Error>?, [CheckedContinuation<Void, any Error>]) {
            guard let index = queue.firstIndex(where: { $0.id == id }) else { return (nil, []) }
            let removed = queue.remove(at: index)
            switch holders {
            case .exclusive:
                return (removed.continuation, [])
            case .none, .shared:
                return (removed.continuation, grant(sharedFirst: false))
            }
        }

        /// Lets in whoever may go now. With `sharedFirst` (an exclusive holder just left),
        /// every shared waiter goes before the next exclusive one.
        private mutating func grant(sharedFirst: Bool) -> [CheckedContinuation<Void, any Error>] {
            switch holders {
            case .exclusive:
                return []
            case .shared where exclusiveWaiting:
                return []
            case .shared, .none:
                break
            }
            if case .none = holders, !sharedFirst || !queue.contains(where: { $0.access == .shared }),
                let first = queue.firstIndex(where: { $0.access == .exclusive })
            {
                holders = .exclusive
                return [queue.remove(at: first).continuation]
            }
            let readers = queue.filter { $0.access == .shared }
            guard !readers.isEmpty else { return [] }
            queue.removeAll { $0.access == .shared }
            switch holders {
            case .none: holders = .shared(readers.count)
            case .shared(let count): holders = .shared(count + readers.count)
            case .exclusive: preconditionFailure("unreachable: checked above")
            }
            return readers.map(\.continuation)
        }
    }
}
