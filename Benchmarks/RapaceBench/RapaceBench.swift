import ArgumentParser

/// `rapace-bench`: latency benchmarks of rapace against raw-socket baselines.
///
/// Every measurement except `ws` runs client and server in separate processes. Servers are
/// children of the bench: this binary re-executed with a hidden subcommand (`echo-server`
/// for rapace over sockets, `raw-echo-server` for the socket baselines, `shm-plugin` and
/// `raw-shm-peer` for shared memory, `tracing-host` for the tracing bench). The bench serves the
/// hand-written `EchoService`, so it never depends on the `@Service` macro (swift-syntax).
@main
struct RapaceBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rapace-bench",
        abstract: "Benchmarks rapace against baselines measured in the same run.",
        subcommands: [
            ShmBench.self, StreamBench.self, WebSocketBench.self, TracingBench.self, EchoServerCommand.self, RawEchoServer.self, ShmBenchPlugin.self,
            RawShmPeer.self, TracingHostCommand.self,
        ])
}
