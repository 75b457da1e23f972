import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

// What `/proc` tells about processes. The readers of this process's own state check that
// the test holds the process gate exclusively (another test's files, memory or children
// would show up in them).

/// Whether `pid` is gone (or a zombie nobody reaped yet).
package func processIsGone(_ pid: pid_t) -> Bool {
    if kill(pid, 0) != 0 && errno == ESRCH { return true }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return true }
    let state = stat[stat.index(close, offsetBy: 2)]
    return state == "Z" || state == "X"
}

/// Waits (bounded) until `pid` is gone; returns whether it is.
package func waitGone(_ pid: pid_t, timeout: Duration = .seconds(5)) async -> Bool {
    await waitUntil(timeout: timeout, interval: .milliseconds(10)) { processIsGone(pid) }
}

/// CPU time (user + system) of a process in clock ticks (1/100 s), from /proc/PID/stat.
package func cpuTicks(of pid: pid_t) -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
        let close = text.lastIndex(of: ")")
    else { return nil }
    let fields = text[text.index(after: close)...].split(separator: " ")
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    guard fields.count > 13, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
    return user + system
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
