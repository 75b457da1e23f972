import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The open descriptors of a process at one moment: number → what it points at
/// (`/proc/PID/fd/N`), for leak checks.
package struct DescriptorSnapshot: Sendable, Equatable {
    package let entries: [Int32: String]

    package init(entries: [Int32: String]) { self.entries = entries }

    package var count: Int { entries.count }

    /// Reads `/proc/PID/fd`. The directory's own descriptor is closed before the targets are
    /// read, so it does not appear.
    ///
    /// Unchecked: for another process, whose descriptors no other test touches, or for this
    /// one in an exit test's child process. For this process in a test, use ``take(sourceLocation:)``.
    package static func of(pid: pid_t) -> DescriptorSnapshot {
        let directory = "/proc/\(pid)/fd"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        var entries: [Int32: String] = [:]
        for name in names {
            guard let fd = Int32(name), let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "\(directory)/\(name)") else { continue }
            entries[fd] = target
        }
        return DescriptorSnapshot(entries: entries)
    }

    /// This process's descriptors. Process-wide state: the test must hold the process gate
    /// exclusively (an issue is recorded otherwise).
    ///
    /// It sleeps a millisecond first: the first timed sleep of the process makes the
    /// concurrency runtime's dispatch open a timerfd that stays open, which must not count
    /// as opened by the test that happens to sleep first.
    package static func take(sourceLocation: SourceLocation = #_sourceLocation) async -> DescriptorSnapshot {
        ProcessGate.expectExclusive("DescriptorSnapshot.take()", sourceLocation: sourceLocation)
        try? await Task.sleep(for: .milliseconds(1))
        return of(pid: getpid())
    }

    /// The same snapshot without the concurrency runtime's timer descriptors (created lazily
    /// per clock by `Task.sleep`; rapace opens none).
    package var withoutTimers: DescriptorSnapshot {
        DescriptorSnapshot(entries: entries.filter { !$0.value.hasSuffix("[timerfd]") })
    }

    /// Descriptors open now that were not open (with the same target) in `baseline`.
    package func opened(since baseline: DescriptorSnapshot) -> [String] {
        entries.filter { baseline.entries[$0.key] != $0.value }.sorted { $0.key < $1.key }.map { "\($0.key) → \($0.value)" }
    }
}

/// Checks that every descriptor this process opened since `baseline` is closed again,
/// waiting at most `timeout` for reactors and watcher threads to finish closing; records an
/// issue naming the ones still open.
///
/// It compares whole-process state: the test must hold the process gate exclusively
/// (`.ownsProcess`), with the baseline taken inside the same test.
package func expectNoDescriptorLeak(since baseline: DescriptorSnapshot, timeout: Duration = .seconds(2), sourceLocation: SourceLocation = #_sourceLocation) async {
    let deadline = ContinuousClock.now + timeout
    var opened = await DescriptorSnapshot.take(sourceLocation: sourceLocation).opened(since: baseline)
    while !opened.isEmpty, ContinuousClock.now < deadline {
        try? await Task.sleep(for: .milliseconds(10))
        opened = await DescriptorSnapshot.take(sourceLocation: sourceLocation).opened(since: baseline)
    }
    #expect(opened.isEmpty, "\(opened.count) descriptor(s) still open \(timeout) after the test (\(baseline.count) before): \(opened)", sourceLocation: sourceLocation)
}
