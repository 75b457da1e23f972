import RapaceTestSupport
import Synchronization
import Testing

/// The readers–writer gate on its own (private gates, not the process's).
@Suite("ProcessGate", .sharesProcess)
struct ProcessGateTests {
    /// Names in the order their tasks got in.
    final class Log: Sendable {
        private let names = Mutex<[String]>([])
        func append(_ name: String) { names.withLock { $0.append(name) } }
        var all: [String] { names.withLock { $0 } }
    }

    /// A flag a holder waits for.
    final class Flag: Sendable {
        private let raised = Atomic(false)
        func raise() { raised.store(true, ordering: .releasing) }
        var isRaised: Bool { raised.load(ordering: .acquiring) }
    }

    /// A task that holds `gate` with `access` until `release` is raised (at most 30 s: then
    /// it throws); logs when it got in.
    private static func holder(_ gate: ProcessGate, _ access: ProcessGate.Access, _ log: Log, _ name: String, until release: Flag) -> Task<Void, any Error> {
        Task {
            try await gate.withAccess(access) {
                log.append(name)
                let deadline = ContinuousClock.now + .seconds(30)
                while !release.isRaised {
                    guard ContinuousClock.now < deadline else { throw TestFailure("holder \(name) was not released within 30 s") }
                    try await Task.sleep(for: .milliseconds(1))
                }
            }
        }
    }

    /// Starts a ``holder(_:_:_:_:until:)`` and expects the gate's statistics to become
    /// `expected` (within 5 s): the new task got in, or queued, as the test says.
    private static func enter(
        _ gate: ProcessGate, _ access: ProcessGate.Access, _ log: Log, _ name: String, until release: Flag, expecting expected: ProcessGate.Statistics,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async -> Task<Void, any Error> {
        let task = holder(gate, access, log, name, until: release)
        let reached = await statistics(gate, is: expected)
        #expect(reached, "after \(name) came: \(gate.statistics), expected \(expected)", sourceLocation: sourceLocation)
        return task
    }

    private static func statistics(_ gate: ProcessGate, is expected: ProcessGate.Statistics) async -> Bool {
        await waitUntil { gate.statistics == expected }
    }

    private static func stats(shared: Int = 0, exclusive: Bool = false, sharedWaiting: Int = 0, exclusiveWaiting: Int = 0) -> ProcessGate.Statistics {
        ProcessGate.Statistics(sharedHolders: shared, exclusiveHeld: exclusive, sharedWaiters: sharedWaiting, exclusiveWaiters: exclusiveWaiting)
    }

    @Test("shared holders run together; an exclusive one waits for all of them, and later shared ones wait for it")
    func sharedThenExclusive() async throws {
        let gate = ProcessGate()
        let log = Log()
        let releaseShared = Flag(), releaseExclusive = Flag(), releaseLate = Flag()
        let a = Self.holder(gate, .shared, log, "a", until: releaseShared)
        let b = await Self.enter(gate, .shared, log, "b", until: releaseShared, expecting: Self.stats(shared: 2))
        let x = await Self.enter(gate, .exclusive, log, "x", until: releaseExclusive, expecting: Self.stats(shared: 2, exclusiveWaiting: 1))
        // A shared arrival does not overtake the waiting exclusive one.
        let late = await Self.enter(gate, .shared, log, "late", until: releaseLate, expecting: Self.stats(shared: 2, sharedWaiting: 1, exclusiveWaiting: 1))
        releaseShared.raise()
        try await value(of: a, within: .seconds(10), "a")
        try await value(of: b, within: .seconds(10), "b")
        #expect(await Self.statistics(gate, is: Self.stats(exclusive: true, sharedWaiting: 1)))
        releaseExclusive.raise()
        try await value(of: x, within: .seconds(10), "x")
        #expect(await Self.statistics(gate, is: Self.stats(shared: 1)))
        releaseLate.raise()
        try await value(of: late, within: .seconds(10), "late")
        #expect(gate.statistics == Self.stats())
        #expect(Set(log.all.prefix(2)) == ["a", "b"])
        #expect(Array(log.all.dropFirst(2)) == ["x", "late"])
    }

    @Test("when an exclusive holder leaves, every shared waiter goes before the next exclusive waiter")
    func phaseFair() async throws {
        let gate = ProcessGate()
        let log = Log()
        let releaseFirst = Flag(), releaseReaders = Flag(), releaseSecond = Flag()
        let first = await Self.enter(gate, .exclusive, log, "x1", until: releaseFirst, expecting: Self.stats(exclusive: true))
        let r1 = await Self.enter(gate, .shared, log, "r1", until: releaseReaders, expecting: Self.stats(exclusive: true, sharedWaiting: 1))
        let second = await Self.enter(gate, .exclusive, log, "x2", until: releaseSecond, expecting: Self.stats(exclusive: true, sharedWaiting: 1, exclusiveWaiting: 1))
        let r2 = await Self.enter(gate, .shared, log, "r2", until: releaseReaders, expecting: Self.stats(exclusive: true, sharedWaiting: 2, exclusiveWaiting: 1))
        releaseFirst.raise()
        try await value(of: first, within: .seconds(10), "first")
        // Both readers, the one that came after x2 too.
        #expect(await Self.statistics(gate, is: Self.stats(shared: 2, exclusiveWaiting: 1)))
        releaseReaders.raise()
        try await value(of: r1, within: .seconds(10), "r1")
        try await value(of: r2, within: .seconds(10), "r2")
        #expect(await Self.statistics(gate, is: Self.stats(exclusive: true)))
        releaseSecond.raise()
        try await value(of: second, within: .seconds(10), "second")
        #expect(log.all.first == "x1")
        #expect(log.all.last == "x2")
        #expect(gate.statistics == Self.stats())
    }

    @Test("exclusive waiters go one at a time, in arrival order")
    func exclusiveInOrder() async throws {
        let gate = ProcessGate()
        let log = Log()
        let release = Flag()
        let first = await Self.enter(gate, .exclusive, log, "0", until: release, expecting: Self.stats(exclusive: true))
        var waiters: [Task<ProcessGate.Statistics, any Error>] = []
        for index in 1...4 {
            // Returns what the gate looked like while it held it (asserted by the test's task).
            waiters.append(Task {
                try await gate.withAccess(.exclusive) {
                    log.append("\(index)")
                    return gate.statistics
                }
            })
            #expect(await Self.statistics(gate, is: Self.stats(exclusive: true, exclusiveWaiting: index)))
        }
        release.raise()
        try await value(of: first, within: .seconds(10), "first")
        for (index, waiter) in waiters.enumerated() {
            // Each held it exclusively, with the ones after it still waiting.
            let statistics = try await value(of: waiter, within: .seconds(10), "exclusive waiter \(index + 1)")
            #expect(statistics == Self.stats(exclusive: true, exclusiveWaiting: 3 - index), "waiter \(index + 1)")
        }
        #expect(log.all == ["0", "1", "2", "3", "4"])
    }

    @Test("a cancelled waiter leaves the queue, and the shared waiters queued behind it go")
    func cancellation() async throws {
        let gate = ProcessGate()
        let log = Log()
        let releaseShared = Flag(), never = Flag(), releaseLate = Flag()
        let reader = await Self.enter(gate, .shared, log, "r", until: releaseShared, expecting: Self.stats(shared: 1))
        let writer = await Self.enter(gate, .exclusive, log, "w", until: never, expecting: Self.stats(shared: 1, exclusiveWaiting: 1))
        let late = await Self.enter(gate, .shared, log, "late", until: releaseLate, expecting: Self.stats(shared: 1, sharedWaiting: 1, exclusiveWaiting: 1))
        writer.cancel()
        await #expect(throws: CancellationError.self) { try await value(of: writer, within: .seconds(10), "the cancelled writer") }
        #expect(await Self.statistics(gate, is: Self.stats(shared: 2)))
        releaseShared.raise()
        releaseLate.raise()
        try await value(of: reader, within: .seconds(10), "reader")
        try await value(of: late, within: .seconds(10), "late")
        #expect(log.all.sorted() == ["late", "r"])
        #expect(gate.statistics == Self.stats())
    }

    @Test("a task already cancelled does not wait")
    func cancelledBeforeWaiting() async throws {
        let gate = ProcessGate()
        let log = Log()
        let release = Flag()
        let holder = await Self.enter(gate, .exclusive, log, "x", until: release, expecting: Self.stats(exclusive: true))
        let cancelled = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            try await gate.withAccess(.shared) { log.append("never") }
        }
        await #expect(throws: CancellationError.self) { try await value(of: cancelled, within: .seconds(10), "the cancelled task") }
        release.raise()
        try await value(of: holder, within: .seconds(10), "holder")
        #expect(log.all == ["x"])
        #expect(gate.statistics == Self.stats())
    }

    @Test("reentrant within a task: nested shared or exclusive-then-shared run at once; shared-then-exclusive fails instead of waiting for itself")
    func reentrancy() async throws {
        let gate = ProcessGate()
        try await gate.withAccess(.exclusive) {
            try await gate.withAccess(.shared) {
                try await gate.withAccess(.exclusive) {
                    #expect(gate.statistics == Self.stats(exclusive: true))
                }
            }
        }
        try await gate.withAccess(.shared) {
            try await gate.withAccess(.shared) {
                #expect(gate.statistics == Self.stats(shared: 1))
            }
            await #expect(throws: ProcessGateError.self) {
                try await gate.withAccess(.exclusive) {}
            }
        }
        #expect(gate.statistics == Self.stats())
    }

    @Test("a throwing body releases the gate")
    func throwingBody() async throws {
        let gate = ProcessGate()
        await #expect(throws: TestFailure.self) {
            try await gate.withAccess(.exclusive) { throw TestFailure("thrown") }
        }
        #expect(gate.statistics == Self.stats())
        try await gate.withAccess(.exclusive) {}
    }
}

/// The traits with Swift Testing, on the process's gate: a suite-level shared trait and a
/// test-level exclusive one nest without waiting for each other.
@Suite("ProcessGateTrait", .sharesProcess)
struct ProcessGateTraitTests {
    @Test("a test of a shared suite holds the gate shared")
    func sharedSuite() {
        #expect(ProcessGate.currentAccess == .shared)
    }

    @Test("an exclusive test in a shared suite holds it exclusively, alone", .ownsProcess("checks that it runs alone"))
    func exclusiveInSharedSuite() {
        #expect(ProcessGate.currentAccess == .exclusive)
        // Held exclusively (by this test: no other test can hold it so meanwhile), so nobody
        // shares it (the gate's holders are one exclusive holder or shared ones, never both)
        // and nobody else runs.
        #expect(ProcessGate.process.statistics.exclusiveHeld)
    }

    @Test("each case of a parameterized exclusive test holds it exclusively", .ownsProcess("checks that it runs alone"), arguments: 0..<3)
    func exclusiveCases(index: Int) {
        #expect(ProcessGate.currentAccess == .exclusive)
        #expect(ProcessGate.process.statistics.exclusiveHeld)
    }

    @Test("the process-state helpers record no issue while the test owns the process", .ownsProcess("reads this process's descriptors"))
    func helpersWhileExclusive() async {
        let snapshot = await DescriptorSnapshot.take()
        #expect(snapshot.count > 0)
        await expectNoDescriptorLeak(since: snapshot)
    }

    @Test("the process-state helpers record an issue in a shared test")
    func helpersWhileShared() async {
        await withKnownIssue("DescriptorSnapshot.take() needs the gate exclusively") {
            _ = await DescriptorSnapshot.take()
        }
        withKnownIssue("residentKiB() needs the gate exclusively") {
            _ = residentKiB()
        }
    }
}

@Suite("ProcessGateTrait on a suite", .ownsProcess("checks that its tests run alone"))
struct ExclusiveSuiteTests {
    @Test("a test of an exclusive suite holds the gate exclusively")
    func exclusiveSuite() {
        #expect(ProcessGate.currentAccess == .exclusive)
        #expect(ProcessGate.process.statistics.exclusiveHeld)
    }

    @Test("a shared trait on a test does not weaken its suite's", .sharesProcess)
    func sharedTestInExclusiveSuite() {
        #expect(ProcessGate.currentAccess == .exclusive)
    }
}
