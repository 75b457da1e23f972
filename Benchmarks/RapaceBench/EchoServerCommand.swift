import ArgumentParser
import CRapaceShim
import EchoService
import Logging
import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// The rapace server of `rapace-bench stream` (hidden): serves the hand-written `Echo`
/// service (`EchoService`) and `SyncEcho` (Echo's `add` with a synchronous handler) on one
/// listener until SIGTERM or SIGINT, then shuts down gracefully. Prints
/// `listening on ADDRESS` once it accepts connections.
///
/// The bench re-executes itself with this subcommand rather than starting `rapace-echo`,
/// which defines Echo with the `@Service` macro: building the macro in release compiles
/// swift-syntax optimised (7–10 minutes), and the bench is always built in release.
struct EchoServerCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "echo-server",
        abstract: "Serves Echo for the rapace rows (started by `rapace-bench stream`).",
        shouldDisplay: false)

    @Option(name: .long, help: "TCP address as HOST:PORT (port 0 picks a free port).")
    var tcp: String?

    @Option(name: .long, help: "Unix domain socket path.")
    var unix: String?

    @Option(name: .long, help: "Seconds in-flight calls get to finish after SIGINT/SIGTERM.")
    var grace: Double = 5

    func validate() throws {
        guard (tcp == nil) != (unix == nil) else { throw ValidationError("pass exactly one of --tcp HOST:PORT and --unix PATH") }
    }

    func run() async throws {
        // Die with the bench even if it is killed with SIGKILL (it spawns from a thread that
        // outlives us, see ChildProcess.spawn).
        // Signal first, then check: the bench may have died before the prctl took effect.
        _ = rapace_set_parent_death_signal(SIGTERM)
        if getppid() == 1 { throw BenchError("echo-server: the bench is already gone") }

        let address: SocketAddress = try unix.map { .unix(path: $0) } ?? SocketAddress.parseTCP(tcp ?? "")
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = .warning
            return handler
        }
        let reactor = try Reactor.start(name: "bench-echo-server")
        let server = RapaceServer(reactor: reactor, services: [EchoServer(DefaultEcho()), SyncEcho()])
        let bound = try await server.listen(on: address)
        printFlushed("listening on \(bound)")

        _ = await SignalWatcher.waitForAny(on: reactor)
        await server.shutdownGracefully(grace: Duration.milliseconds(Int64(grace * 1000)))
        reactor.shutdown()
    }
}
