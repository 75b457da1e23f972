/// Which records a plugin forwards: a level per target, in the syntax of tracing's
/// `EnvFilter` (the part of it that is about targets and levels).
///
/// A filter is a comma-separated list of directives:
///
/// | directive        | meaning                                                      |
/// |------------------|--------------------------------------------------------------|
/// | `LEVEL`          | the level for targets no other directive names               |
/// | `TARGET=LEVEL`   | the level for `TARGET` and the targets below it              |
/// | `TARGET`         | `TARGET=trace`                                               |
///
/// `LEVEL` is `trace`, `debug`, `info`, `warn` (or `warning`), `error` or `off`, in any
/// case. A record passes when its level is at least the level of the most specific
/// directive whose target is the record's target or a prefix of it ending at a `.`, `::`
/// or `/` boundary (`image` covers `image.codec` and `image::png`, not `imagery`). Without
/// a bare `LEVEL`, unnamed targets get `error`. Examples: `info`, `warn,image.codec=trace`,
/// `debug,noisy=off`.
///
/// Targets are logger labels for log records and module names for spans.
public struct TracingFilter: Sendable, Hashable, CustomStringConvertible {
    struct Directive: Sendable, Hashable {
        let target: String
        /// nil: off.
        let level: TraceLevel?
    }

    /// The level for targets no directive names (nil: off).
    let defaultLevel: TraceLevel?
    /// Longest target first, so the first match is the most specific.
    let directives: [Directive]
    /// The text the filter was parsed from.
    public let description: String

    /// Everything at or above `level`.
    public init(level: TraceLevel) {
        defaultLevel = level
        directives = []
        description = level.rawValue.lowercased()
    }

    /// Parses `text`; the error names the directive that does not parse.
    public init(parsing text: String) throws(TracingFilterError) {
        var defaultLevel: TraceLevel? = .error
        var sawDefault = false
        var byTarget: [String: TraceLevel?] = [:]
        for (index, raw) in text.split(separator: ",", omittingEmptySubsequences: false).enumerated() {
            let directive = raw.trimmingSpaces
            if directive.isEmpty {
                if text.trimmingSpaces.isEmpty { break }
                throw TracingFilterError("directive \(index + 1) of \"\(text)\" is empty")
            }
            let parts = directive.split(separator: "=", maxSplits: 2, omittingEmptySubsequences: false)
            switch parts.count {
            case 1:
                if let level = Self.level(parts[0]) {
                    if sawDefault { throw TracingFilterError("\"\(text)\" sets the default level twice") }
                    sawDefault = true
                    defaultLevel = level
                } else {
                    try Self.checkTarget(parts[0], in: text)
                    byTarget[String(parts[0])] = .some(.trace)
                }
            case 2:
                let target = parts[0].trimmingSpaces, levelText = parts[1].trimmingSpaces
                try Self.checkTarget(target, in: text)
                guard let level = Self.level(levelText) else {
                    throw TracingFilterError(
                        "\"\(levelText)\" in \"\(directive)\" is not a level (trace, debug, info, warn, error or off)")
                }
                byTarget[String(target)] = .some(level)
            default:
                throw TracingFilterError("\"\(directive)\" has more than one '='")
            }
        }
        self.defaultLevel = defaultLevel
        self.directives = byTarget.map { Directive(target: $0.key, level: $0.value) }
            .sorted { $0.target.utf8.count != $1.target.utf8.count ? $0.target.utf8.count > $1.target.utf8.count : $0.target < $1.target }
        self.description = text
    }

    /// The level `target` passes at, or nil when it is off.
    public func level(for target: String) -> TraceLevel? {
        for directive in directives where Self.covers(directive.target, target) { return directive.level }
        return defaultLevel
    }

    /// Whether a record of `level` from `target` passes.
    public func allows(_ level: TraceLevel, target: String) -> Bool {
        guard let threshold = self.level(for: target) else { return false }
        return level >= threshold
    }

    /// The lowest level any target passes at (nil: everything is off). Loggers skip
    /// records below it before building them.
    public var lowestLevel: TraceLevel? {
        var lowest = defaultLevel
        for directive in directives {
            guard let level = directive.level else { continue }
            if lowest == nil || level < lowest! { lowest = level }
        }
        return lowest
    }

    static func covers(_ prefix: String, _ target: String) -> Bool {
        guard target.hasPrefix(prefix) else { return false }
        let rest = target.utf8.dropFirst(prefix.utf8.count)
        guard let next = rest.first else { return true }
        return next == UInt8(ascii: ".") || next == UInt8(ascii: "/")
            || (next == UInt8(ascii: ":") && rest.dropFirst().first == UInt8(ascii: ":"))
    }

    static func level(_ text: Substring) -> TraceLevel?? {
        switch text.lowercased() {
        case "trace": .some(.trace)
        case "debug": .some(.debug)
        case "info": .some(.info)
        case "warn", "warning": .some(.warn)
        case "error": .some(.error)
        case "off": .some(nil)
        default: nil
        }
    }

    static func checkTarget(_ target: Substring, in text: String) throws(TracingFilterError) {
        guard !target.isEmpty else { throw TracingFilterError("a directive of \"\(text)\" has an empty target") }
        for byte in target.utf8 where byte <= 0x20 || byte == 0x7F || byte == UInt8(ascii: "[") || byte == UInt8(ascii: "{") {
            throw TracingFilterError("target \"\(target)\" contains '\(Character(Unicode.Scalar(byte)))' (span and field filters are not supported)")
        }
    }
}

/// A filter that does not parse; the message names the directive.
public struct TracingFilterError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What is wrong, naming the directive or target at fault.
    public let message: String
    init(_ message: String) { self.message = message }
    public var description: String { "invalid tracing filter: \(message)" }
}

extension StringProtocol {
    var trimmingSpaces: Substring {
        let text = Substring(self)
        guard let start = text.firstIndex(where: { $0 != " " && $0 != "\t" }) else { return text[text.endIndex...] }
        let end = text.lastIndex(where: { $0 != " " && $0 != "\t" })!
        return text[start...end]
    }
}
