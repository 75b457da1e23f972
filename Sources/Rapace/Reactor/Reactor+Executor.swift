/// The reactor as a Swift concurrency executor.
///
/// As a `TaskExecutor` it lets tasks run on the loop thread
/// (`Task(executorPreference: reactor) { … }`), so their calls into sessions and
/// transports need no hop. As a `SerialExecutor` it can back an actor whose state is
/// confined to the loop (`nonisolated var unownedExecutor: UnownedSerialExecutor`).
extension Reactor: SerialExecutor, TaskExecutor {
    public func enqueue(_ job: consuming ExecutorJob) {
        enqueue(.job(UnownedJob(job)))
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    public func checkIsolated() {
        precondition(inLoop, "rapace: expected to run on the reactor's loop thread (\(name))")
    }

    public func isSameExclusiveExecutionContext(other: Reactor) -> Bool {
        self === other
    }
}

extension Reactor {
    /// Runs `body` as a task on the loop thread and returns its result.
    ///
    /// Use it to call rapace from code that is not already on the reactor: everything
    /// inside runs on the loop thread, so each call costs no thread hop.
    /// Cancelling the calling task cancels `body`.
    public func run<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let task = Task(executorPreference: self) { try await body() }
        return try await withTaskCancellationHandler { try await task.value } onCancel: { task.cancel() }
    }
}
