import Synchronization
import Tracing

/// The swift-distributed-tracing tracer of a plugin: spans are forwarded to the host.
///
/// A span travels as `new_span` (target: the module of the file that started it; level
/// `INFO`, since Swift spans have none; its kind as the field `span.kind` unless
/// `internal`), attribute changes as `record`, span events and recorded errors as `event`
/// with the span as parent, and `end()` as `drop_span`. No method of the span sends anything
/// after its `end()`; what is made in its context later still names it, as the host then
/// counts under `unknownSpan`: a log record (as its parent), a span started under it (sent
/// between `enter` and `exit` of it), and the events of a span under it that was not
/// forwarded. The parent travels the way tracing defines it, as the entered span: a
/// child's `new_span` is sent between `enter(parent)` and `exit(parent)`, so the host sees
/// the right parent even when tasks interleave. Links travel as a `link` field naming the
/// linked span's id, when the host knows that span.
public struct ForwardingTracer: Tracer {
    /// The spans this tracer starts.
    public typealias Span = ForwardedSpan

    let tracing: PluginTracing

    /// Starts a span under the context's span, if any. When the filter passes `INFO` for
    /// the module of `fileID`, it is queued as `new_span` (with `span.kind` unless
    /// `internal`, and `remote_parent` from ``extract(_:into:using:)`` when it has no local
    /// parent). Otherwise, or when the buffer is full, it is kept locally only
    /// (``ForwardedSpan/isRecording`` is false) and its events name its nearest forwarded
    /// ancestor. `instant` is not used.
    public func startSpan<Instant: TracerInstant>(
        _ operationName: String, context: @autoclosure () -> ServiceContext, ofKind kind: SpanKind,
        at instant: @autoclosure () -> Instant, function: String, file fileID: String, line: UInt
    ) -> ForwardedSpan {
        let base = context()
        let parent = base[ForwardedSpanKey.self]?.forwarded
        let target = Self.module(of: fileID)
        var reference: PluginTracing.SpanReference?
        if tracing.allows(.info, target: target) {
            var fields: [TraceField] = []
            if kind != .internal { fields.append(TraceField(name: "span.kind", value: "\(kind)")) }
            if parent == nil, let remote = base[RemoteSpanKey.self] { fields.append(TraceField(name: "remote_parent", value: remote)) }
            let meta = SpanMeta(
                name: operationName, target: target, level: TraceLevel.info.rawValue, file: fileID, line: UInt32(clamping: line),
                fields: fields)
            reference = tracing.enqueueNewSpan(meta, parent: parent)
        }
        return ForwardedSpan(tracing: tracing, reference: reference, forwarded: reference ?? parent, target: target, operationName: operationName, base: base)
    }

    /// The span `context` carries, if one of this tracer's.
    public func activeSpan(identifiedBy context: ServiceContext) -> ForwardedSpan? {
        context[ForwardedSpanKey.self]
    }

    /// Asks the forwarder to send what is buffered now; does not wait.
    public func forceFlush() {
        tracing.kick()
    }

    /// Writes the current span's id under `rapace-span-id` (for a peer that wants to name
    /// it as a remote parent).
    public func inject<Carrier, Inject: Injector>(_ context: ServiceContext, into carrier: inout Carrier, using injector: Inject)
    where Carrier == Inject.Carrier {
        if let span = context[ForwardedSpanKey.self]?.forwarded {
            injector.inject(String(span.id), forKey: Self.spanIDHeader, into: &carrier)
        }
    }

    /// Reads `rapace-span-id`: spans started in the returned context carry it as the field
    /// `remote_parent`.
    public func extract<Carrier, Extract: Extractor>(_ carrier: Carrier, into context: inout ServiceContext, using extractor: Extract)
    where Carrier == Extract.Carrier {
        if let id = extractor.extract(key: Self.spanIDHeader, from: carrier) { context[RemoteSpanKey.self] = id }
    }

    /// The carrier key ``inject(_:into:using:)`` and ``extract(_:into:using:)`` use.
    public static let spanIDHeader = "rapace-span-id"

    static func module(of fileID: String) -> String {
        guard let slash = fileID.firstIndex(of: "/") else { return fileID }
        return String(fileID[..<slash])
    }
}

enum ForwardedSpanKey: ServiceContextKey {
    typealias Value = ForwardedSpan
}

enum RemoteSpanKey: ServiceContextKey {
    typealias Value = String
}

/// A span of ``ForwardingTracer``.
public final class ForwardedSpan: Span {
    struct State {
        var operationName: String
        var attributes: SpanAttributes = [:]
    }

    let tracing: PluginTracing
    /// Its id on the wire (per connection, from 1), nil when the filter or a full buffer
    /// kept it from the host.
    public var id: UInt64? { reference?.id }
    let reference: PluginTracing.SpanReference?
    /// It, or its nearest forwarded ancestor: the parent its events and children name.
    let forwarded: PluginTracing.SpanReference?
    /// The module that started it: the target of its events.
    let target: String
    private let base: ServiceContext
    private let state: Mutex<State>
    /// Set by the first `end()`. Every method that sends reads it before it builds anything
    /// (a setter also before it changes the span's state). (It orders nothing else: relaxed.)
    private let ended = Atomic<Bool>(false)

    init(
        tracing: PluginTracing, reference: PluginTracing.SpanReference?, forwarded: PluginTracing.SpanReference?, target: String,
        operationName: String, base: ServiceContext
    ) {
        self.tracing = tracing
        self.reference = reference
        self.forwarded = forwarded
        self.target = target
        self.base = base
        self.state = Mutex(State(operationName: operationName))
    }

    /// The context the span started in, with this span as its active span.
    public var context: ServiceContext {
        var context = base
        context[ForwardedSpanKey.self] = self
        return context
    }

    /// The span's name. Renaming a span that has not ended records the field `otel.name`.
    public var operationName: String {
        get { state.withLock { $0.operationName } }
        set {
            guard !hasEnded else { return }
            let changed = state.withLock { state -> Bool in
                guard state.operationName != newValue else { return false }
                state.operationName = newValue
                return true
            }
            if changed { record { [TraceField(name: "otel.name", value: newValue)] } }
        }
    }

    /// The span's attributes. Setting them records each new or changed one as a field
    /// (sorted by name), until the span ends; removed ones are not reported.
    public var attributes: SpanAttributes {
        get { state.withLock { $0.attributes } }
        set {
            guard !hasEnded else { return }
            guard reference != nil else {
                // Not forwarded: nothing to describe, only the value to keep.
                state.withLock { $0.attributes = newValue }
                return
            }
            let changed = state.withLock { state -> [TraceField] in
                var fields: [TraceField] = []
                newValue.forEach { name, value in
                    if state.attributes.get(name) != value { fields.append(TraceField(name: name, value: Self.describe(value))) }
                }
                state.attributes = newValue
                return fields.sorted { $0.name < $1.name }
            }
            if !changed.isEmpty { record { changed } }
        }
    }

    /// Whether the span was forwarded (the filter passed it and the buffer had room) and
    /// has not ended.
    public var isRecording: Bool { reference != nil && !hasEnded }

    /// Records `otel.status_code` (`OK` or `ERROR`) and, with a message, `otel.status_message`.
    public func setStatus(_ status: SpanStatus) {
        record {
            var fields = [TraceField(name: "otel.status_code", value: status.code == .ok ? "OK" : "ERROR")]
            if let message = status.message { fields.append(TraceField(name: "otel.status_message", value: message)) }
            return fields
        }
    }

    /// Queues a record of `fields` for this span, if it was forwarded and has not ended
    /// (`fields` is built only then).
    private func record(_ fields: () -> [TraceField]) {
        guard let reference, !hasEnded else { return }
        tracing.enqueueRecord(fields(), on: reference)
    }


    /// Forwards an `INFO` event named after `event`, its attributes as fields, with this
    /// span (or its nearest forwarded ancestor) as parent, when the filter passes it and the
    /// span has not ended.
    public func addEvent(_ event: SpanEvent) {
        guard emits(.info) else { return }
        emit(event.name, level: .info, attributes: event.attributes, extra: [])
    }

    /// Forwards an `ERROR` event whose message describes `error`, with the field
    /// `error.type` and `attributes`, when the filter passes it and the span has not ended.
    /// `instant` is not used.
    public func recordError<Instant: TracerInstant>(_ error: any Error, attributes: SpanAttributes, at instant: @autoclosure () -> Instant) {
        guard emits(.error) else { return }
        emit("\(error)", level: .error, attributes: attributes, extra: [TraceField(name: "error.type", value: "\(type(of: error))")])
    }

    /// Records a `link` field naming the linked span's id, when the host knows that span:
    /// it was forwarded itself (by this span's forwarder, on this span's connection).
    /// Otherwise the link is dropped, since an id would name another span: one the filter
    /// or a full buffer kept from the host has no id (its nearest forwarded ancestor's
    /// would name the ancestor), and ids of an earlier connection or of another forwarder
    /// number other spans. The link's attributes are not forwarded.
    public func addLink(_ link: SpanLink) {
        guard let reference, !hasEnded, let linked = link.context[ForwardedSpanKey.self], linked.tracing === tracing,
            let target = linked.reference, target.connection == reference.connection
        else { return }
        tracing.enqueueRecord([TraceField(name: "link", value: String(target.id))], on: reference)
    }

    /// Ends the span: the first call queues `drop_span` (for a forwarded span). The span
    /// is immutable from then on: later renames, attributes, status, links, events and
    /// recorded errors are dropped, and a second call does nothing. `instant` is not used.
    public func end<Instant: TracerInstant>(at instant: @autoclosure () -> Instant) {
        let first = !ended.exchange(true, ordering: .relaxed)
        if first, let reference { tracing.enqueueDropSpan(reference) }
    }

    private var hasEnded: Bool { ended.load(ordering: .relaxed) }

    /// Whether an event of `level` is to be forwarded: the span has not ended and the
    /// filter passes it. Asked before the event is built.
    private func emits(_ level: TraceLevel) -> Bool {
        !hasEnded && tracing.allows(level, target: target)
    }

    /// Forwards an event that ``emits(_:)`` passed.
    private func emit(_ message: String, level: TraceLevel, attributes: SpanAttributes, extra: [TraceField]) {
        var fields = extra
        attributes.forEach { name, value in fields.append(TraceField(name: name, value: Self.describe(value))) }
        fields.sort { $0.name < $1.name }
        tracing.enqueueEvent(EventMeta(message: message, target: target, level: level.rawValue, fields: fields), parent: forwarded)
    }

    static func describe(_ attribute: SpanAttribute) -> String {
        switch attribute {
        case .int32(let value): String(value)
        case .int64(let value): String(value)
        case .int32Array(let values): "[" + values.map(String.init).joined(separator: ", ") + "]"
        case .int64Array(let values): "[" + values.map(String.init).joined(separator: ", ") + "]"
        case .double(let value): String(value)
        case .doubleArray(let values): "[" + values.map { String($0) }.joined(separator: ", ") + "]"
        case .bool(let value): String(value)
        case .boolArray(let values): "[" + values.map { String($0) }.joined(separator: ", ") + "]"
        case .string(let value): value
        case .stringArray(let values): "[" + values.joined(separator: ", ") + "]"
        case .stringConvertible(let value): value.description
        case .stringConvertibleArray(let values): "[" + values.map(\.description).joined(separator: ", ") + "]"
        default: "\(attribute)"
        }
    }
}
