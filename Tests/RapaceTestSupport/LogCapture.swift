import Logging
import Synchronization

/// Collects what loggers made by ``logger(label:)`` receive, in order.
///
/// Entries that `countOnly` matches are counted, not kept: a test that floods a logger
/// with records keeps neither their memory nor their cost of copying.
package final class LogCapture: Sendable {
    /// One record a captured logger received, with its metadata flattened to strings: the
    /// logger's own (`logger[metadataKey:]`, such as a session's `peer`), then its metadata
    /// provider's, then the call's, a later one winning for the same key (as
    /// swift-log's `StreamLogHandler` merges them).
    package struct Entry: Sendable {
        package let label: String
        package let level: Logger.Level
        package let message: String
        package let metadata: [String: String]

        /// `[label] [stream] message`, `stream` being the `stream` metadata (the plugin
        /// host's stdout or stderr relay) or `-`.
        package var line: String { "[\(label)] [\(metadata["stream"] ?? "-")] \(message)" }
    }

    private let state = Mutex<(entries: [Entry], counted: Int)>(([], 0))
    private let countOnly: @Sendable (Entry) -> Bool

    package init(countOnly: @escaping @Sendable (Entry) -> Bool = { _ in false }) {
        self.countOnly = countOnly
    }

    /// Every kept entry, as ``Entry/line``.
    package var lines: [String] { state.withLock { $0.entries.map(\.line) } }

    /// The kept entries that satisfy `predicate`.
    package func entries(_ predicate: (Entry) -> Bool = { _ in true }) -> [Entry] {
        state.withLock { $0.entries.filter(predicate) }
    }

    /// How many entries `countOnly` matched.
    package var countedOnly: Int { state.withLock { $0.counted } }

    package func append(_ entry: Entry) {
        let count = countOnly(entry)
        state.withLock { state in
            if count { state.counted += 1 } else { state.entries.append(entry) }
        }
    }

    package func logger(label: String) -> Logger {
        Logger(label: label) { label in Handler(label: label, capture: self) }
    }

    /// Waits (bounded) until a line (``Entry/line``) satisfies `predicate`; returns it.
    package func waitForLine(timeout: Duration = .seconds(10), _ predicate: (String) -> Bool) async -> String? {
        var found: String?
        _ = await waitUntil(timeout: timeout, interval: .milliseconds(5)) {
            found = lines.first(where: predicate)
            return found != nil
        }
        return found
    }

    struct Handler: LogHandler {
        let label: String
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var metadataProvider: Logger.MetadataProvider?
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            var flat: [String: String] = [:]
            for (key, value) in metadata { flat[key] = value.description }
            for (key, value) in metadataProvider?.get() ?? [:] { flat[key] = value.description }
            for (key, value) in event.metadata ?? [:] { flat[key] = value.description }
            capture.append(Entry(label: label, level: event.level, message: event.message.description, metadata: flat))
        }
    }
}
