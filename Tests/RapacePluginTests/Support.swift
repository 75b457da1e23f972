import CRapaceShim
import Foundation
import Rapace
import RapacePlugin
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
/// arguments: a plugin whose start takes a known while. The caller removes it.
func slowStartingPlugin(delay: String, exitUnlessExists marker: String? = nil) throws -> String {
    let path = temporaryPath("slow-plugin", suffix: ".sh")
    var script = "#!/bin/sh\nsleep \(delay)\n"
    if let marker { script += "[ -e '\(marker)' ] || exit 3\n" }
    script += "exec '\(examplePlugin)' \"$@\"\n"
    guard FileManager.default.createFile(atPath: path, contents: Data(script.utf8), attributes: [.posixPermissions: 0o755]) else {
        throw TestFailure("cannot write \(path)")
    }
    return path
}

/// Every event a plugin reported, oldest first (an `onEvent` that keeps them).
final class PluginEventLog: Sendable {
    private let events = Mutex<[PluginEvent]>([])

    func record(_ event: PluginEvent) { events.withLock { $0.append(event) } }

    /// The events so far.
    var all: [PluginEvent] { events.withLock { $0 } }
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
