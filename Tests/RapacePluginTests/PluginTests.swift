import EchoService
import Foundation
import Logging
import Rapace
import RapacePlugin
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The plugin runtime with the real `rapace-example-plugin` and `rapace-example-host`
/// executables. Each test owns the process: the leak checks look at this process's
/// segments, descriptors and children, and most tests bound how long a restart or a death
/// takes (the tests in other files extend this suite for the same reason). Serialized too,
/// so that its tests do not all wait for the gate at once.
@Suite(
    .serialized,
    .ownsProcess("leak checks of this process's plugin segments, descriptors and children; process-wide spawner switches (no pidfd, spawn reports held back); restart and death latency bounds"))
struct PluginRuntimeTests {
    // MARK: PluginError, with the plugin run directly

    @Test func noArgumentIsAnArgsError() async throws {
        let run = try await runExamplePlugin([])
        #expect(run.status == 2)
        #expect(run.output.contains("invalid arguments: no shared-memory segment path was given"))
        #expect(run.output.contains("--shm-path=PATH"))
        #expect(run.output.split(separator: "\n").count == 1)
    }

    @Test func segmentThatNeverAppearsTimesOutAfterFiveSeconds() async throws {
        let path = temporaryPath(in: "/dev/shm", "never")
        let run = try await runExamplePlugin(["--shm-path=\(path)"])
        #expect(run.status == 2)
        #expect(run.output.contains("no rapace segment appeared at \(path) within 5.0 seconds"))
        #expect(run.elapsed >= .milliseconds(4900) && run.elapsed < .seconds(8), "took \(run.elapsed)")
    }

    @Test func garbageFileIsAnShmOpenError() async throws {
        let path = temporaryPath(in: "/dev/shm", "garbage")
        defer { unlink(path) }
        let garbage = Data((0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        #expect(FileManager.default.createFile(atPath: path, contents: garbage))
        // The first positional argument works as the path too.
        let run = try await runExamplePlugin([path])
        #expect(run.status == 2)
        #expect(run.output.contains("cannot open the rapace segment at \(path): \(path) is not a rapace segment"))
        #expect(run.elapsed < .seconds(4))
    }

    @Test func configMismatchNamesBothConfigurations() async throws {
        let capture = LogCapture()
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(name: "mismatch", executable: examplePlugin, arguments: ["--slot-count=64"])
            configuration.logger = capture.logger(label: "mismatch")
            let error = try await launchFailure(configuration, reactor: reactor)
            #expect(error.code == .exitedBeforeHandshake)
            #expect(error.message.contains("exited with code 2 before its handshake"), "\(error)")
            let line = await capture.waitForLine { $0.contains("error:") }
            #expect(line?.contains("[stderr]") == true)
            #expect(line?.contains("was created with ring 256 descriptors, 65536-byte slots × 128") == true, "\(line ?? "")")
            #expect(line?.contains("expects ring 256 descriptors, 65536-byte slots × 64") == true, "\(line ?? "")")
            return []
        }
    }

    @Test func duplicateMethodIdsAreAnRPCError() async throws {
        let run = try await runExamplePlugin(["--shm-path=\(temporaryPath(in: "/dev/shm", "unused"))", "--duplicate"])
        #expect(run.status == 2)
        #expect(run.output.contains("RPC setup failed"))
        #expect(run.output.contains("share id"))
        #expect(run.elapsed < .seconds(4))
    }

    @Test func argumentParsing() throws {
        #expect(try PluginRuntime.segmentPath(from: ["p", "--shm-path=/a"]) == "/a")
        #expect(try PluginRuntime.segmentPath(from: ["p", "--shm-path", "/b"]) == "/b")
        #expect(try PluginRuntime.segmentPath(from: ["p", "--multi", "/c"]) == "/c")
        #expect(throws: PluginError.self) { try PluginRuntime.segmentPath(from: ["p", "--shm-path="]) }
        #expect(throws: PluginError.self) { try PluginRuntime.segmentPath(from: ["p"]) }
        #expect(PluginError.shmTimeout(path: "/x", waited: .seconds(5)).message.contains("/x"))
        #expect(PluginError.transport("gone").message.split(separator: "\n").count == 1)
    }

    // MARK: Hosting

    @Test func singleServiceAndStartupTime() async throws {
        let capture = LogCapture()
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(name: "echo-plugin", executable: examplePlugin)
            configuration.logger = capture.logger(label: "echo-plugin")
            let launched = monotonicNow()
            let plugin = try await PluginProcess.launch(configuration, reactor: reactor)
            let echo = EchoClient(plugin)
            #expect(try await echo.echo("hi") == "hi")
            let answered = monotonicNow()
            #expect(try await echo.add(2, 40) == 42)
            let mainLine = await capture.waitForLine { $0.contains("plugin-main ") }
            #expect(mainLine?.hasPrefix("[echo-plugin] [stdout]") == true)
            let line = try #require(mainLine)
            let mainNS = try #require(UInt64(line.split(separator: " ").last ?? ""))
            let total = Double(answered - launched) / 1e6
            let afterMain = Double(answered - mainNS) / 1e6
            print("plugin start → first answered call: \(String(format: "%.1f", total)) ms from spawn, \(String(format: "%.1f", afterMain)) ms from the plugin's main()")
            #expect(afterMain < 1000, "plugin main → first answer took \(afterMain) ms")
            let pid = try #require(await plugin.currentPID())
            await plugin.stop()
            return [pid]
        }
        #expect(openPluginSegmentFDs().isEmpty)
        #expect(await capture.waitForLine(timeout: .seconds(2)) { $0.contains("host closed the connection") } != nil)
    }

    @Test func multiServiceAndUnknownMethod() async throws {
        try await withLeakCheckedReactor { reactor in
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(name: "multi", executable: examplePlugin, arguments: ["--multi"], logger: Logger(label: "multi")), reactor: reactor)
            #expect(try await EchoClient(plugin).echo("both") == "both")
            let grayscale = MethodDescriptor(service: "Image", method: "grayscale", kind: .unary)
            let rgba: [UInt8] = [255, 255, 255, 255, 0, 0, 0, 255, 255, 0, 0, 255]
            let reply = try await plugin.call(grayscale, request: Payload.encoding { $0.writeByteArray(rgba) }, options: .default)
            #expect(try reply.decode { try $0.readByteArray() } == [255, 0, 76])
            // A large image: the request travels in shared-memory slots.
            let pixels = 512 * 512
            let big = [UInt8]((0..<(pixels * 4)).map { UInt8(truncatingIfNeeded: $0 / 4) })
            let bigReply = try await plugin.call(grayscale, request: Payload.encoding(capacity: big.count + 5) { $0.writeByteArray(big) }, options: .default)
            let bigGray = try bigReply.decode { try $0.readByteArray() }
            #expect(bigGray.count == pixels)
            #expect(bigGray[1000] == UInt8((UInt32(UInt8(truncatingIfNeeded: 1000)) * 256) >> 8))
            let unknown = MethodDescriptor(service: "Nope", method: "nothing", kind: .unary)
            do throws(RPCError) {
                _ = try await plugin.call(unknown, request: .empty, options: .default)
                Issue.record("an unknown method should fail")
            } catch {
                #expect(error.code == .unimplemented)
            }
            await plugin.stop()
            return []
        }
    }

    @Test func pluginCallsTheHostOnTheSameSession() async throws {
        let capture = LogCapture()
        try await withLeakCheckedReactor { reactor in
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(
                    name: "caller", executable: examplePlugin, arguments: ["--call-host"], services: [EchoServer(DefaultEcho())],
                    logger: capture.logger(label: "caller")),
                reactor: reactor)
            let line = await capture.waitForLine { $0.contains("host answered:") }
            #expect(line?.hasSuffix("host answered: hello from the plugin") == true, "\(line ?? "nothing")")
            await plugin.stop()
            return []
        }
    }

    @Test func killMidCallFailsUnavailableAndRestartBringsItBack() async throws {
        try await withLeakCheckedReactor { reactor in
            let (plugin, events) = try await launchRecordingEvents(
                PluginConfiguration(
                    name: "crashy", executable: examplePlugin, restartPolicy: .always(initialBackoff: .milliseconds(20)), logger: Logger(label: "crashy")),
                reactor: reactor)
            let echo = EchoClient(plugin)
            #expect(try await echo.echo("before") == "before")
            let pid = try #require(await plugin.currentPID())
            let pending = Task { () -> (RPCError?, UInt64) in
                do {
                    try await echo.sleep(milliseconds: 10_000)
                    return (nil, monotonicNow())
                } catch let error as RPCError {
                    return (error, monotonicNow())
                } catch {
                    return (RPCError(.unknown, "\(error)"), monotonicNow())
                }
            }
            try await Task.sleep(for: .milliseconds(100))
            let killed = monotonicNow()
            kill(pid, SIGKILL)
            let (error, failedAt) = await pending.value
            #expect(error?.code == .unavailable, "\(String(describing: error))")
            let latency = Double(failedAt - killed) / 1e6
            #expect(latency < 100, "pending call failed \(latency) ms after kill -9")
            print("kill -9 → pending call UNAVAILABLE after \(String(format: "%.2f", latency)) ms")
            // The restart policy brings it back; this call waits for the new process.
            #expect(try await echo.echo("after") == "after")
            let newPID = try #require(await plugin.currentPID())
            #expect(newPID != pid)
            #expect(await waitGone(pid))
            let seen = events.all
            #expect(seen.contains(.exited(pid: pid, status: .signalled(SIGKILL))))
            #expect(seen.contains(.restarting(attempt: 1, delay: .milliseconds(20))))
            #expect(seen.contains(.started(pid: newPID)))
            await plugin.stop()
            return [newPID]
        }
    }

    @Test(.timeLimit(.minutes(1))) func reactorShutdownFailsWhatWaitsForAProcessInsteadOfHanging() async throws {
        // The helper shuts the reactor down even when a requirement fails first (a second
        // shutdown, after the test's own, is harmless).
        try await withLeakCheckedReactor { reactor in
            let (plugin, _, pid) = try await launchAndCrash(
                PluginConfiguration(
                    name: "orphaned", executable: examplePlugin, restartPolicy: .always(initialBackoff: .seconds(30)), logger: Logger(label: "orphaned")),
                reactor: reactor)
            // The restart is 30 s away: this call waits for it...
            let waiting = Task { () -> RPCError? in
                do {
                    _ = try await EchoClient(plugin).echo("anyone?")
                    return nil
                } catch let error as RPCError {
                    return error
                } catch {
                    return RPCError(.unknown, "\(error)")
                }
            }
            try await Task.sleep(for: .milliseconds(100))
            // ...until the reactor goes away, which fails it now.
            let shutdownAt = ContinuousClock.now
            reactor.shutdown()
            let error = await waiting.value
            #expect(error?.code == .unavailable)
            #expect(error?.message.contains("shut down") == true, "\(String(describing: error))")
            #expect(ContinuousClock.now - shutdownAt < .seconds(2))
            // Everything after the shutdown answers at once.
            await #expect(throws: RPCError.self) { _ = try await EchoClient(plugin).echo("late") }
            await #expect(throws: RPCError.self) { try await plugin.notify(EchoMethods.echo, request: .empty) }
            await #expect { try await plugin.restart() } throws: { ($0 as? PluginHostError)?.code == .reactorShutDown }
            #expect(await plugin.currentPID() == nil)
            await plugin.stop()
            return [pid]
        }
    }

    @Test func crashWithoutRestartPolicyLeavesItStopped() async throws {
        try await withLeakCheckedReactor { reactor in
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(name: "once", executable: examplePlugin, logger: Logger(label: "once")), reactor: reactor)
            let pid = try #require(await plugin.currentPID())
            kill(pid, SIGKILL)
            #expect(await waitGone(pid))
            try await Task.sleep(for: .milliseconds(100))
            do {
                _ = try await EchoClient(plugin).echo("x")
                Issue.record("a stopped plugin should fail calls")
            } catch let error as RPCError {
                #expect(error.code == .unavailable)
            }
            await plugin.stop()
            return []
        }
    }

    @Test func hotRestartLosesNoCallIssuedDuringTheSwap() async throws {
        // The replacement waits for a gate the test opens: the swap lasts until then, however
        // long issuing the calls takes.
        let replacement = try GatedPlugin(open: false, whenClosed: .waits)
        defer { replacement.remove() }
        try await withLeakCheckedReactor { reactor in
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(name: "hot", executable: examplePlugin, logger: Logger(label: "hot")), reactor: reactor)
            let echo = EchoClient(plugin)
            let oldPID = try #require(await plugin.currentPID())
            // In flight on the old process when the swap begins: finishes there, during the swap.
            let slow = Task { try await echo.sleep(milliseconds: 300) }
            try await Task.sleep(for: .milliseconds(50))
            let restartEnded = RecordLog<ContinuousClock.Instant>()
            let restart = Task {
                defer { restartEnded.record(.now) }
                try await plugin.restart(executable: replacement.script)
            }
            #expect(await waitUntil { plugin.session == nil }, "the swap did not begin")
            try await value(of: slow, within: .seconds(10), "the call in flight on the old process")
            // Each call waiting for the new process holds a timer (its callWaitTimeout): the
            // reactor's registrations count the calls that reached the loop mid-swap.
            let idle = await onLoop(reactor) { reactor.registrationCount }
            let answered = RecordLog<ContinuousClock.Instant>()
            let calls = Task {
                await withTaskGroup(of: Bool.self) { group in
                    for index in 0..<50 {
                        group.addTask {
                            let ok = (try? await echo.echo("call \(index)")) == "call \(index)"
                            answered.record(.now)
                            return ok
                        }
                    }
                    var ok = 0
                    for await result in group where result { ok += 1 }
                    return ok
                }
            }
            let waiting = await waitUntil { await onLoop(reactor) { reactor.registrationCount } == idle + 50 }
            // All 50 were issued and wait, unanswered, while the swap is still under way.
            #expect(waiting, "the calls did not all wait for the new process")
            #expect(restartEnded.all.isEmpty, "the swap ended before the calls were issued")
            #expect(plugin.session == nil)
            #expect(answered.all.count == 0, "a call was answered during the swap")
            let opened = ContinuousClock.now
            try replacement.open()
            let results = try await value(of: calls, within: .seconds(20), "the calls issued during the swap")
            try await value(of: restart, within: .seconds(20), "the restart")
            #expect(results == 50)
            #expect(answered.all.count == 50)
            #expect(answered.all.filter { $0 < opened }.count == 0, "answered before the gate opened")
            let newPID = try #require(await plugin.currentPID())
            #expect(newPID != oldPID)
            #expect(await waitGone(oldPID))
            #expect(try await echo.echo("new") == "new")
            await plugin.stop()
            return [oldPID, newPID]
        }
    }

    @Test func hotRestartIntoOtherArgumentsAndFailedRestartKeepsTheOldProcess() async throws {
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(name: "swap", executable: examplePlugin, logger: Logger(label: "swap"))
            configuration.grace = .milliseconds(500)
            let plugin = try await PluginProcess.launch(configuration, reactor: reactor)
            let grayscale = MethodDescriptor(service: "Image", method: "grayscale", kind: .unary)
            let request = Payload.encoding { $0.writeByteArray([10, 10, 10, 0]) }
            await #expect(throws: RPCError.self) { _ = try await plugin.call(grayscale, request: request, options: .default) }
            // The new process serves one more service; the same handle reaches it.
            try await plugin.restart(arguments: ["--multi"])
            let reply = try await plugin.call(grayscale, request: request, options: .default)
            #expect(try reply.decode { try $0.readByteArray() } == [10])
            let pid = try #require(await plugin.currentPID())
            // A replacement that cannot start leaves the running process in place.
            await #expect { try await plugin.restart(executable: "/nonexistent/plugin") } throws: { ($0 as? PluginHostError)?.code == .spawnFailed }
            #expect(await plugin.currentPID() == pid)
            #expect(try await EchoClient(plugin).echo("still here") == "still here")
            await plugin.stop()
            return [pid]
        }
    }

    @Test func hotRestartDuringACrashBackoffLeavesOneProcess() async throws {
        try await withLeakCheckedReactor { reactor in
            let (plugin, events, crashed) = try await launchAndCrash(
                PluginConfiguration(
                    name: "backoff-swap", executable: examplePlugin, restartPolicy: .always(initialBackoff: .seconds(1)), logger: Logger(label: "backoff-swap")),
                reactor: reactor)
            let backoffEnds = ContinuousClock.now + .seconds(1)
            // Within the backoff: the hot restart replaces the crashed process.
            try await plugin.restart()
            let restarted = try #require(await plugin.currentPID())
            #expect(restarted != crashed)
            // The crash restart's timer would have fired by now: it must not have started a
            // second process (its segment would show as generation 3 at once). The hot
            // restart's process (generation 2) keeps its segment and socket.
            try await Task.sleep(until: backoffEnds + .milliseconds(500))
            expectOnlyFilesOfGeneration(2, of: "backoff-swap")
            #expect(await plugin.currentPID() == restarted)
            #expect(try await EchoClient(plugin).echo("one") == "one")
            let started = events.all.filter(\.isStarted)
            #expect(started.count == 2, "\(events.all)")
            await plugin.stop()
            return [crashed, restarted]
        }
    }

    @Test func hotRestartSupersedesACrashRestartStillStarting() async throws {
        // The crash restart's process takes a second to connect, the hot restart's two: were
        // both starts left in flight, the crash restart's process would connect during the
        // swap, take the callers waiting for the new process, and serve until replaced.
        let crashRestart = try slowStartingPlugin(delay: "1")
        defer { unlink(crashRestart) }
        let hotRestart = try slowStartingPlugin(delay: "2")
        defer { unlink(hotRestart) }
        try await withLeakCheckedReactor { reactor in
            let (plugin, events, crashed) = try await launchAndCrash(
                PluginConfiguration(
                    name: "superseded", executable: crashRestart, restartPolicy: .always(initialBackoff: .milliseconds(10)), logger: Logger(label: "superseded")),
                reactor: reactor)
            // The crash restart's process is starting (its segment exists)...
            #expect(await waitUntil { leftoverPluginFiles().contains { $0.contains("-superseded-2-") } })
            let beforeHot = events.all.count
            // ...when a hot restart begins: that process is killed before it serves.
            let restart = Task { try await plugin.restart(executable: hotRestart) }
            let waiting = Task { try await plugin.connectedSession() }
            try await restart.value
            let hot = try #require(await plugin.currentPID())
            let served = try #require(plugin.session)
            // The caller that waited during the swap got the hot restart's process.
            #expect(try await waiting.value === served)
            let others = {
                events.all.compactMap(\.exitedPID).filter { $0 != crashed }
            }
            #expect(await waitUntil { !others().isEmpty }, "\(events.all)")
            let superseded = try #require(others().first)
            // No other start follows (a stray one would show as generation 4 at once).
            try await Task.sleep(for: .milliseconds(300))
            let seen = events.all
            #expect(seen.contains(.exited(pid: superseded, status: .signalled(SIGKILL))), "\(seen)")
            #expect(seen.compactMap(\.startedPID) == [crashed, hot], "\(seen)")
            let later = seen.dropFirst(beforeHot)
            #expect(!later.contains { $0.isRestarting || $0.isGaveUp }, "\(Array(later))")
            #expect(others() == [superseded], "\(seen)")
            expectOnlyFilesOfGeneration(3, of: "superseded")
            #expect(await plugin.currentPID() == hot)
            #expect(try await EchoClient(plugin).echo("hot") == "hot")
            await plugin.stop()
            return [crashed, hot, superseded]
        }
    }

    @Test func failedHotRestartThatSupersededACrashRestartLeavesThePolicyInCharge() async throws {
        // The crash restart's process takes a second to connect.
        let crashRestart = try slowStartingPlugin(delay: "1")
        defer { unlink(crashRestart) }
        try await withLeakCheckedReactor { reactor in
            let (plugin, events, crashed) = try await launchAndCrash(
                PluginConfiguration(
                    name: "spent", executable: crashRestart, restartPolicy: RestartPolicy(maxRestarts: 1, initialBackoff: .milliseconds(10)),
                    logger: Logger(label: "spent")),
                reactor: reactor)
            // The crash restart (the one the policy allows) is starting...
            #expect(await waitUntil { leftoverPluginFiles().contains { $0.contains("-spent-2-") } })
            // ...when a hot restart that fails at once supersedes it. No process is left and
            // the policy is spent: the plugin gives up.
            await #expect { try await plugin.restart(executable: "/nonexistent/plugin") } throws: { ($0 as? PluginHostError)?.code == .spawnFailed }
            #expect(await waitUntil { events.all.contains { $0.isGaveUp } }, "\(events.all)")
            // The crash restart's process, which would have connected by now, never serves.
            try await Task.sleep(for: .milliseconds(1500))
            let seen = events.all
            #expect(seen.compactMap(\.startedPID) == [crashed], "\(seen)")
            let superseded = seen.compactMap(\.exitedPID).filter { $0 != crashed }
            #expect(superseded.count == 1, "\(seen)")
            #expect(superseded.allSatisfy { seen.contains(.exited(pid: $0, status: .signalled(SIGKILL))) }, "\(seen)")
            #expect(await plugin.currentPID() == nil)
            #expect(plugin.session == nil)
            do {
                _ = try await EchoClient(plugin).echo("anyone?")
                Issue.record("a plugin that gave up should fail calls")
            } catch let error as RPCError {
                #expect(error.code == .unavailable)
            }
            #expect(leftoverPluginFiles().isEmpty, "\(leftoverPluginFiles())")
            await plugin.stop()
            return [crashed] + superseded
        }
    }

    @Test func crashRestartFailingAfterAHotRestartSchedulesNothing() async throws {
        // Every start takes a second; with the gate closed it then exits instead of serving.
        let slow = try GatedPlugin(delay: "1", open: true)
        defer { slow.remove() }
        try await withLeakCheckedReactor { reactor in
            let (plugin, events, crashed) = try await launchAndCrash(
                PluginConfiguration(
                    name: "failed-restart", executable: slow.script, restartPolicy: .always(initialBackoff: .milliseconds(10)),
                    logger: Logger(label: "failed-restart")),
                reactor: reactor, beforeCrash: slow.close)
            // The crash restart's process is starting (its segment exists)...
            #expect(await waitUntil { leftoverPluginFiles().contains { $0.contains("-failed-restart-2-") } })
            // ...when a hot restart replaces the crashed process first.
            try await plugin.restart(executable: examplePlugin)
            let hot = try #require(await plugin.currentPID())
            let afterHot = events.all.count
            // The crash restart's process ends without serving (killed as the hot restart
            // began; left to run, it would exit 3): that must not schedule another restart,
            // since the hot restart's process serves.
            let exitedOthers = {
                events.all.compactMap(\.exitedPID).filter { $0 != crashed && $0 != hot }
            }
            #expect(await waitUntil(timeout: .seconds(10)) { !exitedOthers().isEmpty }, "\(events.all)")
            try await Task.sleep(for: .milliseconds(300))  // a stray restart (10 ms backoff) would have shown by now
            let later = events.all.dropFirst(afterHot)
            #expect(!later.contains { $0.isRestarting }, "\(Array(later))")
            #expect(await plugin.currentPID() == hot)
            #expect(try await EchoClient(plugin).echo("hot") == "hot")
            await plugin.stop()
            return [crashed, hot] + exitedOthers()
        }
    }

    @Test func oldProcessDyingDuringAFailedHotRestartIsRestartedByThePolicy() async throws {
        // The replacement takes a second, then exits (its gate stays closed): the swap fails.
        let replacement = try GatedPlugin(delay: "1", open: false)
        defer { replacement.remove() }
        try await withLeakCheckedReactor { reactor in
            let (plugin, events) = try await launchRecordingEvents(
                PluginConfiguration(
                    name: "orphan-swap", executable: examplePlugin, restartPolicy: .always(initialBackoff: .milliseconds(50)), logger: Logger(label: "orphan-swap")),
                reactor: reactor)
            let old = try #require(await plugin.currentPID())
            let restart = Task { await restartError(plugin, executable: replacement.script) }
            #expect(await waitUntil { plugin.session == nil }, "the swap did not begin")
            // The old process dies while the new one is starting.
            kill(old, SIGKILL)
            #expect(await waitUntil { events.all.contains(.exited(pid: old, status: .signalled(SIGKILL))) })
            let failure = try await value(of: restart, within: .seconds(20), "the restart")
            #expect(failure?.code == .exitedBeforeHandshake)
            #expect(failure?.message.contains("exited with code 3 before its handshake") == true, "\(String(describing: failure))")
            // No process is left: the policy restarts the plugin (with the executable it ran
            // before the failed swap) instead of leaving it stopped.
            #expect(try await EchoClient(plugin).echo("back") == "back")
            let restarted = try #require(await plugin.currentPID())
            #expect(restarted != old)
            let seen = events.all
            #expect(seen.contains(.restarting(attempt: 1, delay: .milliseconds(50))), "\(seen)")
            #expect(seen.last == .started(pid: restarted), "\(seen)")
            #expect(!seen.contains { $0.isGaveUp }, "\(seen)")
            await plugin.stop()
            return [old, restarted]
        }
    }

    @Test func killingTheHostKillsThePlugin() async throws {
        let host = try ChildProcess(exampleHost, ["--wait"])
        defer {
            host.terminate()
            for name in leftoverPluginFiles(hostPID: host.pid) { unlink("/dev/shm/" + name) }
        }
        let pluginPID = try await examplePluginPID(of: host)
        #expect(!processIsGone(pluginPID))
        await killHostExpectingPluginGone(host, plugin: pluginPID)
    }

    @Test func manyPluginsOnOneReactor() async throws {
        try await withLeakCheckedReactor { reactor in
            let capture = LogCapture()
            var plugins: [PluginProcess] = []
            for index in 0..<3 {
                plugins.append(try await PluginProcess.launch(
                    PluginConfiguration(name: "many-\(index)", executable: examplePlugin, logger: capture.logger(label: "many-\(index)")), reactor: reactor))
            }
            for (index, plugin) in plugins.enumerated() {
                #expect(try await EchoClient(plugin).add(Int32(index), 100) == Int32(index) + 100)
            }
            var pids: Set<pid_t> = []
            for plugin in plugins { if let pid = await plugin.currentPID() { pids.insert(pid) } }
            #expect(pids.count == 3)
            for plugin in plugins { await plugin.stop() }
            for pid in pids { #expect(await waitGone(pid)) }
            // A graceful stop is clean on both sides: the plugin reads the host's last frames
            // (GoAway) before the host takes back the slots they are in.
            #expect(capture.entries { $0.message.contains("protocol error") }.isEmpty, "\(capture.lines)")
            return []
        }
    }

    @Test func missingExecutableFailsTheLaunch() async throws {
        try await withLeakCheckedReactor { reactor in
            await launchMissingExecutable(reactor)
            return []
        }
    }

    /// Launches a plugin whose executable does not exist and checks the launch fails saying so.
    private func launchMissingExecutable(_ reactor: Reactor, sourceLocation: SourceLocation = #_sourceLocation) async {
        let configuration = PluginConfiguration(name: "missing", executable: "/nonexistent/rapace-plugin", logger: Logger(label: "missing"))
        guard let error = try? await launchFailure(configuration, reactor: reactor, sourceLocation: sourceLocation) else { return }
        #expect(error.code == .spawnFailed, sourceLocation: sourceLocation)
        #expect(error.message.contains("cannot start /nonexistent/rapace-plugin"), "\(error)", sourceLocation: sourceLocation)
        #expect((error.underlying as? SystemError)?.errno == .noSuchFile, "\(String(describing: error.underlying))", sourceLocation: sourceLocation)
    }

    /// A failed launch takes its hook out of the reactor's shutdown, as `stop()` does: a host
    /// that retries a broken plugin does not pile hooks up on its reactor.
    @Test func aFailedLaunchLeavesNoShutdownHook() async throws {
        try await withLeakCheckedReactor { reactor in
            let before = await onLoop(reactor) { reactor.shutdownHookCount }
            for _ in 0..<3 { await launchMissingExecutable(reactor) }
            #expect(await onLoop(reactor) { reactor.shutdownHookCount } == before)
            return []
        }
    }

    @Test func handshakeTimeoutKillsAPluginThatNeverConnects() async throws {
        let script = try writePluginScript("silent-plugin", exec: "sleep 30")
        defer { unlink(script) }
        try await withLeakCheckedReactor { reactor in
            let events = PluginEventLog()
            var configuration = PluginConfiguration(name: "silent", executable: script, logger: Logger(label: "silent"))
            configuration.handshakeTimeout = .milliseconds(300)
            configuration.onEvent = { event in events.record(event) }
            let started = ContinuousClock.now
            let error = try await launchFailure(configuration, reactor: reactor)
            #expect(error.code == .handshakeTimedOut)
            #expect(error.message.contains("did not connect within"), "\(error)")
            // Removed as the launch fails, not when the killed process's exit is seen later: a
            // host that exits right after a failed launch leaves nothing in /dev/shm.
            #expect(leftoverPluginFiles().isEmpty)
            // Ended by the 300 ms limit: never before it, and long before the default limit
            // (10 s) or the script's exit (30 s) could have ended it. Generous above: the
            // bound is about which limit fired, not how fast the spawn and the kill are.
            let elapsed = ContinuousClock.now - started
            #expect(elapsed >= .milliseconds(300) && elapsed < .seconds(8), "the launch failed after \(elapsed)")
            #expect(await waitUntil { events.all.contains { $0.isExited } })
            let exits = events.all.compactMap(\.exitStatus)
            #expect(exits == [.signalled(SIGKILL)])
            return []
        }
    }

    @Test func handshakeTimeoutEndsAConnectionWhoseHelloComesLate() async throws {
        // The executable only sleeps; this test plays its plugin: it connects to the segment
        // at once, but sends its Hello only after the launch timed out. The host gave up on
        // that process (and killed it): the late Hello must start nothing, no `.started` for
        // the killed pid, and the host must close the connection instead of serving on it
        // (the test's side outlives the killed process, so nothing else ends it).
        let script = try writePluginScript("late-hello-plugin", exec: "sleep 30")
        defer { unlink(script) }
        try await withLeakCheckedReactor { reactor in
            try await withReactor("late-hello-plugin") { pluginSide in
                let events = PluginEventLog()
                var configuration = PluginConfiguration(name: "late-hello", executable: script, logger: Logger(label: "late-hello"))
                configuration.handshakeTimeout = .seconds(2)
                // The host's session waits for the Hello far longer: only the launch gives up.
                configuration.session.handshakeTimeout = .seconds(60)
                configuration.onEvent = { event in events.record(event) }
                let launch = Task { await launchError(configuration, reactor: reactor) }
                // Connected while the launch waits: the host has its session, and its Hello is out.
                #expect(await waitUntil { leftoverPluginFiles().contains { !$0.hasSuffix(".sock") } })
                let segment = try #require(leftoverPluginFiles().first { !$0.hasSuffix(".sock") })
                let transport = try await ShmTransport.connect(path: "/dev/shm/" + segment, reactor: pluginSide)
                let failure = try await value(of: launch, within: .seconds(20), "the launch")
                #expect(failure?.code == .handshakeTimedOut)
                #expect(failure?.message.contains("did not connect within") == true, "\(String(describing: failure))")
                // Now the Hello.
                let closed = RecordLog<Bool>()
                let session = try await onLoopThrowing(pluginSide) { () throws -> SendableBox<Session> in
                    let session = try Session(transport: transport.value, role: .acceptor, configuration: Session.Configuration(handshakeTimeout: .seconds(60)))
                    session.onClose { closed.record(true) }
                    return SendableBox(session)
                }.value
                // The host's Hello was sent before it gave up, so this side may see the
                // handshake done before it sees the connection end.
                _ = try? await session.start()
                #expect(await waitUntil { !closed.all.isEmpty }, "the host kept the connection of a process it killed")
                #expect(await waitUntil { events.all.contains { $0.isExited } }, "\(events.all)")
                let seen = events.all
                #expect(!seen.contains { $0.isStarted }, "\(seen)")
                let exits = seen.compactMap(\.exitStatus)
                #expect(exits == [.signalled(SIGKILL)], "\(seen)")
                await session.closeAndWait()
                return seen.compactMap(\.exitedPID)
            }
        }
    }

    @Test func cleanStopReportsExitCodeZero() async throws {
        try await withLeakCheckedReactor { reactor in
            let (plugin, events) = try await launchRecordingEvents(
                PluginConfiguration(name: "clean", executable: examplePlugin, logger: Logger(label: "clean")), reactor: reactor)
            let pid = try #require(await plugin.currentPID())
            await plugin.stop()
            #expect(events.all == [.started(pid: pid), .exited(pid: pid, status: .exited(code: 0))])
            var received: [PluginEvent] = []
            for await event in plugin.events { received.append(event) }
            #expect(received == [.started(pid: pid), .exited(pid: pid, status: .exited(code: 0))])
            return [pid]
        }
    }
}
