import Logging
import RapaceTestSupport
import Synchronization
@testable import RapaceTracing
import Testing

/// The fields of the records ``ForwardingLogHandler`` buffers (read before any session is
/// attached, where they wait).
@Suite(.sharesProcess) struct ForwardingLogHandlerTests {
    /// `EventMeta.fields` is sorted by name: a logged error's field `error` goes in its place
    /// among the metadata, and replaces a metadata entry of that name rather than repeat it.
    @Test func aLoggedErrorIsAFieldInItsPlaceByName() {
        let tracing = PluginTracing(PluginTracing.Configuration(filter: TracingFilter(level: .trace)))
        // The call's metadata only.
        let plain = Logger(label: "plain") { tracing.makeLogHandler(label: $0) }
        plain.info("failed", error: Failure(), metadata: ["zone": "eu", "attempt": "2"])
        // The handler's metadata too, and an entry named `error`.
        var tagged = Logger(label: "tagged") { tracing.makeLogHandler(label: $0) }
        tagged[metadataKey: "zone"] = "us"
        tagged.info("failed again", error: Failure(), metadata: ["error": "from metadata", "attempt": "3"])
        tagged.info("no error", metadata: ["error": "from metadata"])
        let fields = tracing.state.withLock { state in
            state.queue.compactMap { record -> [TraceField]? in if case .event(let meta) = record { meta.fields } else { nil } }
        }
        #expect(fields == [
            [TraceField(name: "attempt", value: "2"), TraceField(name: "error", value: "it failed"), TraceField(name: "zone", value: "eu")],
            [TraceField(name: "attempt", value: "3"), TraceField(name: "error", value: "it failed"), TraceField(name: "zone", value: "us")],
            [TraceField(name: "error", value: "from metadata"), TraceField(name: "zone", value: "us")],
        ])
    }
}

private struct Failure: Error, CustomStringConvertible {
    var description: String { "it failed" }
}
