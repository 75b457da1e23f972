import EchoService
import Foundation
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// Adaptive spinning before the reactor blocks (`ShmTransport.spinPolicy`): host and plugin
/// in this process, each on its own reactor thread, pinned to chosen CPUs.
@Suite("Shared memory: adaptive spin", .serialized, .sharesProcess)
struct ShmSpinTests {
    /// Debug builds are slow and the VM is noisy: a budget that outlasts their turnaround.
    static let policy = ShmSpinPolicy.adaptive(maximum: .microseconds(200))

    /// A host (Echo) and a plugin session on two reactors, both spinning
    /// (``withShmHost(_:config:services:prepare:started:_:)``, which closes the listener and
    /// removes the files however `body` ends).
    private func withSpinningPair(
        _ tag: String, hostCPU: Int, pluginCPU: Int,
        _ body: (Session, Reactor, Reactor) async throws -> Void
    ) async throws {
        try await withShmHost(tag, prepare: { transport in transport.spinPolicy = ShmSpinTests.policy }) { path, hostReactor, _, pluginReactor in
            #expect(await onLoop(hostReactor) { pinCurrentThread(to: hostCPU) })
            #expect(await onLoop(pluginReactor) { pinCurrentThread(to: pluginCPU) })
            let session = try await Session.connect(shm: path.path, reactor: pluginReactor)
            await onLoop(pluginReactor) { (session.frameTransport as! ShmTransport).spinPolicy = ShmSpinTests.policy }
            try await body(session, hostReactor, pluginReactor)
            await session.closeAndWait()
        }
    }

    @Test(
        "spinning on both sides across CPUs: mixed calls are correct, answers are seen while spinning, few doorbells",
        .enabled(if: Sys.onlineCPUCount >= 2, "needs two CPUs"),
        .ownsProcess("spinning sees answers only while the two pinned CPUs are otherwise idle"))
    func acrossCPUs() async throws {
        try await withSpinningPair("spin-across", hostCPU: 0, pluginCPU: 1) { session, _, pluginReactor in
            let echo = EchoClient(session)
            let text = String(repeating: "spin ", count: 40)  // in a slot, not inline
            let before = await onLoop(pluginReactor) { (session.frameTransport as! ShmTransport).statistics }
            let ok = try await pluginReactor.run {
                var good = true
                for index in 0..<3000 {
                    switch index % 3 {
                    case 0: good = try await echo.add(Int32(index), 1) == Int32(index) + 1 && good
                    case 1: good = try await echo.echo(text) == text && good
                    default:
                        var items: [UInt32] = []
                        for try await item in echo.countdown(from: 3) { items.append(item) }
                        good = items == [3, 2, 1] && good
                    }
                }
                return good
            }
            #expect(ok)
            let after = await onLoop(pluginReactor) { (session.frameTransport as! ShmTransport).statistics }
            let spins = after.spins - before.spins, hits = after.spinHits - before.spinHits
            let doorbells = after.doorbellsRung - before.doorbellsRung
            #expect(spins > 1000, "the plugin spun \(spins) times")
            #expect(hits * 10 >= spins * 8, "\(hits) of \(spins) spins saw the answer")
            // Without spinning the plugin rings about once per call (3000); a host that spins
            // for the next request needs far fewer (it sleeps only after a miss).
            #expect(doorbells < 1000, "\(doorbells) doorbells in 3000 calls (\(hits) of \(spins) spins saw the answer)")
        }
    }

    @Test("never spins against a peer on the same CPU")
    func sameCPU() async throws {
        try await withSpinningPair("spin-same", hostCPU: 0, pluginCPU: 0) { session, _, pluginReactor in
            let echo = EchoClient(session)
            let sum = try await pluginReactor.run {
                var sum: Int32 = 0
                for index in 0..<2000 { sum &+= try await echo.add(Int32(index), 0) }
                return sum
            }
            #expect(sum == (0..<2000).reduce(0, +))
            let stats = await onLoop(pluginReactor) { (session.frameTransport as! ShmTransport).statistics }
            #expect(stats.spins == 0, "spun \(stats.spins) times against a peer on its own CPU")
        }
    }

    @Test(
        "an idle spinning pair goes quiet: at most 60 ms of CPU in 2 s", .enabled(if: Sys.onlineCPUCount >= 2, "needs two CPUs"),
        .ownsProcess("bounds the loop threads' CPU time"))
    func idle() async throws {
        try await withSpinningPair("spin-idle", hostCPU: 0, pluginCPU: 1) { session, hostReactor, pluginReactor in
            #expect(try await EchoClient(session).add(1, 2) == 3)
            try await Task.sleep(for: .milliseconds(100))
            // The two loop threads' own CPU time: the test runner's threads share the process.
            func loopsCPU() async -> Int {
                await onLoop(hostReactor) { threadCPUMicroseconds() } + (await onLoop(pluginReactor) { threadCPUMicroseconds() })
            }
            let before = await loopsCPU()
            try await Task.sleep(for: .seconds(2))
            let used = await loopsCPU() - before
            #expect(used <= 60_000, "an idle spinning pair used \(used / 1000) ms of CPU in 2 s")
        }
    }

    @Test("the policy is bounded and off by default")
    func policy() {
        #expect(ShmSpinPolicy.disabled.isEnabled == false)
        #expect(ShmSpinPolicy.adaptive().maximum == .microseconds(50))
        #expect(ShmSpinPolicy.adaptive(maximum: .seconds(5)).maximum == .milliseconds(10))
        // Seconds × 10⁹ used to wrap before the clamp: this many seconds wrapped to 512 ns.
        #expect(ShmSpinPolicy.adaptive(maximum: .seconds(20_211_507_185_753_197)).maximum == .milliseconds(10))
        #expect(ShmSpinPolicy.adaptive(maximum: .seconds(Int64.max)).maximum == .milliseconds(10))
        #expect(ShmSpinPolicy.adaptive(maximum: .microseconds(3)).maximum == .microseconds(3))
        #expect(ShmSpinPolicy.adaptive(maximum: .zero).isEnabled == false)
    }
}

/// User + system CPU time of the calling thread, in microseconds.
private func threadCPUMicroseconds() -> Int {
    var time = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time)
    return time.tv_sec * 1_000_000 + time.tv_nsec / 1000
}
