import EchoService
import Histogram
import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// Keeps `window` unary calls in flight with the callback API; returns calls per second.
/// The calls go to `Echo.add` (async handler) or `SyncEcho.add` (the same bytes, synchronous
/// handler).
final class PipelinedDriver: @unchecked Sendable {
    // @unchecked Sendable: used only on the reactor's loop thread after `run` hands it over.
    private let session: Session
    private let methodID: UInt32
    private let total: Int
    private let window: Int
    private var issued = 0
    private var completed = 0
    private var started: UInt64 = 0
    private var continuation: UnsafeContinuation<Result<Double, BenchError>, Never>?
    private let request = RapaceMeasurements.addRequest()

    private init(session: Session, methodID: UInt32, total: Int, window: Int) {
        self.session = session
        self.methodID = methodID
        self.total = total
        self.window = window
    }

    static func run(session: Session, reactor: Reactor, total: Int, window: Int, handler: ServerHandler = .async) async throws -> Double {
        let driver = PipelinedDriver(session: session, methodID: handler.methodID, total: total, window: window)
        return try await reactor.suspendOnLoop(orIfShutDown: .failure(BenchError("the reactor has shut down"))) { continuation in
            driver.continuation = continuation
            driver.started = monotonicNanoseconds()
            for _ in 0..<min(window, total) { driver.issue() }
        }.get()
    }

    private func issue() {
        issued += 1
        session.startCall(methodID, request: request) { [self] result in
            if case .failure(let error) = result {
                continuation?.resume(returning: .failure(BenchError("pipelined call failed: \(error)")))
                continuation = nil
                return
            }
            completed += 1
            if issued < total {
                issue()
            } else if completed == total {
                let seconds = Double(monotonicNanoseconds() - started) / 1e9
                continuation?.resume(returning: .success(Double(total) / seconds))
                continuation = nil
            }
        }
    }
}

extension ServerHandler {
    /// The notification `NotificationDriver` sends: `BenchSink.bump` (async handler) or
    /// `BenchSink.bump_now` (synchronous handler); the call's counterpart is ``methodID``.
    var notificationMethodID: UInt32 { self == .async ? BenchSink.bump.id : BenchSink.bumpNow.id }
}

/// Sends notifications as fast as the transport takes them, then one unary call that
/// checks they all arrived; returns notifications per second. The notifications go to
/// `BenchSink.bump` (async handler) or `BenchSink.bump_now` (the same bytes, synchronous
/// handler).
final class NotificationDriver: @unchecked Sendable {
    // @unchecked Sendable: used only on the reactor's loop thread.
    private let session: Session
    private let methodID: UInt32
    private let total: Int
    private var sent = 0
    private var started: UInt64 = 0
    private var continuation: UnsafeContinuation<Result<Double, BenchError>, Never>?
    private let one = Payload.encoding { $0.writeVarint(1) }

    private init(session: Session, methodID: UInt32, total: Int) {
        self.session = session
        self.methodID = methodID
        self.total = total
    }

    /// Output allowed to wait in the transport (about 2 000 frames) before the driver waits
    /// for the backlog to drain.
    private static let queueLimit = 128 * 1024

    static func run(session: Session, reactor: Reactor, total: Int, handler: ServerHandler = .async) async throws -> Double {
        let before = try await session.call(BenchSink.total.id, request: .empty).decode { try $0.readVarint64() }
        let driver = NotificationDriver(session: session, methodID: handler.notificationMethodID, total: total)
        let rate = try await reactor.suspendOnLoop(orIfShutDown: .failure(BenchError("the reactor has shut down"))) { continuation in
            driver.continuation = continuation
            driver.started = monotonicNanoseconds()
            driver.burst()
        }.get()
        let after = try await session.call(BenchSink.total.id, request: .empty).decode { try $0.readVarint64() }
        guard after - before == UInt64(total) else { throw BenchError("\(after - before) of \(total) notifications arrived") }
        return rate
    }

    private func burst() {
        while sent < total && session.queuedOutputBytes < Self.queueLimit {
            if let error = session.sendNotification(methodID, request: one) {
                continuation?.resume(returning: .failure(BenchError("notification failed: \(error)")))
                continuation = nil
                return
            }
            sent += 1
        }
        if sent < total {
            // The peer is behind: go on once the ring has taken the backlog (no polling).
            session.whenOutputDrained { [self] in burst() }
            return
        }
        // All queued: a unary call behind them completes once they are all consumed.
        session.startCall(BenchSink.total.id, request: .empty) { [self] result in
            switch result {
            case .success:
                let seconds = Double(monotonicNanoseconds() - started) / 1e9
                continuation?.resume(returning: .success(Double(total) / seconds))
            case .failure(let error):
                continuation?.resume(returning: .failure(BenchError("sync call failed: \(error)")))
            }
            continuation = nil
        }
    }
}

/// One size of the payload sweep.
struct SweepRow: Sendable {
    let size: Int
    let memcpy: Samples
    let shmCopy: Samples
    let shmZeroCopy: Samples
    /// A ready buffer's send, after an untimed small round trip (see `measure`).
    let shmReady: Samples
    /// A ready buffer's send right after it was written (caches full of its bytes).
    let shmReadyCold: Samples
    /// The control for `shmReady`: the same write and untimed round trip, then the send of
    /// a ready 64-byte buffer instead.
    let shmReadyControl: Samples
    let unix: Samples
}

enum PayloadSweep {
    /// Round trips of `BenchSink.consume(bytes)` (the server reads only the length).
    static func measure(size: Int, shm: Session, unix: Session, reactor: Reactor) async throws -> SweepRow {
        let iterations = max(24, min(2000, (96 << 20) / size))
        // The zero-copy target compares these two rows: at least 200 samples each, so a
        // large size's p50 is steady (at 24 their ratio wandered 0.96–1.42× between runs).
        let targetIterations = max(iterations, 200)
        let warmup = 3
        return try await reactor.run {
            let source = [UInt8](repeating: 0xAB, count: size)
            var prefixWriter = PostcardWriter()
            prefixWriter.writeVarint(UInt64(size))
            let prefix = prefixWriter.bytes
            guard let transport = shm.frameTransport as? ShmTransport else { throw BenchError("not a shared-memory session") }

            // memcpy of the same size, in this process.
            var memcpyHistogram = Samples.newHistogram()
            let destination = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
            defer { destination.deallocate() }
            source.withUnsafeBytes { raw in
                for index in 0..<(warmup + targetIterations) {
                    let start = monotonicNanoseconds()
                    memcpy(destination, raw.baseAddress!, size)
                    let elapsed = monotonicNanoseconds() - start
                    if index >= warmup { memcpyHistogram.record(elapsed) }
                }
            }

            func check(_ reply: Payload) throws {
                let count = try reply.decode { try $0.readVarint64() }
                guard count == UInt64(size) else { throw BenchError("consume returned \(count) for \(size) bytes") }
            }

            // The copying path: encode the [UInt8] (one copy), the transport copies it into slots.
            func copying(_ session: Session) async throws -> Histogram<UInt64> {
                var histogram = Samples.newHistogram()
                for index in 0..<(warmup + iterations) {
                    let start = monotonicNanoseconds()
                    let request = Payload.encoding(capacity: size + 5) { $0.writeByteArray(source) }
                    try check(try await session.call(BenchSink.consume.id, request: request))
                    let elapsed = monotonicNanoseconds() - start
                    if index >= warmup { histogram.record(elapsed) }
                }
                return histogram
            }

            // A buffer in the segment: the length prefix, then the bytes written in place.
            func allocate(count: Int) async throws -> ShmBuffer {
                for _ in 0..<10_000 {
                    if let buffer = transport.allocateBuffer(count: count) { return buffer }
                    try await Task.sleep(for: .microseconds(50))  // the peer is still freeing slots
                }
                throw BenchError("no run of slots for \(count) bytes")
            }
            func allocate() async throws -> ShmBuffer { try await allocate(count: prefix.count + size) }
            func fill(_ buffer: ShmBuffer) {
                buffer.withUnsafeMutableBytes { bytes in
                    for (index, byte) in prefix.enumerated() { bytes[index] = byte }
                    source.withUnsafeBytes { _ = memcpy(bytes.baseAddress! + prefix.count, $0.baseAddress!, size) }
                }
            }

            // Zero copy: producing the bytes in the segment is the only write; the send copies nothing.
            var zeroCopy = Samples.newHistogram()
            for index in 0..<(warmup + targetIterations) {
                let start = monotonicNanoseconds()
                let buffer = try await allocate()
                fill(buffer)
                try check(try await shm.call(BenchSink.consume.id, request: Payload(borrowing: buffer)))
                let elapsed = monotonicNanoseconds() - start
                if index >= warmup { zeroCopy.record(elapsed) }
            }

            // A ready buffer: only the send (and the answer) is timed. The send itself touches
            // none of the payload bytes (a descriptor naming the run; the receiver checks the
            // run's slot-table entries), but writing the buffer just before evicts both
            // processes' working sets from the caches once it is larger than they are, and
            // the next round trip — whatever it carries — pays for that. "Cold" times the send
            // right after writing; the warm figure first runs one untimed 64-byte round trip
            // (the same path), so it times the send of a buffer written earlier. The control
            // does all the same (writes this size, the untimed round trip) but then times the
            // send of a ready 64-byte buffer written just before the big one: the warm figure
            // over the control is what the size itself adds to a send.
            // Only one round trip in three is timed per row, so these rows take at least 200
            // samples each (a 16 MiB row would otherwise have 24: too few for a steady p50).
            let smallBytes = [UInt8](repeating: 1, count: 64)
            let warmRequest = Payload.encoding { $0.writeByteArray(smallBytes) }
            var smallWriter = PostcardWriter()
            smallWriter.writeByteArray(smallBytes)
            let smallEncoded = smallWriter.bytes  // the control's request: the same 64 bytes, prefixed
            var ready = Samples.newHistogram()
            var readyCold = Samples.newHistogram()
            var readyControl = Samples.newHistogram()
            for index in 0..<(3 * (warmup + max(iterations, 200))) {
                let mode = index % 3  // 0 cold, 1 warm, 2 control
                let small = mode == 2 ? try await allocate(count: smallEncoded.count) : nil
                small?.withUnsafeMutableBytes { bytes in
                    smallEncoded.withUnsafeBytes { _ = memcpy(bytes.baseAddress!, $0.baseAddress!, smallEncoded.count) }
                }
                let buffer = try await allocate()
                fill(buffer)
                if mode != 0 { _ = try await shm.call(BenchSink.consume.id, request: warmRequest) }
                let start = monotonicNanoseconds()
                if let small {
                    let count = try await shm.call(BenchSink.consume.id, request: Payload(borrowing: small)).decode { try $0.readVarint64() }
                    guard count == UInt64(smallBytes.count) else { throw BenchError("consume returned \(count) for 64 bytes") }
                } else {
                    try check(try await shm.call(BenchSink.consume.id, request: Payload(borrowing: buffer)))
                }
                let elapsed = monotonicNanoseconds() - start
                // In a control round `buffer` was never sent: it frees its slots as the round ends.
                guard index >= 3 * warmup else { continue }
                switch mode {
                case 0: readyCold.record(elapsed)
                case 1: ready.record(elapsed)
                default: readyControl.record(elapsed)
                }
            }

            return SweepRow(
                size: size, memcpy: Samples(memcpyHistogram), shmCopy: Samples(try await copying(shm)),
                shmZeroCopy: Samples(zeroCopy), shmReady: Samples(ready), shmReadyCold: Samples(readyCold),
                shmReadyControl: Samples(readyControl), unix: Samples(try await copying(unix)))
        }
    }
}

/// Everything `rapace-bench shm` measured, with the targets of the SHM issue.
struct ShmReport {
    let placement: String
    let config: ShmConfig
    let cpus: Int
    var latency: [(String, Samples)] = []
    /// Nil when the throughput rows were not asked for (`--only`).
    var throughput: Throughput?

    struct Throughput {
        var pipelinedCallsPerSecond = 0.0
        var notificationsPerSecond = 0.0
        /// The same two rows served by synchronous handlers (`SyncEcho.add`, `BenchSink.bump_now`).
        var pipelinedSyncCallsPerSecond = 0.0
        var notificationsSyncPerSecond = 0.0
    }
    /// The synchronous rows again with adaptive spin on both sides (bench and plugin on
    /// different CPUs only).
    var spinThroughput: SpinThroughput?
    var sweep: [SweepRow] = []

    struct SpinThroughput {
        let pipelinedSync: Double
        let notificationsSync: Double
    }
    /// What the host side's transport did during the spin rows.
    var spin: SpinCounts?

    struct SpinCounts {
        let calls: Int
        let spins: UInt64
        let hits: UInt64
        let doorbells: UInt64
    }

    private func p50(_ prefix: String) -> Double? { latency.first { $0.0.hasPrefix(prefix) }?.1.p50 }

    func table() -> String {
        var out = "\nrapace-bench shm: \(config); placement: \(placement); \(cpus) CPUs online\n\n"
        if !latency.isEmpty {
            out += "small calls (Echo.add round trip)                  p50 µs    p99 µs   mean µs   p50 ×eventfd\n"
        }
        let eventfd = p50("raw eventfd")
        for (name, samples) in latency {
            let ratio = eventfd.map { Format.fixed(samples.p50 / $0) } ?? ""
            out += Format.left(name, 50) + Format.right(Format.micros(samples.p50), 8) + Format.right(Format.micros(samples.p99), 10)
                + Format.right(Format.micros(samples.mean), 10) + Format.right(ratio, 14) + "\n"
        }
        if let spin {
            out += "spin rows, host side: \(spin.spins) spins, \(spin.hits) saw the answer, \(spin.doorbells) doorbells rung in \(spin.calls) calls\n"
        }
        if let throughput {
            out += "\nthroughput\n"
            out += "  pipelined calls                        \(Format.fixed(throughput.pipelinedCallsPerSecond / 1e6, digits: 3)) M calls/s\n"
            out += "  pipelined calls, sync handler          \(Format.fixed(throughput.pipelinedSyncCallsPerSecond / 1e6, digits: 3)) M calls/s\n"
            out += "  notifications                          \(Format.fixed(throughput.notificationsPerSecond / 1e6, digits: 3)) M msgs/s\n"
            out += "  notifications, sync handler            \(Format.fixed(throughput.notificationsSyncPerSecond / 1e6, digits: 3)) M msgs/s\n"
        }
        if let spinThroughput {
            out += "  pipelined calls, sync handler, spin    \(Format.fixed(spinThroughput.pipelinedSync / 1e6, digits: 3)) M calls/s\n"
            out += "  notifications, sync handler, spin      \(Format.fixed(spinThroughput.notificationsSync / 1e6, digits: 3)) M msgs/s\n"
        }
        if !sweep.isEmpty {
            out += "\npayload sweep (BenchSink.consume round trip, p50 µs and GB/s)\n"
            out += Format.left("size", 10) + Format.right("memcpy", 16) + Format.right("shm copy", 18) + Format.right("shm zero-copy", 18)
                + Format.right("shm ready buf", 18) + Format.right("ready, cold", 18) + Format.right("ready 64 B ctl", 18)
                + Format.right("unix socket", 18) + "\n"
            for row in sweep {
                func cell(_ samples: Samples, bytes: Int? = row.size) -> String {
                    // The control sends 64 bytes whatever the row's size: no rate for it.
                    guard let bytes else { return Format.right(Format.micros(samples.p50), 18) }
                    let gbps = Double(bytes) / samples.p50  // bytes per ns = GB/s
                    return Format.right("\(Format.micros(samples.p50)) \(Format.fixed(gbps, digits: 2))", 18)
                }
                out += Format.left(LatencyChart.bytes(row.size), 10) + cell(row.memcpy) + cell(row.shmCopy) + cell(row.shmZeroCopy)
                    + cell(row.shmReady) + cell(row.shmReadyCold) + cell(row.shmReadyControl, bytes: nil) + cell(row.unix) + "\n"
            }
        }
        out += "\ntargets (ratios within this run)\n"
        for target in targets() { out += "  \(target.met ? "met    " : "NOT met") \(target.text)\n" }
        return out
    }

    struct Target {
        let met: Bool
        let text: String
    }

    func targets() -> [Target] {
        var result: [Target] = []
        if let eventfd = p50("raw eventfd") {
            let rows = [
                ("rapace shm, async", "async"), ("rapace shm, callback", "callback"),
                ("rapace shm, sync handler, async", "async, synchronous handler"), ("rapace shm, sync handler, callback", "callback, synchronous handler"),
            ]
            for (row, label) in rows {
                guard let rapace = p50(row) else { continue }
                let ratio = rapace / eventfd
                result.append(Target(met: ratio <= 1.5, text: "small call (\(label)) \(Format.fixed(ratio))× raw eventfd ping-pong (target ≤ 1.5×)"))
            }
        }
        if let floor = p50("raw shm busy-poll"), let spinning = p50("rapace shm, callback API, spin") {
            let ratio = spinning / floor
            let engaged = spin.map { $0.hits > 0 } ?? false
            let how = engaged ? "" : " (the spin did not engage: the peers share a CPU in this placement)"
            result.append(Target(met: ratio <= 2, text: "callback round trip with adaptive spin \(Format.fixed(ratio))× the busy-poll floor\(how) (target ≤ 2×, across CPUs)"))
        }
        if let throughput {
            let (pipelined, pipelinedSync) = (throughput.pipelinedCallsPerSecond, throughput.pipelinedSyncCallsPerSecond)
            let (notifications, notificationsSync) = (throughput.notificationsPerSecond, throughput.notificationsSyncPerSecond)
            result.append(Target(met: pipelined >= 1e6, text: "pipelined calls \(Format.fixed(pipelined / 1e6, digits: 3)) M/s (target ≥ 1 M/s)"))
            result.append(Target(met: pipelinedSync >= 1e6, text: "pipelined calls, synchronous handler \(Format.fixed(pipelinedSync / 1e6, digits: 3)) M/s (target ≥ 1 M/s)"))
            result.append(Target(met: notifications >= 5e6, text: "notifications \(Format.fixed(notifications / 1e6, digits: 3)) M/s (target ≥ 5 M/s)"))
            result.append(Target(met: notificationsSync >= 5e6, text: "notifications, synchronous handler \(Format.fixed(notificationsSync / 1e6, digits: 3)) M/s (target ≥ 5 M/s)"))
        }
        if let spinThroughput {
            result.append(Target(met: spinThroughput.notificationsSync >= 5e6, text: "notifications, synchronous handler, adaptive spin across CPUs \(Format.fixed(spinThroughput.notificationsSync / 1e6, digits: 3)) M/s (target ≥ 5 M/s)"))
        }
        if let largest = sweep.last, largest.size >= 16 << 20 {
            let ratio = largest.shmZeroCopy.p50 / largest.memcpy.p50
            result.append(Target(met: ratio <= 1.45, text: "\(LatencyChart.bytes(largest.size)) zero-copy transfer \(Format.fixed(ratio))× memcpy (target ≤ 1.45×)"))
            if let smallest = sweep.first {
                let sendRatio = largest.shmReady.p50 / smallest.shmCopy.p50
                let coldRatio = largest.shmReadyCold.p50 / smallest.shmCopy.p50
                let controlRatio = largest.shmReady.p50 / largest.shmReadyControl.p50
                result.append(Target(met: sendRatio <= 1.2, text: "sending a ready \(LatencyChart.bytes(largest.size)) ShmBuffer \(Format.fixed(sendRatio))× sending \(LatencyChart.bytes(smallest.size)) (target ≤ 1.2×; right after writing it, caches cold: \(Format.fixed(coldRatio))×; against a ready 64 B buffer sent after the same write: \(Format.fixed(controlRatio))×)"))
            }
        }
        return result
    }

    func csv() -> String {
        var out = "section,name,size_bytes,p50_ns,p99_ns,mean_ns,per_second\n"
        for (name, samples) in latency {
            out += "latency,\(name),,\(samples.p50),\(samples.p99),\(samples.mean),\n"
        }
        if let throughput {
            out += "throughput,pipelined calls,,,,,\(throughput.pipelinedCallsPerSecond)\n"
            out += "throughput,notifications,,,,,\(throughput.notificationsPerSecond)\n"
            out += "throughput,pipelined calls (sync handler),,,,,\(throughput.pipelinedSyncCallsPerSecond)\n"
            out += "throughput,notifications (sync handler),,,,,\(throughput.notificationsSyncPerSecond)\n"
        }
        if let spinThroughput {
            out += "throughput,pipelined calls (sync handler; spin),,,,,\(spinThroughput.pipelinedSync)\n"
            out += "throughput,notifications (sync handler; spin),,,,,\(spinThroughput.notificationsSync)\n"
        }
        for row in sweep {
            for (name, samples) in [("memcpy", row.memcpy), ("shm copy", row.shmCopy), ("shm zero-copy", row.shmZeroCopy), ("shm ready buffer", row.shmReady), ("shm ready buffer, cold", row.shmReadyCold), ("shm ready 64 B after this write", row.shmReadyControl), ("unix socket", row.unix)] {
                out += "sweep,\(name),\(row.size),\(samples.p50),\(samples.p99),\(samples.mean),\n"
            }
        }
        return out
    }

    func chart() -> LatencyChart {
        func series(_ name: String, _ color: String, _ pick: (SweepRow) -> Samples) -> LatencyChart.Series {
            LatencyChart.Series(name: name, color: color, points: sweep.map { ($0.size, pick($0).p50 / 1000) })
        }
        return LatencyChart(title: "rapace: round trip against payload size (p50)", series: [
            series("memcpy", "#999999", { $0.memcpy }),
            series("shm, copying", "#1f77b4", { $0.shmCopy }),
            series("shm, zero-copy", "#2ca02c", { $0.shmZeroCopy }),
            series("shm, ready buffer", "#17becf", { $0.shmReady }),
            series("unix socket", "#d62728", { $0.unix }),
        ])
    }
}
