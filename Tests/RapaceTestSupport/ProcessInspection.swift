import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

// What `/proc` tells about processes. The readers of this process's own state check that
// the test holds the process gate exclusively (another test's files, memory or children
// would show up in them).

/// What `/proc/PID/stat` says of a process (proc(5)).
package struct ProcessStat: Sendable, Equatable {
    /// The state letter (field 3): `R` running, `S` sleeping, `Z` a zombie, `X` dead, …
    package let state: Character
    /// The parent's pid (field 4).
    package let parent: pid_t
    /// The process group (field 5).
    package let group: pid_t
    /// CPU time, user + system (fields 14 and 15), in clock ticks (1/100 s).
    package let cpuTicks: Int

    /// Neither a zombie nor dead.
    package var isLive: Bool { state != "Z" && state != "X" }

    /// Reads `/proc/PID/stat`; nil when there is no such process (or the file does not parse).
    package static func of(_ pid: pid_t) -> ProcessStat? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = text.lastIndex(of: ")")
        else { return nil }
        // After the command's closing parenthesis (the command may hold spaces and
        // parentheses itself): field 3, the state, comes first.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let state = fields[0].first, let parent = pid_t(fields[1]), let group = pid_t(fields[2]),
            let user = Int(fields[11]), let system = Int(fields[12])
        else { return nil }
        return ProcessStat(state: state, parent: parent, group: group, cpuTicks: user + system)
    }
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
package func processIsGone(_ pid: pid_t) -> Bool {
    if kill(pid, 0) != 0 && errno == ESRCH { return true }
    return !(ProcessStat.of(pid)?.isLive ?? false)
}

/// Waits (bounded) until `pid` is gone; returns whether it is.
package func waitGone(_ pid: pid_t, timeout: Duration = .seconds(5)) async -> Bool {
    await waitUntil(timeout: timeout, interval: .milliseconds(10)) { processIsGone(pid) }
}

/// CPU time (user + system) of a process in clock ticks (1/100 s), from /proc/PID/stat.
package func cpuTicks(of pid: pid_t) -> Int? {
    ProcessStat.of(pid)?.cpuTicks
}

/// The processes in process group `group` that are neither gone nor zombies (from /proc).
package func liveProcesses(inGroup group: pid_t) -> [pid_t] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { entry -> pid_t? in
        guard let pid = pid_t(entry), let stat = ProcessStat.of(pid), stat.isLive, stat.group == group else { return nil }
        return pid
    }
}

/// VmRSS of this process in KiB. Process-wide: needs the gate exclusively.
package func residentKiB(sourceLocation: SourceLocation = #_sourceLocation) -> UInt64 {
    ProcessGate.expectExclusive("residentKiB()", sourceLocation: sourceLocation)
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
        let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") })
    else { return 0 }
    return UInt64(line.filter(\.isNumber)) ?? 0
}

/// Segment and socket files that `PluginProcess` created in /dev/shm for plugins of the
/// host `hostPID` and left behind. For this process (the default) that is process-wide
/// state: it needs the gate exclusively.
package func leftoverPluginFiles(hostPID: pid_t = getpid(), sourceLocation: SourceLocation = #_sourceLocation) -> [String] {
    if hostPID == getpid() { ProcessGate.expectExclusive("leftoverPluginFiles()", sourceLocation: sourceLocation) }
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? []
    return entries.filter { $0.hasPrefix("rapace-plugin-\(hostPID)-") }
}

/// Descriptors of this process that point at plugin segments. Needs the gate exclusively.
package func openPluginSegmentFDs(sourceLocation: SourceLocation = #_sourceLocation) -> [String] {
    ProcessGate.expectExclusive("openPluginSegmentFDs()", sourceLocation: sourceLocation)
    return DescriptorSnapshot.of(pid: getpid()).entries.values.filter { $0.contains("rapace-plugin-\(getpid())-") }.sorted()
}
