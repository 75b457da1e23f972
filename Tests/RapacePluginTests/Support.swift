import CRapaceShim
import Foundation
import Logging
import Rapace
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The directory holding the built executables (next to the test bundle).
var productsDirectory: String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let path = count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    return (path as NSString).deletingLastPathComponent
}

var examplePlugin: String { productsDirectory + "/rapace-example-plugin" }
var exampleHost: String { productsDirectory + "/rapace-example-host" }

struct PluginTestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Collects what a logger receives, one string per entry.
final class LogCapture: @unchecked Sendable {
    private let lines = Mutex<[String]>([])

    var all: [String] { lines.withLock { $0 } }

    func append(_ line: String) { lines.withLock { $0.append(line) } }

    func logger(label: String) -> Logger {
        Logger(label: label) { label in CaptureHandler(label: label, capture: self) }
    }

    /// Waits (bounded) until a line satisfies `predicate`.
    func waitFor(timeout: Duration = .seconds(10), _ predicate: (String) -> Bool) async -> String? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let line = all.first(where: predicate) { return line }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return nil
    }
}

struct CaptureHandler: LogHandler {
    let label: String
    let capture: LogCapture
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String, file: String, function: String, line: UInt) {
        let stream = metadata?["stream"].map { "\($0)" } ?? "-"
        capture.append("[\(label)] [\(stream)] \(message)")
    }
}

/// A plugin executable run directly (no host), for the argument and segment errors.
struct DirectRun {
    let status: Int32
    let stderr: String
    let elapsed: Duration

    /// Runs `executable arguments`, killing it after `timeout`. Polls with `Task.sleep`, so
    /// it never blocks a thread of the shared cooperative pool (other suites run meanwhile).
    static func run(_ arguments: [String], timeout: Duration = .seconds(15)) async throws -> DirectRun {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw PluginTestFailure("pipe failed") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        posix_spawn_file_actions_addclose(&actions, fds[1])
        defer { posix_spawn_file_actions_destroy(&actions) }
        let argv = ([examplePlugin] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var child: pid_t = 0
        let start = ContinuousClock.now
        let rc = posix_spawn(&child, examplePlugin, &actions, nil, argv, environ)
        close(fds[1])
        guard rc == 0 else {
            close(fds[0])
            throw PluginTestFailure("posix_spawn failed: \(rc)")
        }
        defer { close(fds[0]) }
        _ = fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK)
        var output: [UInt8] = []
        var status: Int32 = 0
        let deadline = start + timeout
        while true {
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = read(fds[0], &chunk, chunk.count)
            if n > 0 { output += chunk[0..<n] }
            if waitpid(child, &status, WNOHANG) == child { break }
            if ContinuousClock.now > deadline {
                kill(child, SIGKILL)
                waitpid(child, &status, 0)
                throw PluginTestFailure("plugin did not exit within \(timeout)")
            }
            try await Task.sleep(for: .milliseconds(2))
        }
        var chunk = [UInt8](repeating: 0, count: 4096)
        for _ in 0..<64 {
            let n = read(fds[0], &chunk, chunk.count)
            guard n > 0 else { break }
            output += chunk[0..<n]
        }
        let code = (status & 0x7F) == 0 ? (status >> 8) & 0xFF : -(status & 0x7F)
        return DirectRun(status: code, stderr: String(decoding: output, as: UTF8.self), elapsed: ContinuousClock.now - start)
    }
}

/// Segment or socket files this process created for plugins and left behind.
func leftoverPluginFiles(hostPID: pid_t = getpid()) -> [String] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []
    return entries.filter { $0.hasPrefix("rapace-plugin-\(hostPID)-") }
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
func processIsGone(_ pid: pid_t) -> Bool {
    if kill(pid, 0) != 0 && errno == ESRCH { return true }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return true }
    let state = stat[stat.index(close, offsetBy: 2)]
    return state == "Z" || state == "X"
}

/// Waits (bounded) until `pid` is gone.
func waitGone(_ pid: pid_t, timeout: Duration = .seconds(5)) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if processIsGone(pid) { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return processIsGone(pid)
}

/// Descriptors of this process that point at plugin segments.
func openPluginSegmentFDs() -> [String] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    return entries.compactMap { name in
        guard let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)") else { return nil }
        return target.contains("rapace-plugin-\(getpid())-") ? target : nil
    }
}

func monotonicNow() -> UInt64 { rapace_monotonic_ns() }

/// The open descriptors of this process at one moment: number → what it points at
/// (`/proc/self/fd/N`), for leak checks.
struct DescriptorSnapshot {
    let entries: [Int32: String]

    var count: Int { entries.count }

    /// Reads `/proc/self/fd`. The directory's own descriptor is closed before the targets are
    /// read, so it does not appear.
    ///
    /// It sleeps a millisecond first: the first timed sleep of the process makes the
    /// concurrency runtime's dispatch open a timerfd that stays open, which must not count
    /// as opened by the test that happens to sleep first.
    static func take() async -> DescriptorSnapshot {
        try? await Task.sleep(for: .milliseconds(1))
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        var entries: [Int32: String] = [:]
        for name in names {
            guard let fd = Int32(name), let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(name)") else { continue }
            entries[fd] = target
        }
        return DescriptorSnapshot(entries: entries)
    }

    /// Descriptors open now that were not open (with the same target) in `baseline`.
    func opened(since baseline: DescriptorSnapshot) -> [String] {
        entries.filter { baseline.entries[$0.key] != $0.value }.sorted { $0.key < $1.key }.map { "\($0.key) → \($0.value)" }
    }
}

/// Checks that every descriptor this process opened since `baseline` is closed again,
/// waiting at most `timeout` for the reactor and the plugins' watcher threads to finish
/// closing; records an issue naming the ones still open.
///
/// It compares whole-process state, so it is meaningful only while no other test runs:
/// call it from a serialized suite, with the baseline taken inside the same test (tools/test
/// also runs all suites one after another).
func expectNoDescriptorLeak(since baseline: DescriptorSnapshot, timeout: Duration = .seconds(2), sourceLocation: SourceLocation = #_sourceLocation) async {
    let deadline = ContinuousClock.now + timeout
    var opened = await DescriptorSnapshot.take().opened(since: baseline)
    while !opened.isEmpty, ContinuousClock.now < deadline {
        try? await Task.sleep(for: .milliseconds(10))
        opened = await DescriptorSnapshot.take().opened(since: baseline)
    }
    #expect(opened.isEmpty, "\(opened.count) descriptor(s) still open \(timeout) after the test (\(baseline.count) before): \(opened)", sourceLocation: sourceLocation)
}

/// Waits (bounded) until `condition` holds; returns whether it did.
func waitUntil(timeout: Duration = .seconds(5), _ condition: () async -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if await condition() { return true }
        try? await Task.sleep(for: .milliseconds(2))
    }
    return await condition()
}

/// Runs `body` on the loop thread of `reactor` and returns its result.
func onLoop<T: Sendable>(_ reactor: Reactor, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        reactor.execute { continuation.resume(returning: body()) }
    }
}

/// A shell script that waits `delay` seconds, then runs the example plugin with its own
/// arguments: a plugin whose start takes a known while. The caller removes it.
func slowStartingPlugin(delay: String, exitUnlessExists marker: String? = nil) throws -> String {
    let path = "/tmp/rapace-plugin-test-slow-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sh"
    var script = "#!/bin/sh\nsleep \(delay)\n"
    if let marker { script += "[ -e '\(marker)' ] || exit 3\n" }
    script += "exec '\(examplePlugin)' \"$@\"\n"
    guard FileManager.default.createFile(atPath: path, contents: Data(script.utf8), attributes: [.posixPermissions: 0o755]) else {
        throw PluginTestFailure("cannot write \(path)")
    }
    return path
}
