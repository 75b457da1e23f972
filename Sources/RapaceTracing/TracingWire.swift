import Logging
import Rapace

// The records of the tracing bridge as they travel: wire-compatible with rapace-tracing.
// Every struct is postcard-encoded field by field in declaration order (spec section 3):
// strings as varint length + UTF-8, `Optional` as a 0/1 tag then the value, arrays as a
// varint count then the items. The encoders are written out (no `Codable` on the hot
// path); the `Codable` conformances give the same bytes and are checked against them.

/// One key/value pair of a span or an event.
public struct TraceField: Codable, Sendable, Hashable, CustomStringConvertible {
    /// The field's name, such as a metadata key or `error`.
    public var name: String
    /// The value, as text.
    public var value: String

    /// The field `name` = `value`.
    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }

    public var description: String { "\(name)=\(value)" }
}

/// A severity on the wire: exactly `"TRACE" "DEBUG" "INFO" "WARN" "ERROR"`.
public enum TraceLevel: String, Codable, Sendable, Hashable, CaseIterable, Comparable {
    /// `TRACE`, the lowest level (swift-log `trace`).
    case trace = "TRACE"
    /// `DEBUG` (swift-log `debug`).
    case debug = "DEBUG"
    /// `INFO` (swift-log `info` and `notice`); the level of forwarded spans.
    case info = "INFO"
    /// `WARN` (swift-log `warning`).
    case warn = "WARN"
    /// `ERROR`, the highest level (swift-log `error` and `critical`).
    case error = "ERROR"

    /// The wire level of a swift-log level (`notice` is INFO, `critical` is ERROR).
    public init(_ level: Logger.Level) {
        switch level {
        case .trace: self = .trace
        case .debug: self = .debug
        case .info, .notice: self = .info
        case .warning: self = .warn
        case .error, .critical: self = .error
        }
    }

    /// The swift-log level a host logs this level at.
    public var loggerLevel: Logger.Level {
        switch self {
        case .trace: .trace
        case .debug: .debug
        case .info: .info
        case .warn: .warning
        case .error: .error
        }
    }

    var rank: Int {
        switch self {
        case .trace: 0
        case .debug: 1
        case .info: 2
        case .warn: 3
        case .error: 4
        }
    }

    public static func < (lhs: TraceLevel, rhs: TraceLevel) -> Bool { lhs.rank < rhs.rank }
}

/// What `TracingSink.new_span` carries: a span as it opens.
///
/// The span's parent is not a field: it is the span the plugin has entered when it sends
/// `new_span` (tracing's contextual parent). See ``ForwardingTracer``.
public struct SpanMeta: Codable, Sendable, Hashable {
    /// The span's name (a Swift span's operation name).
    public var name: String
    /// Where it comes from, for filtering: the module that started a Swift span.
    public var target: String
    /// One of the wire levels (``TraceLevel``'s raw values).
    public var level: String
    /// The source file that opened it (a Swift span's `#fileID`), if known.
    public var file: String?
    /// The line in ``file``, if known.
    public var line: UInt32?
    /// The fields it opened with.
    public var fields: [TraceField]

    /// A span as it opens; no file, line or fields by default.
    public init(name: String, target: String, level: String, file: String? = nil, line: UInt32? = nil, fields: [TraceField] = []) {
        self.name = name
        self.target = target
        self.level = level
        self.file = file
        self.line = line
        self.fields = fields
    }
}

/// What `TracingSink.event` carries: one log record or span event.
public struct EventMeta: Codable, Sendable, Hashable {
    /// The message (a log record's text, a span event's name, a recorded error's description).
    public var message: String
    /// Where it comes from, for filtering: a logger's label, or the module of a span's events.
    public var target: String
    /// One of the wire levels (``TraceLevel``'s raw values).
    public var level: String
    /// The source file that produced it, if known.
    public var file: String?
    /// The line in ``file``, if known.
    public var line: UInt32?
    /// Its fields (a log record's metadata, a span event's attributes), sorted by name.
    public var fields: [TraceField]
    /// The plugin's id of the span the event happened in.
    public var parentSpanID: UInt64?

    enum CodingKeys: String, CodingKey {
        case message, target, level, file, line, fields
        case parentSpanID = "parent_span_id"
    }

    /// A record; no file, line, fields or parent span by default.
    public init(
        message: String, target: String, level: String, file: String? = nil, line: UInt32? = nil, fields: [TraceField] = [],
        parentSpanID: UInt64? = nil
    ) {
        self.message = message
        self.target = target
        self.level = level
        self.file = file
        self.line = line
        self.fields = fields
        self.parentSpanID = parentSpanID
    }
}

// MARK: Postcard, by hand

extension PostcardWriter {
    mutating func writeOptional(_ value: String?) {
        if let value {
            writeByte(1)
            writeString(value)
        } else {
            writeByte(0)
        }
    }

    mutating func writeOptional(_ value: UInt32?) {
        writeOptional(value.map(UInt64.init))  // the same varint on the wire
    }

    mutating func writeOptional(_ value: UInt64?) {
        if let value {
            writeByte(1)
            writeVarint(value)
        } else {
            writeByte(0)
        }
    }

    mutating func writeFields(_ fields: [TraceField]) {
        writeVarint(UInt64(fields.count))
        for field in fields {
            writeString(field.name)
            writeString(field.value)
        }
    }

    mutating func write(_ meta: SpanMeta) {
        writeString(meta.name)
        writeString(meta.target)
        writeString(meta.level)
        writeOptional(meta.file)
        writeOptional(meta.line)
        writeFields(meta.fields)
    }

    mutating func write(_ meta: EventMeta) {
        writeString(meta.message)
        writeString(meta.target)
        writeString(meta.level)
        writeOptional(meta.file)
        writeOptional(meta.line)
        writeFields(meta.fields)
        writeOptional(meta.parentSpanID)
    }
}

extension PostcardReader {
    mutating func readOptionalString() throws -> String? {
        try readOptionalTag() ? try readString() : nil
    }

    mutating func readOptionalUInt32() throws -> UInt32? {
        try readOptionalTag() ? try readVarint32() : nil
    }

    mutating func readOptionalUInt64() throws -> UInt64? {
        try readOptionalTag() ? try readVarint64() : nil
    }

    mutating func readFields() throws -> [TraceField] {
        // Each field takes at least two bytes (two empty strings): never reserve for more
        // than could follow.
        let count = try readCount(minimumElementSize: 2)
        var fields: [TraceField] = []
        fields.reserveCapacity(count)
        for _ in 0..<count {
            fields.append(TraceField(name: try readString(), value: try readString()))
        }
        return fields
    }

    mutating func readSpanMeta() throws -> SpanMeta {
        SpanMeta(
            name: try readString(), target: try readString(), level: try readString(),
            file: try readOptionalString(), line: try readOptionalUInt32(), fields: try readFields())
    }

    mutating func readEventMeta() throws -> EventMeta {
        EventMeta(
            message: try readString(), target: try readString(), level: try readString(),
            file: try readOptionalString(), line: try readOptionalUInt32(), fields: try readFields(),
            parentSpanID: try readOptionalUInt64())
    }
}
