import Foundation
import Rapace
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The transports the behaviour tests run over.
enum TestTransport: String, CaseIterable, Sendable, CustomTestStringConvertible {
    /// `InMemoryTransport.makePair`, client and server on their own reactors.
    case inMemory
    /// A Unix domain socket: `RapaceServer.listen` and `Session.connect`.
    case unixSocket

    var testDescription: String { rawValue }
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
                try await startTogether(client, server)
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
                let path = temporarySocketPath("macro")
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
