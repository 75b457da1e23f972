import ArgumentParser
import Histogram

#if canImport(Glibc)
import Glibc
#endif

/// Latency samples in nanoseconds and their summary.
struct Samples: Sendable {
    let count: UInt64
    let p50: Double
    let p99: Double
    let mean: Double
    let min: Double
    let max: Double

    /// A histogram for round trips in nanoseconds: 1 ns to 60 s, three significant digits.
    static func newHistogram() -> Histogram<UInt64> {
        Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
    }

    init(_ histogram: Histogram<UInt64>) {
        count = histogram.totalCount
        p50 = Double(histogram.valueAtPercentile(50))
        p99 = Double(histogram.valueAtPercentile(99))
        mean = histogram.mean
        min = Double(histogram.min)
        max = Double(histogram.max)
    }
}

/// What was measured in one row.
enum Client: String, Sendable, CaseIterable, ExpressibleByArgument {
    case raw = "raw-ping-pong"
    case asyncOnReactor = "rapace-async-on-reactor"
    case callbackOnLoop = "rapace-callback-on-loop"
    case asyncOffLoop = "rapace-async-off-loop"
    /// `SyncEcho.add`: the same bytes, served by a synchronous handler (no task on the server).
    case asyncOnReactorSyncHandler = "rapace-async-on-reactor-sync-handler"
    case callbackOnLoopSyncHandler = "rapace-callback-on-loop-sync-handler"

    var label: String {
        switch self {
        case .raw: "raw ping-pong (baseline)"
        case .asyncOnReactor: "rapace EchoClient, task on reactor"
        case .callbackOnLoop: "rapace startCall, callback on loop"
        case .asyncOffLoop: "rapace EchoClient, off-loop (info)"
        case .asyncOnReactorSyncHandler: "sync handler: async, task on reactor"
        case .callbackOnLoopSyncHandler: "sync handler: startCall, callback"
        }
    }
}

/// One measured row.
struct ResultRow: Sendable {
    let transport: String
    let client: Client
    let samples: Samples
}

/// The table on stdout and the CSV file.
struct Report {
    let rows: [ResultRow]
    let warmup: Int
    let requestBytes: Int
    let responseBytes: Int

    private func baseline(for transport: String) -> Samples? {
        rows.first { $0.transport == transport && $0.client == .raw }?.samples
    }

    private static func ratio(_ value: Double, _ base: Double?) -> Double? {
        guard let base, base > 0 else { return nil }
        return value / base
    }

    /// The human-readable table, ratios against the raw baseline of the same transport.
    func table() -> String {
        let header = [
            Format.left("transport", 9), Format.left("client", 36),
            Format.right("p50 µs", 8), Format.right("p99 µs", 8), Format.right("mean µs", 8),
            Format.right("min µs", 8), Format.right("max µs", 9),
            Format.right("p50 ×raw", 9), Format.right("p99 ×raw", 9), Format.right("mean ×raw", 10),
        ].joined(separator: "  ")
        var lines = [header, String(repeating: "-", count: header.count)]
        var previousTransport: String?
        for row in rows {
            if let previousTransport, previousTransport != row.transport { lines.append("") }
            previousTransport = row.transport
            let base = baseline(for: row.transport)
            let ratio = { (value: Double, baseValue: Double?) -> String in
                guard row.client != .raw, let r = Report.ratio(value, baseValue) else { return "" }
                return Format.fixed(r, digits: 2)
            }
            lines.append([
                Format.left(row.transport, 9), Format.left(row.client.label, 36),
                Format.right(Format.micros(row.samples.p50), 8), Format.right(Format.micros(row.samples.p99), 8),
                Format.right(Format.micros(row.samples.mean), 8), Format.right(Format.micros(row.samples.min), 8),
                Format.right(Format.micros(row.samples.max), 9),
                Format.right(ratio(row.samples.p50, base?.p50), 9), Format.right(ratio(row.samples.p99, base?.p99), 9),
                Format.right(ratio(row.samples.mean, base?.mean), 10),
            ].joined(separator: "  "))
        }
        return lines.joined(separator: "\n")
    }

    /// The same numbers as CSV (microseconds; empty ratio cells on baseline rows).
    func csv() -> String {
        var lines = ["transport,client,iterations,warmup,request_bytes,response_bytes,p50_us,p99_us,mean_us,min_us,max_us,p50_ratio_vs_raw,p99_ratio_vs_raw,mean_ratio_vs_raw"]
        for row in rows {
            let base = row.client == .raw ? nil : baseline(for: row.transport)
            let ratio = { (value: Double, baseValue: Double?) -> String in
                Report.ratio(value, baseValue).map { Format.fixed($0, digits: 3) } ?? ""
            }
            let s = row.samples
            lines.append([
                row.transport, row.client.rawValue, String(s.count), String(warmup),
                String(requestBytes), String(responseBytes),
                Format.fixed(s.p50 / 1000, digits: 3), Format.fixed(s.p99 / 1000, digits: 3),
                Format.fixed(s.mean / 1000, digits: 3), Format.fixed(s.min / 1000, digits: 3),
                Format.fixed(s.max / 1000, digits: 3),
                ratio(s.p50, base?.p50), ratio(s.p99, base?.p99), ratio(s.mean, base?.mean),
            ].joined(separator: ","))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// Writes ``csv()`` to `path`.
    func writeCSV(to path: String) throws {
        guard let file = fopen(path, "w") else { throw BenchError.system("cannot open \(path) for writing") }
        let text = csv()
        let written = fputs(text, file)
        let closed = fclose(file)
        guard written >= 0, closed == 0 else { throw BenchError.system("cannot write \(path)") }
    }
}
