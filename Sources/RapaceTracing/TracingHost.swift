import Logging
import Rapace
import Synchronization

/// The host side of the tracing bridge: receives plugins' records, logs each through the
/// host's `Logger`, and keeps the span tree for inspection.
///
/// ```swift
/// let tracing = TracingHost(logger: logger)
/// let plugin = try await PluginProcess.launch(
///     PluginConfiguration(name: "imaging", executable: path, services: [tracing.service(pluginName: "imaging")]),
///     reactor: reactor)
/// try await TracingConfigClient(plugin).setFilter("debug,imaging.codec=trace")
/// ```
///
/// Every record is logged with the metadata `plugin`. Events add `target`, `file`
/// (`file:line`) and their fields, and, in a span, `span_id` and `span`. A span's open and
/// close add its `target`, `file`, `span_id` and `parent_id`, with the fields it opened
/// with (open) or those recorded on it (close, which also adds `observed_duration`, from
/// open to close as the host saw them). A `record` adds `span_id`, the fields and the
/// span's `target` when the span is known; `enter`, `exit` and the close of an unknown
/// span add only `span_id`. Events log at their level; span opens and closes at the
/// span's level; `record`, `enter` and `exit` at `trace`.
///
/// When a plugin's connection ends (exit, crash, restart), the spans it left open are
/// closed as ``SpanSnapshot/State-swift.enum/abandoned(_:)`` and each is reported with a
/// warning. Memory stays bounded whatever a plugin sends: at most `maxOpenSpans` open
/// spans per connection (more are logged but not kept) and, per plugin, the last
/// `closedSpansKept` closed ones (at most twice as many are held, trimmed in chunks);
/// strings of every record are cut as ``PluginTracing/Limits`` says (16 KiB messages,
/// 4 KiB values, 64 fields), and the entered-span stack keeps the innermost 1024.
public final class TracingHost: Sendable {
    /// A span as the host knows it.
    public struct SpanSnapshot: Sendable, Hashable {
        /// Whether the span is still open, and how it ended.
        public enum State: Sendable, Hashable {
            /// Opened, not closed yet.
            case open
            /// The plugin closed it (`drop_span`).
            case closed
            /// The plugin's connection ended while the span was open.
            case abandoned(String)
        }

        /// The plugin's name (the one given to ``TracingHost/service(pluginName:)``).
        public let plugin: String
        /// Which connection of that plugin, from 1 (a restart opens a new one).
        public let connection: Int
        /// The plugin's id of the span (per connection, from 1).
        public let id: UInt64
        /// The span the plugin had entered (the innermost) when it opened this one, nil when
        /// none; the host does not check that it knows that span.
        public let parentID: UInt64?
        /// What `new_span` carried, cut to ``PluginTracing/Limits``.
        public let meta: SpanMeta
        /// Fields recorded after the span opened, in order.
        public internal(set) var recorded: [TraceField]
        /// Open, closed or abandoned; set by the host.
        public internal(set) var state: State
        /// When the host received the span's `new_span`.
        public let opened: ContinuousClock.Instant
        /// When the host received its `drop_span`, or saw its connection end; nil while open.
        public internal(set) var closed: ContinuousClock.Instant?
    }

    /// Counts per plugin.
    public struct PluginStatistics: Sendable, Hashable {
        /// Events received (log records, span events, drop reports).
        public var events: UInt64 = 0
        /// Spans opened.
        public var spans: UInt64 = 0
        /// Records the plugin reported it dropped.
        public var droppedByPlugin: UInt64 = 0
        /// Records naming a span the host does not know (never opened, closed, or beyond
        /// `maxOpenSpans`): `record`, `drop_span` and `enter` of such a span, `exit` of a
        /// span not entered, events whose parent is such a span.
        public var unknownSpan: UInt64 = 0
        /// Spans closed because their connection ended.
        public var abandonedSpans: UInt64 = 0
    }

    /// One connection of a plugin; touched only under the host's lock.
    final class Connection: @unchecked Sendable {
        let plugin: String
        let number: Int
        var nextID: UInt64 = 1
        var spans: [UInt64: SpanSnapshot] = [:]
        var entered: [UInt64] = []

        init(plugin: String, number: Int) {
            self.plugin = plugin
            self.number = number
        }
    }

    struct State {
        var connections: [ObjectIdentifier: Connection] = [:]
        var connectionCounts: [String: Int] = [:]
        var closedSpans: [String: [SpanSnapshot]] = [:]
        var statistics: [String: PluginStatistics] = [:]
    }

    /// Fields kept per span from `record` (the newest).
    static let recordedFieldsKept = 256
    /// Entered spans remembered per connection (the innermost); a peer that enters deeper
    /// loses its outermost half.
    static let maxEnteredDepth = 1024

    let logger: Logger
    let maxOpenSpans: Int
    let closedSpansKept: Int
    private let state = Mutex(State())

    /// - Parameters:
    ///   - logger: where plugins' records are logged.
    ///   - maxOpenSpans: open spans kept per connection.
    ///   - closedSpansKept: closed spans ``spans(plugin:)`` shows per plugin (oldest forgotten
    ///     first; up to twice as many are held between trims).
    public init(logger: Logger, maxOpenSpans: Int = 65_536, closedSpansKept: Int = 4096) {
        self.logger = logger
        self.maxOpenSpans = maxOpenSpans
        self.closedSpansKept = closedSpansKept
    }

    /// The `TracingSink` service to offer the plugin called `pluginName` (put it in its
    /// ``PluginConfiguration``'s services, or on any session it connects with).
    public func service(pluginName: String) -> any RPCService {
        TracingSinkServer(Binding(host: self, plugin: pluginName))
    }

    /// The spans of `plugin` the host keeps: open ones and the most recent closed ones,
    /// by connection and id.
    public func spans(plugin: String) -> [SpanSnapshot] {
        state.withLock { state in
            // The archive may hold up to twice the kept count (it is trimmed in chunks).
            var spans = Array((state.closedSpans[plugin] ?? []).suffix(closedSpansKept))
            for connection in state.connections.values where connection.plugin == plugin {
                spans.append(contentsOf: connection.spans.values)
            }
            return spans.sorted { ($0.connection, $0.id) < ($1.connection, $1.id) }
        }
    }

    /// Counters of `plugin`.
    public func statistics(plugin: String) -> PluginStatistics {
        state.withLock { $0.statistics[plugin] ?? PluginStatistics() }
    }

    // MARK: Receiving (loop thread of the plugin's session)

    struct Binding: TracingSink {
        let host: TracingHost
        let plugin: String

        func newSpan(_ meta: SpanMeta, from peer: Session) -> UInt64 { host.newSpan(meta, plugin: plugin, peer: peer) }
        func record(_ spanID: UInt64, _ fields: [TraceField], from peer: Session) { host.record(spanID, fields, plugin: plugin, peer: peer) }
        func event(_ meta: EventMeta, from peer: Session) { host.event(meta, plugin: plugin, peer: peer) }
        func enter(_ spanID: UInt64, from peer: Session) { host.enter(spanID, plugin: plugin, peer: peer) }
        func exit(_ spanID: UInt64, from peer: Session) { host.exit(spanID, plugin: plugin, peer: peer) }
        func dropSpan(_ spanID: UInt64, from peer: Session) { host.dropSpan(spanID, plugin: plugin, peer: peer) }
    }

    /// The connection of `peer`, created (and watched for its end) on its first record.
    private func connection(_ state: inout State, plugin: String, peer: Session, isNew: inout Bool) -> Connection {
        let key = ObjectIdentifier(peer)
        if let existing = state.connections[key] { return existing }
        let number = (state.connectionCounts[plugin] ?? 0) + 1
        state.connectionCounts[plugin] = number
        let connection = Connection(plugin: plugin, number: number)
        state.connections[key] = connection
        isNew = true
        return connection
    }

    private func withConnection<T: Sendable>(plugin: String, peer: Session, _ body: @Sendable (inout State, Connection) -> T) -> T {
        var isNew = false
        let result = state.withLock { state in
            let connection = connection(&state, plugin: plugin, peer: peer, isNew: &isNew)
            return body(&state, connection)
        }
        if isNew {
            let key = ObjectIdentifier(peer)
            peer.reactor.executeOrRunNow { [self] in peer.onClose { [self] in connectionEnded(key) } }
        }
        return result
    }

    func newSpan(_ meta: SpanMeta, plugin: String, peer: Session) -> UInt64 {
        // What the host keeps is bounded per span, whatever the peer sent.
        let meta = PluginTracing.clipped(meta)
        let (id, parent, kept) = withConnection(plugin: plugin, peer: peer) { state, connection -> (UInt64, UInt64?, Bool) in
            let id = connection.nextID
            connection.nextID &+= 1
            state.statistics[plugin, default: PluginStatistics()].spans += 1
            let parent = connection.entered.last
            guard connection.spans.count < maxOpenSpans else { return (id, parent, false) }
            connection.spans[id] = SpanSnapshot(
                plugin: plugin, connection: connection.number, id: id, parentID: parent, meta: meta, recorded: [], state: .open,
                opened: .now, closed: nil)
            return (id, parent, true)
        }
        let (level, unknownLevel) = Self.level(meta.level)
        emit(level: level, "span opened: \(meta.name)", file: meta.file, line: meta.line) {
            var metadata = base(plugin: plugin, target: meta.target, file: meta.file, line: meta.line, fields: meta.fields, unknownLevel: unknownLevel)
            metadata["span_id"] = "\(id)"
            if let parent { metadata["parent_id"] = "\(parent)" }
            if !kept { metadata["untracked"] = "more than \(maxOpenSpans) spans open" }
            return metadata
        }
        return id
    }

    func record(_ spanID: UInt64, _ fields: [TraceField], plugin: String, peer: Session) {
        let fields = PluginTracing.clipped(fields)
        let span = withConnection(plugin: plugin, peer: peer) { state, connection -> SpanSnapshot? in
            // One lookup: the span is then reached, and changed in place, by its index.
            guard let index = connection.spans.index(forKey: spanID) else {
                state.statistics[plugin, default: PluginStatistics()].unknownSpan += 1
                return nil
            }
            connection.spans.values[index].recorded.append(contentsOf: fields)
            let excess = connection.spans.values[index].recorded.count - TracingHost.recordedFieldsKept
            if excess > 0 { connection.spans.values[index].recorded.removeFirst(excess) }
            return connection.spans.values[index]
        }
        emit(level: .trace, "span \(span?.meta.name ?? "#\(spanID) (unknown)") recorded \(fields.count) field(s)", file: nil, line: nil) {
            var metadata = base(plugin: plugin, target: span?.meta.target, file: nil, line: nil, fields: fields)
            metadata["span_id"] = "\(spanID)"
            return metadata
        }
    }

    func event(_ meta: EventMeta, plugin: String, peer: Session) {
        let meta = PluginTracing.clipped(meta)
        let span = withConnection(plugin: plugin, peer: peer) { state, connection -> SpanSnapshot? in
            state.statistics[plugin, default: PluginStatistics()].events += 1
            if let parent = meta.parentSpanID, connection.spans[parent] == nil {
                state.statistics[plugin, default: PluginStatistics()].unknownSpan += 1
            }
            if meta.target == PluginTracing.internalTarget,
               let dropped = meta.fields.first(where: { $0.name == PluginTracing.droppedField }).flatMap({ UInt64($0.value) }) {
                state.statistics[plugin, default: PluginStatistics()].droppedByPlugin &+= dropped
            }
            return meta.parentSpanID.flatMap { connection.spans[$0] }
        }
        let (level, unknownLevel) = Self.level(meta.level)
        emit(level: level, meta.message, file: meta.file, line: meta.line) {
            var metadata = base(plugin: plugin, target: meta.target, file: meta.file, line: meta.line, fields: meta.fields, unknownLevel: unknownLevel)
            if let parent = meta.parentSpanID {
                metadata["span_id"] = "\(parent)"
                if let span { metadata["span"] = .string(span.meta.name) }
            }
            return metadata
        }
    }

    func enter(_ spanID: UInt64, plugin: String, peer: Session) {
        let known = withConnection(plugin: plugin, peer: peer) { state, connection -> Bool in
            // A peer that enters without exiting must not grow the stack without bound.
            if connection.entered.count >= TracingHost.maxEnteredDepth { connection.entered.removeFirst(TracingHost.maxEnteredDepth / 2) }
            connection.entered.append(spanID)
            let known = connection.spans[spanID] != nil
            if !known { state.statistics[plugin, default: PluginStatistics()].unknownSpan += 1 }
            return known
        }
        emit(level: .trace, known ? "span entered" : "unknown span entered", file: nil, line: nil) { spanMetadata(plugin: plugin, spanID) }
    }

    func exit(_ spanID: UInt64, plugin: String, peer: Session) {
        withConnection(plugin: plugin, peer: peer) { state, connection in
            if let index = connection.entered.lastIndex(of: spanID) {
                connection.entered.remove(at: index)
            } else {
                state.statistics[plugin, default: PluginStatistics()].unknownSpan += 1
            }
        }
        emit(level: .trace, "span exited", file: nil, line: nil) { spanMetadata(plugin: plugin, spanID) }
    }

    func dropSpan(_ spanID: UInt64, plugin: String, peer: Session) {
        let span = withConnection(plugin: plugin, peer: peer) { state, connection -> SpanSnapshot? in
            guard var span = connection.spans.removeValue(forKey: spanID) else {
                state.statistics[plugin, default: PluginStatistics()].unknownSpan += 1
                return nil
            }
            span.state = .closed
            span.closed = .now
            archive(span, in: &state)
            trimArchive(of: plugin, in: &state)
            return span
        }
        guard let span else {
            emit(level: .debug, "close of an unknown span", file: nil, line: nil) { spanMetadata(plugin: plugin, spanID) }
            return
        }
        let (level, unknownLevel) = Self.level(span.meta.level)
        emit(level: level, "span closed: \(span.meta.name)", file: span.meta.file, line: span.meta.line) {
            var metadata = base(plugin: plugin, target: span.meta.target, file: span.meta.file, line: span.meta.line, fields: span.recorded, unknownLevel: unknownLevel)
            metadata["span_id"] = "\(spanID)"
            if let parent = span.parentID { metadata["parent_id"] = "\(parent)" }
            if let closed = span.closed { metadata["observed_duration"] = "\(closed - span.opened)" }
            return metadata
        }
    }

    /// The plugin's connection ended: close what it left open, as abandoned.
    private func connectionEnded(_ key: ObjectIdentifier) {
        let abandoned = state.withLock { state -> [SpanSnapshot] in
            guard let connection = state.connections.removeValue(forKey: key) else { return [] }
            var spans: [SpanSnapshot] = []
            let now = ContinuousClock.now
            for id in connection.spans.keys.sorted() {
                var span = connection.spans[id]!
                span.state = .abandoned("the plugin's connection ended while the span was open")
                span.closed = now
                archive(span, in: &state)
                spans.append(span)
            }
            trimArchive(of: connection.plugin, in: &state)
            state.statistics[connection.plugin, default: PluginStatistics()].abandonedSpans += UInt64(spans.count)
            return spans
        }
        for span in abandoned {
            emit(level: .warning, "span abandoned: \(span.meta.name) was still open when the plugin's connection ended", file: span.meta.file, line: span.meta.line) {
                var metadata = base(plugin: span.plugin, target: span.meta.target, file: span.meta.file, line: span.meta.line, fields: span.recorded)
                metadata["span_id"] = "\(span.id)"
                if let parent = span.parentID { metadata["parent_id"] = "\(parent)" }
                return metadata
            }
        }
    }

    /// Appends a closed span to its plugin's archive (in place); ``trimArchive(of:in:)``
    /// bounds it.
    private func archive(_ span: SpanSnapshot, in state: inout State) {
        state.closedSpans[span.plugin, default: []].append(span)
    }

    /// Forgets the oldest closed spans of `plugin` once it holds more than twice
    /// `closedSpansKept`, down to `closedSpansKept` at once: the shift is paid once per
    /// `closedSpansKept` closes, not on each. ``spans(plugin:)`` shows the newest
    /// `closedSpansKept` only.
    private func trimArchive(of plugin: String, in state: inout State) {
        guard let count = state.closedSpans[plugin]?.count, count - closedSpansKept > closedSpansKept else { return }
        state.closedSpans[plugin]!.removeFirst(count - closedSpansKept)
    }

    // MARK: Logging

    private func base(plugin: String, target: String?, file: String?, line: UInt32?, fields: [TraceField], unknownLevel: String? = nil) -> Logger.Metadata {
        var metadata: Logger.Metadata = [:]
        for field in fields { metadata[field.name] = .string(field.value) }
        if let unknownLevel { metadata["level"] = .string(unknownLevel) }
        metadata["plugin"] = .string(plugin)
        if let target { metadata["target"] = .string(target) }
        if let file { metadata["file"] = .string(line.map { "\(file):\($0)" } ?? file) }
        return metadata
    }

    /// The logger level of a wire level; an unknown one logs at `info`, with its raw text
    /// (`unknown`) in the metadata.
    private static func level(_ text: String) -> (level: Logger.Level, unknown: String?) {
        guard let known = TraceLevel(rawValue: text) else { return (.info, text) }
        return (known.loggerLevel, nil)
    }

    /// `plugin` and `span_id`: what `enter`, `exit` and the close of an unknown span log.
    private func spanMetadata(plugin: String, _ spanID: UInt64) -> Logger.Metadata {
        ["plugin": .string(plugin), "span_id": "\(spanID)"]
    }

    /// Logs a record at the plugin's file and line. `Logger.log` checks `level` first: the
    /// message and the metadata of a record the host's logger does not take are never built.
    private func emit(
        level: Logger.Level, _ message: @autoclosure () -> String, file: String?, line: UInt32?, metadata: () -> Logger.Metadata
    ) {
        logger.log(
            level: level, Logger.Message(stringLiteral: message()), metadata: metadata(), source: "plugin", file: file ?? "plugin", function: "",
            line: UInt(line ?? 0))
    }
}
