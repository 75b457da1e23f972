import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The `/proc/PID/stat` reader against what the kernel says through system calls.
@Suite(.sharesProcess) struct ProcessInspectionTests {
    @Test func thisProcessReadsAsLiveWithItsParentAndGroup() throws {
        let stat = try #require(ProcessStat.of(getpid()))
        #expect(stat.isLive)
        #expect(stat.parent == getppid())
        #expect(stat.group == getpgrp())
        #expect(stat.cpuTicks >= 0)
        #expect(liveProcesses(inGroup: getpgrp()).contains(getpid()))
        #expect(!processIsGone(getpid()))
    }

    @Test func aReapedChildIsGoneAndAZombieIsNotLive() async throws {
        let child = try ChildProcess("/bin/sh", ["-c", "exit 0"])
        // Not reaped yet: once it has exited it is a zombie, neither live nor a group member.
        #expect(await waitUntil(timeout: .seconds(10)) { ProcessStat.of(child.pid)?.state == "Z" })
        #expect(processIsGone(child.pid))
        #expect(!liveProcesses(inGroup: getpgrp()).contains(child.pid))
        try child.wait()
        #expect(ProcessStat.of(child.pid) == nil)
        #expect(processIsGone(child.pid))
    }
}
