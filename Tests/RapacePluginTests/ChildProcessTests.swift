import Foundation
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `ChildProcess` (RapaceTestSupport): the output pipe of one child must not leak into
/// children spawned after it (or meanwhile, by another test), whose lifetime would then
/// hold off its end of output.
@Suite(.sharesProcess) struct ChildProcessTests {
    @Test func aLaterChildDoesNotInheritAnEarlierChildsPipe() async throws {
        let first = try ChildProcess("/bin/sleep", ["30"])
        defer { first.terminate() }
        // The first child's stdout is the write end of its pipe: both ends share the inode.
        let pipe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(first.pid)/fd/1")
        #expect(pipe.hasPrefix("pipe:["), "\(pipe)")
        let second = try await FinishedProcess.run("/bin/sh", ["-c", "ls -l /proc/$$/fd"], capturing: .stdout, timeout: .seconds(10))
        #expect(second.status == 0)
        #expect(second.output.contains("pipe:["), "the listing shows the second child's own stdout: \(second.output)")
        #expect(!second.output.contains(pipe), "the second child holds the first child's pipe: \(second.output)")
    }
}
