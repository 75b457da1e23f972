import Logging
import Synchronization
import Tracing

/// A swift-log handler that forwards each record to the host as a `TracingSink.event`.
///
/// The logger's label is the record's target; `notice` travels as `INFO` and `critical`
/// as `ERROR`. Metadata (the handler's, the metadata provider's and the call's, in that
/// order of precedence) and a logged error (the field `error`, which takes the place of a
/// metadata entry of that name) become fields, sorted by name. A record logged
/// inside a span of ``ForwardingTracer`` (`withSpan`) names that span as its parent.
///
/// With a local handler (``PluginTracing/Configuration/localHandler``) each record also
/// goes there, at that handler's own level; the host's filter only decides what is
/// forwarded, and it is read on every call, so a new filter applies to existing loggers.
public struct ForwardingLogHandler: LogHandler {
    /// The logger's label: the target of every record it forwards.
    public let label: String
    let tracing: PluginTracing
    /// Also receives the records its level passes (metadata changes are mirrored to it).
    private var local: (any LogHandler)?
    /// The logger's metadata, added to every record as fields (and copied to the local
    /// handler, if any).
    public var metadata: Logger.Metadata = [:] {
        didSet { local?.metadata = metadata }
    }
    /// Adds metadata to each record, taking precedence over ``metadata``; set from
    /// `LoggingSystem.metadataProvider` when the handler is made.
    public var metadataProvider: Logger.MetadataProvider?
    /// The level set on this logger; the host's filter may let even less through.
    private var localLevel: Logger.Level = .trace

    init(label: String, tracing: PluginTracing, local: (any LogHandler)? = nil) {
        self.label = label
        self.tracing = tracing
        self.local = local
        self.metadataProvider = LoggingSystem.metadataProvider
    }

    /// One entry of ``metadata``.
    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// The lowest level anything here wants: a logger skips building records below it.
    /// Forwarding wants the stricter of the level set here and the lowest level the host's
    /// filter passes; a local handler wants its own level.
    public var logLevel: Logger.Level {
        get {
            guard let local else { return forwardingLevel }
            return min(forwardingLevel, local.logLevel)
        }
        set {
            localLevel = newValue
            local?.logLevel = newValue
        }
    }

    /// The lowest level forwarded (`critical` while the filter is off: then nothing passes).
    private var forwardingLevel: Logger.Level {
        guard let lowest = tracing.filterSummary.lowestLevel else { return .critical }
        return max(localLevel, lowest)
    }

    /// Hands the record to the local handler when its level passes, then forwards it when
    /// the level set here and the host's current filter pass it: queued as an `event`,
    /// never waiting for the host.
    public func log(event: LogEvent) {
        if let local, event.level >= local.logLevel { local.log(event: event) }
        // The level set here, then the host's filter (which decides alone: the logger's
        // `logLevel` check is only a shortcut, and the filter may have changed since).
        let level = TraceLevel(event.level)
        guard event.level >= localLevel, tracing.allows(level, target: label) else { return }
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
        if let error = event.error { Self.place(TraceField(name: "error", value: "\(error)"), in: &fields) }
        let parent = ServiceContext.current?[ForwardedSpanKey.self]?.forwarded
        tracing.enqueueEvent(
            EventMeta(message: event.message.description, target: label, level: level.rawValue, file: event.file, line: UInt32(clamping: event.line), fields: fields),
            parent: parent)
    }

    static func fields(_ metadata: Logger.Metadata) -> [TraceField] {
        metadata.sorted { $0.key < $1.key }.map { TraceField(name: $0.key, value: $0.value.description) }
    }

    /// Puts `field` where its name sorts in `fields` (sorted by name, names unique),
    /// replacing a field of the same name.
    static func place(_ field: TraceField, in fields: inout [TraceField]) {
        guard let index = fields.firstIndex(where: { $0.name >= field.name }) else {
            fields.append(field)
            return
        }
        if fields[index].name == field.name { fields[index] = field } else { fields.insert(field, at: index) }
    }
}
