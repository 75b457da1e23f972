import ArgumentParser
import CRapaceShim
import Histogram
import Logging
import Rapace
import RapaceTracing
import Synchronization
import Tracing

#if canImport(Glibc)
import Glibc
#endif

/// `rapace-bench tracing`: what a log call costs in a plugin whose records are forwarded
/// to its host, against a swift-log handler that discards records (measured in the same
/// run). This process is the plugin; the host is this binary re-executed as the hidden
/// `tracing-host` subcommand, serving `TracingSink` on a shared-memory segment.
struct TracingBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tracing",
        abstract: "Tracing bridge: the cost of a forwarded log call in a plugin, against a discarding handler.")

    @Option(name: .long, help: "Measured log calls per row.")
    var iterations: Int = 200_000

    @Option(name: .long, help: "Calls between two flushes (kept below the buffer, so nothing is dropped).")
    var burst: Int = 1_000

    func validate() throws {
        guard iterations > 0, burst > 0, burst <= 8192 else { throw ValidationError("--iterations > 0 and 0 < --burst ≤ 8192") }
    }

    func run() async throws {
        EmergencyCleanup.install()
        let segmentPath = "/dev/shm/rapace-bench-tracing-\(getpid())"
        EmergencyCleanup.registerPath(segmentPath)
        EmergencyCleanup.registerPath(segmentPath + ".sock")
        let spawner = try Reactor.start(name: "bench-spawner")
        let reactor = try Reactor.start(name: "bench-plugin")
        defer {
            reactor.shutdown()
            spawner.shutdown()
        }
        let host = try await ChildProcess.spawn(
            on: spawner, try Executables.currentExecutable(), ["tracing-host", "--shm", segmentPath], name: "tracing-host")
        defer { host.terminate() }
        _ = try host.readListeningAddress()

        let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .info)))
        let session = try await Session.connect(shm: segmentPath, reactor: reactor, services: [tracing.configService])
        tracing.attach(to: session)
        let forwarding = Logger(label: "bench") { tracing.makeLogHandler(label: $0) }
        let discarding = Logger(label: "bench") { _ in DiscardingLogHandler() }

        printFlushed("rapace-bench tracing: \(iterations) log calls per row, flushed every \(burst) (release build expected)")
        var rows: [(String, Samples)] = []
        let baseline = try await measure(discarding, tracing: nil)
        rows.append(("swift-log, discarding handler (baseline)", baseline))
        rows.append(("forwarded to the host", try await measure(forwarding, tracing: tracing)))
        rows.append(("forwarded, inside a span", try await measure(forwarding, tracing: tracing, inSpan: true)))
        try tracing.setFilter("warn")
        rows.append(("filtered out by the plugin's filter", try await measure(forwarding, tracing: tracing)))

        print("")
        print(Format.left("log call", 40) + Format.right("p50 µs", 10) + Format.right("p99 µs", 10) + Format.right("× base p50", 12))
        for (label, samples) in rows {
            print(
                Format.left(label, 40) + Format.right(Format.micros(samples.p50), 10) + Format.right(Format.micros(samples.p99), 10)
                    + Format.right(Format.fixed(samples.p50 / max(baseline.p50, 1), digits: 2), 12))
        }
        let statistics = tracing.statistics
        print("")
        print("records forwarded: \(statistics.forwarded), dropped: \(statistics.dropped) (target: forwarded log call ≤ 2 µs p50)")
        await session.closeAndWait()
    }

    /// Times each call of `iterations` calls; between bursts (untimed) waits until the
    /// forwarder has handed everything to the session.
    private func measure(_ logger: Logger, tracing: PluginTracing?, inSpan: Bool = false) async throws -> Samples {
        var histogram = Samples.newHistogram()
        var done = 0
        var round = 0
        let warmup = min(iterations / 10, 20_000)
        while done < iterations + warmup {
            let count = min(burst, iterations + warmup - done)
            let body = {
                for index in 0..<count {
                    let start = rapace_monotonic_ns()
                    logger.info("request served", metadata: ["round": "\(round)", "index": "\(index)"])
                    let elapsed = rapace_monotonic_ns() - start
                    if done + index >= warmup { histogram.record(elapsed) }
                }
            }
            if inSpan, let tracing {
                tracing.tracer.withSpan("bench-span") { span in
                    ServiceContext.$current.withValue(span.context) { body() }
                }
            } else {
                body()
            }
            done += count
            round += 1
            await tracing?.flush()
        }
        return Samples(histogram)
    }
}

/// A handler that accepts every level and discards the record: the cost of swift-log
/// itself (level check, message and metadata built), the floor of any handler.
struct DiscardingLogHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        blackHole(event.message.description.utf8.count &+ (event.metadata?.count ?? 0))
    }
}

@inline(never)
func blackHole(_ value: Int) {
    if value == -1 { print("") }
}

/// The host of `rapace-bench tracing` (hidden): serves `TracingSink` on a shared-memory
/// segment and counts what arrives.
struct TracingHostCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tracing-host", abstract: "Serves TracingSink for `rapace-bench tracing`.", shouldDisplay: false)

    @Option(name: .long, help: "Segment path.")
    var shm: String

    func run() async throws {
        _ = rapace_set_parent_death_signal(SIGTERM)
        if getppid() == 1 { throw BenchError("tracing-host: the bench is already gone") }
        let reactor = try Reactor.start(name: "bench-tracing-host")
        let host = TracingHost(logger: Logger(label: "plugin") { _ in DiscardingLogHandler() })
        let server = RapaceServer(reactor: reactor, services: [host.service(pluginName: "bench")])
        _ = try await server.listen(shm: shm)
        printFlushed("listening on \(shm)")
        _ = await SignalWatcher.waitForAny(on: reactor)
        await server.shutdownGracefully(grace: .seconds(1))
        reactor.shutdown()
    }
}
