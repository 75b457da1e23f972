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
