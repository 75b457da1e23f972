import Foundation
import Rapace
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Errors of the test helpers.
struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The transports the behaviour tests run over.
enum TestTransport: String, CaseIterable, Sendable, CustomTestStringConvertible {
    /// `InMemoryTransport.makePair`, client and server on their own reactors.
    case inMemory
    /// A Unix domain socket: `RapaceServer.listen` and `Session.connect`.
    case unixSocket

    var testDescription: String { rawValue }
}

/// Runs `body` with a fresh reactor on its own thread, shutting it down afterwards.
func withReactor<T>(_ name: String, _ body: (Reactor) async throws -> T) async throws -> T {
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

/// Connects a client session to a server session that serves `services` over `transport`,
/// runs `body` with the client session, then closes both.
func withConnection<T>(
    _ transport: TestTransport,
    serving services: [any RPCService],
    serverConfiguration: Session.Configuration = Session.Configuration(),
    _ body: (Session) async throws -> T
) async throws -> T {
    try await withReactor("client") { clientReactor in
        try await withReactor("server") { serverReactor in
            switch transport {
            case .inMemory:
                let (a, b) = InMemoryTransport.makePair(clientReactor, serverReactor)
                let server = try Session(transport: b, role: .acceptor, services: services, configuration: serverConfiguration)
                let client = try Session(transport: a, role: .initiator)
                async let serverReady: Void = server.start()
                try await client.start()
                try await serverReady
                do {
                    let value = try await body(client)
                    await client.closeAndWait()
                    await server.closed()
                    return value
                } catch {
                    await client.closeAndWait()
                    await server.closed()
                    throw error
                }
            case .unixSocket:
                let path = "/tmp/rapace-macro-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
                defer { unlink(path) }
                let server = RapaceServer(reactor: serverReactor, services: services, configuration: serverConfiguration)
                let address = try await server.listen(on: .unix(path: path))
                do {
                    let client = try await Session.connect(to: address, reactor: clientReactor)
                    do {
                        let value = try await body(client)
                        await client.closeAndWait()
                        await server.shutdownGracefully(grace: .seconds(2))
                        return value
                    } catch {
                        await client.closeAndWait()
                        throw error
                    }
                } catch {
                    await server.shutdownGracefully(grace: .seconds(2))
                    throw error
                }
            }
        }
    }
}

/// Fails with a timeout error if `body` takes longer than `limit`.
func withTimeout<T: Sendable>(_ limit: Duration, _ what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
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

/// The error `body` throws, as an `RPCError`; records an issue when it throws nothing
/// or something else.
func rpcError(sourceLocation: SourceLocation = #_sourceLocation, _ body: () async throws -> Void) async -> RPCError? {
    do {
        try await body()
        Issue.record("expected an RPCError, got success", sourceLocation: sourceLocation)
        return nil
    } catch let error as RPCError {
        return error
    } catch {
        Issue.record("expected an RPCError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}
