#if canImport(Glibc)
import Glibc
#endif
import CRapaceShim
import Synchronization

/// A single-threaded, callback-driven event loop on libevent (epoll on Linux).
///
/// One reactor owns one `event_base`. Every transport, timer and shared-memory doorbell of
/// rapace is a watcher on a reactor, and all session state is confined to the reactor's
/// loop thread, so nothing on the hot path takes a lock.
///
/// There are two ways to embed it:
/// - ``start(name:)`` creates a base and runs it on a thread the reactor owns.
/// - ``attach(to:name:)`` registers with an `event_base` the application already runs; the
///   application keeps calling `event_base_loop` (or `event_base_dispatch`) itself.
///
/// Work reaches the loop from other threads through ``execute(_:)``: a queue guarded by a
/// mutex plus an eventfd doorbell. The reactor is also a Swift concurrency
/// `SerialExecutor` and `TaskExecutor`, so a task started with
/// `Task(executorPreference: reactor)` (or code inside `withTaskExecutorPreference`)
/// runs on the loop thread and calls into rapace without a thread hop.
///
/// Shutdown (``shutdown()``) closes every transport still registered, frees every event,
/// closes the doorbell and, for an owned thread, joins it: nothing is left behind.
public final class Reactor: @unchecked Sendable {
    // @unchecked Sendable: `base`, `wakeFD`, `mode` and `name` are immutable; `loopState` and
    // `wakeEvent` are only touched on the loop thread (checked with `assertInLoop` in debug
    // builds); `thread` is written once before the loop starts and read by `shutdown()` after
    // the `finished` mutex admitted a single caller; `remote` is a Mutex. Everything a
    // foreign thread may call goes through `remote` + the eventfd.

    /// How the loop is driven.
    public enum Mode: Sendable, Equatable {
        /// The reactor runs its own thread.
        case ownThread
        /// The application drives a base it created; the reactor only registers events.
        case attached
    }

    /// Work queued for the loop, from the loop itself or from any thread.
    @usableFromInline
    enum Work: Sendable {
        case closure(@Sendable () -> Void)
        case job(UnownedJob)
    }

    struct RemoteQueue: ~Copyable {
        var items: [Work] = []
        var wakeupPending = false
        var isShutDown = false
    }

    /// Loop-confined bookkeeping.
    struct LoopState {
        var local: [Work] = []
        /// The emptied local queue of the previous round, kept for its capacity.
        var spareLocal: [Work] = []
        var spareRemote: [Work] = []
        var callbackDepth = 0
        var registrations: [ObjectIdentifier: any ReactorRegistration] = [:]
        /// Objects that asked to flush once the queued work of this turn has run.
        var flushTargets: [any ReactorFlushable] = []
        var spareFlushTargets: [any ReactorFlushable] = []
        /// Objects that want a last look before the loop blocks (see `requestIdle`).
        var idleTargets: [any ReactorIdleHandler] = []
        var spareIdleTargets: [any ReactorIdleHandler] = []
        var shutdownHooks: [(id: Int, body: () -> Void)] = []
        var nextHookID = 0
        var isShuttingDown = false
    }

    /// The libevent base (`struct event_base *`).
    public let base: OpaquePointer
    /// Whether the reactor owns a thread or is attached to an application's base.
    public let mode: Mode
    /// A name for logs and the thread.
    public let name: String

    let wakeFD: Int32
    private var wakeEvent: OpaquePointer?
    /// `@exclusivity(unchecked)`: only the loop thread touches it (every entry point checks
    /// `inLoop` first), and no access stays open while queued work, flush targets or idle
    /// handlers run: those lists are swapped out into locals before they are called, and the
    /// shutdown hooks are iterated from a copy. Accesses cannot overlap, so the runtime check
    /// (`swift_beginAccess`, several per loop turn) could never fire.
    @exclusivity(unchecked) var loopState = LoopState()
    private let remote = Mutex(RemoteQueue())
    /// Mirrors `!remote.items.isEmpty` (written under the lock): lets the loop skip the lock
    /// when nothing was submitted from another thread.
    private let remoteHint = Atomic<Bool>(false)
    private var thread: pthread_t?
    private let finished = Mutex(false)

    private init(base: OpaquePointer, mode: Mode, name: String) throws(SystemError) {
        self.base = base
        self.mode = mode
        self.name = name
        self.wakeFD = try Sys.eventfd()
        let context = Unmanaged.passUnretained(self).toOpaque()
        guard let event = rapace_event_new(base, wakeFD, RAPACE_EV_READ | RAPACE_EV_PERSIST, reactorWakeTrampoline, context) else {
            Sys.close(wakeFD)
            throw SystemError("event_new(doorbell)", errno: .invalidArgument)
        }
        wakeEvent = event
        _ = rapace_event_add(event, -1)
    }

    /// Creates a reactor with a new `event_base` running on its own thread.
    ///
    /// - Parameter name: names the thread (visible in `top -H`, debuggers) and log lines.
    public static func start(name: String = "rapace-reactor") throws(SystemError) -> Reactor {
        guard let base = rapace_event_base_new() else {
            throw SystemError("event_base_new", errno: .invalidArgument)
        }
        let reactor: Reactor
        do {
            reactor = try Reactor(base: base, mode: .ownThread, name: name)
        } catch {
            rapace_event_base_free(base)
            throw error
        }
        try reactor.spawnThread()
        return reactor
    }

    /// Attaches a reactor to an `event_base` the application created and drives.
    ///
    /// Call it on the thread that runs the base (or before the loop starts). The application
    /// keeps running `event_base_loop`; rapace's callbacks run inside it. Call ``shutdown()``
    /// on the loop thread (or while the loop is not running) to unregister everything; the
    /// base itself stays the application's.
    public static func attach(to base: OpaquePointer, name: String = "rapace-attached") throws(SystemError) -> Reactor {
        try Reactor(base: base, mode: .attached, name: name)
    }

    deinit {
        // `shutdown()` frees everything; a reactor dropped without it leaks the base by design
        // (freeing under a running loop would be worse).
    }

    // MARK: Thread confinement

    /// True when the caller runs on this reactor's loop thread.
    @inlinable
    public var inLoop: Bool {
        rapace_thread_current_reactor() == Unmanaged.passUnretained(self).toOpaque()
    }

    /// Traps (in debug builds) unless called on the loop thread.
    @inlinable
    public func assertInLoop(_ file: StaticString = #fileID, line: UInt = #line) {
        assert(inLoop, "rapace: must be called on the reactor's loop thread (\(name))", file: file, line: line)
    }

    /// Traps unless called on the loop thread, also in release builds.
    @inlinable
    public func preconditionInLoop(_ file: StaticString = #fileID, line: UInt = #line) {
        precondition(inLoop, "rapace: must be called on the reactor's loop thread (\(name))", file: file, line: line)
    }

    // MARK: Submitting work

    /// Runs `work` on the loop thread, after the current callback when already there.
    ///
    /// Safe to call from any thread. Returns whether `work` will run: false (and `work` is
    /// dropped) once the reactor has shut down, so a caller can fail what it was waiting for
    /// instead of waiting forever.
    @discardableResult
    public func execute(_ work: @escaping @Sendable () -> Void) -> Bool {
        enqueue(.closure(work))
    }

    /// Runs `work` now when on the loop thread, otherwise like ``execute(_:)``: false when
    /// the reactor has shut down and `work` will never run.
    @inlinable
    @discardableResult
    public func executeOrRunNow(_ work: @escaping @Sendable () -> Void) -> Bool {
        if inLoop {
            work()
            return true
        }
        return enqueue(.closure(work))
    }

    /// Suspends the caller until `body`, run on the loop thread (inline when already there)
    /// with `argument`, resumes the continuation it is given; `body` must resume it exactly
    /// once. When the reactor has shut down, or is shutting down when `body` would run,
    /// `body` never runs and the caller gets `shutDown`: the one way the async API reaches
    /// the loop without risking a wait that never ends. (Work that reaches the loop during
    /// teardown runs after the shutdown hooks and the sweep of registrations: what `body`
    /// would register there, a hook or a watcher, would never be closed or fire.)
    /// `shutDown` is evaluated only then, on the thread that finds the reactor gone.
    ///
    /// `body` gets its state as `argument` so that a caller can pass a closure that captures
    /// nothing: such a closure is a plain function, and on the loop nothing is allocated
    /// (nor for `shutDown`, as long as it captures nothing or a single object). Off the loop
    /// one closure carries `body`, `argument`, `shutDown` and the continuation to the loop.
    package nonisolated(nonsending) func suspendOnLoop<A: Sendable, T: Sendable>(
        with argument: A, orIfShutDown shutDown: @autoclosure @escaping @Sendable () -> T,
        _ body: @escaping @Sendable (A, UnsafeContinuation<T, Never>) -> Void
    ) async -> T {
        await suspendOnLoop(with: argument, shutDownValue: shutDown, body)
    }

    /// ``suspendOnLoop(with:orIfShutDown:_:)`` for a `body` that carries its own state.
    package nonisolated(nonsending) func suspendOnLoop<T: Sendable>(
        orIfShutDown shutDown: @autoclosure @escaping @Sendable () -> T, _ body: @escaping @Sendable (UnsafeContinuation<T, Never>) -> Void
    ) async -> T {
        await suspendOnLoop(with: body, shutDownValue: shutDown) { body, continuation in body(continuation) }
    }

    /// Runs `body` on the loop thread (inline when already there) and returns its value or
    /// throws its error; throws `shutDown` instead when the reactor has shut down or is
    /// shutting down (``suspendOnLoop(with:orIfShutDown:_:)``). For work that completes on
    /// the loop at once: building a listener, say.
    package nonisolated(nonsending) func suspendOnLoop<T: Sendable, E: Error>(
        orThrowIfShutDown shutDown: @autoclosure @escaping @Sendable () -> E, _ body: @escaping @Sendable () throws(E) -> T
    ) async throws(E) -> T {
        let result = await suspendOnLoop(with: body, shutDownValue: { Result<T, E>.failure(shutDown()) }) { body, continuation in
            continuation.resume(returning: Result { () throws(E) -> T in try body() })
        }
        return try result.get()
    }

    /// What the three forms above share. It takes `shutDownValue` as a closure, not an
    /// autoclosure, so that the first two hand theirs on as it is: passing `shutDown()` to an
    /// escaping autoclosure would wrap it in a new closure, allocated on every call. (The
    /// throwing form wraps its error in a `Result` closure once per call: listener set-up.)
    private nonisolated(nonsending) func suspendOnLoop<A: Sendable, T: Sendable>(
        with argument: A, shutDownValue: @escaping @Sendable () -> T,
        _ body: @escaping @Sendable (A, UnsafeContinuation<T, Never>) -> Void
    ) async -> T {
        await withUnsafeContinuation { continuation in
            // On the loop; off it, also work submitted before the shutdown began that the
            // teardown's last drains run. A local function: called directly it allocates
            // nothing; only the enqueue off the loop makes it a closure.
            @Sendable func run() {
                if loopState.isShuttingDown {
                    continuation.resume(returning: shutDownValue())
                } else {
                    body(argument, continuation)
                }
            }
            if inLoop {
                run()
            } else if !enqueue(.closure(run)) {
                continuation.resume(returning: shutDownValue())
            }
        }
    }

    /// The error a transport-level async operation gets once its reactor has shut down.
    package static let shutDownError = TransportError(.closed, "the reactor has shut down")

    @usableFromInline
    @discardableResult
    func enqueue(_ work: Work) -> Bool {
        if inLoop && !loopState.isShuttingDown {
            loopState.local.append(work)
            // Inside a callback the queue is drained before returning to libevent; outside one
            // (the attached-mode shutdown path) ring the doorbell so it runs on the next turn.
            if loopState.callbackDepth == 0 { Sys.eventfdSignal(wakeFD) }
            return true
        }
        let ring = remote.withLock { (q: inout RemoteQueue) -> Bool? in
            if q.isShutDown { return nil }
            q.items.append(work)
            remoteHint.store(true, ordering: .releasing)
            if q.wakeupPending { return false }
            q.wakeupPending = true
            return true
        }
        switch ring {
        case true?: Sys.eventfdSignal(wakeFD)
        case false?: break
        case nil:
            dropAfterShutdown(work)
            return false
        }
        return true
    }

    /// Work submitted from other threads that the loop has not taken yet (tests order
    /// their submissions against a shutdown with it).
    var remoteBacklog: Int { remote.withLock { $0.items.count } }

    private func dropAfterShutdown(_ work: Work) {
        if case .job(let job) = work {
            // A task resumed after shutdown must not hang forever: let the global executor run it.
            globalConcurrentExecutor.enqueue(ExecutorJob(job))
        }
    }

    /// Called by every trampoline after its handler: runs queued work.
    @usableFromInline
    func runPending() {
        var rounds = 0
        while rounds < 64 {
            rounds += 1
            var hadRemote = false
            if remoteHint.load(ordering: .acquiring) {
                var batch = loopState.spareRemote
                loopState.spareRemote = []
                remote.withLock { (q: inout RemoteQueue) in
                    q.wakeupPending = false
                    remoteHint.store(false, ordering: .relaxed)
                    if !q.items.isEmpty { swap(&batch, &q.items) }
                }
                hadRemote = !batch.isEmpty
                for work in batch { run(work) }
                batch.removeAll(keepingCapacity: true)
                loopState.spareRemote = batch
            }
            if loopState.local.isEmpty {
                if hadRemote { continue }
                if loopState.flushTargets.isEmpty {
                    // Nothing left but blocking: give idle handlers their last look first.
                    if loopState.idleTargets.isEmpty || !runIdleHandlers() { return }
                    continue
                }
                // Everything queued has run: now write what it produced, once per target.
                var targets = loopState.spareFlushTargets
                loopState.spareFlushTargets = []
                swap(&targets, &loopState.flushTargets)
                for target in targets { target.reactorFlush() }
                targets.removeAll(keepingCapacity: true)
                loopState.spareFlushTargets = targets
                continue
            }
            // Swap in the spare array: work queued while this batch runs lands in an array
            // that already has capacity (no allocation per job).
            var local = loopState.spareLocal
            loopState.spareLocal = []
            swap(&local, &loopState.local)
            for work in local { run(work) }
            local.removeAll(keepingCapacity: true)
            loopState.spareLocal = local
        }
        // Still busy: yield to I/O and come back on the next iteration.
        Sys.eventfdSignal(wakeFD)
    }

    /// Runs when the loop has nothing left to do and would block in `epoll_wait`: spins for
    /// the largest budget any idle handler asks for (polling them all, and the remote
    /// queue), then lets each prepare to sleep. Returns true when new work turned up.
    private func runIdleHandlers() -> Bool {
        var targets = loopState.spareIdleTargets
        loopState.spareIdleTargets = []  // keep the buffer uniquely referenced: no copy on append
        swap(&targets, &loopState.idleTargets)
        defer {
            targets.removeAll(keepingCapacity: true)
            loopState.spareIdleTargets = targets
        }
        var budget: UInt64 = 0
        for target in targets { budget = max(budget, target.idleSpinBudget()) }
        var outcome = ReactorIdleSpin.none
        if budget > 0 {
            // Poll a handler held in a local: reading it out of the array on every poll
            // retained and released it each time (a third of a spinning loop's samples).
            // Several handlers (connections that all want a look in one turn) still pay
            // that per poll: neither an immutable copy, a buffer pointer nor an
            // `unowned(unsafe)` local kept Swift 6.3 from retaining each one for its call.
            if targets.count == 1 {
                let only = targets[0]
                outcome = spin(for: budget) { only.idleHasWork() }
            } else {
                outcome = spin(for: budget) { targets.contains { $0.idleHasWork() } }
            }
        }
        var more = false
        for target in targets where target.reactorWillBlock(after: outcome) { more = true }
        return more || remoteHint.load(ordering: .acquiring)
    }

    /// Polls `hasWork` and the remote queue until one of them has something or `budget`
    /// nanoseconds have passed.
    @inline(__always)
    private func spin(for budget: UInt64, until hasWork: () -> Bool) -> ReactorIdleSpin {
        let start = Sys.monotonicNanoseconds()
        var polls: UInt32 = 0
        while true {
            if hasWork() { return .found }
            if remoteHint.load(ordering: .relaxed) { return .interrupted }
            polls &+= 1
            // Reading the clock costs about as much as a poll: look every 8th time.
            if polls & 7 == 0 && Sys.monotonicNanoseconds() &- start >= budget { return .timedOut }
            rapace_cpu_relax()
        }
    }

    /// Runs an executor job on the loop thread as the *task executor* only.
    ///
    /// Running it also isolated to the reactor as a serial executor would make every call
    /// into a nonisolated async function (most of rapace's async API) a `swift_task_switch`
    /// away from that serial executor, and a custom serial executor cannot hand its thread
    /// over: the runtime would re-enqueue the task, a trip through the local queue per
    /// call level. Code isolated to an actor whose executor is the reactor still runs here,
    /// serially; the runtime confirms that isolation through ``checkIsolated()``.
    @inline(__always)
    private func runJob(_ job: UnownedJob) {
        job.runSynchronously(on: asUnownedTaskExecutor())
    }

    @inline(__always)
    private func run(_ work: Work) {
        switch work {
        case .closure(let body): body()
        case .job(let job): runJob(job)
        }
    }

    /// Marks the start of a libevent callback on this thread; pairs with `leaveCallback`.
    @usableFromInline
    func enterCallback() -> UnsafeMutableRawPointer? {
        let previous = rapace_thread_current_reactor()
        rapace_thread_set_current_reactor(Unmanaged.passUnretained(self).toOpaque())
        loopState.callbackDepth += 1
        return previous
    }

    @usableFromInline
    func leaveCallback(_ previous: UnsafeMutableRawPointer?) {
        if loopState.callbackDepth == 1 { runPending() }
        loopState.callbackDepth -= 1
        rapace_thread_set_current_reactor(previous)
    }

    fileprivate func wakeFired() {
        _ = Sys.eventfdDrain(wakeFD)
    }

    // MARK: Registrations and shutdown

    /// Records a live registration so shutdown can close it.
    func register(_ registration: any ReactorRegistration) {
        assertInLoop()
        loopState.registrations[ObjectIdentifier(registration)] = registration
    }

    func unregister(_ registration: any ReactorRegistration) {
        loopState.registrations[ObjectIdentifier(registration)] = nil
    }

    /// The number of live watchers and timers (for leak checks).
    public var registrationCount: Int {
        preconditionInLoop()
        return loopState.registrations.count
    }

    /// Stops the reactor: closes every registration (transports fail their pending calls),
    /// frees every event, closes the doorbell and joins the owned thread.
    ///
    /// For an owned thread call it from any thread except the loop thread; it returns once
    /// the thread has exited. For an attached reactor call it on the application's loop
    /// thread or while that loop is not running. Calling it twice is harmless.
    public func shutdown() {
        let first = finished.withLock { (done: inout Bool) -> Bool in
            if done { return false }
            done = true
            return true
        }
        guard first else { return }
        switch mode {
        case .ownThread:
            precondition(!inLoop, "rapace: Reactor.shutdown() of an owned thread cannot run on that thread")
            enqueue(.closure { [self] in
                tearDownOnLoop()
                _ = rapace_event_base_loopbreak(base)
            })
            if let thread { pthread_join(thread, nil) }
            thread = nil
            rapace_event_base_free(base)
        case .attached:
            let previous = rapace_thread_current_reactor()
            rapace_thread_set_current_reactor(Unmanaged.passUnretained(self).toOpaque())
            loopState.callbackDepth += 1
            runPending()
            tearDownOnLoop()
            loopState.callbackDepth -= 1
            rapace_thread_set_current_reactor(previous)
        }
        Sys.close(wakeFD)
    }

    private func tearDownOnLoop() {
        loopState.isShuttingDown = true
        // Closing registrations may queue more work (failing calls, resuming tasks): run it.
        for hook in loopState.shutdownHooks { hook.body() }
        loopState.shutdownHooks.removeAll()
        var rounds = 0
        while !loopState.registrations.isEmpty && rounds < 8 {
            rounds += 1
            let all = Array(loopState.registrations.values)
            for registration in all { registration.reactorWillShutDown() }
            runPending()
        }
        runPending()
        remote.withLock { $0.isShutDown = true }
        runPending()
        if let wakeEvent {
            rapace_event_del(wakeEvent)
            rapace_event_free(wakeEvent)
            self.wakeEvent = nil
        }
    }

    /// Adds a hook that runs first during shutdown, on the loop thread; returns its id.
    @discardableResult
    package func addShutdownHook(_ body: @escaping () -> Void) -> Int {
        assertInLoop()
        loopState.nextHookID += 1
        loopState.shutdownHooks.append((loopState.nextHookID, body))
        return loopState.nextHookID
    }

    /// Removes a hook added with ``addShutdownHook(_:)``. Loop thread only.
    package func removeShutdownHook(_ id: Int) {
        loopState.shutdownHooks.removeAll { $0.id == id }
    }

    /// How many hooks ``addShutdownHook(_:)`` added are still registered. Loop thread only;
    /// for tests that check their owners remove them.
    package var shutdownHookCount: Int {
        assertInLoop()
        return loopState.shutdownHooks.count
    }

    // MARK: The owned thread

    private func spawnThread() throws(SystemError) {
        let context = Unmanaged.passRetained(self).toOpaque()
        var handle = pthread_t()
        let rc = pthread_create(&handle, nil, { raw in
            let reactor = Unmanaged<Reactor>.fromOpaque(raw!).takeRetainedValue()
            reactor.threadMain()
            return nil
        }, context)
        if rc != 0 {
            Unmanaged<Reactor>.fromOpaque(context).release()
            throw SystemError("pthread_create", errno: Errno(rawValue: rc))
        }
        thread = handle
    }

    private func threadMain() {
        rapace_thread_set_name(name)
        rapace_thread_set_current_reactor(Unmanaged.passUnretained(self).toOpaque())
        _ = rapace_event_base_loop_forever(base)
        rapace_thread_set_current_reactor(nil)
    }
}

/// Something that buffers output and wants one flush after the current turn's work.
protocol ReactorFlushable: AnyObject {
    /// Write buffered output now. Called on the loop thread.
    func reactorFlush()
}

extension Reactor {
    /// Asks for `target.reactorFlush()` once the work queued in this turn has run. The
    /// caller keeps its own "already requested" flag. Loop thread only.
    func requestFlush(_ target: any ReactorFlushable) {
        assertInLoop()
        loopState.flushTargets.append(target)
        if loopState.callbackDepth == 0 { Sys.eventfdSignal(wakeFD) }
    }
}

extension Reactor {
    /// Asks for `target`'s idle hooks once the loop has run everything queued and would
    /// block; asked again each time it is wanted (the list is emptied every time it runs).
    /// The caller keeps its own "already requested" flag. Loop thread only.
    func requestIdle(_ target: any ReactorIdleHandler) {
        assertInLoop()
        loopState.idleTargets.append(target)
        if loopState.callbackDepth == 0 { Sys.eventfdSignal(wakeFD) }
    }
}

/// How the spin before blocking ended.
enum ReactorIdleSpin {
    /// No handler asked for a spin.
    case none
    /// A handler has new work.
    case found
    /// Work arrived from another thread (the remote queue).
    case interrupted
    /// The budget ran out with nothing new.
    case timedOut
}

/// Something that wants a last look before the loop blocks: a shared-memory consumer that
/// may spin on its ring instead of sleeping (a wakeup through the kernel costs microseconds,
/// or about 20 µs across vCPUs). Spinning blocks the loop for up to the budget: nothing
/// else on this reactor runs meanwhile (the remote queue is polled and ends the spin).
protocol ReactorIdleHandler: AnyObject {
    /// How long spinning for new work is worth it now, in nanoseconds (0: do not spin).
    /// Called once per idle turn; a handler that returns more than 0 must be ready to be
    /// polled with ``idleHasWork()``.
    func idleSpinBudget() -> UInt64
    /// Whether new work is there (called in a tight loop while spinning: keep it cheap).
    func idleHasWork() -> Bool
    /// The loop is about to block: publish that (a sleeping flag, re-checked after) or
    /// handle what arrived. Returns true when it delivered work (the loop goes on).
    func reactorWillBlock(after spin: ReactorIdleSpin) -> Bool
}

/// Something registered with a reactor that must be closed when the reactor shuts down.
protocol ReactorRegistration: AnyObject {
    /// Close now: unregister events, fail pending work. Called on the loop thread.
    func reactorWillShutDown()
}

private func reactorWakeTrampoline(_ fd: Int32, _ what: Int16, _ context: UnsafeMutableRawPointer?) {
    let reactor = Unmanaged<Reactor>.fromOpaque(context!).takeUnretainedValue()
    let previous = reactor.enterCallback()
    reactor.wakeFired()
    reactor.leaveCallback(previous)
}
