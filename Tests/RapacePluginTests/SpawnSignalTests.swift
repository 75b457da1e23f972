import Foundation
import Rapace
import RapaceTestSupport
@testable import RapacePlugin
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `Sys.spawn` starts every child with no signal blocked and default dispositions, whatever
/// the spawning thread blocks and this process ignores: a plugin spawned from a thread that
/// blocks `SIGTERM` (as the cooperative pool's do) must still end on the `SIGTERM` that
/// `PluginProcess` sends when it retires it, not only on the `SIGKILL` after the grace period.
/// Every process here is the test's own (spawned, and killed and reaped however the test ends,
/// by `ChildProcess`).
@Suite(.sharesProcess) struct SpawnSignalTests {
    @Test func aChildOfAThreadThatBlocksSIGTERMStartsWithNothingBlockedAndSIGTERMEndsIt() async throws {
        let spawned = try await spawnOnAThreadBlockingSIGTERM("/bin/sleep", ["30"])
        let sleeper = spawned.child
        defer { sleeper.terminate() }
        #expect(spawned.spawnerBlockedSIGTERM, "the spawning thread did not block SIGTERM: the test proves nothing")
        let state = try SignalState(of: sleeper.pid)
        #expect(state.blocked == 0, "the child blocks \(state)")
        sleeper.signal(SIGTERM)
        // Generous: a SIGTERM the child blocks stays pending, and this times out (and kills it).
        let finished = try await sleeper.runToExit(timeout: .seconds(10))
        #expect(finished.status == -SIGTERM, "wait status \(finished.waitStatus)")
    }

    @Test(.ownsProcess("sets SIGPIPE and SIGUSR1 to SIG_IGN in this process, a process-wide switch, while it spawns"))
    func aChildStartsWithDefaultDispositionsWhereThisProcessIgnoresSignals() async throws {
        var oldPipe = sigaction()
        var oldUser1 = sigaction()
        try #require(sigaction(SIGPIPE, nil, &oldPipe) == 0 && sigaction(SIGUSR1, nil, &oldUser1) == 0)
        let sleeper: ChildProcess
        let parent: SignalState
        do {
            defer {
                sigaction(SIGPIPE, &oldPipe, nil)
                sigaction(SIGUSR1, &oldUser1, nil)
            }
            signal(SIGPIPE, SIG_IGN)
            signal(SIGUSR1, SIG_IGN)
            parent = try SignalState(of: getpid())
            sleeper = try ChildProcess("/bin/sleep", ["30"])
        }
        defer { sleeper.terminate() }
        #expect(parent.ignores(SIGPIPE) && parent.ignores(SIGUSR1), "this process: \(parent)")
        let child = try SignalState(of: sleeper.pid)
        // Signals 32 and 33 are glibc's own (no program can set them: sigaddset refuses them),
        // which its posix_spawn leaves ignored in every child; a glibc program reinstalls them.
        #expect(child.ignored & SignalState.standardSignals == 0, "the child ignores \(child)")
        #expect(child.blocked == 0, "the child blocks \(child)")
    }

    /// A child spawned on a thread of its own and whether that thread blocked `SIGTERM`.
    private struct Spawned: Sendable {
        let child: ChildProcess
        let spawnerBlockedSIGTERM: Bool
    }

    /// Spawns `executable` through `ChildProcess` (so `Sys.spawn`) from a new thread that
    /// first blocks `SIGTERM` (on that thread only) and then ends. Waits for it at most 10 s;
    /// a child it spawns later is killed and reaped when the thread's closure releases it.
    private func spawnOnAThreadBlockingSIGTERM(_ executable: String, _ arguments: [String]) async throws -> Spawned {
        let outcome = Mutex<Result<Spawned, any Error>?>(nil)
        try startDetachedThread {
            var terminate = sigset_t()
            var current = sigset_t()
            sigemptyset(&terminate)
            sigaddset(&terminate, SIGTERM)
            let result: Result<Spawned, any Error>
            if pthread_sigmask(SIG_BLOCK, &terminate, nil) != 0 || pthread_sigmask(SIG_BLOCK, nil, &current) != 0 {
                result = .failure(TestFailure("pthread_sigmask failed"))
            } else {
                let blocked = sigismember(&current, SIGTERM) == 1
                result = Result { Spawned(child: try ChildProcess(executable, arguments), spawnerBlockedSIGTERM: blocked) }
            }
            outcome.withLock { $0 = result }
        }
        let finished = await waitUntil(timeout: .seconds(10)) { outcome.withLock { $0 != nil } }
        try #require(finished, "the spawning thread did not finish within 10 s")
        return try outcome.withLock { $0! }.get()
    }
}

/// A process's blocked and ignored signals (`SigBlk` and `SigIgn` of `/proc/PID/status`:
/// bit `n - 1` for signal `n`).
private struct SignalState: CustomStringConvertible {
    let blocked: UInt64
    let ignored: UInt64

    init(of pid: pid_t) throws {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        func mask(_ name: String) throws -> UInt64 {
            for line in status.split(separator: "\n") where line.hasPrefix(name + ":") {
                let hex = line.dropFirst(name.count + 1).trimmingCharacters(in: .whitespaces)
                if let value = UInt64(hex, radix: 16) { return value }
            }
            throw TestFailure("no \(name) in /proc/\(pid)/status")
        }
        blocked = try mask("SigBlk")
        ignored = try mask("SigIgn")
    }

    /// Signals 1 to 31.
    static let standardSignals: UInt64 = 0x7FFF_FFFF

    func ignores(_ signal: Int32) -> Bool { ignored & (1 << UInt64(signal - 1)) != 0 }

    var description: String {
        "SigBlk \(String(blocked, radix: 16)), SigIgn \(String(ignored, radix: 16))"
    }
}
