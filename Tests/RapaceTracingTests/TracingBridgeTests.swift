import Foundation
import Logging
import Rapace
import RapacePlugin
import RapaceTestSupport
import RapaceTracing
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The tracing bridge with a real plugin process (`rapace-tracing-probe`) on shared memory.
/// Each test owns the process: it checks this process's plugin segment files afterwards,
/// and the flood bounds this process's memory.
@Suite(.serialized, .ownsProcess("checks this process's plugin segment files and resident memory"))
struct TracingBridgeTests {
    @Test func logsAtEachLevelArriveInOrderWithTheirMetadata() async throws {
        try await withProbe { probe, host, capture in
            try await probe.call("log_levels", string: "t1")
            let entries = capture.entries { $0.metadata["tag"] == "t1" }
            #expect(entries.map(\.message) == Logger.Level.allCases.map { "level \($0)" })
            #expect(entries.map(\.level) == [.trace, .debug, .info, .info, .warning, .error, .error])
            #expect(entries.map { $0.metadata["index"] } == (0..<7).map { "\($0)" })
            var lines: [Int] = []
            for entry in entries {
                #expect(entry.metadata["plugin"] == "probe")
                #expect(entry.metadata["target"] == "probe")
                let file = try #require(entry.metadata["file"])
                #expect(file.hasPrefix("RapaceTracingProbe/TracingProbe.swift:"), "\(file)")
                lines.append(Int(file.split(separator: ":").last ?? "") ?? -1)
                #expect(entry.metadata["span_id"] == nil)
            }
            #expect(Set(lines).count == 1 && lines[0] > 0, "all from one log call site: \(lines)")
            #expect(host.statistics(plugin: "probe").events >= 7)
        }
    }

    @Test func nestedSpansArriveWithTheirParents() async throws {
        try await withProbe { probe, host, capture in
            try await probe.call("nested_spans", string: "n1")
            let spans = host.spans(plugin: "probe")
            let outer = try #require(spans.first { $0.meta.name == "outer" })
            let middle = try #require(spans.first { $0.meta.name == "middle" })
            let inner = try #require(spans.first { $0.meta.name == "inner" })
            #expect(outer.parentID == nil)
            #expect(middle.parentID == outer.id)
            #expect(inner.parentID == middle.id)
            #expect([outer, middle, inner].allSatisfy { $0.state == .closed && $0.closed != nil })
            #expect(outer.meta.target == "RapaceTracingProbe")
            #expect(outer.meta.file == "RapaceTracingProbe/TracingProbe.swift")
            #expect(outer.recorded == [TraceField(name: "tag", value: "n1")])
            // Records name the span they happened in.
            let inOuter = try #require(capture.entries { $0.message == "in outer" }.first)
            #expect(inOuter.metadata["span_id"] == "\(outer.id)")
            #expect(inOuter.metadata["span"] == "outer")
            let inInner = try #require(capture.entries { $0.message == "in inner" }.first)
            #expect(inInner.metadata["span_id"] == "\(inner.id)")
            let event = try #require(capture.entries { $0.message == "middle-event" }.first)
            #expect(event.metadata["span_id"] == "\(middle.id)")
            // The host logged each span's open and close, children inside their parents.
            let order = capture.entries { $0.message.hasPrefix("span opened") || $0.message.hasPrefix("span closed") }.map(\.message)
            #expect(order == [
                "span opened: outer", "span opened: middle", "span opened: inner",
                "span closed: inner", "span closed: middle", "span closed: outer",
            ])
        }
    }

    @Test func setFilterTakesEffectOnTheNextRecord() async throws {
        try await withProbe { probe, _, capture in
            let config = TracingConfigClient(probe.plugin)
            try await config.setFilter("warn")
            try await probe.call("log_levels", string: "f1")
            #expect(capture.entries { $0.metadata["tag"] == "f1" }.map(\.level) == [.warning, .error, .error])
            try await config.setFilter("trace,probe=off")
            try await probe.call("log_levels", string: "f2")
            #expect(capture.entries { $0.metadata["tag"] == "f2" }.isEmpty)
            try await config.setFilter("error,probe=debug")
            try await probe.call("log_levels", string: "f3")
            #expect(capture.entries { $0.metadata["tag"] == "f3" }.map(\.level) == [.debug, .info, .info, .warning, .error, .error])
            do throws(RPCError) {
                try await config.setFilter("probe=loud")
                Issue.record("an invalid filter was accepted")
            } catch {
                #expect(error.code == .invalidArgument)
                #expect(error.message.contains("\"loud\""), "\(error.message)")
            }
            // The invalid filter changed nothing.
            try await probe.call("log_levels", string: "f4")
            #expect(capture.entries { $0.metadata["tag"] == "f4" }.count == 6)
        }
    }

    @Test func aFloodNeitherBlocksThePluginNorGrowsMemoryAndDropsAreReported() async throws {
        let total: UInt32 = 100_000
        try await withProbe(arguments: ["--buffer=256"]) { probe, host, capture in
            let residentBefore = try await probe.residentKiB()
            let hostBefore = residentKiB()
            let elapsed = try await probe.flood(total)
            let (forwarded, dropped, peakQueued) = try await probe.flushStatistics()
            // Never blocked (a generous bound: the records are made in ~0.2 s) and never
            // buffered more than its capacity.
            #expect(elapsed < 60_000_000_000, "the flood took \(elapsed) ns")
            #expect(peakQueued <= 256, "peak buffer \(peakQueued)")
            // Every record either reached the host or was counted as dropped, and the
            // host heard about the drops.
            #expect(await waitUntil(timeout: .seconds(30), interval: .milliseconds(20)) {
                capture.countedOnly + Int(host.statistics(plugin: "probe").droppedByPlugin) >= Int(total)
            }, "records neither received nor reported as dropped")
            let received = capture.countedOnly
            let reported = host.statistics(plugin: "probe").droppedByPlugin
            print("flood of \(total): \(String(format: "%.1f", Double(elapsed) / 1e6)) ms in the plugin, \(received) forwarded, \(reported) dropped and reported (plugin: \(forwarded) forwarded, \(dropped) dropped)")
            #expect(received + Int(reported) == Int(total))
            #expect(reported > 0, "a 256-record buffer must overflow")
            #expect(reported == dropped)
            #expect(!capture.entries { $0.metadata["target"] == "rapace.tracing" && $0.level == .warning }.isEmpty)
            let residentAfter = try await probe.residentKiB()
            let hostAfter = residentKiB()
            print("resident memory: plugin \(residentBefore) → \(residentAfter) KiB, host \(hostBefore) → \(hostAfter) KiB")
            #expect(residentAfter < residentBefore + 64 * 1024, "plugin grew from \(residentBefore) to \(residentAfter) KiB")
            #expect(hostAfter < hostBefore + 128 * 1024, "host grew from \(hostBefore) to \(hostAfter) KiB")
            // The plugin still answers, and forwards again; span ids still agree (a dropped
            // span start consumed no id on either side).
            try await probe.call("log_levels", string: "after-flood")
            #expect(capture.entries { $0.metadata["tag"] == "after-flood" }.count == 7)
            try await probe.call("nested_spans", string: "after-flood")
            let spans = host.spans(plugin: "probe")
            let middle = try #require(spans.last { $0.meta.name == "middle" })
            let inner = try #require(spans.last { $0.meta.name == "inner" })
            #expect(inner.parentID == middle.id)
            #expect(capture.entries { $0.message == "in inner" }.last?.metadata["span_id"] == "\(inner.id)")
        }
    }

    @Test func aCrashMidSpanIsReportedAndTheSpanClosed() async throws {
        try await withProbe { probe, host, capture in
            try await probe.call("open_span", string: "doomed")
            let open = try #require(host.spans(plugin: "probe").first { $0.meta.name == "doomed" })
            #expect(open.state == .open)
            let warning = try #require(capture.entries { $0.message == "about to be abandoned" }.first)
            #expect(warning.metadata["span_id"] == "\(open.id)")
            do throws(RPCError) {
                try await probe.call("crash", string: nil)
                Issue.record("the crash call returned")
            } catch {
                #expect(error.code == .unavailable)
            }
            _ = await waitUntil { host.spans(plugin: "probe").first(where: { $0.meta.name == "doomed" })?.state != .open }
            let closed = try #require(host.spans(plugin: "probe").first { $0.meta.name == "doomed" })
            guard case .abandoned(let reason) = closed.state else {
                Issue.record("span state is \(closed.state)")
                return
            }
            #expect(reason.contains("connection ended"))
            #expect(host.statistics(plugin: "probe").abandonedSpans == 1)
            let report = try #require(capture.entries { $0.message.hasPrefix("span abandoned: doomed") }.first)
            #expect(report.level == .warning)
            #expect(report.metadata["span_id"] == "\(open.id)")
        }
    }
}

extension TracingBridgeTests {
    @Test func aHotRestartAbandonsTheOldConnectionsSpansAndTheNewOneCountsFromOne() async throws {
        try await withProbe { probe, host, capture in
            try await probe.call("open_span", string: "before-restart")
            try await probe.plugin.restart()
            _ = await waitUntil(timeout: .seconds(10)) { host.spans(plugin: "probe").first(where: { $0.meta.name == "before-restart" })?.state != .open }
            let old = try #require(host.spans(plugin: "probe").first { $0.meta.name == "before-restart" })
            #expect(old.connection == 1)
            guard case .abandoned = old.state else {
                Issue.record("the old process's open span is \(old.state)")
                return
            }
            // The new process is a new connection: its first span is id 1 again.
            try await probe.call("nested_spans", string: "after-restart")
            let outer = try #require(host.spans(plugin: "probe").first { $0.meta.name == "outer" })
            #expect(outer.connection == 2)
            #expect(outer.id == 1)
            #expect(capture.entries { $0.message == "in outer" }.first?.metadata["span_id"] == "1")
        }
    }
}

/// `rapace-example-host` as a user runs it: its log shows the plugin's records between its own.
@Suite(.sharesProcess) struct ExampleHostTracingTests {
    @Test func pluginRecordsAppearInterleavedWithTheHostsOwn() async throws {
        let log = try await FinishedProcess.run(productsDirectory + "/rapace-example-host", capturing: .stderr, timeout: .seconds(60)).output
        let lines = log.split(separator: "\n").map(String.init)
        func index(_ text: String) -> Int? { lines.firstIndex { $0.contains(text) } }
        let launching = try #require(index("[RapaceExampleHost] launching the plugin"), "\(log)")
        let started = try #require(index("target=example.plugin [plugin] plugin started"), "\(log)")
        let converting = try #require(index("[RapaceExampleHost] converting a 512×512 image"), "\(log)")
        let converted = try #require(index("[plugin] converted 262144 pixels to grayscale"), "\(log)")
        let answered = try #require(index("[RapaceExampleHost] the plugin answered with 262147 bytes"), "\(log)")
        #expect(launching < started && started < converting && converting < converted && converted < answered)
        #expect(lines[converted].contains("plugin=example-plugin") && lines[converted].contains("span=grayscale"))
    }
}

/// A `TracingHost` serving `plugin` (and `services`) on an in-memory pair after the
/// handshake: a client session and the sink's session, each on its own reactor. However
/// `body` ends (or the handshake fails), both sessions are closed and both reactors shut
/// down afterwards.
func withSinkPair(
    _ host: TracingHost, plugin: String, services: [any RPCService] = [], _ body: (Session, Session) async throws -> Void
) async throws {
    try await withUnstartedSinkPair(host, plugin: plugin, services: services) { client, server in
        try await startTogether(client, server)
        try await body(client, server)
    }
}

/// ``withSinkPair(_:plugin:services:_:)`` before the handshake: `body` starts the sessions
/// (the client is the plugin's side, with `clientConfiguration`).
func withUnstartedSinkPair(
    _ host: TracingHost, plugin: String, services: [any RPCService] = [], clientConfiguration: Session.Configuration = Session.Configuration(),
    _ body: (Session, Session) async throws -> Void
) async throws {
    let serverReactor = try Reactor.start(name: "sink")
    defer { serverReactor.shutdown() }
    let clientReactor = try Reactor.start(name: "plugin")
    defer { clientReactor.shutdown() }
    let (a, b) = InMemoryTransport.makePair(clientReactor, serverReactor)
    let server = try Session(transport: b, role: .initiator, services: [host.service(pluginName: plugin)] + services)
    let client = try Session(transport: a, role: .acceptor, configuration: clientConfiguration)
    do {
        try await body(client, server)
    } catch {
        await client.closeAndWait()
        await server.closeAndWait()
        throw error
    }
    await client.closeAndWait()
    await server.closeAndWait()
}

/// The sink with a hostile or careless peer, in one process.
@Suite(.sharesProcess) struct TracingSinkRobustnessTests {
    @Test func unknownSpansAndLevelsAndMalformedRecordsAreHandled() async throws {
        let capture = LogCapture()
        let host = TracingHost(logger: capture.logger(label: "host"), maxOpenSpans: 2)
        try await withSinkPair(host, plugin: "hostile") { client, server in
            let sink = TracingSinkClient(client)
            // Ids count from 1 per connection; a span beyond the limit is logged, not kept.
            #expect(try await sink.newSpan(SpanMeta(name: "a", target: "t", level: "INFO")) == 1)
            #expect(try await sink.newSpan(SpanMeta(name: "b", target: "t", level: "LOUD")) == 2)
            #expect(try await sink.newSpan(SpanMeta(name: "c", target: "t", level: "INFO")) == 3)
            #expect(host.spans(plugin: "hostile").map(\.meta.name) == ["a", "b"])
            #expect(capture.entries { $0.message == "span opened: b" }.first?.metadata["level"] == "LOUD")
            #expect(capture.entries { $0.message == "span opened: c" }.first?.metadata["untracked"] != nil)
            // Records for spans the host does not know are counted, not fatal.
            try await sink.record(99, [TraceField(name: "x", value: "y")])
            try await sink.dropSpan(99)
            try await sink.exit(42)
            #expect(host.statistics(plugin: "hostile").unknownSpan == 3)
            // A request that does not decode is INVALID_ARGUMENT for that call only.
            do throws(RPCError) {
                _ = try await client.call(TracingSinkMethods.event, request: Payload([3, 0x61]), options: .default)
                Issue.record("a truncated event was accepted")
            } catch {
                #expect(error.code == .invalidArgument)
            }
            try await sink.event(EventMeta(message: "still here", target: "t", level: "INFO", parentSpanID: 1))
            #expect(capture.entries { $0.message == "still here" }.first?.metadata["span"] == "a")
            await client.closeAndWait()
            await server.closed()
            // Spans left open were closed as abandoned when the connection ended.
            #expect(host.spans(plugin: "hostile").count == 2)
            #expect(host.spans(plugin: "hostile").allSatisfy {
                if case .abandoned = $0.state { true } else { false }
            })
        }
    }

    @Test func eventsAreClippedAndClosedSpansKeepTheNewest() async throws {
        let capture = LogCapture()
        let host = TracingHost(logger: capture.logger(label: "host"), closedSpansKept: 3)
        try await withSinkPair(host, plugin: "big") { client, server in
            let sink = TracingSinkClient(client)
            // The host cuts an event's strings as the plugin does, whatever the peer sent.
            let fields = (0..<100).map { TraceField(name: "f\($0)", value: String(repeating: "v", count: 6000)) }
            try await sink.event(EventMeta(message: String(repeating: "m", count: 40_000), target: "t", level: "INFO", fields: fields))
            let entry = try #require(capture.entries { $0.message.hasPrefix("mmm") }.first)
            #expect(entry.message.utf8.count <= PluginTracing.Limits.message)
            #expect(entry.message.hasSuffix("…"))
            #expect(entry.metadata["fields_omitted"] == "36")
            #expect(entry.metadata["f63"].map { $0.utf8.count <= PluginTracing.Limits.value } == true)
            #expect(entry.metadata["f64"] == nil)
            // Ten spans, the first eight closed in order: the newest three closed ones show.
            for index in 1...10 {
                #expect(try await sink.newSpan(SpanMeta(name: "s\(index)", target: "t", level: "INFO")) == UInt64(index))
            }
            for index in 1...8 { try await sink.dropSpan(UInt64(index)) }
            #expect(host.spans(plugin: "big").map(\.id) == [6, 7, 8, 9, 10])
            #expect(host.spans(plugin: "big").prefix(3).allSatisfy { $0.state == .closed })
            await client.closeAndWait()
            await server.closed()
            // The two left open are archived as abandoned, and still only three show.
            #expect(await waitUntil { host.statistics(plugin: "big").abandonedSpans == 2 })
            let spans = host.spans(plugin: "big")
            #expect(spans.map(\.id) == [8, 9, 10])
            #expect(spans.map { $0.state == .closed } == [true, false, false])
        }
    }
}

// MARK: Support

/// A launched `rapace-tracing-probe` and calls to its `TracingProbe` service.
struct Probe {
    let plugin: PluginProcess

    func call(_ method: String, string: String?) async throws(RPCError) {
        let request = string.map { text in Payload.encoding { $0.writeString(text) } } ?? .empty
        _ = try await plugin.call(MethodDescriptor(service: "TracingProbe", method: method, kind: .unary), request: request, options: .default)
    }

    func flood(_ count: UInt32) async throws -> UInt64 {
        let reply = try await plugin.call(
            MethodDescriptor(service: "TracingProbe", method: "flood", kind: .unary), request: .encoding { $0.writeVarint(UInt64(count)) },
            options: CallOptions(timeout: .seconds(120)))
        return try reply.decode { try $0.readVarint64() }
    }

    func residentKiB() async throws -> UInt64 {
        let reply = try await plugin.call(MethodDescriptor(service: "TracingProbe", method: "resident_kib", kind: .unary), request: .empty, options: .default)
        return try reply.decode { try $0.readVarint64() }
    }

    func flushStatistics() async throws -> (forwarded: UInt64, dropped: UInt64, peakQueued: UInt64) {
        let reply = try await plugin.call(MethodDescriptor(service: "TracingProbe", method: "flush", kind: .unary), request: .empty, options: .default)
        return try reply.decode { (try $0.readVarint64(), try $0.readVarint64(), try $0.readVarint64()) }
    }
}

/// Launches the probe with a ``TracingHost`` logging into a capture, runs `body`, then
/// stops the probe and checks nothing was left behind.
func withProbe(arguments: [String] = [], _ body: (Probe, TracingHost, LogCapture) async throws -> Void) async throws {
    // The flood's records are only counted.
    let capture = LogCapture(countOnly: { $0.message == "flood" })
    let host = TracingHost(logger: capture.logger(label: "host"))
    try await withLeakCheckedReactor("tracing-test", checkDescriptors: false) { reactor in
        let plugin = try await PluginProcess.launch(
            PluginConfiguration(
                name: "probe", executable: productsDirectory + "/rapace-tracing-probe", arguments: arguments,
                services: [host.service(pluginName: "probe")], logger: Logger(label: "probe-process")),
            reactor: reactor)
        let pid = await plugin.currentPID()
        do {
            try await body(Probe(plugin: plugin), host, capture)
        } catch {
            await plugin.stop()
            throw error
        }
        await plugin.stop()
        return pid.map { [$0] } ?? []
    }
}
