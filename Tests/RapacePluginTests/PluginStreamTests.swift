import CRapaceShim
import EchoService
import Foundation
import Logging
@testable import Rapace
import RapaceTestSupport
@testable import RapacePlugin
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Server streams asked for while no process is ready (hot restart, crash backoff), and the
/// exit watch. Part of ``PluginRuntimeTests`` so that, like its other tests, each owns the
/// process for its leak checks.
extension PluginRuntimeTests {
    @Test func serverStreamsAskedForDuringAHotRestartRunOnTheNewProcess() async throws {
        // The replacement takes 500 ms to start: the streams are surely asked for mid-swap.
        let script = try slowStartingPlugin(delay: "0.5")
        defer { unlink(script) }
        try await withLeakCheckedReactor { reactor in
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(name: "hot-stream", executable: examplePlugin, logger: Logger(label: "hot-stream")), reactor: reactor)
            let echo = EchoClient(plugin)
            let oldPID = try #require(await plugin.currentPID())
            let oldSession = try #require(plugin.session)
            let restart = Task { try await plugin.restart(executable: script) }
            #expect(await waitUntil { plugin.session == nil }, "the swap did not begin")
            let streams = (0..<8).map { _ in echo.countdown(from: 100) }
            #expect(plugin.session == nil, "the streams were asked for after the swap ended")
            let results = await withTaskGroup(of: Result<[UInt32], RPCError>.self) { group in
                for stream in streams { group.addTask { await collect(stream) } }
                var all: [Result<[UInt32], RPCError>] = []
                for await result in group { all.append(result) }
                return all
            }
            try await restart.value
            #expect(results.count == 8)
            for result in results {
                switch result {
                case .success(let items): #expect(items == Array((1...100).reversed()))
                case .failure(let error): Issue.record("a stream failed: \(error)")
                }
            }
            // Every item arrived on the new process's session; none on the old one.
            let newSession = try #require(plugin.session)
            #expect(newSession !== oldSession)
            #expect(await onLoop(reactor) { oldSession.statistics.maxStreamBytesInFlight } == 0)
            #expect(await onLoop(reactor) { newSession.statistics.maxStreamBytesInFlight } > 0)
            let newPID = try #require(await plugin.currentPID())
            #expect(newPID != oldPID)
            #expect(await waitGone(oldPID))
            await plugin.stop()
            return [newPID]
        }
    }

    @Test func serverStreamAskedForDuringCrashBackoffCompletesAfterTheRestart() async throws {
        try await withLeakCheckedReactor { reactor in
            let events = Mutex<[(PluginEvent, UInt64)]>([])
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(
                    name: "crash-stream", executable: examplePlugin, restartPolicy: .always(initialBackoff: .milliseconds(500)),
                    logger: Logger(label: "crash-stream"), onEvent: { event in events.withLock { $0.append((event, monotonicNow())) } }),
                reactor: reactor)
            let echo = EchoClient(plugin)
            let pid = try #require(await plugin.currentPID())
            let killed = monotonicNow()
            kill(pid, SIGKILL)
            let restarting = await waitUntil { events.withLock { $0.contains { $0.0 == .restarting(attempt: 1, delay: .milliseconds(500)) } } }
            #expect(restarting)
            // In the backoff: no process, none started yet.
            let stream = echo.countdown(from: 100)
            #expect(plugin.session == nil)
            #expect(events.withLock { $0.filter { $0.0.isStarted }.count } == 1)
            let items = try await collect(stream).get()
            #expect(items == Array((1...100).reversed()))
            let newPID = try #require(await plugin.currentPID())
            #expect(newPID != pid)
            let seen = events.withLock { $0 }
            #expect(seen.map(\.0) == [
                .started(pid: pid), .exited(pid: pid, status: .signalled(SIGKILL)), .restarting(attempt: 1, delay: .milliseconds(500)),
                .started(pid: newPID),
            ])
            if let exited = seen.first(where: { $0.0 == .exited(pid: pid, status: .signalled(SIGKILL)) }) {
                print("kill -9 → exited event after \(String(format: "%.2f", Double(exited.1 - killed) / 1e6)) ms")
            }
            await plugin.stop()
            return [newPID]
        }
    }

    @Test func waitingServerStreamEndsUnavailableNamingWhy() async throws {
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(
                name: "slow-back", executable: examplePlugin, restartPolicy: .always(initialBackoff: .seconds(30)), logger: Logger(label: "slow-back"))
            configuration.callWaitTimeout = .milliseconds(200)
            let (plugin, _, _) = try await launchAndCrash(configuration, reactor: reactor)
            let echo = EchoClient(plugin)
            // The backoff outlasts the wait: the stream gives up after callWaitTimeout.
            let timedOut = await collect(echo.countdown(from: 3))
            #expect(timedOut.failure?.code == .unavailable)
            #expect(timedOut.failure?.message == "plugin slow-back was not back within 0.2 seconds", "\(String(describing: timedOut.failure))")
            // Stopping the plugin ends a waiting stream at once.
            let idle = await onLoop(reactor) { reactor.registrationCount }
            let waiting = echo.countdown(from: 3)
            let waitingResult = Task { await collect(waiting) }
            // Its waiter (and that waiter's timer) is in place.
            #expect(await waitUntil { await onLoop(reactor) { reactor.registrationCount } == idle + 1 })
            await plugin.stop()
            let stopped = await waitingResult.value
            #expect(stopped.failure?.code == .unavailable)
            #expect(stopped.failure?.message == "plugin slow-back stopped", "\(String(describing: stopped.failure))")
            // A stopped plugin fails new streams at once, naming how its last process ended.
            let late = await collect(echo.countdown(from: 3))
            #expect(late.failure?.code == .unavailable)
            #expect(late.failure?.message == "plugin slow-back is not running (last process killed by signal 9)", "\(String(describing: late.failure))")
            return []
        }
    }

    @Test func waitingServerStreamEndsWhenTheRestartPolicyGivesUp() async throws {
        // A plugin that starts only while its gate is open, allowed one restart.
        let gated = try GatedPlugin(open: true)
        defer { gated.remove() }
        try await withLeakCheckedReactor { reactor in
            let (plugin, events, _) = try await launchAndCrash(
                PluginConfiguration(
                    name: "one-more", executable: gated.script, restartPolicy: RestartPolicy(maxRestarts: 1, initialBackoff: .milliseconds(500)),
                    logger: Logger(label: "one-more")),
                reactor: reactor, beforeCrash: gated.close)
            let result = await collect(EchoClient(plugin).countdown(from: 3))
            #expect(result.failure?.code == .unavailable)
            let reason = "plugin one-more exited with code 3 before its handshake; the restart policy allows no more restarts"
            #expect(result.failure?.message == reason, "\(String(describing: result.failure))")
            #expect(events.all.last == .gaveUp(reason: reason))
            await plugin.stop()
            return []
        }
    }

    /// A process that stayed up `resetAfter` resets the restart count when it exits, so the
    /// policy restarts it even with its restarts used up. A stream asked for once its
    /// connection has closed, before it exits, waits for that restart: it does not fail as
    /// if nothing would restart.
    @Test func aStreamAskedForBetweenTheCloseAndTheExitOfALongLivedProcessWaitsForItsRestart() async throws {
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(
                name: "long-lived", executable: examplePlugin,
                restartPolicy: RestartPolicy(maxRestarts: 1, initialBackoff: .milliseconds(500), resetAfter: .milliseconds(300)),
                logger: Logger(label: "long-lived"))
            configuration.callWaitTimeout = .seconds(20)
            let (plugin, events, _) = try await launchAndCrash(configuration, reactor: reactor)
            // The one restart allowed is used; its process serves, then outlives resetAfter.
            try #require(await waitUntil(timeout: .seconds(10)) { plugin.session != nil }, "the restart did not serve")
            let second = try #require(await plugin.currentPID())
            try await Task.sleep(for: .milliseconds(400))
            // In one turn of the loop: the host closes the process's connection, and a stream
            // asks for a process before that process can have exited.
            let stream = await onLoop(reactor) { () -> RapaceStream<UInt32> in
                plugin.session?.close()
                return EchoClient(plugin).countdown(from: 3)
            }
            let result = await collect(stream)
            #expect(result.failure == nil, "\(String(describing: result.failure))")
            if case .success(let items) = result { #expect(items == [3, 2, 1]) }
            let third = await plugin.currentPID()
            #expect(third != nil && third != second)
            #expect(events.all.contains { $0.exitedPID == second }, "\(events.all)")
            await plugin.stop()
            return []
        }
    }

    /// As above, for a process whose connection closed before it had stayed up `resetAfter`
    /// and which exits only after: a stream asked for in between, once the process has
    /// stayed up `resetAfter`, waits for the restart its exit brings. Whether it restarts is
    /// asked when the stream comes, not when the connection closed.
    @Test func aStreamAskedForOnceAClosedProcessHasStayedUpResetAfterWaitsForItsRestart() async throws {
        // The plugin behind a shell that outlives it: once the plugin has exited (its
        // connection closed), the process the host watches lingers until the host kills it,
        // 2 s after the close. (The plugin's parent is the shell: it is the host it checks.)
        let script = try lingeringPlugin()
        defer { unlink(script) }
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(
                name: "closed-early", executable: script, grace: .milliseconds(200),
                restartPolicy: RestartPolicy(maxRestarts: 1, initialBackoff: .milliseconds(50), resetAfter: .milliseconds(1500)),
                logger: Logger(label: "closed-early"))
            configuration.callWaitTimeout = .seconds(20)
            let (plugin, events) = try await launchRecordingEvents(configuration, reactor: reactor)
            // The first process's exit (the host's kill) takes the one restart allowed.
            let first = try #require(await plugin.currentPID())
            await onLoop(reactor) { plugin.session?.close() }
            try #require(await waitUntil(timeout: .seconds(10)) { plugin.session != nil }, "the restart did not serve")
            let second = try #require(await plugin.currentPID())
            #expect(events.all.contains(.restarting(attempt: 1, delay: .milliseconds(50))), "\(events.all)")
            // Its connection closes as soon as it serves, before it has stayed up resetAfter
            // (1.5 s from its spawn): were it to exit now, nothing would restart it. The
            // stream is asked for by a loop timer due 1.6 s after the close begins: after
            // the process has stayed up resetAfter, and before the host's kill, a timer of
            // the same loop due 2 s after the close. Timers fire in the order they are due,
            // so it comes first however late the loop or this task runs.
            let asked = await withCheckedContinuation { (continuation: CheckedContinuation<(RapaceStream<UInt32>, exited: Bool), Never>) in
                reactor.execute {
                    plugin.session?.close()
                    reactor.schedule(after: .milliseconds(1600)) {
                        let exited = events.all.contains { $0.exitedPID == second }
                        continuation.resume(returning: (EchoClient(plugin).countdown(from: 3), exited))
                    }
                }
            }
            #expect(!asked.exited, "the stream was asked for after the process exited: \(events.all)")
            let result = await collect(asked.0)
            #expect(result.failure == nil, "\(String(describing: result.failure))")
            if case .success(let items) = result { #expect(items == [3, 2, 1]) }
            let third = try #require(await plugin.currentPID())
            #expect(third != second)
            #expect(events.all.contains(.exited(pid: second, status: .signalled(SIGKILL))), "\(events.all)")
            await plugin.stop()
            return [first, second, third]
        }
    }

    @Test func cancelledOrDroppedWaitersAreForgotten() async throws {
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(
                name: "forget", executable: examplePlugin, restartPolicy: .always(initialBackoff: .seconds(30)), logger: Logger(label: "forget"))
            configuration.callWaitTimeout = .seconds(60)
            let (plugin, events, _) = try await launchAndCrash(configuration, reactor: reactor)
            let echo = EchoClient(plugin)
            // In the backoff, each waiter holds a timer: the reactor's registrations count them.
            let idle = await onLoop(reactor) { reactor.registrationCount }
            let iterated = echo.countdown(from: 3)
            let iterating = Task { await collect(iterated) }
            let call = Task { () -> RPCError? in
                do {
                    _ = try await echo.echo("never sent")
                    return nil
                } catch let error as RPCError {
                    return error
                } catch {
                    return RPCError(.unknown, "\(error)")
                }
            }
            #expect(await waitUntil { await onLoop(reactor) { reactor.registrationCount } == idle + 2 })
            // Dropped without being iterated.
            _ = echo.countdown(from: 3)
            iterating.cancel()
            call.cancel()
            #expect(await iterating.value.failure?.code == .cancelled)
            #expect(await call.value?.code == .cancelled)
            #expect(await waitUntil(timeout: .seconds(2)) { await onLoop(reactor) { reactor.registrationCount } == idle })
            // Still in the backoff: they ended because they were cancelled, not because it ended.
            #expect(plugin.session == nil)
            #expect(events.all.filter(\.isStarted).count == 1)
            await plugin.stop()
            return []
        }
    }

    /// Whether this kernel lets us open a pidfd (Linux 5.3 and later, unless filtered).
    static let kernelHasPidfd: Bool = {
        let fd = rapace_pidfd_open(getpid())
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }()

    @Test func startedIsReportedWhenTheHandshakeEndsBeforeThePidIsKnown() async throws {
        try await withLeakCheckedReactor { reactor in
            try await withSpawnReportsHeld { gate in
                // The spawner's thread reports the pid only once the gate opens: the handshake
                // (which needs only the plugin's connection) ends first, and the start is
                // reported once the pid is in.
                let configuration = PluginConfiguration(name: "late-pid", executable: examplePlugin, logger: Logger(label: "late-pid"))
                let (plugin, events) = try await launchRecordingEvents(configuration, reactor: reactor)
                #expect(await plugin.currentPID() == nil)
                #expect(try await EchoClient(plugin).echo("served") == "served")
                #expect(events.all.isEmpty, "\(events.all)")
                gate.open()
                #expect(await waitUntil(timeout: .seconds(10)) { events.all.contains(where: \.isStarted) }, "\(events.all)")
                let pid = try #require(await plugin.currentPID())
                #expect(gate.spawned == [pid])
                #expect(events.all == [.started(pid: pid)])
                await plugin.stop()
                return [pid]
            }
        }
    }

    @Test func onEventGetsNothingAfterTheEventStreamFinished() async throws {
        // A process served before its pid is reported, and the report queued behind the
        // reactor's teardown: the teardown's hook finishes `events`, then its last drain
        // runs the report, which would announce the start. Neither `events` nor `onEvent`
        // may get it.
        try await withLeakCheckedReactor { reactor in
            try await withSpawnReportsHeld { gate in
                let configuration = PluginConfiguration(name: "report-in-teardown", executable: examplePlugin, logger: Logger(label: "report-in-teardown"))
                let (plugin, events) = try await launchRecordingEvents(configuration, reactor: reactor)
                let pid = try #require(gate.spawned.first)
                // The loop is held inside a callback while the teardown, then the report,
                // queue up behind it; released, it runs them in that order.
                let hold = try #require(await HeldLoop.hold(reactor))
                defer { hold.release() }  // never leave the loop held
                hold.shutDownFromAnotherThread()
                #expect(await waitUntil { reactor.remoteBacklog == 1 }, "the teardown was not queued")
                gate.open()
                #expect(await waitUntil { reactor.remoteBacklog == 2 }, "the report was not queued behind the teardown")
                hold.release()
                #expect(await hold.shutDownReturns(), "shutdown did not return")
                let read = Task {
                    var all: [PluginEvent] = []
                    for await event in plugin.events { all.append(event) }
                    return all
                }
                let streamed = try await value(of: read, within: .seconds(10), "the end of events")
                #expect(streamed == [])
                #expect(events.all == streamed)
                return [pid]
            }
        }
    }

    @Test func aReactorShutDownDuringAStopEndsTheStop() async throws {
        // The plugin exits on the stop's GoAway, but the process the host watches (its shell)
        // lingers 30 s: the stop waits for its exit, or for its kill at the end of the grace
        // (6 s). The reactor shuts down meanwhile: no exit will reach the loop any more, and
        // the stop must end with the shutdown, as a stop after it does, and kill the shell
        // itself (the grace's timer dies with the reactor).
        let script = try lingeringPlugin()
        defer { unlink(script) }
        try await withLeakCheckedReactor { reactor in
            let configuration = PluginConfiguration(name: "stop-in-shutdown", executable: script, grace: .seconds(5), logger: Logger(label: "stop-in-shutdown"))
            let (plugin, events) = try await launchRecordingEvents(configuration, reactor: reactor)
            let pid = try #require(await plugin.currentPID())
            let stop = Task { await plugin.stop() }
            #expect(await waitUntil { plugin.session == nil }, "the stop did not begin")
            reactor.shutdown()
            try await value(of: stop, within: .seconds(10), "stop")
            let read = Task {
                var all: [PluginEvent] = []
                for await event in plugin.events { all.append(event) }
                return all
            }
            let streamed = try await value(of: read, within: .seconds(10), "the end of events")
            #expect(streamed == [.started(pid: pid)])
            #expect(events.all == streamed)
            return [pid]  // must be gone: the leak check waits for it, far less than 30 s
        }
    }

    @Test func aStopBeforeThePidIsKnownStillKillsAProcessThatLingers() async throws {
        // Served before its pid is reported; stopped at once with a short grace. The plugin
        // exits on the GoAway, but the process the host watches (its shell) lingers: only a
        // kill stops it, and both kills come before the pid is known: the one at the end of
        // the grace (a loop timer due 1.1 s after the stop), and the one 2 s after the
        // session closed (armed in the turn that closes it). The report is let through by a
        // loop timer armed after that close and due 2.5 s later: timers fire in due order,
        // however loaded the machine. The kill must be sent once the pid is in.
        let script = try lingeringPlugin()
        defer { unlink(script) }
        try await withLeakCheckedReactor { reactor in
            try await withSpawnReportsHeld { gate in
                let configuration = PluginConfiguration(
                    name: "late-pid-stop", executable: script, grace: .milliseconds(100), logger: Logger(label: "late-pid-stop"))
                let (plugin, events) = try await launchRecordingEvents(configuration, reactor: reactor)
                #expect(await plugin.currentPID() == nil)
                let session = try #require(plugin.session)
                // Without the kill the shell sleeps 30 s, and stop() waits for its exit.
                let stop = Task { await plugin.stop() }
                try await value(of: Task { await session.closed() }, within: .seconds(15), "the session's close")
                await onLoop(reactor) { _ = reactor.schedule(after: .milliseconds(2500)) { gate.open() } }
                try await value(of: stop, within: .seconds(15), "stop")
                let pid = try #require(gate.spawned.first)
                #expect(events.all == [.started(pid: pid), .exited(pid: pid, status: .signalled(SIGKILL))])
                return [pid]
            }
        }
    }

    @Test func exitIsWatchedWithAPidfdOrEvery20msWithout() async throws {
        let reactor = try Reactor.start(name: "plugin-test")
        defer { reactor.shutdown() }
        defer { PluginSpawner.pidfdDisabledForTesting.store(false, ordering: .relaxed) }
        for pidfd in [true, false] {
            PluginSpawner.pidfdDisabledForTesting.store(!pidfd, ordering: .relaxed)
            let descriptors = await DescriptorSnapshot.take()
            let exits = Mutex<[PluginExitStatus]>([])
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(
                    name: "watch", executable: examplePlugin, logger: Logger(label: "watch"),
                    onEvent: { event in if let status = event.exitStatus { exits.withLock { $0.append(status) } } }),
                reactor: reactor)
            let pidfds = await DescriptorSnapshot.take().opened(since: descriptors).filter { $0.contains("pidfd") }
            // A kernel (or seccomp policy) without pidfd_open falls back to polling: then
            // there is no pidfd to see, and both rounds test the fallback.
            #expect(pidfds.count == (pidfd && Self.kernelHasPidfd ? 1 : 0), "pidfd \(pidfd): \(pidfds)")
            let pid = try #require(await plugin.currentPID())
            kill(pid, SIGKILL)
            #expect(await waitUntil { exits.withLock { $0 } == [.signalled(SIGKILL)] }, "pidfd \(pidfd): \(exits.withLock { $0 })")
            await plugin.stop()
            #expect(leftoverPluginFiles().isEmpty)
            await expectNoDescriptorLeak(since: descriptors)
        }
    }

    @Test func outputIsRelayedLineByLineWithLongLinesSplit() async throws {
        // Thousands of short lines (many per read), a line longer than `maxLineBytes`, a
        // stderr line, and a last line without a newline (logged when the child is gone).
        let script = """
            i=0; while [ $i -lt 3000 ]; do echo "line $i"; i=$((i+1)); done
            head -c 100000 /dev/zero | tr '\\0' x; echo
            echo "on stderr" >&2
            printf 'no newline'
            """
        let capture = LogCapture()
        let spawned = Mutex<PluginChild?>(nil)
        let spawnFailure = Mutex<String?>(nil)
        let status = Mutex<PluginExitStatus?>(nil)
        // However the test ends, the shell does not outlive it (the spawner reaps it; a
        // signal after that sends nothing).
        defer { _ = try? spawned.withLock({ $0 })?.signal(SIGKILL) }
        // The callbacks record what they saw; the test asserts it on its own task.
        PluginSpawner.spawn(
            executable: "/bin/sh", arguments: ["-c", script], environment: [:], logger: capture.logger(label: "relay"),
            onSpawn: { result in
                switch result {
                case .success(let child): spawned.withLock { $0 = child }
                case .failure(let error): spawnFailure.withLock { $0 = "\(error)" }
                }
            },
            onExit: { exit in status.withLock { $0 = exit } })
        #expect(await waitUntil(timeout: .seconds(20)) { status.withLock { $0 } != nil || spawnFailure.withLock { $0 } != nil })
        try #require(spawnFailure.withLock { $0 } == nil, "spawn failed: \(spawnFailure.withLock { $0 } ?? "")")
        #expect(status.withLock { $0 } == .exited(code: 0))
        let lines = capture.lines
        let stdout = lines.filter { $0.hasPrefix("[relay] [stdout] ") }.map { String($0.dropFirst("[relay] [stdout] ".count)) }
        #expect(Array(stdout.prefix(3000)) == (0..<3000).map { "line \($0)" })
        let long = stdout.dropFirst(3000).prefix(2)
        #expect(long.count == 2)
        #expect(long.allSatisfy { $0.allSatisfy { $0 == "x" } })
        #expect(long.map(\.utf8.count).reduce(0, +) == 100_000)
        #expect((long.first?.utf8.count ?? 0) >= PluginSpawner.maxLineBytes)
        #expect(Array(stdout.dropFirst(3002)) == ["no newline"])
        #expect(lines.filter { $0.hasPrefix("[relay] [stderr] ") } == ["[relay] [stderr] on stderr"])
    }
}

/// All items of `stream`, or the error that ended it.
private func collect(_ stream: RapaceStream<UInt32>) async -> Result<[UInt32], RPCError> {
    var items: [UInt32] = []
    do {
        for try await item in stream {
            items.append(item)
            if items.count > 1000 { return .failure(RPCError(.unknown, "more items than asked for")) }
        }
        return .success(items)
    } catch let error as RPCError {
        return .failure(error)
    } catch {
        return .failure(RPCError(.unknown, "\(error)"))
    }
}

extension Result {
    /// The error, if this is a failure.
    fileprivate var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
