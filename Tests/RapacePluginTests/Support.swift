import CRapaceShim
import Foundation
import Rapace
@testable import RapacePlugin
import RapaceTestSupport
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

var examplePlugin: String { productsDirectory + "/rapace-example-plugin" }
var exampleHost: String { productsDirectory + "/rapace-example-host" }

/// Runs the example plugin directly (no host), for the argument and segment errors: its
/// exit code and what it wrote to stderr. Killed after `timeout`.
func runExamplePlugin(_ arguments: [String], timeout: Duration = .seconds(15)) async throws -> FinishedProcess {
    try await FinishedProcess.run(examplePlugin, arguments, capturing: .stderr, timeout: timeout)
}

func monotonicNow() -> UInt64 { rapace_monotonic_ns() }

/// A shell script that waits `delay` seconds, then runs the example plugin with its own
/// arguments: a plugin whose start takes a known while. The caller removes it. The wait is a
/// `sleep` child of the script, which a SIGKILL of the script leaves to run out its delay
/// (Docs/testing.md); the plugin replaces the script (`exec`).
func slowStartingPlugin(delay: String) throws -> String {
    try writePluginScript("slow-plugin", "sleep \(delay)\n")
}

/// Writes an executable shell script (named after `tag`) that runs `prelude`, then replaces
/// itself with `command` (by default the example plugin with the script's arguments): its
/// path. Throws when it cannot be written; the caller removes it.
func writePluginScript(_ tag: String, _ prelude: String = "", exec command: String = "'\(examplePlugin)' \"$@\"") throws -> String {
    let path = temporaryPath(tag, suffix: ".sh")
    let script = "#!/bin/sh\n" + prelude + "exec \(command)\n"
    guard FileManager.default.createFile(atPath: path, contents: Data(script.utf8), attributes: [.posixPermissions: 0o755]) else {
        throw TestFailure("cannot write \(path)")
    }
    return path
}

/// The example plugin behind a shell that outlives it: once the plugin has exited (its
/// connection closed), the process the host watches lingers 30 s unless the host kills it.
/// (The plugin's parent is the shell: the host it checks is named by the environment.)
func lingeringPlugin() throws -> String {
    try writePluginScript("lingering-plugin", "\(pluginHostPIDEnvironmentVariable)=$$ '\(examplePlugin)' \"$@\"\n", exec: "sleep 30")
}

/// The example plugin behind a gate, a file the test creates (``open()``) and removes
/// (``close()``): a shell script that waits `delay` seconds, then runs the plugin if the
/// gate is open; if it is not, it exits with code 3 (``Closed/exits``) or waits for the gate
/// to open (``Closed/waits``; exit 3 after 30 s). ``remove()`` deletes the script and the gate.
/// Without a delay the script starts no child before the plugin replaces it, unless it waits
/// for the gate (`sleep 0.01` between checks); a delay is a `sleep` child, as in
/// ``slowStartingPlugin(delay:)``.
struct GatedPlugin {
    /// What the script does when, after its delay, it finds the gate closed.
    enum Closed {
        case exits
        case waits
    }

    /// The executable to launch.
    let script: String
    /// The gate: the plugin runs while this file exists.
    let gate: String

    init(delay: String = "0", open: Bool, whenClosed: Closed = .exits) throws {
        gate = temporaryPath("plugin-gate")
        let check =
            switch whenClosed {
            case .exits: "[ -e '\(gate)' ] || exit 3\n"
            case .waits: "i=0\nwhile [ ! -e '\(gate)' ]; do i=$((i+1)); [ $i -le 3000 ] || exit 3; sleep 0.01; done\n"
            }
        let wait = delay == "0" ? "" : "sleep \(delay)\n"
        script = try writePluginScript("gated-plugin", wait + check)
        if open { try self.open() }
    }

    func open() throws {
        guard FileManager.default.createFile(atPath: gate, contents: nil) else { throw TestFailure("cannot create \(gate)") }
    }

    func close() { unlink(gate) }

    func remove() {
        unlink(script)
        unlink(gate)
    }
}

/// What was recorded, oldest first, from any thread: a `Locked` array.
typealias RecordLog<Entry: Sendable> = Locked<[Entry]>

extension Locked where Value: RangeReplaceableCollection {
    /// An empty log.
    convenience init() { self.init(Value()) }

    func record(_ entry: Value.Element) { withLock { $0.append(entry) } }

    /// The entries so far.
    var all: Value { withLock { $0 } }
}

/// Every event a plugin reported, oldest first (an `onEvent` that keeps them).
typealias PluginEventLog = RecordLog<PluginEvent>

/// What the tests ask of an event, without a pattern match at each call site.
extension PluginEvent {
    /// The pid of a `.started` event; nil for the others.
    var startedPID: pid_t? { if case .started(let pid) = self { pid } else { nil } }
    /// The pid of an `.exited` event; nil for the others.
    var exitedPID: pid_t? { if case .exited(let pid, _) = self { pid } else { nil } }
    /// How the process of an `.exited` event ended; nil for the others.
    var exitStatus: PluginExitStatus? { if case .exited(_, let status) = self { status } else { nil } }
    var isStarted: Bool { startedPID != nil }
    var isExited: Bool { exitedPID != nil }
    var isRestarting: Bool { if case .restarting = self { true } else { false } }
    var isGaveUp: Bool { if case .gaveUp = self { true } else { false } }
}

/// Launches `configuration` on `reactor` with an `onEvent` (replacing any it has) that
/// records the plugin's events: the plugin and its event log.
func launchRecordingEvents(_ configuration: PluginConfiguration, reactor: Reactor) async throws -> (PluginProcess, PluginEventLog) {
    let events = PluginEventLog()
    var configuration = configuration
    configuration.onEvent = { event in events.record(event) }
    return (try await PluginProcess.launch(configuration, reactor: reactor), events)
}

/// Expects this host's plugin files in /dev/shm (`leftoverPluginFiles()`) to be exactly those
/// of one running process: generation `generation` of plugin `name`, which `PluginProcess`
/// names `rapace-plugin-PID-NAME-GENERATION-RANDOM`, and the bootstrap socket beside it
/// (`SEGMENT.sock`), both kept while the process serves. No files, another generation's or a
/// segment without its socket fail. Needs the gate exclusively.
func expectOnlyFilesOfGeneration(_ generation: Int, of name: String, sourceLocation: SourceLocation = #_sourceLocation) {
    let files = leftoverPluginFiles(sourceLocation: sourceLocation).sorted()
    let prefix = "rapace-plugin-\(getpid())-\(name)-\(generation)-"
    let segment = files.first { $0.hasPrefix(prefix) && !$0.hasSuffix(".sock") }
    let random = segment.map { $0.dropFirst(prefix.count) } ?? ""
    #expect(!random.isEmpty && random.allSatisfy(\.isNumber), "no segment of generation \(generation) of \(name): \(files)", sourceLocation: sourceLocation)
    #expect(segment.map { files == [$0, $0 + ".sock"] } == true, "not only generation \(generation)'s segment and socket: \(files)", sourceLocation: sourceLocation)
}

/// Launches `configuration` recording its events (``launchRecordingEvents(_:reactor:)``),
/// runs `beforeCrash`, kills the process with SIGKILL and waits (at most 5 s) for the restart
/// policy's first answer: the events must begin with exactly the start, the exit by SIGKILL
/// and restart attempt 1 after the policy's first backoff (what the restarted process reports
/// may follow, however soon it comes). The plugin, its event log and the killed pid; throws
/// when those first events differ.
func launchAndCrash(
    _ configuration: PluginConfiguration, reactor: Reactor, beforeCrash: () -> Void = {}, sourceLocation: SourceLocation = #_sourceLocation
) async throws -> (PluginProcess, PluginEventLog, pid_t) {
    let (plugin, events) = try await launchRecordingEvents(configuration, reactor: reactor)
    let pid = try #require(await plugin.currentPID(), sourceLocation: sourceLocation)
    beforeCrash()
    kill(pid, SIGKILL)
    let restarting = PluginEvent.restarting(attempt: 1, delay: configuration.restartPolicy.backoff(attempt: 1))
    _ = await waitUntil { events.all.contains(restarting) }
    let first = Array(events.all.prefix(3))
    try #require(first == [.started(pid: pid), .exited(pid: pid, status: .signalled(SIGKILL)), restarting], "\(events.all)", sourceLocation: sourceLocation)
    try #require(await waitGone(pid), "killed plugin \(pid) is still there", sourceLocation: sourceLocation)
    return (plugin, events, pid)
}

/// Reads `rapace-example-host`'s output (at most 15 s) until its first answer; the pid of the
/// plugin it launched, from its `plugin-pid` line.
func examplePluginPID(of host: ChildProcess, sourceLocation: SourceLocation = #_sourceLocation) async throws -> pid_t {
    var lines: [String] = []
    let deadline = ContinuousClock.now + .seconds(15)
    while !lines.contains(where: { $0.hasPrefix("answer ") }) {
        lines.append(try await host.nextLine(timeout: deadline - ContinuousClock.now))
    }
    let pidLine = try #require(lines.first { $0.hasPrefix("plugin-pid ") }, sourceLocation: sourceLocation)
    return try #require(pid_t(pidLine.dropFirst("plugin-pid ".count)), sourceLocation: sourceLocation)
}

/// Kills `host` (SIGKILL, reaped) and expects the plugin it launched, `pluginPID`, to die with
/// it within 2 s; kills the plugin itself only if it did not (once gone, its pid may name
/// another process).
func killHostExpectingPluginGone(_ host: ChildProcess, plugin pluginPID: pid_t, sourceLocation: SourceLocation = #_sourceLocation) async {
    host.terminate()
    let gone = await waitGone(pluginPID, timeout: .seconds(2))
    #expect(gone, "plugin \(pluginPID) outlived its host", sourceLocation: sourceLocation)
    if !gone { kill(pluginPID, SIGKILL) }
}

/// The error `PluginProcess.launch` fails with. A launch that succeeds is recorded as an
/// issue, its plugin stopped, and ``TestFailure`` thrown.
func launchFailure(_ configuration: PluginConfiguration, reactor: Reactor, sourceLocation: SourceLocation = #_sourceLocation) async throws -> PluginHostError {
    let plugin: PluginProcess
    do throws(PluginHostError) {
        plugin = try await PluginProcess.launch(configuration, reactor: reactor)
    } catch {
        return error
    }
    Issue.record("launch of \(configuration.name) should fail", sourceLocation: sourceLocation)
    await plugin.stop()
    throw TestFailure("launch of \(configuration.name) should fail")
}

/// How `PluginProcess.launch` ends: nil when it succeeds (the plugin is dropped: the
/// reactor's shutdown ends it), else its error.
func launchError(_ configuration: PluginConfiguration, reactor: Reactor) async -> PluginHostError? {
    do throws(PluginHostError) {
        _ = try await PluginProcess.launch(configuration, reactor: reactor)
        return nil
    } catch {
        return error
    }
}

/// How `plugin.restart(executable:)` ends: nil when it succeeds, else its error.
func restartError(_ plugin: PluginProcess, executable: String) async -> PluginHostError? {
    do throws(PluginHostError) {
        try await plugin.restart(executable: executable)
        return nil
    } catch {
        return error
    }
}

/// Holds back the spawner's report of each new plugin process (the child and its pid, to the
/// reactor's loop) until ``open()``: its handshake can then end before its pid is known, a
/// race that is rare otherwise. See ``withSpawnReportsHeld(_:)``.
final class SpawnReportGate: Sendable {
    private let isOpen = Locked(false)
    private let pids = RecordLog<pid_t>()

    /// The pids of the processes spawned so far, reported or held.
    var spawned: [pid_t] { pids.all }

    /// Lets the reports held go to the loop, and every later one at once.
    func open() { isOpen.withLock { $0 = true } }

    /// On the spawner's thread: records `pid`, then waits until the gate is open (at most
    /// 20 s, so that a test that forgets it does not keep the thread forever).
    fileprivate func hold(_ pid: pid_t) {
        pids.record(pid)
        let deadline = ContinuousClock.now + .seconds(20)
        while !isOpen.withLock({ $0 }) && ContinuousClock.now < deadline { usleep(1000) }
    }
}

/// Runs `body` with the spawner's report of every plugin process spawned meanwhile held
/// back by the gate it gets (``SpawnReportGate``), until `body` opens it or returns. The
/// hook is process-wide (`PluginSpawner.beforeReportingSpawnForTesting`): the test must own
/// the process.
func withSpawnReportsHeld<T>(sourceLocation: SourceLocation = #_sourceLocation, _ body: (SpawnReportGate) async throws -> T) async throws -> T {
    ProcessGate.expectExclusive("withSpawnReportsHeld (a hook on every spawn of this process)", sourceLocation: sourceLocation)
    let gate = SpawnReportGate()
    PluginSpawner.beforeReportingSpawnForTesting.withLock { $0 = { gate.hold($0) } }
    defer {
        PluginSpawner.beforeReportingSpawnForTesting.withLock { $0 = nil }
        gate.open()
    }
    return try await body(gate)
}
