import ArgumentParser

/// `rapace-bench`: latency benchmarks of rapace against raw-socket baselines.
///
/// Every measurement runs client and server in separate processes. Servers are children
/// of the bench: `rapace-echo` (found next to this binary) for rapace, and this binary
/// re-executed with the hidden `raw-echo-server` subcommand for the baselines.
@main
struct RapaceBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rapace-bench",
        abstract: "Benchmarks rapace against raw-socket baselines, server in a separate process.",
        subcommands: [ShmBench.self, StreamBench.self, RawEchoServer.self, ExecWithParent.self, ShmBenchPlugin.self, RawShmPeer.self])
}
