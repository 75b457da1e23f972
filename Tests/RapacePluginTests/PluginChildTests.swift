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
        defer {
            // As the watcher would: once the bystander is reaped, a reap through the child
            // finds no child of that pid (ECHILD) and closes the pidfd.
            bystander.terminate()
            #expect(throws: SystemError.self) { try child.reapIfExited() }
            #expect(!child.hasOpenPidfd)
        }
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
    @Test(.enabled(if: kernelHasPidfd, "needs pidfd_open (Linux 5.3+)"))
    func aSignalAfterTheWatchersReapSendsNothingWithAPidfd() async throws {
        try await aSignalAfterTheWatchersReapSendsNothing(withPidfd: true)
    }

    @Test func aSignalAfterTheWatchersReapSendsNothingWithoutAPidfd() async throws {
        try await aSignalAfterTheWatchersReapSendsNothing(withPidfd: false)
    }

    private func aSignalAfterTheWatchersReapSendsNothing(withPidfd: Bool) async throws {
        let pid = try Sys.spawn("/bin/sleep", arguments: ["30"], environment: [], redirections: [])
        let child = PluginChild(pid: pid, pidfd: withPidfd ? (try? Sys.pidfdOpen(pid)) : nil)
        defer { _ = killAndReap(child) }
        #expect(child.hasOpenPidfd == withPidfd)
        #expect(try child.signal(SIGTERM))
        let status = await reap(child)
        #expect(status.map { PluginExitStatus(waitStatus: $0) } == .signalled(SIGTERM))
        #expect(!child.hasOpenPidfd)
        #expect(try child.signal(SIGTERM) == false)
        #expect(try child.signal(SIGKILL) == false)
    }

    /// How a signaller thread stopped.
    private enum SignallerEnd: Equatable {
        /// A signal returned false: the child had been reaped.
        case sawTheChildGone
        case failed(SystemError)
        /// Still signalling after 60 s: it never saw the reap.
        case timedOut
    }

    /// A signaller on another thread that keeps signalling while the child is reaped (the reap
    /// closes the pidfd) never gets EBADF: each signal goes before the reap, through the open
    /// pidfd, or after it, and finds the child gone. Every round shows the signaller running
    /// on both sides of the reap: the reap begins only once a signal has gone through, and the
    /// signaller stops only on finding the child gone. What this cannot force from outside
    /// `PluginChild` is the exact window its lock closes (the pidfd read, the reap closing it,
    /// then the stale number used): without the lock the rounds make hitting it likely, not
    /// certain.
    @Test(.enabled(if: kernelHasPidfd, "needs pidfd_open (Linux 5.3+)"))
    func aSignallerRunningAcrossTheReapNeverUsesAClosedPidfd() async throws {
        for round in 0..<20 {
            let pid = try Sys.spawn("/bin/sh", arguments: ["-c", "exit 0"], environment: [], redirections: [])
            let child = PluginChild(pid: pid, pidfd: try? Sys.pidfdOpen(pid))
            defer { _ = killAndReap(child) }
            try #require(child.hasOpenPidfd)
            // Signals that went through (the child exists until the reap, as a zombie at least).
            let sent = Atomic<Int>(0)
            let end = Mutex<SignallerEnd?>(nil)
            try startDetachedThread {
                // Signal 0 checks that the process exists; it sends nothing. The bound is for a
                // signaller that never sees the reap; it must outlast the test's wait for the
                // signaller below (a loaded machine can keep this task from running for
                // seconds), since a signaller that gives up before the reap proves nothing.
                let deadline = ContinuousClock.now + .seconds(60)
                while ContinuousClock.now < deadline {
                    do throws(SystemError) {
                        guard try child.signal(0) else {
                            end.withLock { $0 = .sawTheChildGone }
                            return
                        }
                        sent.add(1, ordering: .relaxed)
                    } catch {
                        end.withLock { $0 = .failed(error) }
                        return
                    }
                }
                end.withLock { $0 = .timedOut }
            }
            // The signaller is under way before the reap begins...
            #expect(
                await waitUntil(timeout: .seconds(30), interval: .milliseconds(1)) { sent.load(ordering: .relaxed) > 0 || end.withLock { $0 } != nil },
                "round \(round)")
            #expect(sent.load(ordering: .relaxed) > 0 && end.withLock { $0 } == nil, "round \(round): the signaller stopped before the reap: \(String(describing: end.withLock { $0 }))")
            #expect(await reap(child) == 0, "round \(round)")
            // ...and still signalling when it happens: it stops only by finding the child gone.
            #expect(await waitUntil(timeout: .seconds(15)) { end.withLock { $0 } != nil }, "round \(round)")
            #expect(end.withLock { $0 } == .sawTheChildGone, "round \(round): \(String(describing: end.withLock { $0 }))")
        }
    }

    static var seccompAvailable: Bool {
        (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8))?.contains("\nSeccomp:") == true
    }

    /// Under a seccomp filter that refuses `pidfd_send_signal` with `EPERM` (as container
    /// runtimes' filters often answer) while `pidfd_open` worked, a signal still reaches the
    /// child, by pid, instead of failing. In a process of its own (an exit test): the filter
    /// cannot be taken off again.
    @Test(.enabled(if: kernelHasPidfd && seccompAvailable, "needs pidfd_open (Linux 5.3+) and seccomp"))
    func aSignalThatSeccompRefusesThroughThePidfdGoesByPid() async {
        await #expect(processExitsWith: .success) {
            // Exit codes: 1 the signal failed, 2 the child ended otherwise, 3 it did not end,
            // 10-14 the set-up failed.
            guard let pid = try? Sys.spawn("/bin/sleep", arguments: ["30"], environment: [], redirections: []) else { exit(10) }
            guard let pidfd = try? Sys.pidfdOpen(pid) else {
                kill(pid, SIGKILL)
                exit(11)
            }
            let child = PluginChild(pid: pid, pidfd: pidfd)
            // On this thread (and threads it starts) from here on; this closure never suspends.
            guard PluginChildTests.refusePidfdSendSignalWithEPERM() else {
                kill(pid, SIGKILL)
                exit(12)
            }
            do throws(SystemError) {
                try Sys.pidfdSendSignal(pidfd, 0)
                kill(pid, SIGKILL)
                exit(13)  // the filter is not in force
            } catch {
                if error.errno.rawValue != EPERM {
                    kill(pid, SIGKILL)
                    exit(14)
                }
            }
            guard (try? child.signal(SIGTERM)) == true else {
                kill(pid, SIGKILL)
                exit(1)
            }
            for _ in 0..<10_000 {
                if let status = try? child.reapIfExited() { exit(PluginExitStatus(waitStatus: status) == .signalled(SIGTERM) ? 0 : 2) }
                usleep(1000)
            }
            kill(pid, SIGKILL)
            exit(3)
        }
    }

    /// Installs a seccomp filter on the calling thread under which `pidfd_send_signal` fails
    /// with `EPERM` and every other call runs (`PR_SET_NO_NEW_PRIVS`, then `PR_SET_SECCOMP`
    /// with `SECCOMP_MODE_FILTER`): whether it could.
    private static func refusePidfdSendSignalWithEPERM() -> Bool {
        // prctl is variadic, which Swift does not import: it is called through a pointer of a
        // fixed-argument type (integer arguments pass the same way on Linux x86-64 and
        // AArch64).
        typealias Prctl = @convention(c) (Int32, UInt, UInt, UInt, UInt) -> Int32
        guard let symbol = dlsym(nil, "prctl") else { return false }
        let prctl = unsafeBitCast(symbol, to: Prctl.self)
        // A classic-BPF `struct sock_filter` (code, jt, jf, k) as one little-endian word.
        func instruction(_ code: UInt16, _ jumpIfTrue: UInt8, _ jumpIfFalse: UInt8, _ k: UInt32) -> UInt64 {
            UInt64(code) | UInt64(jumpIfTrue) << 16 | UInt64(jumpIfFalse) << 24 | UInt64(k) << 32
        }
        let pidfdSendSignal: UInt32 = 424  // the same number on every Linux architecture
        var program: [UInt64] = [
            instruction(0x20, 0, 0, 0),  // BPF_LD | BPF_W | BPF_ABS: seccomp_data.nr
            instruction(0x15, 0, 1, pidfdSendSignal),  // BPF_JMP | BPF_JEQ | BPF_K
            instruction(0x06, 0, 0, 0x0005_0000 | UInt32(EPERM)),  // BPF_RET: SECCOMP_RET_ERRNO | EPERM
            instruction(0x06, 0, 0, 0x7FFF_0000),  // BPF_RET: SECCOMP_RET_ALLOW
        ]
        return program.withUnsafeMutableBufferPointer { filter in
            // `struct sock_fprog`: the instruction count (padded to 8 bytes), then the pointer.
            var header: [UInt] = [UInt(filter.count), UInt(bitPattern: filter.baseAddress)]
            return header.withUnsafeMutableBufferPointer { header in
                prctl(38, 1, 0, 0, 0) == 0  // PR_SET_NO_NEW_PRIVS
                    && prctl(22, 2, UInt(bitPattern: header.baseAddress), 0, 0) == 0  // PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            }
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
