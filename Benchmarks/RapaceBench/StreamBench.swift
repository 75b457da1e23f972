import ArgumentParser
import CRapaceShim
import EchoService
import Histogram
import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// A stream transport the bench measures.
enum TransportKind: String, ExpressibleByArgument, CaseIterable, Sendable {
    case unix, tcp
}

/// Bytes a rapace `Echo.add(2, 3)` round trip puts on a stream socket (spec 8.1 framing:
/// varint length, 64-byte descriptor, payload), computed with rapace's own encoders.
struct WireSizes {
    let openChannelFrame: Int
    let requestFrame: Int
    let responseFrame: Int
    var request: Int { openChannelFrame + requestFrame }
    var response: Int { responseFrame }

    /// Sizes for a call on channel `channelID` (its varint width varies with the id).
    init(channelID: UInt32) {
        let openChannel = OpenChannel(channelID: channelID, kind: .call, initialCredits: .max).encoded().count
        let request = RapaceMeasurements.addRequest().count
        let sum = Payload.encoding { $0.writeZigZag(5) }
        var result = PostcardWriter(reservingCapacity: 16)
        sum.withUnsafeBytes { CallResult.encodeSuccess(body: $0, into: &result) }
        openChannelFrame = WireSizes.streamFrame(payload: openChannel)
        requestFrame = WireSizes.streamFrame(payload: request)
        responseFrame = WireSizes.streamFrame(payload: result.bytes.count)
    }

    /// `varint(64 + payload) ‖ descriptor ‖ payload`.
    static func streamFrame(payload: Int) -> Int {
        var length = UInt64(FrameDescriptor.size + payload)
        var varint = 1
        while length >= 0x80 {
            length >>= 7
            varint += 1
        }
        return varint + FrameDescriptor.size + payload
    }
}

/// `rapace-bench stream`: unary round trip over Unix and TCP stream sockets against an
/// Echo server process (this binary, `echo-server`), next to a raw ping-pong baseline in
/// another process.
struct StreamBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stream",
        abstract: "p50/p99 round trip of Echo.add(2,3) over Unix and TCP sockets vs a raw ping-pong, server in another process.",
        discussion: """
            For each transport, two server processes, both this binary re-executed: the \
            hidden `echo-server` (the hand-written Echo service) and the hidden \
            `raw-echo-server`. Clients: \
            a raw ping-pong (blocking sockets, TCP_NODELAY, one write each way of the bytes a \
            rapace call puts on the wire), EchoClient from a task on the reactor, the \
            callback API (startCall) on the loop thread, and EchoClient from an off-loop task \
            (for information). The measured calls are split into --rounds slices and the \
            clients take turns (order rotated every round), so slow drift on a shared \
            machine hits every row alike; percentiles are over all slices.

            By default the bench and its servers all run on CPU 0 (--cpus 0): on a small VM \
            a wakeup across CPUs costs about 20 µs and the scheduler's placement otherwise \
            makes results bimodal from run to run. --cpus 0,1 measures the cross-CPU case \
            (bench on 0, servers on 1); --cpus none leaves placement to the scheduler.
            """)

    @Option(name: .long, help: "Measured round trips per row.")
    var iterations: Int = 20_000

    @Option(name: .long, help: "Unrecorded round trips before each client's first slice.")
    var warmup: Int = 2_000

    @Option(name: .long, help: "Slices the clients take turns in (1 = each client runs all its calls at once).")
    var rounds: Int = 5

    @Option(name: .long, help: "Unrecorded round trips before each later slice.")
    var rewarm: Int = 200

    @Option(name: .long, help: "CPU placement: N (bench and servers on CPU N), CLIENT,SERVER (bench on one CPU, servers on another), or none (let the scheduler float them).")
    var cpus: String = "0"

    @Option(name: .customLong("transport"), help: "Transport to measure (repeatable): unix, tcp.")
    var transports: [TransportKind] = TransportKind.allCases

    @Option(name: .customLong("client"), help: "Client row to measure (repeatable; the raw baseline always runs): \(Client.allCases.filter { $0 != .raw }.map(\.rawValue).joined(separator: ", ")).")
    var clientRows: [Client] = Client.allCases

    @Option(name: .long, help: "Also write the numbers as CSV to this path.")
    var csv: String?

    @Option(name: .long, help: "Raw baseline request size in bytes (default: what a rapace call sends).")
    var rawRequestBytes: Int?

    @Option(name: .long, help: "Raw baseline response size in bytes (default: what a rapace reply takes).")
    var rawResponseBytes: Int?

    func validate() throws {
        guard iterations > 0 else { throw ValidationError("--iterations must be positive") }
        guard warmup >= 0, rewarm >= 0 else { throw ValidationError("--warmup and --rewarm must not be negative") }
        guard rounds >= 1, rounds <= iterations else { throw ValidationError("--rounds must be between 1 and --iterations") }
        if let rawRequestBytes, rawRequestBytes <= 0 { throw ValidationError("--raw-request-bytes must be positive") }
        if let rawResponseBytes, rawResponseBytes <= 0 { throw ValidationError("--raw-response-bytes must be positive") }
        do { _ = try Placement(parsing: cpus) } catch { throw ValidationError("\(error)") }
    }

    func run() async throws {
        EmergencyCleanup.install()
        let benchPath = try Executables.currentExecutable()

        // Representative channel id: the middle of the first rapace row's measured calls.
        let sizes = WireSizes(channelID: UInt32(clamping: 2 * (warmup + iterations / 2) + 1))
        let requestBytes = rawRequestBytes ?? sizes.request
        let responseBytes = rawResponseBytes ?? sizes.response

        let placement = try Placement(parsing: cpus)
        // Before any reactor exists, so their threads inherit the mask.
        if case .pinned(let client, _) = placement { try CPUAffinity.pinProcess(to: client) }

        let directory = try TemporaryDirectory(prefix: "rapace-bench")
        defer { directory.remove() }
        let reactor = try Reactor.start(name: "rapace-bench")
        defer { reactor.shutdown() }
        // Only spawns the servers: its thread must outlive them (see ChildProcess.spawn).
        let spawner = try Reactor.start(name: "bench-spawner")
        defer { spawner.shutdown() }

        let online = sysconf(Int32(_SC_NPROCESSORS_ONLN))
        printFlushed("""
            rapace-bench stream: Echo.add(2,3) round trip, server in a separate process
              \(iterations) measured calls per row in \(rounds) interleaved slices; warm-up \(warmup) calls, then \(rewarm) before each later slice
              \(online) CPUs online, load average \(Self.loadAverage()); libevent backend \(String(cString: rapace_event_base_method(reactor.base)))
              placement: \(placement)
              rapace request \(sizes.request) B (OpenChannel frame \(sizes.openChannelFrame) B + request frame \(sizes.requestFrame) B; ±1 B as the channel id's varint grows), response \(sizes.response) B
              raw ping-pong: \(requestBytes) B request, \(responseBytes) B response, one blocking write/read each way, TCP_NODELAY
            """)

        var rows: [ResultRow] = []
        for transport in transports {
            let setup: TransportSetup
            switch transport {
            case .unix:
                setup = TransportSetup(
                    kind: transport,
                    rawAddress: .unix(path: directory.file("raw.sock")),
                    echoArguments: ["echo-server", "--unix", directory.file("echo-server.sock")])
            case .tcp:
                setup = TransportSetup(
                    kind: transport,
                    rawAddress: .tcp(host: "127.0.0.1", port: 0),
                    echoArguments: ["echo-server", "--tcp", "127.0.0.1:0"])
            }
            rows += try await measure(setup, benchPath: benchPath, requestBytes: requestBytes, responseBytes: responseBytes, reactor: reactor, spawner: spawner, serverCPU: placement.serverCPU)
        }

        let report = Report(rows: rows, warmup: warmup, requestBytes: requestBytes, responseBytes: responseBytes)
        printFlushed("")
        printFlushed(report.table())
        printFlushed("""

            ×raw = rapace ÷ raw ping-pong of the same transport, measured in this run. \
            Compare ratios, not absolute numbers across runs or placements.
            """)
        if let csv {
            try report.writeCSV(to: csv)
            printFlushed("CSV written to \(csv)")
        }
    }

    /// What differs between the Unix and TCP runs.
    private struct TransportSetup {
        let kind: TransportKind
        let rawAddress: RawAddress
        let echoArguments: [String]
    }

    /// Starts both servers, connects both clients, runs the interleaved slices, then closes
    /// the clients and stops (and reaps) the servers.
    private func measure(_ setup: TransportSetup, benchPath: String, requestBytes: Int, responseBytes: Int, reactor: Reactor, spawner: Reactor, serverCPU: Int?) async throws -> [ResultRow] {
        let name = setup.kind.rawValue

        var rawArguments = ["raw-echo-server", "--request-bytes", String(requestBytes), "--response-bytes", String(responseBytes)]
        switch setup.rawAddress {
        case .unix(let path): rawArguments += ["--unix", path]
        case .tcp: rawArguments += ["--tcp", setup.rawAddress.description]
        }
        let rawServer = try await ChildProcess.spawn(on: spawner, cpu: serverCPU, benchPath, rawArguments, name: "raw-echo-server")
        defer { progress("\(name): raw-echo-server stopped (\(rawServer.terminate(exitOnItsOwnMs: 2_000)))") }
        let echoServer = try await ChildProcess.spawn(on: spawner, cpu: serverCPU, benchPath, setup.echoArguments, name: "echo-server")
        defer { progress("\(name): echo-server stopped (\(echoServer.terminate()))") }

        let rawListening = try rawServer.readListeningAddress()
        let rawAddress: RawAddress = setup.rawAddress.isTCP ? try RawAddress.parseTCP(rawListening) : .unix(path: rawListening)
        let echoListening = try echoServer.readListeningAddress()
        let echoAddress: SocketAddress = setup.kind == .tcp ? try SocketAddress.parseTCP(echoListening) : .unix(path: echoListening)
        progress("\(name): raw-echo-server (pid \(rawServer.pid)) on \(rawAddress), echo-server (pid \(echoServer.pid)) on \(echoAddress)")

        let rawClient = try RawPingPongClient(connectingTo: rawAddress, requestBytes: requestBytes, responseBytes: responseBytes)
        defer { rawClient.close() }
        let session = try await Session.connect(to: echoAddress, reactor: reactor)

        var histograms: [Client: Histogram<UInt64>] = [:]
        do {
            // The baseline always runs: every ratio needs it from the same run.
            let clients = Client.allCases.filter { $0 == .raw || clientRows.contains($0) }
            for round in 0..<rounds {
                let count = iterations / rounds + (round < iterations % rounds ? 1 : 0)
                let warm = round == 0 ? warmup : rewarm
                progress("\(name): slice \(round + 1)/\(rounds) (\(count) calls per client)")
                for offset in 0..<clients.count {
                    let client = clients[(round + offset) % clients.count]
                    let slice: Histogram<UInt64>
                    switch client {
                    case .raw:
                        slice = try rawClient.measure(warmup: warm, iterations: count)
                    case .asyncOnReactor:
                        slice = try await RapaceMeasurements.asyncOnReactor(session: session, reactor: reactor, warmup: warm, iterations: count)
                    case .callbackOnLoop:
                        slice = try await RapaceMeasurements.callbackOnLoop(session: session, reactor: reactor, warmup: warm, iterations: count)
                    case .asyncOffLoop:
                        slice = try await RapaceMeasurements.asyncOffLoop(session: session, reactor: reactor, warmup: warm, iterations: count)
                    case .asyncOnReactorSyncHandler:
                        slice = try await RapaceMeasurements.asyncOnReactor(session: session, reactor: reactor, warmup: warm, iterations: count, handler: .synchronous)
                    case .callbackOnLoopSyncHandler:
                        slice = try await RapaceMeasurements.callbackOnLoop(session: session, reactor: reactor, warmup: warm, iterations: count, handler: .synchronous)
                    }
                    histograms[client, default: Samples.newHistogram()].add(slice)
                }
            }
        } catch {
            await session.closeAndWait()
            throw error
        }
        await session.closeAndWait()
        rawClient.close()
        return Client.allCases.compactMap { client in
            histograms[client].map { ResultRow(transport: name, client: client, samples: Samples($0)) }
        }
    }

    private func progress(_ text: String) { printError("rapace-bench: \(text)") }

    /// The 1-, 5- and 15-minute load averages from /proc/loadavg.
    private static func loadAverage() -> String {
        guard let file = fopen("/proc/loadavg", "r") else { return "unknown" }
        defer { fclose(file) }
        var buffer = [CChar](repeating: 0, count: 128)
        let line = buffer.withUnsafeMutableBufferPointer { pointer -> String? in
            guard let base = pointer.baseAddress, fgets(base, Int32(pointer.count), file) != nil else { return nil }
            return String(cString: base)
        }
        guard let line else { return "unknown" }
        return line.split(separator: " ").prefix(3).joined(separator: " ")
    }
}
