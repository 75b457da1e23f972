#if canImport(Glibc)
import Glibc
#endif
import Logging
import Rapace
import RapacePlugin
import RapaceTracing
import Tracing

/// `TracingProbe`: what the tracing bridge's tests ask a real plugin to do.
struct ProbeService: RPCService {
    static let logLevels = MethodDescriptor(service: "TracingProbe", method: "log_levels", kind: .unary)
    static let nestedSpans = MethodDescriptor(service: "TracingProbe", method: "nested_spans", kind: .unary)
    static let flood = MethodDescriptor(service: "TracingProbe", method: "flood", kind: .unary)
    static let openSpan = MethodDescriptor(service: "TracingProbe", method: "open_span", kind: .unary)
    static let crash = MethodDescriptor(service: "TracingProbe", method: "crash", kind: .unary)
    static let residentKiB = MethodDescriptor(service: "TracingProbe", method: "resident_kib", kind: .unary)
    static let flush = MethodDescriptor(service: "TracingProbe", method: "flush", kind: .unary)

    let tracing: PluginTracing
    let logger = Logger(label: "probe")

    var methods: [MethodDescriptor] { [Self.logLevels, Self.nestedSpans, Self.flood, Self.openSpan, Self.crash, Self.residentKiB, Self.flush] }

    nonisolated(nonsending) func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        switch method {
        case Self.logLevels.id:
            // One record per swift-log level, each with its index and the caller's tag.
            let tag = try request.decode { try $0.readString() }
            for (index, level) in Logger.Level.allCases.enumerated() {
                logger.log(level: level, "level \(level)", metadata: ["tag": "\(tag)", "index": "\(index)"])
            }
            // No flush: the records go out before this reply (the tests rely on it).
            return .empty
        case Self.nestedSpans.id:
            // outer ⊃ middle ⊃ inner, a record in each, an attribute and an event.
            let tag = try request.decode { try $0.readString() }
            try await withSpan("outer") { outer in
                outer.attributes["tag"] = tag
                logger.info("in outer")
                try await withSpan("middle") { middle in
                    middle.addEvent("middle-event")
                    try await withSpan("inner") { _ in
                        try await Task.sleep(for: .milliseconds(1))
                        logger.info("in inner")
                    }
                }
            }
            return .empty
        case Self.flood.id:
            // `count` records as fast as a task can make them; returns how long that took.
            // Off the loop thread, as plugin work usually is, so the forwarder sends while
            // the records are made.
            let count = try request.decode { try $0.readVarint32() }
            let logger = self.logger
            let elapsed = await Task.detached {
                let start = ContinuousClock.now
                for index in 0..<count { logger.info("flood", metadata: ["index": "\(index)"]) }
                return ContinuousClock.now - start
            }.value
            let (seconds, attoseconds) = elapsed.components
            return Payload.encoding { $0.writeVarint(UInt64(seconds) * 1_000_000_000 + UInt64(attoseconds / 1_000_000_000)) }
        case Self.openSpan.id:
            // A span left open on purpose (for the crash test), with a record inside it.
            let name = try request.decode { try $0.readString() }
            let span = InstrumentationSystem.tracer.startAnySpan(name, context: ServiceContext.current ?? .topLevel)
            ServiceContext.$current.withValue(span.context) { logger.warning("about to be abandoned") }
            await tracing.flush()
            return .empty
        case Self.crash.id:
            kill(getpid(), SIGKILL)
            return .empty
        case Self.residentKiB.id:
            return Payload.encoding { $0.writeVarint(Self.readResidentKiB()) }
        case Self.flush.id:
            await tracing.flush()
            let statistics = tracing.statistics
            return Payload.encoding {
                $0.writeVarint(statistics.forwarded)
                $0.writeVarint(statistics.dropped)
                $0.writeVarint(UInt64(statistics.peakQueued))
            }
        default:
            throw RPCError(.unimplemented, "TracingProbe has no method \(method)")
        }
    }

    /// VmRSS of this process, in KiB (0 when /proc cannot be read).
    static func readResidentKiB() -> UInt64 {
        guard let file = fopen("/proc/self/status", "r") else { return 0 }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.hasPrefix("VmRSS:") {
                return UInt64(text.dropFirst(6).filter(\.isNumber)) ?? 0
            }
        }
        return 0
    }
}

/// The tracing bridge's test subject: a plugin that forwards everything (filter `trace`)
/// and logs, opens spans, floods or crashes when the host asks.
@main
struct TracingProbe {
    static func main() async {
        do {
            // `--buffer=N`: a smaller buffer, so a flood must drop.
            let buffer = CommandLine.arguments.first { $0.hasPrefix("--buffer=") }.flatMap { Int($0.dropFirst("--buffer=".count)) }
            let tracing = PluginTracing.bootstrap(PluginTracing.Configuration(filter: TracingFilter(level: .trace), bufferCapacity: buffer ?? 8192))
            try await PluginRuntime().serve([ProbeService(tracing: tracing)], tracing: tracing)
        } catch {
            var bytes = Array("error: \(error)\n".utf8)
            _ = write(2, &bytes, bytes.count)
            exit(2)
        }
    }
}
