import ArgumentParser
import CRapaceShim
import EchoService
import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// Hidden: the plugin side of `rapace-bench shm`. Connects to the bench's segment and serves
/// Echo, SyncEcho and BenchSink there, and the same services on a Unix socket (the "rapace over a Unix
/// socket" comparison). Prints `connected` once both are up; exits when the host goes away.
struct ShmBenchPlugin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shm-plugin",
        abstract: "Plugin process of `rapace-bench shm`.",
        shouldDisplay: false)

    @Option(name: .long, help: "The bench's segment path.")
    var shm: String

    @Option(name: .long, help: "Unix socket path to serve the same services on.")
    var unix: String

    @Option(name: .long, help: "Largest payload in bytes.")
    var maxPayload: UInt32

    func run() async throws {
        // Die with the bench even on SIGKILL (spawned from a thread that outlives us).
        _ = rapace_set_parent_death_signal(SIGTERM)
        if getppid() == 1 { throw BenchError("shm-plugin: the bench is already gone") }
        let reactor = try Reactor.start(name: "bench-plugin")
        defer { reactor.shutdown() }
        var configuration = Session.Configuration()
        configuration.limits.maxPayloadSize = maxPayload
        let services: [any RPCService] = [EchoServer(DefaultEcho()), SyncEcho(), BenchSink()]
        let server = RapaceServer(reactor: reactor, services: services, configuration: configuration)
        _ = try await server.listen(on: .unix(path: unix))
        let session = try await Session.connect(shm: shm, reactor: reactor, services: services, configuration: configuration)
        printFlushed("connected")
        await session.closed()
        await server.shutdownGracefully(grace: .seconds(1))
    }
}
