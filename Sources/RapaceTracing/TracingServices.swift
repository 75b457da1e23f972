import Rapace

// `TracingSink` (the host implements it, the plugin calls it) and `TracingConfig` (the
// plugin implements it, the host calls it), wire-compatible with rapace-tracing.
//
// Written against the dispatch protocol rather than with `@Service`: plugins and
// rapace-bench link this module, and neither should build swift-syntax. The shape is what
// the macro generates: descriptors, a server over an implementation, a typed client.

/// Method descriptors of `TracingSink`.
public enum TracingSinkMethods {
    /// `TracingSink.new_span`: a ``SpanMeta``; answers the span's id (u64).
    public static let newSpan = MethodDescriptor(service: "TracingSink", method: "new_span", id: 0xEF20_01DF, kind: .unary)
    /// `TracingSink.record`: a span id (u64) and the ``TraceField``s recorded on it.
    public static let record = MethodDescriptor(service: "TracingSink", method: "record", id: 0x0157_5B2E, kind: .unary)
    /// `TracingSink.event`: an ``EventMeta``.
    public static let event = MethodDescriptor(service: "TracingSink", method: "event", id: 0xBECB_2012, kind: .unary)
    /// `TracingSink.enter`: the id (u64) of the span the plugin entered.
    public static let enter = MethodDescriptor(service: "TracingSink", method: "enter", id: 0x14EA_4DB2, kind: .unary)
    /// `TracingSink.exit`: the id (u64) of the span the plugin left.
    public static let exit = MethodDescriptor(service: "TracingSink", method: "exit", id: 0xC174_32A6, kind: .unary)
    /// `TracingSink.drop_span`: the id (u64) of the span that closed.
    public static let dropSpan = MethodDescriptor(service: "TracingSink", method: "drop_span", id: 0x5293_3DA1, kind: .unary)

    /// Every method, in declaration order.
    public static let all = [newSpan, record, event, enter, exit, dropSpan]
}

/// Method descriptors of `TracingConfig`.
public enum TracingConfigMethods {
    /// `TracingConfig.set_filter`: the filter's text (a string; ``TracingFilter`` syntax).
    public static let setFilter = MethodDescriptor(service: "TracingConfig", method: "set_filter", id: 0xB806_4DED, kind: .unary)

    /// Every method.
    public static let all = [setFilter]
}

/// Receives a plugin's spans and events (the host side of the bridge).
///
/// The methods are synchronous on purpose: they run on the session's loop thread in the
/// order the records arrive, which is the order the plugin produced them. Do not block in
/// them; hand slow work (writing to disk, exporting) to another thread.
///
/// `peer` is the session the record arrived on: span ids are the plugin's own, counted
/// per connection from 1 (a restarted plugin starts again at 1 on its new session).
public protocol TracingSink: Sendable {
    /// A span opened; returns its id (the peer's next id on this connection).
    func newSpan(_ meta: SpanMeta, from peer: Session) -> UInt64
    /// Fields were recorded on span `spanID`.
    func record(_ spanID: UInt64, _ fields: [TraceField], from peer: Session)
    /// A log record or span event.
    func event(_ meta: EventMeta, from peer: Session)
    /// The peer entered span `spanID` (it becomes the contextual parent of new spans).
    func enter(_ spanID: UInt64, from peer: Session)
    /// The peer left span `spanID`.
    func exit(_ spanID: UInt64, from peer: Session)
    /// Span `spanID` closed.
    func dropSpan(_ spanID: UInt64, from peer: Session)
}

/// Serves a ``TracingSink`` implementation. Every method may be called as a notification
/// (no reply; what ``PluginTracing`` does) or as a unary call.
public struct TracingSinkServer<Implementation: TracingSink>: RPCService {
    /// The sink the records go to.
    public let implementation: Implementation

    /// A server for `implementation`.
    public init(_ implementation: Implementation) { self.implementation = implementation }

    /// The six `TracingSink` methods (``TracingSinkMethods/all``).
    public var methods: [MethodDescriptor] { TracingSinkMethods.all }

    /// Every sink method is synchronous: records are served inline on the loop thread, in
    /// arrival order, with no task per record.
    public func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        try serve(method: method, request: request, peer: context.session)
    }

    /// Serves a record as ``handleImmediately(method:request:context:)`` does (the session
    /// tries that first, so this runs only when called directly).
    public nonisolated(nonsending) func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        try serve(method: method, request: request, peer: context.session)
    }

    private func serve(method: UInt32, request: Payload, peer: Session) throws -> Payload {
        switch method {
        case TracingSinkMethods.newSpan.id:
            let meta = try request.decode { try $0.readSpanMeta() }
            let id = implementation.newSpan(meta, from: peer)
            return Payload.encoding { $0.writeVarint(id) }
        case TracingSinkMethods.record.id:
            let (id, fields) = try request.decode { (try $0.readVarint64(), try $0.readFields()) }
            implementation.record(id, fields, from: peer)
        case TracingSinkMethods.event.id:
            let meta = try request.decode { try $0.readEventMeta() }
            implementation.event(meta, from: peer)
        case TracingSinkMethods.enter.id:
            let id = try request.decode { try $0.readVarint64() }
            implementation.enter(id, from: peer)
        case TracingSinkMethods.exit.id:
            let id = try request.decode { try $0.readVarint64() }
            implementation.exit(id, from: peer)
        case TracingSinkMethods.dropSpan.id:
            let id = try request.decode { try $0.readVarint64() }
            implementation.dropSpan(id, from: peer)
        default:
            throw RPCError(.unimplemented, "TracingSink has no method 0x\(String(method, radix: 16, uppercase: true))")
        }
        return .empty
    }
}

/// Builds the requests of `TracingSink` (shared by the client and the forwarder).
enum TracingSinkRequest {
    static func newSpan(_ meta: SpanMeta) -> Payload {
        Payload.encoding(capacity: 64) { $0.write(meta) }
    }

    static func record(_ id: UInt64, _ fields: [TraceField]) -> Payload {
        Payload.encoding(capacity: 32) {
            $0.writeVarint(id)
            $0.writeFields(fields)
        }
    }

    static func event(_ meta: EventMeta) -> Payload {
        Payload.encoding(capacity: 64 + meta.message.utf8.count) { $0.write(meta) }
    }

    static func spanID(_ id: UInt64) -> Payload {
        Payload.encoding { $0.writeVarint(id) }
    }
}

/// A typed client for `TracingSink`: unary calls, or notifications (the `notify…` methods)
/// that return once the record is queued for the transport.
public struct TracingSinkClient: Sendable {
    /// What the calls go through: a session, or a handle that forwards to one.
    public let caller: any RPCCaller
    /// The options of the unary calls (notifications take none).
    public var options: CallOptions

    /// A client calling through `caller`.
    public init(_ caller: any RPCCaller, options: CallOptions = .default) {
        self.caller = caller
        self.options = options
    }

    /// Calls `new_span` and returns the id the host gave the span.
    public nonisolated(nonsending) func newSpan(_ meta: SpanMeta) async throws(RPCError) -> UInt64 {
        let reply = try await caller.call(TracingSinkMethods.newSpan, request: TracingSinkRequest.newSpan(meta), options: options)
        return try reply.decodeResult { try $0.read(UInt64.self) }
    }

    /// Calls `record`: `fields` were recorded on span `spanID`.
    public nonisolated(nonsending) func record(_ spanID: UInt64, _ fields: [TraceField]) async throws(RPCError) {
        try await caller.call(TracingSinkMethods.record, request: TracingSinkRequest.record(spanID, fields), options: options).decodeEmptyResult()
    }

    /// Calls `event` with one record.
    public nonisolated(nonsending) func event(_ meta: EventMeta) async throws(RPCError) {
        try await caller.call(TracingSinkMethods.event, request: TracingSinkRequest.event(meta), options: options).decodeEmptyResult()
    }

    /// Calls `enter`: the plugin entered span `spanID`.
    public nonisolated(nonsending) func enter(_ spanID: UInt64) async throws(RPCError) {
        try await caller.call(TracingSinkMethods.enter, request: TracingSinkRequest.spanID(spanID), options: options).decodeEmptyResult()
    }

    /// Calls `exit`: the plugin left span `spanID`.
    public nonisolated(nonsending) func exit(_ spanID: UInt64) async throws(RPCError) {
        try await caller.call(TracingSinkMethods.exit, request: TracingSinkRequest.spanID(spanID), options: options).decodeEmptyResult()
    }

    /// Calls `drop_span`: span `spanID` closed.
    public nonisolated(nonsending) func dropSpan(_ spanID: UInt64) async throws(RPCError) {
        try await caller.call(TracingSinkMethods.dropSpan, request: TracingSinkRequest.spanID(spanID), options: options).decodeEmptyResult()
    }

    /// Sends `new_span` as a notification. The host numbers spans itself (per connection,
    /// from 1), so the sender counts them to know the id.
    public nonisolated(nonsending) func notifyNewSpan(_ meta: SpanMeta) async throws(RPCError) {
        try await caller.notify(TracingSinkMethods.newSpan, request: TracingSinkRequest.newSpan(meta))
    }

    /// Sends `event` as a notification.
    public nonisolated(nonsending) func notifyEvent(_ meta: EventMeta) async throws(RPCError) {
        try await caller.notify(TracingSinkMethods.event, request: TracingSinkRequest.event(meta))
    }

    /// Sends `record` as a notification.
    public nonisolated(nonsending) func notifyRecord(_ spanID: UInt64, _ fields: [TraceField]) async throws(RPCError) {
        try await caller.notify(TracingSinkMethods.record, request: TracingSinkRequest.record(spanID, fields))
    }

    /// Sends `enter` as a notification.
    public nonisolated(nonsending) func notifyEnter(_ spanID: UInt64) async throws(RPCError) {
        try await caller.notify(TracingSinkMethods.enter, request: TracingSinkRequest.spanID(spanID))
    }

    /// Sends `exit` as a notification.
    public nonisolated(nonsending) func notifyExit(_ spanID: UInt64) async throws(RPCError) {
        try await caller.notify(TracingSinkMethods.exit, request: TracingSinkRequest.spanID(spanID))
    }

    /// Sends `drop_span` as a notification.
    public nonisolated(nonsending) func notifyDropSpan(_ spanID: UInt64) async throws(RPCError) {
        try await caller.notify(TracingSinkMethods.dropSpan, request: TracingSinkRequest.spanID(spanID))
    }
}

/// Lets the host change what a plugin forwards (the plugin side of the bridge).
public protocol TracingConfig: Sendable {
    /// Replaces the filter; throws ``RPCError`` `INVALID_ARGUMENT` for a filter that does
    /// not parse (``TracingFilter`` documents the syntax).
    func setFilter(_ filter: String) async throws
}

/// Serves a ``TracingConfig`` implementation.
public struct TracingConfigServer<Implementation: TracingConfig>: RPCService {
    /// What `set_filter` calls.
    public let implementation: Implementation

    /// A server for `implementation`.
    public init(_ implementation: Implementation) { self.implementation = implementation }

    /// `set_filter` (``TracingConfigMethods/all``).
    public var methods: [MethodDescriptor] { TracingConfigMethods.all }

    /// Decodes the filter and calls ``TracingConfig/setFilter(_:)``; its errors reach the
    /// host. Another method id throws `UNIMPLEMENTED`.
    public nonisolated(nonsending) func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        guard method == TracingConfigMethods.setFilter.id else {
            throw RPCError(.unimplemented, "TracingConfig has no method 0x\(String(method, radix: 16, uppercase: true))")
        }
        let filter = try request.decode { try $0.readString() }
        try await implementation.setFilter(filter)
        return .empty
    }
}

/// A typed client for `TracingConfig`: the host calls it on a plugin.
public struct TracingConfigClient: Sendable {
    /// What the calls go through: a plugin's session, or a handle that forwards to one.
    public let caller: any RPCCaller
    /// The options of every call.
    public var options: CallOptions

    /// A client calling through `caller`.
    public init(_ caller: any RPCCaller, options: CallOptions = .default) {
        self.caller = caller
        self.options = options
    }

    /// Sets the plugin's filter; it applies to the next record the plugin produces.
    public nonisolated(nonsending) func setFilter(_ filter: String) async throws(RPCError) {
        let request = Payload.encoding(capacity: filter.utf8.count + 5) { $0.writeString(filter) }
        try await caller.call(TracingConfigMethods.setFilter, request: request, options: options).decodeEmptyResult()
    }
}
