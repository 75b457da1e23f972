import Logging
import Synchronization
import Tracing

/// A swift-log handler that forwards each record to the host as a `TracingSink.event`.
///
/// The logger's label is the record's target; `notice` travels as `INFO` and `critical`
/// as `ERROR`. Metadata (the handler's, the metadata provider's and the call's, in that
/// order of precedence, sorted by key) and a logged error become fields. A record logged
/// inside a span of ``ForwardingTracer`` (`withSpan`) names that span as its parent.
public struct ForwardingLogHandler: LogHandler {
    public let label: String
    let tracing: PluginTracing
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    /// The level set on this logger; the host's filter may let even less through.
    private var localLevel: Logger.Level = .trace

    init(label: String, tracing: PluginTracing) {
        self.label = label
        self.tracing = tracing
        self.metadataProvider = LoggingSystem.metadataProvider
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// The stricter of the level set here and the lowest level the host's filter passes,
    /// so a logger skips building records nobody forwards.
    public var logLevel: Logger.Level {
        get {
            let filterOrdinal = tracing.lowestLoggerLevel.load(ordering: .relaxed)
            let levels = Logger.Level.allCases
            guard filterOrdinal < levels.count else { return .critical }
            return max(localLevel, levels[filterOrdinal])
        }
        set { localLevel = newValue }
    }

    public func log(event: LogEvent) {
        let level = TraceLevel(event.level)
        guard tracing.allows(level, target: label) else { return }
        var fields: [TraceField] = []
        let provided = metadataProvider?.get() ?? [:]
        if metadata.isEmpty && provided.isEmpty {
            if let own = event.metadata, !own.isEmpty { fields = Self.fields(own) }
        } else {
            var merged = metadata
            merged.merge(provided) { _, new in new }
            if let own = event.metadata { merged.merge(own) { _, new in new } }
            fields = Self.fields(merged)
        }
        if let error = event.error { fields.append(TraceField(name: "error", value: "\(error)")) }
        let parent = ServiceContext.current?[ForwardedSpanKey.self]?.forwarded
        tracing.enqueueEvent(
            EventMeta(message: event.message.description, target: label, level: level.rawValue, file: event.file, line: UInt32(clamping: event.line), fields: fields),
            parent: parent)
    }

    static func fields(_ metadata: Logger.Metadata) -> [TraceField] {
        metadata.sorted { $0.key < $1.key }.map { TraceField(name: $0.key, value: $0.value.description) }
    }
}
