import ArgumentParser
import CRapaceShim
import EchoService
import Histogram
import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// `rapace-bench shm`: the shared-memory transport against baselines measured in the same
/// run — a raw eventfd ping-pong between two processes, a raw shared-memory busy-poll
/// ping-pong, `memcpy` of the same sizes, and rapace over a Unix socket.
///
/// This process is the host (it creates the segment); the plugin is this binary re-executed
/// as the hidden `shm-plugin` subcommand, serving Echo, `SyncEcho` (Echo's `add` with a
/// synchronous handler) and the bench's sink service.
struct ShmBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "shm",
        abstract: "Shared-memory transport: round trips, throughput and a payload sweep against raw baselines.")

    @Option(name: .long, help: "Measured round trips per latency row.")
    var iterations: Int = 20_000

    @Option(name: .long, help: "Warm-up round trips before each latency row.")
    var warmup: Int = 2_000

    @Option(name: .long, help: "Calls in the pipelined-throughput run.")
    var pipelined: Int = 200_000

    @Option(name: .long, help: "Calls kept in flight in the pipelined run.")
    var window: Int = 64

    @Option(name: .long, help: "Notifications in the notification-throughput run.")
    var notifications: Int = 1_000_000

    @Option(name: .long, help: "Largest payload of the sweep in bytes (the sweep goes 64 B, ×4, …).")
    var sweepMax: Int = 16 << 20

    @Option(name: .long, help: "Spin budget in microseconds for the rows measured with adaptive spinning on both sides (0: skip them).")
    var spinUs: Int = 50

    @Option(name: .long, help: "CPU placement: N (bench and plugin on CPU N), C,S (bench on C, plugin on S) or none.")
    var cpus: String = "0"

    @Option(name: .long, help: "Measure only these sections, comma-separated: latency, throughput, sweep (default: all).")
    var only: String?

    @Option(name: .long, help: "Write every figure as CSV to this path.")
    var csv: String?

    @Option(name: .long, help: "Write an SVG chart (latency against payload size) to this path.")
    var svg: String?

    func validate() throws {
        guard iterations > 0, warmup >= 0, pipelined > 0, window > 0, notifications > 0 else {
            throw ValidationError("counts must be positive")
        }
        guard spinUs >= 0, spinUs <= 10_000 else { throw ValidationError("--spin-us must be between 0 and 10000") }
        do { _ = try Placement(parsing: cpus) } catch { throw ValidationError("\(error)") }
        guard sweepMax >= 64, sweepMax <= 64 << 20 else { throw ValidationError("--sweep-max must be between 64 and 64 MiB") }
        let sections = try Section.parse(only)
        if svg != nil && !sections.contains(.sweep) { throw ValidationError("--svg charts the payload sweep: include sweep in --only") }
    }

    /// The parts of the run `--only` selects.
    enum Section: String, CaseIterable {
        case latency, throughput, sweep

        static func parse(_ list: String?) throws -> Set<Section> {
            guard let list else { return Set(allCases) }
            var sections = Set<Section>()
            for name in list.split(separator: ",", omittingEmptySubsequences: false) {
                let trimmed = String(name.filter { !$0.isWhitespace })
                guard let section = Section(rawValue: trimmed) else {
                    let known = allCases.map(\.rawValue).joined(separator: ", ")
                    throw ValidationError("--only: unknown section '\(trimmed)' (known: \(known))")
                }
                sections.insert(section)
            }
            return sections
        }
    }

    func run() async throws {
        EmergencyCleanup.install()
        let placement = try Placement(parsing: cpus)
        let sections = try Section.parse(only)
        let onlineCPUs = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        let benchPath = try Executables.currentExecutable()
        let directory = try TemporaryDirectory(prefix: "rapace-bench-shm")
        defer { directory.remove() }
        let segmentPath = "/dev/shm/rapace-bench-\(getpid())"
        EmergencyCleanup.registerPath(segmentPath)
        EmergencyCleanup.registerPath(segmentPath + ".sock")
        if case .pinned(let client, _) = placement { try CPUAffinity.pinProcess(to: client) }

        let spawner = try Reactor.start(name: "bench-spawner")
        let reactor = try Reactor.start(name: "bench-host")
        defer {
            reactor.shutdown()
            spawner.shutdown()
        }

        // A pool big enough for the largest payload of the sweep plus its length prefix, and
        // beside it the ready-buffer control's 64-byte buffer and the untimed round trip's
        // copied request (one slot each), and one slot to spare.
        let slotSize: UInt32 = 64 * 1024
        let slotCount = UInt32(max(128, (sweepMax + 64 * 1024) / Int(slotSize) + 3))
        let config = ShmConfig(ringCapacity: 256, slotSize: slotSize, slotCount: slotCount)
        let maxPayload = UInt32(clamping: config.poolBytes)
        var sessionConfiguration = Session.Configuration()
        sessionConfiguration.limits.maxPayloadSize = maxPayload

        progress("segment \(segmentPath): \(config)")
        let hostSession = Locked<SendableBox<Session>?>(nil)
        let configuration = sessionConfiguration
        let listener = try await onLoop(reactor) { () throws -> SendableBox<ShmListener> in
            SendableBox(try ShmListener(reactor: reactor, path: segmentPath, config: config) { transport in
                guard let session = try? Session(transport: transport, role: .initiator, configuration: configuration) else { return }
                session.start { result in if case .success = result { hostSession.set(SendableBox(session)) } }
            })
        }
        defer { _ = try? onLoopSync(reactor) { listener.value.close() } }

        let unixPath = directory.file("plugin.sock")
        let plugin = try await ChildProcess.spawn(
            on: spawner, cpu: placement.serverCPU, benchPath,
            ["shm-plugin", "--shm", segmentPath, "--unix", unixPath, "--max-payload", "\(maxPayload)"], name: "shm-plugin")
        defer { progress("shm-plugin stopped (\(plugin.terminate(exitOnItsOwnMs: 2_000)))") }
        guard try plugin.readLine() == "connected" else { throw BenchError("shm-plugin did not connect") }
        var session: Session?
        for _ in 0..<1000 where session == nil {
            session = hostSession.get()?.value
            if session == nil { try await Task.sleep(for: .milliseconds(2)) }
        }
        guard let session else { throw BenchError("the plugin connected but the handshake did not finish") }
        let unixSession = try await Session.connect(to: .unix(path: unixPath), reactor: reactor, configuration: sessionConfiguration)

        var report = ShmReport(placement: "\(placement)", config: config, cpus: onlineCPUs)

        // 1. Small-call round trips.
        if sections.contains(.latency) {
            progress("small calls: raw eventfd ping-pong")
            report.latency.append(("raw eventfd ping-pong (2 processes)", Samples(try await eventfdBaseline(spawner: spawner, benchPath: benchPath, placement: placement))))
            if onlineCPUs >= 2 {
                progress("small calls: raw busy-poll ping-pong across CPUs")
                report.latency.append(("raw shm busy-poll ping-pong (CPU 0 ↔ 1)", Samples(try await spinBaseline(spawner: spawner, benchPath: benchPath, directory: directory))))
            }
            progress("small calls: rapace over shared memory")
            report.latency.append(("rapace shm, async on the reactor", Samples(try await RapaceMeasurements.asyncOnReactor(session: session, reactor: reactor, warmup: warmup, iterations: iterations))))
            report.latency.append(("rapace shm, callback API", Samples(try await RapaceMeasurements.callbackOnLoop(session: session, reactor: reactor, warmup: warmup, iterations: iterations))))
            progress("small calls: rapace over shared memory, synchronous handler (SyncEcho.add)")
            report.latency.append(("rapace shm, sync handler, async on the reactor", Samples(try await RapaceMeasurements.asyncOnReactor(session: session, reactor: reactor, warmup: warmup, iterations: iterations, handler: .synchronous))))
            report.latency.append(("rapace shm, sync handler, callback API", Samples(try await RapaceMeasurements.callbackOnLoop(session: session, reactor: reactor, warmup: warmup, iterations: iterations, handler: .synchronous))))
            if spinUs > 0 {
                progress("small calls: rapace over shared memory, adaptive spin (\(spinUs) µs) on both sides")
                try await setSpin(session, reactor: reactor, microseconds: spinUs)
                let before = try await onLoop(reactor) { Self.shmStatistics(session) }
                report.latency.append(("rapace shm, callback API, spin", Samples(try await RapaceMeasurements.callbackOnLoop(session: session, reactor: reactor, warmup: warmup, iterations: iterations))))
                report.latency.append(("rapace shm, async on the reactor, spin", Samples(try await RapaceMeasurements.asyncOnReactor(session: session, reactor: reactor, warmup: warmup, iterations: iterations))))
                let after = try await onLoop(reactor) { Self.shmStatistics(session) }
                try await setSpin(session, reactor: reactor, microseconds: 0)
                report.spin = ShmReport.SpinCounts(
                    calls: 2 * (warmup + iterations), spins: after.spins - before.spins, hits: after.spinHits - before.spinHits,
                    doorbells: after.doorbellsRung - before.doorbellsRung)
            }
            progress("small calls: rapace over a Unix socket")
            report.latency.append(("rapace unix socket, async on the reactor", Samples(try await RapaceMeasurements.asyncOnReactor(session: unixSession, reactor: reactor, warmup: warmup, iterations: iterations))))
        }

        // 2. Throughput.
        if sections.contains(.throughput) {
            var throughput = ShmReport.Throughput()
            progress("pipelined calls (\(pipelined), \(window) in flight)")
            throughput.pipelinedCallsPerSecond = try await PipelinedDriver.run(session: session, reactor: reactor, total: pipelined, window: window)
            progress("pipelined calls, synchronous handler (SyncEcho.add)")
            throughput.pipelinedSyncCallsPerSecond = try await PipelinedDriver.run(session: session, reactor: reactor, total: pipelined, window: window, handler: .synchronous)
            progress("notifications (\(notifications))")
            throughput.notificationsPerSecond = try await NotificationDriver.run(session: session, reactor: reactor, total: notifications)
            progress("notifications, synchronous handler (BenchSink.bump_now)")
            throughput.notificationsSyncPerSecond = try await NotificationDriver.run(session: session, reactor: reactor, total: notifications, handler: .synchronous)
            report.throughput = throughput
            if spinUs > 0, case .pinned(let client, let server) = placement, client != server {
                // Across CPUs a spinning side also watches for room in a full ring instead of
                // sleeping until the consumer rings (Docs/shm.md, "Spinning").
                progress("pipelined calls and notifications, synchronous handler, adaptive spin (\(spinUs) µs) on both sides")
                try await setSpin(session, reactor: reactor, microseconds: spinUs)
                report.spinThroughput = ShmReport.SpinThroughput(
                    pipelinedSync: try await PipelinedDriver.run(session: session, reactor: reactor, total: pipelined, window: window, handler: .synchronous),
                    notificationsSync: try await NotificationDriver.run(session: session, reactor: reactor, total: notifications, handler: .synchronous))
                try await setSpin(session, reactor: reactor, microseconds: 0)
            }
        }

        // 3. Payload sweep.
        if sections.contains(.sweep) {
            var size = 64
            while size <= sweepMax {
                progress("payload sweep: \(LatencyChart.bytes(size))")
                report.sweep.append(try await PayloadSweep.measure(size: size, shm: session, unix: unixSession, reactor: reactor))
                size *= 4
            }
        }

        await unixSession.closeAndWait()
        await session.closeAndWait()

        print(report.table())
        if let csv {
            try report.csv().write(toPath: csv)
            progress("wrote \(csv)")
        }
        if let svg {
            try report.chart().svg().write(toPath: svg)
            progress("wrote \(svg)")
        }
    }

    private func progress(_ text: String) { printError("rapace-bench: \(text)") }

    private static func shmStatistics(_ session: Session) -> ShmTransport.Statistics {
        (session.frameTransport as? ShmTransport)?.statistics ?? ShmTransport.Statistics()
    }

    /// Sets the spin policy on both ends of the shared-memory connection (0: no spin).
    private func setSpin(_ session: Session, reactor: Reactor, microseconds: Int) async throws {
        let policy: ShmSpinPolicy = microseconds == 0 ? .disabled : .adaptive(maximum: .microseconds(microseconds))
        try await onLoop(reactor) { (session.frameTransport as? ShmTransport)?.spinPolicy = policy }
        let nanos = UInt64(microseconds) * 1000
        _ = try await session.call(BenchSink.setSpin.id, request: Payload.encoding { $0.writeVarint(nanos) })
    }

    private func eventfdBaseline(spawner: Reactor, benchPath: String, placement: Placement) async throws -> Histogram<UInt64> {
        // Two blocking eventfds the child inherits: it reads `toPeer` and writes `toBench`.
        let toPeer = rapace_eventfd(0)
        let toBench = rapace_eventfd(0)
        guard toPeer >= 0, toBench >= 0 else { throw BenchError.system("eventfd") }
        defer {
            close(toPeer)
            close(toBench)
        }
        for fd in [toPeer, toBench] {
            _ = fcntl(fd, F_SETFL, 0)  // blocking
            _ = fcntl(fd, F_SETFD, 0)  // inherited by the child
        }
        let peer = try await ChildProcess.spawn(on: spawner, cpu: placement.serverCPU, benchPath, ["raw-shm-peer", "--eventfd", "\(toPeer),\(toBench)"], name: "raw-shm-peer")
        for fd in [toPeer, toBench] { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        defer { peer.terminate(exitOnItsOwnMs: 2_000) }
        guard try peer.readLine() == "ready" else { throw BenchError("raw-shm-peer did not start") }
        return try RawShm.eventfdRoundTrips(out: toPeer, in: toBench, warmup: warmup, iterations: iterations)
    }

    private func spinBaseline(spawner: Reactor, benchPath: String, directory: TemporaryDirectory) async throws -> Histogram<UInt64> {
        let file = directory.file("spin")
        let words = try RawShm.map(file)
        defer { munmap(words, 4096) }
        memset(words, 0, 4096)
        let peer = try await ChildProcess.spawn(on: spawner, cpu: 1, benchPath, ["raw-shm-peer", "--spin", file], name: "raw-shm-peer")
        defer { peer.terminate(exitOnItsOwnMs: 2_000) }
        guard try peer.readLine() == "ready" else { throw BenchError("raw-shm-peer did not start") }
        // The spinning client runs on a thread pinned to CPU 0 (the peer spins on CPU 1).
        let warmup = self.warmup, iterations = self.iterations
        let box = SendableBox(words)
        return try await onLoop(spawner) {
            try CPUAffinity.pin(to: 0)
            return RawShm.spinRoundTrips(box.value, warmup: warmup, iterations: iterations)
        }
    }
}

/// Runs `body` on `reactor`'s loop thread and returns its result.
func onLoop<T: Sendable>(_ reactor: Reactor, _ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await reactor.suspendOnLoop(orThrowIfShutDown: BenchError("the reactor has shut down") as any Error, body)
}

/// Like `onLoop`, blocking the calling thread (for `defer`).
func onLoopSync(_ reactor: Reactor, _ body: @escaping @Sendable () -> Void) throws {
    let done = Locked(false)
    guard reactor.execute({
        body()
        done.set(true)
    }) else { throw BenchError("the reactor has shut down") }
    while !done.get() { usleep(100) }
}

/// A mutex-guarded value.
final class Locked<Value: Sendable>: @unchecked Sendable {
    // @unchecked Sendable: every access holds `lock`.
    private var value: Value
    private var lock = pthread_mutex_t()
    init(_ value: Value) {
        self.value = value
        pthread_mutex_init(&lock, nil)
    }
    func get() -> Value {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        return value
    }
    func set(_ newValue: Value) {
        pthread_mutex_lock(&lock)
        value = newValue
        pthread_mutex_unlock(&lock)
    }
}

extension String {
    /// Writes the string to a file (created or truncated).
    func write(toPath path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw BenchError.system("open \(path)") }
        defer { close(fd) }
        var bytes = Array(utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress! + offset, $0.count - offset) }
            guard n > 0 else { throw BenchError.system("write \(path)") }
            offset += n
        }
    }
}
