import Logging
import RapaceTestSupport
import Testing

@Suite("LogCapture", .sharesProcess)
struct LogCaptureTests {
    @Test("an entry carries the logger's own metadata and the call's, the call's winning")
    func metadataIsMerged() {
        let capture = LogCapture()
        var logger = capture.logger(label: "test")
        logger[metadataKey: "peer"] = "unix:/tmp/a"
        logger[metadataKey: "stream"] = "stderr"
        logger.info("plain")
        logger.info("overridden", metadata: ["stream": "stdout", "extra": "1"])
        let entries = capture.entries()
        #expect(entries.map(\.metadata) == [
            ["peer": "unix:/tmp/a", "stream": "stderr"],
            ["peer": "unix:/tmp/a", "stream": "stdout", "extra": "1"],
        ])
        #expect(capture.lines == ["[test] [stderr] plain", "[test] [stdout] overridden"])
    }
}
