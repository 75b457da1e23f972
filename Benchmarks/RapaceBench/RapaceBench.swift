import ArgumentParser

/// `rapace-bench`: latency benchmarks of rapace against raw-socket baselines.
///
/// Every measurement runs client and server in separate processes. Servers are children
/// of the bench: this binary re-executed with a hidden subcommand (`echo-server` for
/// rapace over sockets, `raw-echo-server` for the baselines). The bench serves the
/// hand-written `EchoService`, so it never depends on the `@Service` macro (swift-syntax).
@main
struct RapaceBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rapace-bench",
        abstract: "Benchmarks rapace against raw-socket baselines, server in a separate process.",
        subcommands: [
            ShmBench.self, StreamBench.self, WebSocketBench.self, TracingBench.self, EchoServerCommand.self, RawEchoServer.self, ShmBenchPlugin.self,
            RawShmPeer.self, TracingHostCommand.self,
        ])
}
