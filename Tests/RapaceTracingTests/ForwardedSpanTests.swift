import Logging
import Rapace
import RapaceTestSupport
@testable import RapaceTracing
import Testing
import Tracing

/// The `Span` API of ``ForwardedSpan`` end to end: a plugin-side ``PluginTracing`` attached to
/// an in-memory session whose peer serves a ``TracingHost``; each test reads what the host
/// kept (``TracingHost/spans(plugin:)``) and logged (a ``LogCapture``).
///
/// Spans started here have the target `RapaceTracingTests` (the module of this file); a span
/// started with `file: "Hidden/…"` has the target `Hidden`, which filters can reject alone.
@Suite(.sharesProcess) struct ForwardedSpanTests {
    @Test func attributesAndRenamesAreRecordedAsFields() async throws {
        try await withTracedPlugin("fields") { plugin in
            let span = plugin.tracer.startSpan("decode", context: .topLevel)
            span.attributes["bytes"] = 512
            span.attributes["format"] = "png"
            span.attributes["format"] = "png"  // unchanged: not recorded again
            // Set at once: only what changed, sorted by name; a removed one is not reported.
            span.attributes = ["bytes": 1024, "alpha": true]
            span.operationName = "decode png"
            span.operationName = "decode png"  // unchanged: not recorded again
            #expect(span.operationName == "decode png")
            try await plugin.settle()
            let snapshot = try plugin.snapshot(of: span)
            #expect(snapshot.meta.name == "decode")
            #expect(snapshot.meta.target == "RapaceTracingTests")
            #expect(snapshot.recorded == [
                TraceField(name: "bytes", value: "512"), TraceField(name: "format", value: "png"),
                TraceField(name: "alpha", value: "true"), TraceField(name: "bytes", value: "1024"),
                TraceField(name: "otel.name", value: "decode png"),
            ])
            span.end()
        }
    }

    @Test func setStatusRecordsTheCodeAndTheMessage() async throws {
        try await withTracedPlugin("status") { plugin in
            let span = plugin.tracer.startSpan("upload", context: .topLevel)
            span.setStatus(SpanStatus(code: .ok))
            span.setStatus(SpanStatus(code: .error, message: "disk full"))
            try await plugin.settle()
            #expect(try plugin.snapshot(of: span).recorded == [
                TraceField(name: "otel.status_code", value: "OK"),
                TraceField(name: "otel.status_code", value: "ERROR"), TraceField(name: "otel.status_message", value: "disk full"),
            ])
            span.end()
        }
    }

    @Test func recordErrorSendsAnErrorEventWithTheErrorsType() async throws {
        try await withTracedPlugin("error") { plugin in
            let span = plugin.tracer.startSpan("parse", context: .topLevel)
            span.recordError(ParseFailure(reason: "bad header"), attributes: ["offset": 12])
            try await plugin.settle()
            // With the span as parent.
            let events = plugin.events(of: span)
            #expect(events.count == 1)
            let event = try #require(events.first)
            #expect(event.message == "parse failure: bad header")
            #expect(event.level == .error)
            #expect(event.metadata["error.type"] == "ParseFailure")
            #expect(event.metadata["offset"] == "12")
            #expect(event.metadata["target"] == "RapaceTracingTests")
            span.end()
        }
    }

    @Test func addEventSendsAnInfoEventWithItsAttributes() async throws {
        try await withTracedPlugin("event") { plugin in
            let span = plugin.tracer.startSpan("lookup", context: .topLevel)
            span.addEvent(SpanEvent(name: "cache miss", attributes: ["key": "k7", "size": 3]))
            try await plugin.settle()
            // With the span as parent.
            let events = plugin.events(of: span)
            #expect(events.count == 1)
            let event = try #require(events.first)
            #expect(event.message == "cache miss")
            #expect(event.level == .info)
            #expect(event.metadata["key"] == "k7")
            #expect(event.metadata["size"] == "3")
            span.end()
        }
    }

    @Test func isRecordingWhileForwardedAndOpen() async throws {
        try await withTracedPlugin("recording", filter: "trace,Hidden=warn") { plugin in
            let forwarded = plugin.tracer.startSpan("forwarded", context: .topLevel)
            #expect(forwarded.isRecording)
            #expect(forwarded.id != nil)
            // Spans are INFO: the filter keeps this one from the host.
            let hidden = plugin.tracer.startSpan("hidden", context: .topLevel, file: "Hidden/Work.swift")
            #expect(!hidden.isRecording)
            #expect(hidden.id == nil)
            forwarded.end()
            #expect(!forwarded.isRecording)
            hidden.end()
            #expect(!hidden.isRecording)
        }
    }
}

// MARK: Links

extension ForwardedSpanTests {
    @Test func aLinkToAForwardedSpanNamesItsID() async throws {
        try await withTracedPlugin("link") { plugin in
            let first = plugin.tracer.startSpan("first", context: .topLevel)
            let second = plugin.tracer.startSpan("second", context: .topLevel)
            let linking = plugin.tracer.startSpan("linking", context: .topLevel)
            linking.addLink(second)
            linking.addLink(SpanLink(context: first.context, attributes: ["why": "retry"]))
            // A context without a span of this tracer names nothing.
            linking.addLink(SpanLink(context: .topLevel, attributes: [:]))
            try await plugin.settle()
            let (firstID, secondID) = (try #require(first.id), try #require(second.id))
            #expect(try plugin.snapshot(of: linking).recorded == [
                TraceField(name: "link", value: "\(secondID)"), TraceField(name: "link", value: "\(firstID)"),
            ])
            for span in [first, second, linking] { span.end() }
        }
    }

    /// The linked span's nearest forwarded ancestor is forwarded: its id must not stand in
    /// for the linked span's.
    @Test func aLinkToASpanTheFilterKeptFromTheHostIsDropped() async throws {
        try await withTracedPlugin("filtered-link", filter: "trace,Hidden=warn") { plugin in
            let parent = plugin.tracer.startSpan("parent", context: .topLevel)
            let hidden = plugin.tracer.startSpan("hidden", context: parent.context, file: "Hidden/Work.swift")
            #expect(hidden.id == nil)
            let (linking, recorded) = try await plugin.linkingSpan(to: hidden)
            let parentID = try #require(parent.id)
            #expect(recorded.isEmpty, "the link was sent naming span \(parentID), the linked span's parent: \(recorded)")
            for span in [hidden, linking, parent] { span.end() }
        }
    }

    /// As above, for a span whose `new_span` did not fit in the buffer.
    @Test func aLinkToASpanDroppedForAFullBufferIsDropped() async throws {
        let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace), bufferCapacity: 2))
        // Before the session is attached the records wait in the buffer: the third does not fit.
        let parent = tracing.tracer.startSpan("parent", context: .topLevel)
        Logger(label: "filler") { tracing.makeLogHandler(label: $0) }.info("filler")
        let dropped = tracing.tracer.startSpan("dropped", context: parent.context)
        #expect(dropped.id == nil)
        #expect(!dropped.isRecording)
        #expect(tracing.statistics.dropped == 1)
        try await withTracedPlugin("full-link", tracing: tracing) { plugin in
            let (linking, recorded) = try await plugin.linkingSpan(to: dropped)
            let parentID = try #require(parent.id)
            #expect(recorded.isEmpty, "the link was sent naming span \(parentID), the linked span's parent: \(recorded)")
            for span in [dropped, linking, parent] { span.end() }
        }
    }

    /// After a reconnect ids count from 1 again: the id of a span of the first connection
    /// names another span on the second (here the linking span itself).
    @Test func aLinkToASpanOfAnEarlierConnectionIsDropped() async throws {
        let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace)))
        try await withTracedPlugin("before-reconnect", tracing: tracing) { first in
            let earlier = first.tracer.startSpan("earlier", context: .topLevel)
            #expect(earlier.id == 1)
            try await withTracedPlugin("after-reconnect", tracing: tracing) { second in
                let (linking, recorded) = try await second.linkingSpan(to: earlier)
                #expect(linking.id == 1)
                #expect(recorded.isEmpty, "a link to a span of the earlier connection was sent: \(recorded)")
                linking.end()
            }
            earlier.end()
        }
    }

    /// Another forwarder numbers its own spans: its span's id names one of this forwarder's.
    @Test func aLinkToASpanOfAnotherForwarderIsDropped() async throws {
        let other = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace)))
        let foreign = other.tracer.startSpan("foreign", context: .topLevel)
        #expect(foreign.id == 1)
        try await withTracedPlugin("foreign-link") { plugin in
            let mine = plugin.tracer.startSpan("mine", context: .topLevel)
            #expect(mine.id == 1)
            let (linking, recorded) = try await plugin.linkingSpan(to: foreign)
            #expect(recorded.isEmpty, "a link to another forwarder's span was sent: \(recorded)")
            for span in [mine, linking] { span.end() }
        }
        foreign.end()
    }
}

// MARK: After end()

extension ForwardedSpanTests {
    @Test func anEndedSpanIsImmutableAndEndsOnce() async throws {
        try await withTracedPlugin("ended") { plugin in
            let other = plugin.tracer.startSpan("other", context: .topLevel)
            let span = plugin.tracer.startSpan("work", context: .topLevel)
            span.attributes["before"] = 1
            span.end()
            #expect(!span.isRecording)
            span.operationName = "renamed"
            span.attributes["after"] = 2
            span.setStatus(SpanStatus(code: .error, message: "late"))
            span.addLink(other)
            span.addEvent(SpanEvent(name: "late event", attributes: ["n": 1]))
            span.recordError(ParseFailure(reason: "late"))
            span.end()
            other.end()
            try await plugin.settle()
            let id = try #require(span.id)
            let snapshot = try plugin.snapshot(of: span)
            #expect(snapshot.state == .closed)
            #expect(snapshot.recorded == [TraceField(name: "before", value: "1")])
            // The span keeps what it had when it ended.
            #expect(span.operationName == "work")
            #expect(span.attributes.get("after") == nil)
            // The host logs a `record` for a span it no longer knows as `span #ID (unknown)
            // recorded …`, with the fields as metadata.
            let lateRecords = plugin.capture.entries { $0.metadata["span_id"] == "\(id)" && $0.message.hasPrefix("span #\(id) (unknown)") }
            #expect(!lateRecords.contains { $0.metadata["otel.name"] != nil }, "the rename after end() was sent")
            #expect(!lateRecords.contains { $0.metadata["after"] != nil }, "an attribute set after end() was sent")
            #expect(!lateRecords.contains { $0.metadata["otel.status_code"] != nil }, "the status set after end() was sent")
            #expect(!lateRecords.contains { $0.metadata["link"] != nil }, "a link added after end() was sent")
            #expect(plugin.capture.entries { $0.message == "late event" }.isEmpty, "an event added after end() was sent")
            #expect(plugin.capture.entries { $0.message == "parse failure: late" }.isEmpty, "an error recorded after end() was sent")
            #expect(plugin.capture.entries { $0.message == "span closed: work" }.count == 1)
            #expect(plugin.capture.entries { $0.message == "close of an unknown span" }.isEmpty, "the second end() sent drop_span again")
            // Anything naming the span after its drop_span would count here.
            #expect(plugin.host.statistics(plugin: plugin.name).unknownSpan == 0)
        }
    }

    /// A span the filter kept from the host sends its events with its nearest forwarded
    /// ancestor as parent, until it ends.
    @Test func anEndedSpanTheFilterKeptFromTheHostSendsNoMoreEvents() async throws {
        try await withTracedPlugin("ended-hidden", filter: "trace,Hidden=warn") { plugin in
            let parent = plugin.tracer.startSpan("parent", context: .topLevel)
            let hidden = plugin.tracer.startSpan("hidden", context: parent.context, file: "Hidden/Work.swift")
            // Spans are INFO, which the filter rejects for `Hidden`; errors pass.
            hidden.recordError(ParseFailure(reason: "while open"))
            hidden.end()
            hidden.recordError(ParseFailure(reason: "after end"))
            try await plugin.settle()
            #expect(plugin.events(of: parent).map(\.message) == ["parse failure: while open"])
            #expect(plugin.capture.entries { $0.message == "parse failure: after end" }.isEmpty, "an error recorded after end() was sent")
            parent.end()
        }
    }
}

// MARK: Support

/// An error with a description of its own: the message of the event `recordError` sends.
private struct ParseFailure: Error, CustomStringConvertible {
    let reason: String
    var description: String { "parse failure: \(reason)" }
}

/// A plugin's forwarder attached to a session whose peer serves ``host`` as plugin `name`.
private struct TracedPlugin {
    let name: String
    let tracing: PluginTracing
    let host: TracingHost
    let capture: LogCapture

    var tracer: ForwardingTracer { tracing.tracer }

    /// Waits (bounded) until the host has handled every record the plugin produced before
    /// the call: a log record sent after them arrives after them (one ordered connection,
    /// handled in arrival order), so once the host logged it, what was not there was not sent.
    func settle() async throws {
        let marker = "settled \(UInt64.random(in: 0...UInt64.max))"
        Logger(label: "settle") { tracing.makeLogHandler(label: $0) }.info("\(marker)")
        let arrived = await waitUntil(timeout: .seconds(10)) { !capture.entries { $0.message == marker }.isEmpty }
        try #require(arrived, "the host did not receive the plugin's records within 10 s")
    }

    /// Starts a top-level span `linking`, links it to `linked` and waits for the host
    /// (``settle()``): the span, for the caller to end, and the fields the host recorded on it.
    func linkingSpan(to linked: ForwardedSpan) async throws -> (span: ForwardedSpan, recorded: [TraceField]) {
        let linking = tracer.startSpan("linking", context: .topLevel)
        linking.addLink(linked)
        try await settle()
        return (linking, try snapshot(of: linking).recorded)
    }

    /// What the host keeps of `span` (which must have been forwarded).
    func snapshot(of span: ForwardedSpan) throws -> TracingHost.SpanSnapshot {
        let id = try #require(span.id, "the span was not forwarded")
        return try #require(host.spans(plugin: name).first { $0.id == id }, "the host has no span \(id)")
    }

    /// The events (log records, span events, recorded errors) the host logged with `span`
    /// as their parent, in order: records with its `span_id` other than the host's own
    /// `span …` lines (opened, recorded, entered, exited, closed).
    func events(of span: ForwardedSpan) -> [LogCapture.Entry] {
        guard let id = span.id else { return [] }
        return capture.entries { $0.metadata["span_id"] == "\(id)" && !$0.message.hasPrefix("span ") }
    }
}

/// `body` with a ``TracedPlugin`` named `name`: `tracing` (by default one forwarding at every
/// level, else with `filter` parsed) attached to a fresh in-memory session with a
/// ``TracingHost`` (``withSinkPair(_:plugin:services:_:)``), which is closed afterwards.
private func withTracedPlugin(
    _ name: String, filter: String? = nil, tracing: PluginTracing? = nil, _ body: (TracedPlugin) async throws -> Void
) async throws {
    let capture = LogCapture()
    let host = TracingHost(logger: capture.logger(label: "host"))
    let tracing = try tracing ?? PluginTracing(PluginTracing.Configuration(filter: TracingFilter(parsing: filter ?? "trace")))
    try await withSinkPair(host, plugin: name) { client, _ in
        tracing.attach(to: client)
        // Off the loop attach(to:) hands its work to the loop: let it run.
        await onLoop(client.reactor) {}
        try await body(TracedPlugin(name: name, tracing: tracing, host: host, capture: capture))
    }
}
