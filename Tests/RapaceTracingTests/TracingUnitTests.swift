import Dispatch
import Logging
import Rapace
import RapaceTestSupport
import Synchronization
@testable import RapaceTracing
import Testing
import Tracing

@Suite(.sharesProcess) struct TracingFilterTests {
    @Test func bareLevelAndTargetsWithTheMostSpecificWinning() throws {
        let filter = try TracingFilter(parsing: "warn, image=debug, image.codec=trace,noisy=off")
        #expect(filter.allows(.warn, target: "other"))
        #expect(!filter.allows(.info, target: "other"))
        #expect(filter.allows(.debug, target: "image"))
        #expect(filter.allows(.debug, target: "image.resize"))
        #expect(filter.allows(.debug, target: "image::png"))
        #expect(!filter.allows(.trace, target: "image.resize"))
        #expect(filter.allows(.trace, target: "image.codec"))
        #expect(filter.allows(.trace, target: "image.codec.png"))
        // A prefix only counts at a boundary.
        #expect(!filter.allows(.debug, target: "imagery"))
        #expect(!filter.allows(.error, target: "noisy"))
        #expect(!filter.allows(.error, target: "noisy/sub"))
        #expect(filter.lowestLevel == .trace)
    }

    @Test func defaultsAndShorthands() throws {
        // No bare level: unnamed targets pass errors only; a bare target means trace.
        let filter = try TracingFilter(parsing: "probe")
        #expect(filter.allows(.trace, target: "probe"))
        #expect(filter.allows(.error, target: "other"))
        #expect(!filter.allows(.warn, target: "other"))
        #expect(try TracingFilter(parsing: "OFF").lowestLevel == nil)
        #expect(try TracingFilter(parsing: "Warning").allows(.warn, target: "x"))
        #expect(try TracingFilter(parsing: "").level(for: "x") == .error)
        #expect(TracingFilter(level: .debug).allows(.debug, target: "anything"))
    }

    @Test func errorsNameTheDirective() {
        #expect(throws: TracingFilterError.self) { try TracingFilter(parsing: "image=loud") }
        do {
            _ = try TracingFilter(parsing: "info,image=loud")
            Issue.record("a bad level parsed")
        } catch {
            #expect(error.description.contains("\"loud\" in \"image=loud\" is not a level"), "\(error)")
        }
        for bad in ["info,,debug", "=info", "a=b=c", "info,debug", "my target=info", "x[span]=info"] {
            #expect(throws: TracingFilterError.self, "\(bad)") { try TracingFilter(parsing: bad) }
        }
    }
}

@Suite(.sharesProcess) struct TracingWireTests {
    @Test func methodIDsAreTheVectors() {
        // From ../shared/spec/vectors.json.
        let expected: [(MethodDescriptor, UInt32)] = [
            (TracingSinkMethods.newSpan, 0xEF20_01DF), (TracingSinkMethods.record, 0x0157_5B2E),
            (TracingSinkMethods.event, 0xBECB_2012), (TracingSinkMethods.enter, 0x14EA_4DB2),
            (TracingSinkMethods.exit, 0xC174_32A6), (TracingSinkMethods.dropSpan, 0x5293_3DA1),
            (TracingConfigMethods.setFilter, 0xB806_4DED),
        ]
        for (method, id) in expected {
            #expect(method.id == id, "\(method.fullName)")
            #expect(MethodID.compute(method.fullName) == id, "\(method.fullName)")
        }
    }

    @Test func handWrittenEncodingIsThePostcardOfTheStructs() throws {
        let span = SpanMeta(name: "decode", target: "image", level: "DEBUG", file: "Image/Decode.swift", line: 42, fields: [TraceField(name: "w", value: "640")])
        let bare = SpanMeta(name: "x", target: "t", level: "INFO")
        let event = EventMeta(message: "héllo", target: "probe", level: "WARN", file: nil, line: 7, fields: [], parentSpanID: 300)
        for meta in [span, bare] {
            let bytes = TracingSinkRequest.newSpan(meta).bytes
            #expect(bytes == (try Payload.encoding(meta).bytes))
            #expect(try Payload(bytes).decode { try $0.readSpanMeta() } == meta)
        }
        let bytes = TracingSinkRequest.event(event).bytes
        #expect(bytes == (try Payload.encoding(event).bytes))
        #expect(try Payload(bytes).decode { try $0.readEventMeta() } == event)
        // SpanMeta by the spec: name, target, level strings; None file; Some(7) line; one field.
        let golden = SpanMeta(name: "decode", target: "img", level: "INFO", line: 7, fields: [TraceField(name: "w", value: "640")])
        #expect(TracingSinkRequest.newSpan(golden).bytes == [
            6, 0x64, 0x65, 0x63, 0x6F, 0x64, 0x65, 3, 0x69, 0x6D, 0x67, 4, 0x49, 0x4E, 0x46, 0x4F, 0, 1, 7, 1, 1, 0x77, 3, 0x36, 0x34, 0x30,
        ])
        let fields = [TraceField(name: "a", value: "1"), TraceField(name: "", value: "")]
        #expect(TracingSinkRequest.record(9, fields).bytes == [9, 2, 1, 0x61, 1, 0x31, 0, 0])
        // The exact bytes of a small event: strings, None file, Some(7) line, no fields, Some(300) parent.
        #expect(try Payload.encoding(EventMeta(message: "m", target: "t", level: "INFO", line: 7, parentSpanID: 300)).bytes
            == [1, 0x6D, 1, 0x74, 4, 0x49, 0x4E, 0x46, 0x4F, 0, 1, 7, 0, 1, 0xAC, 0x02])
    }
}

extension TracingWireTests {
    @Test func aFieldCountBeyondTheBytesLeftIsRejectedBeforeAllocating() throws {
        // SpanMeta "x", "t", "I", no file, no line, then the field count.
        let head: [UInt8] = [1, 0x78, 1, 0x74, 1, 0x49, 0, 0]
        // 2^40 fields in two bytes: refused by the count check, not by running out.
        do {
            _ = try Payload(head + [0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0, 0]).decode { try $0.readSpanMeta() }
            Issue.record("a field count of 2^40 was accepted")
        } catch let error as PostcardError {
            #expect(error.code == .lengthTooLarge, "\(error)")
        }
        // Each field takes two bytes at least: two fields in three bytes are refused too,
        // one field of two empty strings in two is read.
        do {
            _ = try Payload(head + [2, 0, 0, 0]).decode { try $0.readSpanMeta() }
            Issue.record("two fields in three bytes were accepted")
        } catch let error as PostcardError {
            #expect(error.code == .lengthTooLarge, "\(error)")
        }
        let meta = try Payload(head + [1, 0, 0]).decode { try $0.readSpanMeta() }
        #expect(meta.fields == [TraceField(name: "", value: "")])
    }
}

@Suite(.sharesProcess) struct TracingLimitTests {
    @Test func longStringsAreCutAtACharacterBoundaryAndMarked() {
        let text = String(repeating: "é", count: 20)  // 40 UTF-8 bytes
        let cut = PluginTracing.clip(text, 10)
        #expect(cut.utf8.count <= 10)
        #expect(cut == "ééé…")
        #expect(PluginTracing.clip("short", 10) == "short")
        let many = (0..<100).map { TraceField(name: "f\($0)", value: String(repeating: "x", count: 5000)) }
        let clipped = PluginTracing.clipped(many)
        #expect(clipped.count == PluginTracing.Limits.fields + 1)
        #expect(clipped.last == TraceField(name: "fields_omitted", value: "36"))
        #expect(clipped.dropLast().allSatisfy { $0.value.utf8.count <= PluginTracing.Limits.value })
    }

    /// `EventMeta.fields` are sorted by name, also once clipped: names after
    /// `fields_omitted`, and a long name whose cut ends in "…" (which sorts after "y").
    @Test func clippedEventFieldsStaySorted() {
        let long = "g" + String(repeating: "x", count: PluginTracing.Limits.name + 40)
        let cutNeighbour = "g" + String(repeating: "x", count: PluginTracing.Limits.name - 4) + "y"
        let names = [long, cutNeighbour] + (0..<70).map { "m\($0 < 10 ? "0" : "")\($0)" }
        #expect(names == names.sorted(), "the input is sorted")
        let event = EventMeta(message: "m", target: "t", level: TraceLevel.info.rawValue, fields: names.map { TraceField(name: $0, value: "v") })
        let clipped = PluginTracing.clipped(event).fields
        #expect(clipped.map(\.name) == clipped.map(\.name).sorted(), "\(clipped.map { String($0.name.suffix(4)) })")
        #expect(clipped.count == PluginTracing.Limits.fields + 1)
        #expect(clipped.contains(TraceField(name: "fields_omitted", value: "8")))
        #expect(clipped.contains { $0.name.hasSuffix("…") && $0.name.utf8.count <= PluginTracing.Limits.name })
    }

    @Test func theForwardersLockFreeCheckAgreesWithTheFilter() throws {
        let tracing = PluginTracing()
        let targets = ["other", "image", "image.codec", "imagery", "noisy.sub"]
        for text in ["trace", "info", "warn", "error", "off", "warn,image=debug", "off,image.codec=trace", "debug,noisy=off", "image"] {
            let filter = try TracingFilter(parsing: text)
            tracing.setFilter(filter)
            let summary = tracing.filterSummary
            #expect(summary == PluginTracing.FilterSummary(filter), "\(text)")
            #expect(summary.levelDecidesAlone == (filter.directives.isEmpty && filter.defaultLevel != nil), "\(text)")
            #expect(summary.lowestLevel == filter.lowestLevel?.loggerLevel, "\(text)")
            for level in TraceLevel.allCases {
                for target in targets {
                    #expect(tracing.allows(level, target: target) == filter.allows(level, target: target), "\(text) \(level) \(target)")
                }
            }
            // What a logger reports follows the filter, and what it forwards is what the filter passes.
            let handler = tracing.makeLogHandler(label: "image.codec")
            #expect(handler.logLevel == filter.lowestLevel?.loggerLevel ?? .critical, "\(text)")
        }
    }

    @Test func flushWithoutASessionReturnsAtOnce() async throws {
        let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace), bufferCapacity: 4))
        let logger = Logger(label: "alone") { tracing.makeLogHandler(label: $0) }
        for index in 0..<10 { logger.info("record \(index)") }
        try await withTimeout(.seconds(10), "flush") { await tracing.flush() }
        let statistics = tracing.statistics
        #expect(statistics.queued == 4)
        #expect(statistics.peakQueued == 4)
        #expect(statistics.dropped == 6)
        #expect(statistics.forwarded == 0)
    }
}

/// The forwarder on an in-memory session with a `TracingHost`.
@Suite(.sharesProcess) struct PluginTracingSessionTests {
    @Test func flushReturnsWhenTheHostRefusesRecordsAfterGoAway() async throws {
        let host = TracingHost(logger: LogCapture().logger(label: "host"))
        let blocker = Blocker()
        try await withSinkPair(host, plugin: "leaving", services: [blocker]) { client, server in
            let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace)))
            tracing.attach(to: client)
            // Off the loop, attach(to:) hands its work to the loop: let it run first.
            await onLoop(client.reactor) {}
            let logger = Logger(label: "leaving") { tracing.makeLogHandler(label: $0) }
            logger.info("before GoAway")
            try await withTimeout(.seconds(10), "flush") { await tracing.flush() }
            #expect(tracing.statistics.forwarded == 1)
            // A call in flight keeps both sessions open after the host's GoAway.
            let inFlight = Task { try? await client.call(Blocker.wait, request: .empty, options: .default) }
            #expect(await waitUntil { blocker.started.load(ordering: .acquiring) })
            server.reactor.execute { server.shutdownGracefully(grace: .seconds(60), reason: .shutdown, message: "host leaving") }
            // Once the GoAway arrived, a new call is refused before it is sent.
            let unknown = MethodDescriptor(service: "Nope", method: "nothing", kind: .unary)
            #expect(await waitUntil {
                do throws(RPCError) {
                    _ = try await client.call(unknown, request: .empty, options: .default)
                    return false
                } catch {
                    return error.code == .unavailable
                }
            })
            // The loop is held while a record is logged and flush() starts waiting, so the
            // drain that sends the record (and is refused) runs with the waiter in place.
            let release = DispatchSemaphore(value: 0)
            defer { release.signal() }  // however the test ends, the loop is not left held
            client.reactor.execute { release.wait() }
            logger.info("after GoAway")
            let flushed = Atomic<Bool>(false)
            Task {
                await tracing.flush()
                flushed.store(true, ordering: .releasing)
            }
            #expect(await waitUntil { tracing.state.withLock { !$0.flushWaiters.isEmpty } })
            release.signal()
            #expect(await waitUntil { flushed.load(ordering: .acquiring) }, "flush() still waits after the session refused the record")
            let statistics = tracing.statistics
            #expect(statistics.forwarded == 1)
            #expect(statistics.dropped == 1)
            #expect(statistics.queued == 0)
            inFlight.cancel()
            await client.closeAndWait()
            await server.closed()
        }
    }
}

extension PluginTracingSessionTests {
    /// Unstarted sessions of a plugin named `plugin` with a ``TracingHost``
    /// (``withUnstartedSinkPair(_:plugin:services:clientConfiguration:_:)``), and tracing at
    /// every level, not attached yet: `body` gets the plugin's and the host's sessions, the
    /// tracing, a logger through it labelled `plugin`, and the capture of the host's log.
    private func withUnstartedTracedPair(
        plugin: String, clientConfiguration: Session.Configuration = Session.Configuration(),
        _ body: (Session, Session, PluginTracing, Logger, LogCapture) async throws -> Void
    ) async throws {
        let capture = LogCapture()
        let host = TracingHost(logger: capture.logger(label: "host"))
        try await withUnstartedSinkPair(host, plugin: plugin, clientConfiguration: clientConfiguration) { client, server in
            let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace)))
            let logger = Logger(label: plugin) { tracing.makeLogHandler(label: $0) }
            try await body(client, server, tracing, logger, capture)
        }
    }

    /// The plugin's side in the tests that start it well before the host: its handshake
    /// waits while the test checks what happens meanwhile, each check a hop through the
    /// cooperative threads, which the tests beginning together at the start of a loaded run
    /// can keep busy for longer than the default 5 s handshake timeout.
    static let patientClient = Session.Configuration(handshakeTimeout: .seconds(60))

    /// What `PluginRuntime.serve(_:tracing:)` does: attach before the handshake starts; the
    /// records go out once it is done, with no second attach. Nothing is handed to the
    /// session in between (it would only queue it), so flush() waits for the handshake.
    @Test func recordsLoggedBeforeTheHandshakeWaitForItThenArriveInOrder() async throws {
        try await withUnstartedTracedPair(plugin: "early", clientConfiguration: Self.patientClient) { client, server, tracing, logger, capture in
            logger.info("before attach")
            await onLoop(client.reactor) {
                tracing.attach(to: client)
                client.start { _ in }
            }
            logger.info("during the handshake")
            let flushed = Atomic<Bool>(false)
            Task {
                try await withTimeout(.seconds(30), "flush") { await tracing.flush() }
                flushed.store(true, ordering: .releasing)
            }
            #expect(await waitUntil(timeout: .seconds(30)) { tracing.state.withLock { !$0.flushWaiters.isEmpty } }, "flush() returned before the handshake")
            // A drain the records or flush() asked for has run by now: still nothing sent.
            #expect(await onLoop(client.reactor) { client.phase } == .handshaking)
            let returnedEarly = flushed.load(ordering: .acquiring)
            #expect(!returnedEarly, "flush() returned before the handshake")
            var statistics = tracing.statistics
            #expect(statistics.forwarded == 0)
            #expect(statistics.queued == 2)
            // The host answers: the end of the handshake sends.
            try await server.start()
            try await client.start()
            #expect(await waitUntil(timeout: .seconds(30)) { flushed.load(ordering: .acquiring) }, "flush() still waits after the handshake")
            statistics = tracing.statistics
            #expect(statistics.forwarded == 2)
            #expect(statistics.dropped == 0)
            #expect(statistics.queued == 0)
            #expect(await waitUntil(timeout: .seconds(30)) { capture.entries { $0.metadata["plugin"] == "early" }.count == 2 })
            #expect(capture.entries { $0.metadata["plugin"] == "early" }.map(\.message) == ["before attach", "during the handshake"])
        }
    }

    /// Attached while its handshake runs, a session gets the records once it is ready,
    /// without a second attach.
    @Test func attachedDuringTheHandshakeTheRecordsGoOutOnceItIsReady() async throws {
        try await withUnstartedTracedPair(plugin: "midway", clientConfiguration: Self.patientClient) { client, server, tracing, logger, capture in
            await onLoop(client.reactor) { client.start { _ in } }
            tracing.attach(to: client)
            logger.info("while shaking hands")
            await onLoop(client.reactor) {}
            #expect(tracing.statistics.forwarded == 0)
            #expect(tracing.statistics.queued == 1)
            try await server.start()
            #expect(await waitUntil(timeout: .seconds(30)) { capture.entries { $0.metadata["plugin"] == "midway" }.map(\.message) == ["while shaking hands"] })
            #expect(tracing.statistics.forwarded == 1)
            // From then on records go out as they come.
            logger.info("after")
            try await withTimeout(.seconds(30), "flush") { await tracing.flush() }
            #expect(tracing.statistics.forwarded == 2)
            #expect(await waitUntil(timeout: .seconds(30)) { capture.entries { $0.metadata["plugin"] == "midway" }.count == 2 })
        }
    }

    /// Attached to a second session (a plugin that reconnects) before a drain scheduled for
    /// the first one runs: that drain sends nothing on the second, not ready yet, and leaves
    /// the record to the end of its handshake, which sends it there.
    @Test func aDrainScheduledForThePreviousSessionLeavesTheRecordsToTheNextHandshake() async throws {
        let capture = LogCapture()
        let firstHost = TracingHost(logger: LogCapture().logger(label: "first-host"))
        let secondHost = TracingHost(logger: capture.logger(label: "second-host"))
        let serverReactor = try Reactor.start(name: "sink")
        defer { serverReactor.shutdown() }
        let clientReactor = try Reactor.start(name: "plugin")
        defer { clientReactor.shutdown() }
        let (firstPlugin, firstSink) = InMemoryTransport.makePair(clientReactor, serverReactor)
        let (secondPlugin, secondSink) = InMemoryTransport.makePair(clientReactor, serverReactor)
        let firstServer = try Session(transport: firstSink, role: .initiator, services: [firstHost.service(pluginName: "again")])
        let first = try Session(transport: firstPlugin, role: .acceptor)
        let secondServer = try Session(transport: secondSink, role: .initiator, services: [secondHost.service(pluginName: "again")])
        let second = try Session(transport: secondPlugin, role: .acceptor)
        try await startTogether(first, firstServer)
        let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace)))
        let logger = Logger(label: "again") { tracing.makeLogHandler(label: $0) }
        await onLoop(clientReactor) { tracing.attach(to: first) }
        // One turn of the loop: the record schedules a drain for `first` (ready), and the
        // attach to `second` runs before that drain does.
        await onLoop(clientReactor) {
            logger.info("across the attach")
            tracing.attach(to: second)
        }
        await onLoop(clientReactor) {}
        #expect(tracing.statistics.forwarded == 0)
        #expect(tracing.statistics.queued == 1)
        #expect(!tracing.state.withLock { $0.drainScheduled }, "the drain left one scheduled: the handshake's end would not send")
        try await startTogether(second, secondServer)
        #expect(await waitUntil { capture.entries { $0.metadata["plugin"] == "again" }.map(\.message) == ["across the attach"] })
        #expect(tracing.statistics.forwarded == 1)
        for session in [first, firstServer, second, secondServer] { await session.closeAndWait() }
    }

    /// A handshake that fails sends nothing: the records buffered for it count as dropped,
    /// not forwarded, and flush() returns.
    @Test func aFailedHandshakeCountsTheBufferedRecordsAsDropped() async throws {
        let quiet = Session.Configuration(handshakeTimeout: .milliseconds(100), logger: Logger(label: "quiet") { _ in SwiftLogNoOpLogHandler() })
        try await withUnstartedTracedPair(plugin: "failed", clientConfiguration: quiet) { client, _, tracing, logger, _ in
            await onLoop(client.reactor) { tracing.attach(to: client) }
            for index in 0..<3 { logger.info("record \(index)") }
            // The host never answers: the handshake times out.
            await onLoop(client.reactor) { client.start { _ in } }
            let flushed = Atomic<Bool>(false)
            Task {
                await tracing.flush()
                flushed.store(true, ordering: .releasing)
            }
            // The handshake times out after 100 ms; bounded in case it never does.
            try await withTimeout(.seconds(10), "the client's close after its failed handshake") { await client.closed() }
            #expect(await waitUntil { flushed.load(ordering: .acquiring) }, "flush() still waits after the handshake failed")
            let statistics = tracing.statistics
            #expect(statistics.forwarded == 0)
            #expect(statistics.dropped == 3)
            #expect(statistics.queued == 0)
        }
    }
}

/// A service whose one method waits until its call is cancelled: a call kept in flight.
final class Blocker: RPCService {
    static let wait = MethodDescriptor(service: "Blocker", method: "wait", kind: .unary)
    let started = Atomic<Bool>(false)

    var methods: [MethodDescriptor] { [Self.wait] }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        started.store(true, ordering: .releasing)
        try await Task.sleep(for: .seconds(60))
        return .empty
    }
}
