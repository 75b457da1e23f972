import Logging
import Rapace
import RapaceTestSupport
import Synchronization
@testable import RapaceTracing
import Testing

/// When the forwarder sends: a record, a drop, the end of the handshake, `flush()`,
/// `forceFlush()` and a reply all claim the drain one way (`State.claimDrain`), for records
/// and for a drop report alike, and only for a session ready to take them.
@Suite(.sharesProcess) struct PluginTracingDrainTests {
    /// With no room at all every record is dropped and none is ever buffered: the drop
    /// report still goes out as records are dropped (it waited for a reply of the plugin's).
    @Test func aDropReportGoesOutWithNothingBuffered() async throws {
        let host = TracingHost(logger: LogCapture().logger(label: "host"))
        try await withSinkPair(host, plugin: "no-room") { client, _ in
            let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace), bufferCapacity: 0))
            tracing.attach(to: client)
            // Off the loop attach(to:) hands its work to the loop: let it run.
            await onLoop(client.reactor) {}
            let logger = Logger(label: "no-room") { tracing.makeLogHandler(label: $0) }
            for index in 0..<3 { logger.info("record \(index)") }
            #expect(
                await waitUntil { host.statistics(plugin: "no-room").droppedByPlugin == 3 },
                "the host was told of \(host.statistics(plugin: "no-room").droppedByPlugin) dropped records, not 3")
            let statistics = tracing.statistics
            #expect(statistics.forwarded == 0)
            #expect(statistics.dropped == 3)
            #expect(statistics.queued == 0)
        }
    }

    /// A reply the plugin sends once forwarding has stopped (the host sent GoAway, and the
    /// session refused a record) claims no drain: no session takes records. It used to, and
    /// the drain, finding no session, left the claim in place; after a reconnect neither the
    /// end of the handshake nor new records sent anything then.
    @Test func aReplyAfterForwardingStoppedLeavesTheNextConnectionToSend() async throws {
        let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace)))
        let logger = Logger(label: "again") { tracing.makeLogHandler(label: $0) }
        let held = HeldCall()
        let firstHost = TracingHost(logger: LogCapture().logger(label: "first-host"))
        try await withServingPlugin(firstHost, name: "again", services: [held]) { plugin, host in
            tracing.attach(to: plugin)
            await onLoop(plugin.reactor) {}
            // A call to the plugin in flight keeps both sessions open after the host's GoAway.
            let call = Task { try? await host.call(HeldCall.method, request: .empty, options: .default) }
            #expect(await waitUntil { held.started.load(ordering: .acquiring) })
            host.reactor.execute { host.shutdownGracefully(grace: .seconds(60), reason: .shutdown, message: "host leaving") }
            // Once the GoAway arrived, the plugin's session refuses what it would send.
            let unknown = MethodDescriptor(service: "Nope", method: "nothing", kind: .unary)
            #expect(await waitUntil {
                do throws(RPCError) {
                    _ = try await plugin.call(unknown, request: .empty, options: .default)
                    return false
                } catch {
                    return error.code == .unavailable
                }
            })
            logger.info("refused")
            #expect(await waitUntil { tracing.state.withLock { $0.detached } }, "the refused record did not stop forwarding")
            // Dropped: its drop report is due, with no session to send it.
            logger.info("while stopped")
            held.released.store(true, ordering: .releasing)
            _ = await call.value
            #expect(!tracing.state.withLock { $0.drainScheduled }, "the reply left a drain claimed with no session to drain to")
        }
        // The plugin connects again: the drop report and what it logs now arrive.
        let capture = LogCapture()
        let secondHost = TracingHost(logger: capture.logger(label: "second-host"))
        try await withServingPlugin(secondHost, name: "again", services: []) { plugin, _ in
            tracing.attach(to: plugin)
            await onLoop(plugin.reactor) {}
            logger.info("after reconnect")
            #expect(
                await waitUntil { !capture.entries { $0.message == "after reconnect" }.isEmpty },
                "nothing was sent on the new connection")
            #expect(await waitUntil { secondHost.statistics(plugin: "again").droppedByPlugin == 1 })
        }
    }
}

/// A unary method that waits until ``released`` is set: a call kept in flight.
private final class HeldCall: RPCService {
    static let method = MethodDescriptor(service: "Held", method: "hold", kind: .unary)
    let started = Atomic<Bool>(false)
    let released = Atomic<Bool>(false)

    var methods: [MethodDescriptor] { [Self.method] }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        started.store(true, ordering: .releasing)
        while !released.load(ordering: .acquiring) { try await Task.sleep(for: .milliseconds(5)) }
        return .empty
    }
}

/// A plugin's session serving `services`, started with a host's session that serves `host`
/// as plugin `name` (each on its own reactor, over an in-memory transport); both are closed
/// afterwards. `body` gets the plugin's session and the host's.
private func withServingPlugin(
    _ host: TracingHost, name: String, services: [any RPCService], _ body: (Session, Session) async throws -> Void
) async throws {
    let hostReactor = try Reactor.start(name: "sink")
    defer { hostReactor.shutdown() }
    let pluginReactor = try Reactor.start(name: "plugin")
    defer { pluginReactor.shutdown() }
    let (pluginSide, hostSide) = InMemoryTransport.makePair(pluginReactor, hostReactor)
    let hostSession = try Session(transport: hostSide, role: .initiator, services: [host.service(pluginName: name)])
    let pluginSession = try Session(transport: pluginSide, role: .acceptor, services: services)
    try await startTogether(pluginSession, hostSession)
    do {
        try await body(pluginSession, hostSession)
    } catch {
        await pluginSession.closeAndWait()
        await hostSession.closeAndWait()
        throw error
    }
    await pluginSession.closeAndWait()
    await hostSession.closeAndWait()
}
