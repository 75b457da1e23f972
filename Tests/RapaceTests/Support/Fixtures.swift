import EchoService
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

/// A connected client/server pair of sessions over the in-memory transport.
struct SessionPair {
    let client: Session
    let server: Session

    static func make(
        clientReactor: Reactor, serverReactor: Reactor,
        serverServices: [any RPCService] = [EchoServer(DefaultEcho())],
        clientServices: [any RPCService] = [],
        serverConfiguration: Session.Configuration = Session.Configuration(),
        clientConfiguration: Session.Configuration = Session.Configuration()
    ) async throws -> SessionPair {
        let (a, b) = InMemoryTransport.makePair(clientReactor, serverReactor)
        let server = try Session(transport: b, role: .acceptor, services: serverServices, configuration: serverConfiguration)
        let client = try Session(transport: a, role: .initiator, services: clientServices, configuration: clientConfiguration)
        try await startTogether(client, server)
        return SessionPair(client: client, server: server)
    }
}

/// Records when `DefaultEcho.sleep` ends, for cancellation tests.
final class SleepObserver: Sendable {
    struct Event: Sendable {
        let cancelled: Bool
        let slept: Duration
        let at: ContinuousClock.Instant
    }

    private let events = Mutex<[Event]>([])

    var echo: DefaultEcho {
        DefaultEcho { [self] cancelled, slept in
            events.withLock { $0.append(Event(cancelled: cancelled, slept: slept, at: .now)) }
        }
    }

    var all: [Event] { events.withLock { $0 } }

    /// Waits (bounded) until a sleep has ended and returns that event.
    func waitForEnd(timeout: Duration = .seconds(5)) async throws -> Event {
        guard await waitUntil(timeout: timeout, { !all.isEmpty }), let first = all.first else {
            throw TestFailure("no sleep ended within \(timeout)")
        }
        return first
    }
}

/// A service with one notification and one unary method, counting notifications.
final class CounterService: RPCService, Sendable {
    static let bump = MethodDescriptor(service: "Counter", method: "bump", kind: .notification)
    static let total = MethodDescriptor(service: "Counter", method: "total", kind: .unary)
    let count = Mutex<UInt64>(0)

    var methods: [MethodDescriptor] { [Self.bump, Self.total] }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        switch method {
        case Self.bump.id:
            let by = try request.decode { try $0.readVarint64() }
            count.withLock { $0 += by }
            return .empty
        case Self.total.id:
            try request.decode { _ in }
            let value = count.withLock { $0 }
            return .encoding { $0.writeVarint(value) }
        default:
            throw RPCError(.unimplemented, "no such method")
        }
    }
}

/// A unary method whose handler returns only when the test lets it: a test knows when a
/// call is in the handler (``waitForEntries(_:timeout:)``) and chooses when it ends
/// (``release()``), instead of guessing both with pauses. A handler cancelled while it
/// waits ends at once with `CancellationError`.
final class HeldCallService: RPCService, Sendable {
    static let hold = MethodDescriptor(service: "Held", method: "hold", kind: .unary)

    private struct State {
        var entered = 0
        var released = false
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var nextWaiter: UInt64 = 0
    }

    private let state = Mutex(State())

    var methods: [MethodDescriptor] { [Self.hold] }

    /// Handlers that have started waiting so far.
    var entered: Int { state.withLock { $0.entered } }

    /// Waits (bounded) until `count` handlers have started waiting.
    func waitForEntries(_ count: Int = 1, timeout: Duration = .seconds(10)) async throws {
        guard await waitUntil(timeout: timeout, { entered >= count }) else {
            throw TestFailure("\(entered) of \(count) held calls reached the handler within \(timeout)")
        }
    }

    /// Lets every waiting handler return, and every later one return at once.
    func release() {
        let waiters = state.withLock { state in
            state.released = true
            defer { state.waiters.removeAll() }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        try request.decode { _ in }
        let id = state.withLock { state in
            state.entered += 1
            state.nextWaiter += 1
            return state.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let waiting = state.withLock { state in
                    guard !state.released, !Task.isCancelled else { return false }
                    state.waiters[id] = continuation
                    return true
                }
                if !waiting { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
            waiter?.resume()
        }
        try Task.checkCancellation()
        return .empty
    }
}
