import EchoService
import Foundation
import Logging
import Rapace
@testable import RapacePlugin
import RapaceTestSupport
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `PluginHostError.code` for the failures that are cheap to provoke, and the error
/// underneath where there is one. (The missing executable, a plugin that exits before its
/// handshake and the handshake timeout are checked where `PluginRuntimeTests` provokes them.)
extension PluginRuntimeTests {
    @Test func hostErrorsAreEqualByCodeAndMessageNotByTheUnderlyingError() {
        let enoent = PluginHostError(.spawnFailed, "cannot start x", underlying: SystemError("posix_spawn(x)", errno: .noSuchFile))
        let eacces = PluginHostError(.spawnFailed, "cannot start x", underlying: SystemError("posix_spawn(x)", errno: Errno(rawValue: EACCES)))
        #expect(enoent == eacces)
        #expect(enoent.hashValue == eacces.hashValue)
        #expect(enoent != PluginHostError(.exitedBeforeHandshake, "cannot start x"))
        #expect(enoent != PluginHostError(.spawnFailed, "cannot start y"))
        #expect(enoent.description == "cannot start x")
        #expect(Set([enoent, eacces]).count == 1)
    }

    @Test func servicesClaimingOneMethodIDAreAServiceConflict() async throws {
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(name: "conflict", executable: examplePlugin, logger: Logger(label: "conflict"))
            configuration.services = [EchoServer(DefaultEcho()), EchoServer(DefaultEcho())]
            let error = try await launchFailure(configuration, reactor: reactor)
            #expect(error.code == .serviceConflict)
            #expect(error.message.contains("the host's services for conflict conflict"), "\(error)")
            let underlying = try #require(error.underlying as? RPCError, "\(String(describing: error.underlying))")
            #expect(error.message.contains(underlying.message), "\(error)")
            return []
        }
    }

    @Test func aSegmentThatCannotBeCreatedIsASegmentCreationFailure() async throws {
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(name: "nowhere", executable: examplePlugin, logger: Logger(label: "nowhere"))
            configuration.segmentDirectory = "/nonexistent-rapace-directory"
            let error = try await launchFailure(configuration, reactor: reactor)
            #expect(error.code == .segmentCreationFailed)
            #expect(error.message.contains("cannot create the segment for nowhere at /nonexistent-rapace-directory/"), "\(error)")
            let underlying = try #require(error.underlying as? ShmError, "\(String(describing: error.underlying))")
            #expect(underlying.systemError?.errno == .noSuchFile, "\(underlying)")
            return []
        }
    }

    @Test func aThreadThatCannotStartIsASpawnFailureCarryingItsSystemError() async throws {
        // pthread_create refusing (EAGAIN), as it does at a limit on threads.
        ProcessGate.expectExclusive("threadStartFailureForTesting (every thread a spawn starts in this process fails)")
        PluginSpawner.threadStartFailureForTesting.withLock { $0 = .wouldBlock }
        defer { PluginSpawner.threadStartFailureForTesting.withLock { $0 = nil } }
        try await withLeakCheckedReactor { reactor in
            let configuration = PluginConfiguration(name: "threadless", executable: examplePlugin, logger: Logger(label: "threadless"))
            let error = try await launchFailure(configuration, reactor: reactor)
            #expect(error.code == .spawnFailed)
            #expect(error.message.hasPrefix("cannot start a thread to spawn \(examplePlugin): "), "\(error)")
            let underlying = try #require(error.underlying as? SystemError, "\(String(describing: error.underlying))")
            #expect(underlying == SystemError("pthread_create", errno: .wouldBlock))
            #expect(error.message.hasSuffix("\(underlying)"), "\(error)")
            return []
        }
    }

    @Test func aRestartWhileOneStartsIsRefusedAndStopEndsIt() async throws {
        // The replacement never connects: the hot restart stays in flight until stopped.
        let silent = try writePluginScript("silent-replacement", exec: "sleep 30")
        defer { unlink(silent) }
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(name: "busy", executable: examplePlugin, logger: Logger(label: "busy"))
            configuration.handshakeTimeout = .seconds(30)
            configuration.grace = .milliseconds(200)
            let (plugin, events) = try await launchRecordingEvents(configuration, reactor: reactor)
            let first = try #require(await plugin.currentPID())
            let restart = Task { await restartError(plugin, executable: silent) }
            #expect(await waitUntil { plugin.session == nil }, "the swap did not begin")
            // One start at a time.
            await #expect { try await plugin.restart() } throws: { error in
                guard let error = error as? PluginHostError else { return false }
                return error.code == .alreadyRestarting && error.message == "plugin busy is already restarting"
            }
            // Stopping gives up the start in flight...
            await plugin.stop()
            let failure = try await value(of: restart, within: .seconds(10), "the restart in flight")
            #expect(failure?.code == .stopped, "\(String(describing: failure))")
            #expect(failure?.message == "plugin busy stopped")
            // ...and a stopped plugin does not restart.
            await #expect { try await plugin.restart() } throws: { ($0 as? PluginHostError)?.code == .stopped }
            return [first] + events.all.compactMap(\.exitedPID)
        }
    }

    @Test func aReactorShutDownDuringTheLaunchFailsItAsReactorShutDown() async throws {
        // Never connects, and sleeps far longer than the test waits for it to be gone. The
        // spawner reports the process only after the reactor has shut down: the spawner
        // itself must kill it then.
        let silent = try writePluginScript("silent-launch", exec: "sleep 60")
        defer { unlink(silent) }
        try await withLeakCheckedReactor { reactor in
            try await withSpawnReportsHeld { gate in
                var configuration = PluginConfiguration(name: "orphan-launch", executable: silent, logger: Logger(label: "orphan-launch"))
                configuration.handshakeTimeout = .seconds(30)
                let launch = Task { await launchError(configuration, reactor: reactor) }
                #expect(await waitUntil { !gate.spawned.isEmpty }, "nothing was spawned")
                reactor.shutdown()
                gate.open()
                let failure = try await value(of: launch, within: .seconds(10), "the launch")
                #expect(failure?.code == .reactorShutDown, "\(String(describing: failure))")
                #expect(failure?.message.contains("has shut down") == true, "\(String(describing: failure))")
                return gate.spawned
            }
        }
    }
}
