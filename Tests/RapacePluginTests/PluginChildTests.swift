import Foundation
import Rapace
import RapaceTestSupport
@testable import RapacePlugin
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `PluginChild` and `Sys.pidfdSendSignal`: a plugin's process is signalled through its pidfd,
/// and once it has been reaped a signal reaches nothing, never another process that got its
/// pid. Every process here is the test's own (spawned and reaped by it).
@Suite(.sharesProcess) struct PluginChildTests {
    static var kernelHasPidfd: Bool { PluginRuntimeTests.kernelHasPidfd }

    @Test(.enabled(if: kernelHasPidfd, "needs pidfd_open (Linux 5.3+)"))
    func pidfdSendSignalReachesTheLiveChildAndFindsTheReapedOneGone() async throws {
        let sleeper = try ChildProcess("/bin/sleep", ["30"])
        defer { sleeper.terminate() }
        let pidfd = try Sys.pidfdOpen(sleeper.pid)
        defer { close(pidfd) }
        // SIGTERM: children start with nothing blocked (SpawnSignalTests), so it ends it.
        #expect(try Sys.pidfdSendSignal(pidfd, SIGTERM))
        let finished = try await sleeper.runToExit(timeout: .seconds(10))
        #expect(PluginExitStatus(waitStatus: finished.waitStatus) == .signalled(SIGTERM))
        // Reaped: the pidfd still refers to that process, which is gone (ESRCH, no error).
        #expect(try Sys.pidfdSendSignal(pidfd, SIGKILL) == false)
    }

    /// The window the old `kill(pid)` left: the plugin's process has been reaped but the
    /// instance does not know yet (its `status` is still nil), and its pid names another
    /// process. The kernel does not reuse a pid on request, so the child is given the pid of
    /// a live process of the test's own, as if the kernel had; by pid it would be killed.
    @Test(.enabled(if: kernelHasPidfd, "needs pidfd_open (Linux 5.3+)"))
    func aKillAfterTheReapDoesNotReachAProcessThatGotThePid() async throws {
        let bystander = try ChildProcess("/bin/sleep", ["30"])
        defer { bystander.terminate() }
        let plugin = try ChildProcess("/bin/sh", ["-c", "exit 0"])
        defer { plugin.terminate() }
        // Opened before the reap below, as the spawner opens it before its watcher reaps; the
        // child owns it from here.
        let child = PluginChild(pid: bystander.pid, pidfd: try Sys.pidfdOpen(plugin.pid))
        _ = try await plugin.runToExit(timeout: .seconds(10))
        let instance = PluginInstance(generation: 1, path: "unused")
        instance.child = child
        #expect(instance.status == nil && instance.pid == bystander.pid)
        instance.kill(SIGKILL)
        #expect(try child.signal(SIGKILL) == false)
        let killed = await waitGone(bystander.pid, timeout: .milliseconds(300))
        #expect(!killed, "the signal reached pid \(bystander.pid)")
    }

    /// The watcher's reap goes through the child: after it, a signal sends nothing and the
    /// pidfd is closed; before it, a signal is delivered. With and without a pidfd.
    @Test(arguments: [true, false])
    func aSignalAfterTheWatchersReapSendsNothing(withPidfd: Bool) async throws {
        if withPidfd && !Self.kernelHasPidfd { return }
        let pid = try Sys.spawn("/bin/sleep", arguments: ["30"], environment: [], redirections: [])
        let child = PluginChild(pid: pid, pidfd: withPidfd ? (try? Sys.pidfdOpen(pid)) : nil)
        defer { _ = killAndReap(child) }
        #expect((child.pidfdToPoll != nil) == withPidfd)
        #expect(try child.signal(SIGTERM))
        let status = await reap(child)
        #expect(status.map { PluginExitStatus(waitStatus: $0) } == .signalled(SIGTERM))
        #expect(child.pidfdToPoll == nil)
        #expect(try child.signal(SIGTERM) == false)
        #expect(try child.signal(SIGKILL) == false)
    }

    /// A signaller on another thread racing the reap (which closes the pidfd) never gets
    /// EBADF: it signals before the reap, through an open pidfd, or sees the child gone.
    @Test(.enabled(if: kernelHasPidfd, "needs pidfd_open (Linux 5.3+)"))
    func aSignalRacingTheReapNeverUsesAClosedPidfd() async throws {
        for round in 0..<20 {
            let pid = try Sys.spawn("/bin/sh", arguments: ["-c", "exit 0"], environment: [], redirections: [])
            let child = PluginChild(pid: pid, pidfd: try? Sys.pidfdOpen(pid))
            defer { _ = killAndReap(child) }
            try #require(child.pidfdToPoll != nil)
            let errors = Mutex<[SystemError]>([])
            let signaller = Atomic<Int>(0)  // 0 running, 1 done
            let started = startDetachedThread {
                // Signal 0 checks that the process exists; until the reap it always does.
                for _ in 0..<1_000_000 {
                    do throws(SystemError) {
                        if try !child.signal(0) { break }
                    } catch {
                        errors.withLock { $0.append(error) }
                        break
                    }
                }
                signaller.store(1, ordering: .releasing)
            }
            try #require(started)
            #expect(await reap(child) == 0, "round \(round)")
            #expect(await waitUntil(timeout: .seconds(10)) { signaller.load(ordering: .acquiring) == 1 }, "round \(round)")
            #expect(errors.withLock { $0 }.isEmpty, "round \(round): \(errors.withLock { $0 })")
        }
    }

    /// Reaps `child` through it as the watcher does, waiting at most 10 s: its wait status.
    private func reap(_ child: PluginChild) async -> Int32? {
        var status: Int32?
        _ = await waitUntil(timeout: .seconds(10), interval: .milliseconds(1)) {
            status = try? child.reapIfExited()
            return status != nil
        }
        return status
    }

    /// Kills and reaps `child` if it has not been reaped yet (bounded: 5 s).
    private func killAndReap(_ child: PluginChild) -> Int32? {
        guard (try? child.signal(SIGKILL)) == true else { return nil }
        for _ in 0..<5000 {
            if let status = try? child.reapIfExited() { return status }
            usleep(1000)
        }
        return nil
    }
}
