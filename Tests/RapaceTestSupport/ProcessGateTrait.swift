import Testing

/// Runs each test case inside the process gate (``ProcessGate/process``), shared or
/// exclusive, so that `swift test --disable-xctest` can run the suites in parallel.
///
/// ## The rule
///
/// Every suite of every test target names its access at suite level, so that reading any
/// suite tells how it runs:
///
/// - `@Suite(.sharesProcess)`: its tests run alongside other tests. This is the default
///   choice: a test that only looks at what it created (its sessions, its child processes,
///   its own files) and bounds its waits only generously, to avoid hanging.
/// - `.ownsProcess("why")`: no other test of the process runs meanwhile. A test needs it
///   when it
///   - reads process-wide state: this process's descriptors (`/proc/self/fd`), its threads,
///     memory or CPU time, files under `/dev/shm` or `/tmp` named after this process rather
///     than after the test, children it did not start itself, a process-wide flag it sets;
///   - or asserts an upper bound on wall-clock time or CPU use as the property under test
///     (a dead peer noticed within 100 ms, a cancellation within 100 ms, an idle pair using
///     at most 50 ms of CPU in 10 s, a deadline answered within 2 s): other tests' load
///     would stretch it. A lower bound (a timer did not fire early) cannot be disturbed,
///     and neither can a generous timeout that only keeps a broken test from hanging.
///
///   Put it on the test (`@Test(…, .ownsProcess("…"))`) inside a `.sharesProcess` suite, or
///   on the suite when all or nearly all of its tests need it. The reason is documentation:
///   say which state or which bound.
///
/// Helpers that read process-wide state check the rule (``ProcessGate/expectExclusive(_:sourceLocation:)``),
/// so forgetting `.ownsProcess` fails at once instead of flaking.
///
/// ## How it nests
///
/// The gate is taken per test case, inside Swift Testing's per-case parallelism limit, and
/// never around a suite or a whole test function: a suite never holds the gate while its
/// tests wait for it, so nothing waits for itself. The trait is recursive: a suite's trait
/// is inherited by each of its tests, and a test case takes the strongest access among the
/// gate traits it has (its own and its suites'): exclusive wins. A test with both therefore
/// takes the gate once, exclusively.
package struct ProcessGateTrait: TestTrait, SuiteTrait, TestScoping {
    /// The access this trait asks for.
    package let access: ProcessGate.Access
    /// Why a test needs exclusive access (nil for shared access).
    package let reason: String?

    package var isRecursive: Bool { true }

    package var comments: [Comment] {
        reason.map { [Comment(rawValue: "owns the process: \($0)")] } ?? []
    }

    package func scopeProvider(for test: Test, testCase: Test.Case?) -> Self? {
        // Test cases only: a suite or a whole test function would hold the gate while its
        // cases wait for parallelism slots and for the gate.
        guard !test.isSuite, testCase != nil else { return nil }
        let strongest: ProcessGate.Access =
            test.traits.contains { ($0 as? ProcessGateTrait)?.access == .exclusive } ? .exclusive : .shared
        // Only a trait asking for the strongest access provides the scope; several such
        // traits nest harmlessly (the gate is reentrant within a task).
        return access == strongest ? self : nil
    }

    package func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        try await ProcessGate.process.withAccess(access, function)
    }
}

extension Trait where Self == ProcessGateTrait {
    /// Runs each test of the suite (or the test) while other tests run: takes the process
    /// gate shared. See ``ProcessGateTrait`` for the rule.
    package static var sharesProcess: Self { ProcessGateTrait(access: .shared, reason: nil) }

    /// Runs each test of the suite (or the test) with no other test running in this
    /// process: takes the process gate exclusively. `reason` names the process-wide state
    /// read or the timing bound asserted. See ``ProcessGateTrait`` for the rule.
    package static func ownsProcess(_ reason: String) -> Self { ProcessGateTrait(access: .exclusive, reason: reason) }
}
