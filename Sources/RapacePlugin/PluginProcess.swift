#if canImport(Glibc)
import Glibc
#endif
import Logging
import Rapace
import Synchronization

/// When and how fast a crashed plugin is started again.
public struct RestartPolicy: Sendable, Hashable {
    /// Restarts allowed in a row (a process that ran for `resetAfter` resets the count);
    /// 0 never restarts.
    public var maxRestarts: Int
    /// Delay before the first restart; doubled after each further one.
    public var initialBackoff: Duration
    /// Upper bound of the delay.
    public var maxBackoff: Duration
    /// A process that stayed up this long resets the restart count.
    public var resetAfter: Duration

    public init(maxRestarts: Int, initialBackoff: Duration = .milliseconds(50), maxBackoff: Duration = .seconds(5), resetAfter: Duration = .seconds(30)) {
        self.maxRestarts = maxRestarts
        self.initialBackoff = initialBackoff
        self.maxBackoff = maxBackoff
        self.resetAfter = resetAfter
    }

    /// Never restart: a crash leaves the plugin stopped.
    public static let never = RestartPolicy(maxRestarts: 0)

    /// Restart after every crash, with exponential backoff.
    public static func always(initialBackoff: Duration = .milliseconds(50), maxBackoff: Duration = .seconds(5)) -> RestartPolicy {
        RestartPolicy(maxRestarts: .max, initialBackoff: initialBackoff, maxBackoff: maxBackoff)
    }

    /// The delay before restart number `attempt` (1-based).
    public func backoff(attempt: Int) -> Duration {
        var delay = initialBackoff
        var step = 1
        while step < attempt && delay < maxBackoff {
            delay = delay * 2
            step += 1
        }
        return min(delay, maxBackoff)
    }
}

/// What happens to a plugin, in order.
public enum PluginEvent: Sendable, Hashable {
    /// A process finished its handshake and serves calls.
    case started(pid: pid_t)
    /// A process ended.
    case exited(pid: pid_t, status: PluginExitStatus)
    /// The restart policy starts a new process after `delay`.
    case restarting(attempt: Int, delay: Duration)
    /// A restart failed, or the policy allows no more: the plugin stays stopped.
    case gaveUp(reason: String)
}

/// How to launch and watch one plugin.
public struct PluginConfiguration: Sendable {
    /// The plugin's name: its logger label and part of its segment path.
    public var name: String
    /// Path of the executable.
    public var executable: String
    /// Arguments after `--shm-path=PATH`.
    public var arguments: [String]
    /// Segment geometry (the plugin must use the same; default 256 / 64 KiB / 128).
    public var shm: ShmConfig
    /// Directory the segments are created in.
    public var segmentDirectory: String
    /// Services the host offers the plugin on the same session.
    public var services: [any RPCService]
    /// Tunables of each session with the plugin.
    public var session: Session.Configuration
    /// How long a new process gets to connect and finish its handshake.
    public var handshakeTimeout: Duration
    /// How long a call, server stream or notification waits for a process while the
    /// plugin is (re)starting.
    public var callWaitTimeout: Duration
    /// How long the old process of a hot restart (or a stopping plugin) gets to finish
    /// calls in flight before it is killed.
    public var grace: Duration
    /// What to do when the process dies.
    public var restartPolicy: RestartPolicy
    /// Receives the plugin's stdout (info) and stderr (notice), one entry per line.
    public var logger: Logger
    /// Called on the reactor thread for each ``PluginEvent``: the events of
    /// ``PluginProcess/events``, and none after that stream has finished.
    public var onEvent: (@Sendable (PluginEvent) -> Void)?

    public init(
        name: String, executable: String, arguments: [String] = [], shm: ShmConfig = .default,
        segmentDirectory: String = "/dev/shm", services: [any RPCService] = [],
        session: Session.Configuration = Session.Configuration(), handshakeTimeout: Duration = .seconds(10),
        callWaitTimeout: Duration = .seconds(5), grace: Duration = .seconds(5), restartPolicy: RestartPolicy = .never,
        logger: Logger? = nil, onEvent: (@Sendable (PluginEvent) -> Void)? = nil
    ) {
        self.name = name
        self.executable = executable
        self.arguments = arguments
        self.shm = shm
        self.segmentDirectory = segmentDirectory
        self.services = services
        self.session = session
        self.handshakeTimeout = handshakeTimeout
        self.callWaitTimeout = callWaitTimeout
        self.grace = grace
        self.restartPolicy = restartPolicy
        self.logger = logger ?? Logger(label: name)
        self.onEvent = onEvent
    }
}

/// A call through a ``PluginProcess``: its handle once started, whether the caller
/// cancelled it meanwhile, and while it waits for a process, its waiter. Loop-confined.
final class PendingCall: @unchecked Sendable {
    // @unchecked Sendable: touched only on the reactor's loop thread.
    var handle: CallHandle?
    var cancelled = false
    /// Set while the call waits for a process: the waiter's id and how to fail the call.
    var waiting: (id: Int, fail: (RPCError) -> Void)?
}

/// One process of a plugin: its segment, its session and its child process. Loop-confined.
final class PluginInstance {
    let generation: Int
    let path: String
    var listener: ShmListener?
    var session: Session?
    /// The spawned process, once its pid is known. A signal ``kill(_:)`` was asked for
    /// before then is sent when it is set.
    var child: PluginChild? {
        didSet {
            guard let child, let signal = pendingSignal else { return }
            pendingSignal = nil
            _ = try? child.signal(signal)
        }
    }
    /// What ``kill(_:)`` was asked for while the pid was not known yet (SIGKILL wins).
    private var pendingSignal: Int32?
    var pid: pid_t? { child?.pid }
    var status: PluginExitStatus?
    var startedAt = ContinuousClock.now
    var onReady: ((Result<Session, PluginHostError>) -> Void)?
    /// Its start succeeded: ``PluginEvent/started(pid:)`` is due once its pid is known too
    /// (``PluginProcess/announceStart(_:)``).
    var started = false
    var onExit: [() -> Void] = []
    /// Its launch failed or was cancelled (it is killed, as soon as its pid is known).
    var abandoned = false
    var timers: [ReactorTimer] = []

    init(generation: Int, path: String) {
        self.generation = generation
        self.path = path
    }

    var hasExited: Bool { status != nil }

    func resolve(_ result: Result<Session, PluginHostError>) {
        guard let onReady else { return }
        self.onReady = nil
        onReady(result)
    }

    func cancelTimers() {
        for timer in timers { timer.cancel() }
        timers.removeAll()
    }

    /// Gives up on the process before it serves: its start reports nothing more (`onReady`
    /// is dropped), it is killed now or as soon as its pid is known, and its segment and
    /// socket go now, not when its exit is seen (a host that exits right after a failed
    /// start must leave nothing behind). A session it already opened is closed now too, so
    /// that a handshake on its way never completes with a process we gave up on. (Closing
    /// the listener closes its connection, and with it that session, already; this does
    /// not rely on it.)
    func abandon() {
        onReady = nil
        cancelTimers()
        abandoned = true
        kill(SIGKILL)
        listener?.close()
        listener = nil
        session?.close()
    }

    func kill(_ signal: Int32) {
        // Not by pid on the strength of a nil `status`: that is set on the loop only after the
        // watcher thread has reaped the child, and in between the pid is free for the kernel
        // to reuse. `PluginChild.signal` goes through the child's pidfd, which cannot reach
        // another process, and sends nothing once the watcher has reaped the child (the reap
        // and the signal take turns under one lock). Without a pidfd it signals by pid, still
        // not after our reap; see there for the window left. A child already gone is no error,
        // and EPERM (not ours to signal) needs nothing from us. Before the pid is known the
        // signal waits for it (`child`): a retire's or an abandon's kill must not be lost.
        guard let child else {
            if pendingSignal != SIGKILL { pendingSignal = signal }
            return
        }
        _ = try? child.signal(signal)
    }
}

/// A plugin process the host launched and watches, usable as an ``RPCCaller`` across
/// restarts: build typed clients on it (`EchoClient(plugin)`) and keep them.
///
/// - A crash fails the calls in flight with `UNAVAILABLE` (the session sees the process
///   go), emits ``PluginEvent/exited(pid:status:)`` and, per the restart policy, starts a
///   new process after a backoff; calls made meanwhile wait (at most
///   ``PluginConfiguration/callWaitTimeout``) and go to the new process.
/// - ``restart(executable:arguments:)`` replaces the process (for example with a rebuilt binary) while the host
///   keeps its clients: calls issued during the swap wait and go to the new process; calls
///   already in flight on the old one finish there (within ``PluginConfiguration/grace``).
/// - Server streams wait the same way: ``serverStream(_:request:options:)`` returns at once,
///   and a stream asked for while no process is ready starts on the next one. If none is
///   ready within `callWaitTimeout`, or the plugin gave up or was stopped, the stream ends
///   with `UNAVAILABLE` naming why. Cancelling or dropping a waiting stream forgets it. A
///   stream already running when its process dies ends with `UNAVAILABLE` (it is not
///   resumed on the new process).
public final class PluginProcess: RPCCaller, @unchecked Sendable {
    // @unchecked Sendable: everything below `ready` is confined to the reactor's loop
    // thread; `ready` is a lock-protected mirror for the synchronous `session` (calls,
    // streams and notifications check on the loop).
    public let reactor: Reactor
    public let configuration: PluginConfiguration
    /// Events (the same as `onEvent`), newest kept when nobody reads. It finishes before
    /// ``stop()`` returns, or when the reactor shuts down; after that no event is emitted,
    /// to `onEvent` either.
    public let events: AsyncStream<PluginEvent>
    private let eventSink: AsyncStream<PluginEvent>.Continuation
    /// `events` has finished: nothing is emitted any more (``emit(_:)``).
    private var eventsFinished = false
    private let ready = Mutex<Session?>(nil)

    private var state = State.notRunning
    private var generation = 0
    private var consecutiveRestarts = 0
    private var instances: [Int: PluginInstance] = [:]
    private var waiters: [Int: Waiter] = [:]
    private var nextWaiter = 0
    private var lastExit: PluginExitStatus?
    /// What new processes run (``restart(executable:arguments:)`` may change it).
    private var executable: String
    private var arguments: [String]
    /// `configuration.services`, routed: built once by ``launch(_:reactor:)``, which is where
    /// a conflict between them fails; every process's session serves through it.
    private let router: ServiceRouter

    private init(reactor: Reactor, configuration: PluginConfiguration, router: ServiceRouter) {
        self.reactor = reactor
        self.configuration = configuration
        self.router = router
        self.executable = configuration.executable
        self.arguments = configuration.arguments
        (events, eventSink) = AsyncStream.makeStream(of: PluginEvent.self, bufferingPolicy: .bufferingNewest(256))
    }

    /// Creates a segment, spawns `configuration.executable --shm-path=PATH …`, and returns
    /// once the plugin finished its handshake (at most `handshakeTimeout`).
    ///
    /// The first launch of this process in a `segmentDirectory` first removes the segment
    /// and socket files there of hosts that are gone (they died without ``stop()``), logging
    /// them at `info` through `configuration.logger` (Docs/hosting-plugins.md, "Files of a
    /// host that died").
    ///
    /// - Throws: ``PluginHostError``, its ``PluginHostError/code`` one of
    ///   ``PluginHostError/Code/serviceConflict``, ``PluginHostError/Code/segmentCreationFailed``,
    ///   ``PluginHostError/Code/spawnFailed``, ``PluginHostError/Code/exitedBeforeHandshake``,
    ///   ``PluginHostError/Code/handshakeTimedOut``, ``PluginHostError/Code/handshakeFailed``
    ///   or ``PluginHostError/Code/reactorShutDown``.
    public static func launch(_ configuration: PluginConfiguration, reactor: Reactor) async throws(PluginHostError) -> PluginProcess {
        let router: ServiceRouter
        do throws(RPCError) { router = try ServiceRouter(configuration.services) } catch {
            throw PluginHostError(.serviceConflict, "the host's services for \(configuration.name) conflict: \(error)", underlying: error)
        }
        // On a task of its own: a directory scan must not hold up the loop, and the caller's
        // task may be running on it (a handler, `reactor.run`).
        let (directory, logger) = (configuration.segmentDirectory, configuration.logger)
        await Task.detached { PluginFiles.sweepOnce(directory, logger: logger) }.value
        let plugin = PluginProcess(reactor: reactor, configuration: configuration, router: router)
        let result = await reactor.suspendOnLoop(
            orIfShutDown: Result<Void, PluginHostError>.failure(PluginHostError(.reactorShutDown, Self.reactorGone(configuration.name)))
        ) { continuation in
            plugin.shutdownHook = reactor.addShutdownHook { [weak plugin] in plugin?.reactorShuttingDown() }
            plugin.startInstance(as: State.starting) { result in
                switch result {
                case .success(let instance):
                    plugin.install(instance)
                case .failure:
                    // The reactor's shutdown stopped the plugin meanwhile (and took the hook),
                    // or it never served: nobody gets the plugin to stop, so its hook goes now.
                    if case .starting = plugin.state { plugin.state = .notRunning }
                    plugin.removeShutdownHook()
                }
                continuation.resume(returning: result.map { _ in () })
            }
        }
        _ = try result.get()
        return plugin
    }

    /// The session with the current process, if one is connected now.
    public var session: Session? { ready.withLock { $0 } }

    /// The pid of the current process. Loop thread only.
    public var pid: pid_t? {
        reactor.preconditionInLoop()
        return state.current?.pid
    }

    /// How the last process ended, if one has. Loop thread only.
    public var lastExitStatus: PluginExitStatus? {
        reactor.preconditionInLoop()
        return lastExit
    }

    /// The pid of the current process, from any thread.
    public func currentPID() async -> pid_t? {
        await reactor.suspendOnLoop(orIfShutDown: nil) { continuation in continuation.resume(returning: self.state.current?.pid) }
    }

    // MARK: RPCCaller

    public nonisolated(nonsending) func call(_ method: MethodDescriptor, request: Payload, options: CallOptions) async throws(RPCError) -> Payload {
        // One hop to the loop: there the session's state is current (a session that just
        // closed is never used). With a process ready the call begins at once; otherwise it
        // waits while a process starts, then begins.
        let pending = PendingCall()
        let reactor = self.reactor
        let result = await withTaskCancellationHandler {
            await reactor.suspendOnLoop(
                orIfShutDown: Result<Payload, RPCError>.failure(RPCError(.unavailable, Self.reactorGone(self.configuration.name)))
            ) { continuation in
                guard !pending.cancelled else {
                    continuation.resume(returning: .failure(RPCError(.cancelled, "call cancelled by the caller")))
                    return
                }
                // Checked here, before `waitForSession`: its escaping body would be a heap
                // closure on every call, though it is needed only when the call waits.
                if let session = self.servingSession {
                    pending.handle = session.startCall(method.id, request: request, options: options) { continuation.resume(returning: $0) }
                    return
                }
                let waiter = self.waitForSession { found in
                    pending.waiting = nil
                    switch found {
                    case .failure(let error):
                        continuation.resume(returning: .failure(error))
                    case .success(let session):
                        pending.handle = session.startCall(method.id, request: request, options: options) { continuation.resume(returning: $0) }
                    }
                }
                if let waiter { pending.waiting = (waiter, { continuation.resume(returning: .failure($0)) }) }
            }
        } onCancel: {
            reactor.execute {
                pending.cancelled = true
                if let waiting = pending.waiting {
                    // Still waiting for a process: forget the waiter, fail the call now.
                    pending.waiting = nil
                    self.cancelWait(waiting.id)
                    waiting.fail(RPCError(.cancelled, "call cancelled by the caller while plugin \(self.configuration.name) was restarting"))
                }
                pending.handle?.cancel()
            }
        }
        return try result.get()
    }

    /// Starts a server-streaming call on the current process, or, while the plugin is
    /// (re)starting, on the next one (waiting at most `callWaitTimeout`). Returns at once;
    /// a stream that cannot start ends with `UNAVAILABLE` naming why.
    public func serverStream(_ method: MethodDescriptor, request: Payload, options: CallOptions) -> RawStream {
        // Like `call`: one hop to the loop, where the session's state is current.
        let (stream, pending) = PendingServerStream.make(on: reactor, options: options)
        let running = reactor.executeOrRunNow {
            // Cancelled or dropped before it got here: nothing to start.
            guard !pending.isFinished else { return }
            if let session = self.servingSession {
                pending.start(on: session, method.id, request: request, options: options)
                return
            }
            let waiter = self.waitForSession { found in
                switch found {
                case .failure(let error): pending.fail(error)
                case .success(let session): pending.start(on: session, method.id, request: request, options: options)
                }
            }
            // The hook captures `self` and the waiter captures `pending`: the cycle ends when
            // either runs (a waiter is removed before it runs; `start`/`fail` drop the hook).
            if let waiter { pending.onCancel { self.cancelWait(waiter) } }
        }
        if !running { pending.fail(RPCError(.unavailable, Self.reactorGone(configuration.name))) }
        return stream
    }

    public nonisolated(nonsending) func notify(_ method: MethodDescriptor, request: Payload) async throws(RPCError) {
        let result = await reactor.suspendOnLoop(orIfShutDown: RPCError(.unavailable, Self.reactorGone(self.configuration.name)) as RPCError?) { continuation in
            if let session = self.servingSession {
                continuation.resume(returning: session.sendNotification(method.id, request: request))
                return
            }
            self.waitForSession { found in
                switch found {
                case .failure(let error): continuation.resume(returning: error)
                case .success(let session): continuation.resume(returning: session.sendNotification(method.id, request: request))
                }
            }
        }
        if let result { throw result }
    }

    /// The current session, waiting (bounded) while a process is starting.
    public func connectedSession() async throws(RPCError) -> Session {
        let result = await reactor.suspendOnLoop(
            orIfShutDown: Result<Session, RPCError>.failure(RPCError(.unavailable, Self.reactorGone(self.configuration.name)))
        ) { continuation in
            if let session = self.servingSession {
                continuation.resume(returning: .success(session))
                return
            }
            self.waitForSession { continuation.resume(returning: $0) }
        }
        return try result.get()
    }

    // MARK: Control

    /// Hot restart: starts a new process (the same executable, which may have been
    /// rebuilt), switches the plugin's callers to it once its handshake is done, and lets
    /// the old one finish its calls in flight before it is stopped. Calls issued meanwhile
    /// wait and go to the new process. On failure the old process keeps serving; if there
    /// is none (it exited during the swap, or crashed before it), the restart policy
    /// applies as after a crash. A crash restart, waiting for its backoff or with its
    /// process still starting, is replaced by this one: that process is killed before it
    /// serves, and only this restart's process is installed.
    ///
    /// - Parameters:
    ///   - executable: a different executable to run from now on (also for later
    ///     crash restarts); nil keeps the current one.
    ///   - arguments: different arguments (after `--shm-path=PATH`); nil keeps them.
    /// - Throws: ``PluginHostError``: why the new process did not start (the codes of
    ///   ``launch(_:reactor:)`` but `serviceConflict`), ``PluginHostError/Code/alreadyRestarting``
    ///   while another hot restart is starting its process (a crash restart in flight is
    ///   superseded instead), or ``PluginHostError/Code/stopped`` once ``stop()`` was called
    ///   (also during the restart).
    public func restart(executable: String? = nil, arguments: [String]? = nil) async throws(PluginHostError) {
        let result = await reactor.suspendOnLoop(
            orIfShutDown: Result<Void, PluginHostError>.failure(PluginHostError(.reactorShutDown, Self.reactorGone(self.configuration.name)))
        ) { continuation in
            self.hotRestart(executable: executable, arguments: arguments) { continuation.resume(returning: $0) }
        }
        try result.get()
    }

    /// Stops the plugin: no more restarts, a graceful shutdown of the session (calls in
    /// flight get `grace`), then the process is killed if it has not exited. Returns once it
    /// is reaped and its segment removed, or once the reactor shuts down if that comes first
    /// (its shutdown closes the sessions and listeners, and the processes exit on their own).
    public func stop() async {
        // After the reactor shut down there is nothing left to stop: its shutdown closed the
        // sessions and listeners, and the processes exit on their own.
        await reactor.suspendOnLoop(orIfShutDown: ()) { continuation in self.stopAll { continuation.resume() } }
    }

    static func reactorGone(_ name: String) -> String { "the reactor of plugin \(name) has shut down" }

    /// The reactor is shutting down (its sessions, listeners and timers are about to close):
    /// nothing will restart, and whatever waits for a process fails now instead of never.
    private func reactorShuttingDown() {
        shutdownHook = nil
        endRestarts(.reactorShutDown, why: Self.reactorGone(configuration.name))
        // A stop promised to kill what lingers, but its timers die with the reactor: the
        // processes it waits for are killed now (through the pidfd; one whose pid is not in
        // yet gets it when the report comes, or from the spawner if the report cannot).
        if !stopsWaiting.isEmpty {
            for instance in instances.values where !instance.hasExited { instance.kill(SIGKILL) }
        }
        // No exit reaches the loop any more: a stop waiting for one ends now.
        allStopped()
    }

    /// Nothing will start any more (`code` says why: ``PluginHostError/Code/stopped`` or
    /// ``PluginHostError/Code/reactorShutDown``): no restart, no new caller served; whatever
    /// waits for a process, and a process still in its handshake, fails with `why`.
    private func endRestarts(_ code: PluginHostError.Code, why: String) {
        let previous = state
        state = .stopped(current: previous.current)
        if case .backingOff(let timer) = previous { timer.cancel() }
        setReady(nil)
        failWaiters(why)
        previous.startInFlight?.resolve(.failure(PluginHostError(code, why)))
    }

    // MARK: Loop-confined machinery

    /// Where the plugin is in its life: the process installed, the one starting (one at a
    /// time: a hot restart supersedes a crash restart's) and why, whether a restart is
    /// coming. One value, so that no two of these can disagree. Loop-confined.
    private enum State {
        /// No process and none starting: before the launch, after a failed one, or once the
        /// restart policy gave up. Callers fail at once; a hot restart starts a process.
        case notRunning
        /// No process installed: the launch's process, or a crash restart's, is starting. (A
        /// hot restart supersedes a crash restart's start. It never meets the launch's: the
        /// plugin is handed out only once its launch has ended.)
        case starting(PluginInstance)
        /// A process is installed. It serves calls while its session is ready; once that has
        /// closed, callers wait if the restart policy will replace it when it exits
        /// (``willRestart(afterExitOf:)``, asked when they come), and fail at once if not.
        case running(PluginInstance)
        /// No process: a crash restart waits out its backoff on `timer`.
        case backingOff(timer: ReactorTimer)
        /// A hot restart: `starting` is to replace `old`, the process installed when it
        /// began (nil if there was none, or once it has exited). Callers wait for `starting`.
        case swapping(old: PluginInstance?, starting: PluginInstance)
        /// ``stop()`` or the reactor's shutdown: nothing starts any more, and callers fail.
        /// `current` is the process installed then, until it exits (``stop()`` lets go of it
        /// at once, retiring every process).
        case stopped(current: PluginInstance?)

        /// The installed process: the one whose exit ends its part (a crash restart after
        /// it, or the end of a hot restart's old process).
        var current: PluginInstance? {
            switch self {
            case .running(let instance): instance
            case .swapping(let old, _): old
            case .stopped(let current): current
            case .notRunning, .starting, .backingOff: nil
            }
        }

        /// The process being started, by the launch, a crash restart or a hot restart.
        var startInFlight: PluginInstance? {
            switch self {
            case .starting(let instance), .swapping(_, let instance): instance
            case .notRunning, .running, .backingOff, .stopped: nil
            }
        }

        var isStopped: Bool {
            if case .stopped = self { true } else { false }
        }
    }

    /// Our hook in the reactor's shutdown (removed once a stop is done, or the launch failed).
    private var shutdownHook: Int?

    /// Takes our hook out of the reactor's shutdown, if it is there.
    private func removeShutdownHook() {
        guard let shutdownHook else { return }
        reactor.removeShutdownHook(shutdownHook)
        self.shutdownHook = nil
    }

    private func emit(_ event: PluginEvent) {
        // Once finished, `onEvent` gets nothing either: work the reactor's teardown runs
        // after its shutdown hooks (a spawner's late report of a pid) would emit otherwise.
        guard !eventsFinished else { return }
        eventSink.yield(event)
        configuration.onEvent?(event)
    }

    /// Finishes `events`; nothing is emitted from now on.
    private func finishEvents() {
        eventsFinished = true
        eventSink.finish()
    }

    private func setReady(_ session: Session?) {
        ready.withLock { $0 = session }
    }

    /// Makes `instance`, whose start succeeded (so it has a session), the current process
    /// and hands its session to waiting callers.
    private func install(_ instance: PluginInstance) {
        reactor.preconditionInLoop()
        guard let session = instance.session else { preconditionFailure("plugin \(configuration.name): a process without a session installed") }
        state = .running(instance)
        setReady(session)
        resumeWaiters(.success(session))
    }

    /// A call, stream or notification waiting for a process, and its `callWaitTimeout` timer.
    private struct Waiter {
        let body: (Result<Session, RPCError>) -> Void
        let timer: ReactorTimer
    }

    /// The session calls go to now: the installed process's, while it is ready. (After
    /// `stop()` there is none; after the reactor's shutdown, the installed process serves
    /// until that closes its session. During a hot restart callers wait for the new process.)
    private var servingSession: Session? {
        switch state {
        case .running(let instance), .stopped(current: let instance?):
            guard let session = instance.session, session.phase == .ready else { return nil }
            return session
        case .notRunning, .starting, .backingOff, .swapping, .stopped(current: nil):
            return nil
        }
    }

    /// With no ``servingSession`` now (the callers look first, where they need no closure):
    /// runs `body` once a process is ready (at most `callWaitTimeout` later), or at once with
    /// why none will be. Returns the waiter's id for ``cancelWait(_:)`` when it waits, nil
    /// when `body` already ran.
    @discardableResult
    private func waitForSession(_ body: @escaping (Result<Session, RPCError>) -> Void) -> Int? {
        assert(servingSession == nil, "plugin \(configuration.name): a wait for a session while one serves")
        let waits: Bool
        switch state {
        // The installed process's connection has closed: whether its exit brings a restart
        // depends on how long it will have stayed up, so it is asked now, not at the close.
        case .running(let instance): waits = willRestart(afterExitOf: instance)
        case .starting, .backingOff, .swapping: waits = true
        case .notRunning, .stopped: waits = false
        }
        guard waits else {
            let why = lastExit.map { " (last process \($0))" } ?? ""
            body(.failure(RPCError(.unavailable, "plugin \(configuration.name) is not running\(why)")))
            return nil
        }
        let id = nextWaiter
        nextWaiter += 1
        let wait = configuration.callWaitTimeout
        let timer = reactor.schedule(after: wait) { [self] in
            waiters.removeValue(forKey: id)?.body(.failure(RPCError(.unavailable, "plugin \(configuration.name) was not back within \(wait)")))
        }
        waiters[id] = Waiter(body: body, timer: timer)
        return id
    }

    /// Forgets a waiter whose caller gave up; its body does not run.
    private func cancelWait(_ id: Int) {
        waiters.removeValue(forKey: id)?.timer.cancel()
    }

    private func resumeWaiters(_ result: Result<Session, RPCError>) {
        let pending = waiters
        waiters.removeAll()
        for waiter in pending.values {
            waiter.timer.cancel()
            waiter.body(result)
        }
    }

    private func failWaiters(_ why: String) {
        resumeWaiters(.failure(RPCError(.unavailable, why)))
    }

    /// Spawns a new process on a fresh segment, entering the state `starting` makes of it
    /// (before anything can complete); `completion` gets it once its handshake is done, or
    /// the error (the process is then killed and reaped). `completion` sets the next state.
    private func startInstance(as starting: (PluginInstance) -> State, _ completion: @escaping (Result<PluginInstance, PluginHostError>) -> Void) {
        reactor.preconditionInLoop()
        // One start at a time: a superseded one is abandoned first.
        precondition(state.startInFlight?.abandoned ?? true, "plugin \(configuration.name): a start while another is in flight")
        generation += 1
        let name = PluginFiles.segmentName(hostPID: Sys.processID, name: configuration.name, generation: generation, random: .random(in: 0...UInt32.max))
        let path = "\(configuration.segmentDirectory)/\(name)"
        let instance = PluginInstance(generation: generation, path: path)
        state = starting(instance)
        assert(state.startInFlight === instance)
        instance.onReady = { [self] result in
            // Still the start in flight, unless `stop()` or the reactor's shutdown failed it.
            assert(state.startInFlight === instance || state.isStopped)
            switch result {
            case .success:
                instance.cancelTimers()
                // Here, where the start resolves, not where the handshake ends: a start
                // already given up on (superseded, timed out) reports no process.
                instance.started = true
                announceStart(instance)
            case .failure:
                instance.abandon()
            }
            completion(result.map { _ in instance })
        }
        instances[instance.generation] = instance
        do {
            instance.listener = try ShmListener(reactor: reactor, path: path, config: configuration.shm) { [self] transport in
                accepted(transport, by: instance)
            }
        } catch {
            instances[instance.generation] = nil
            instance.resolve(.failure(PluginHostError(.segmentCreationFailed, "cannot create the segment for \(configuration.name) at \(path): \(error)", underlying: error)))
            return
        }
        instance.timers.append(reactor.schedule(after: configuration.handshakeTimeout) { [self] in
            instance.resolve(.failure(PluginHostError(.handshakeTimedOut, "plugin \(configuration.name) did not connect within \(configuration.handshakeTimeout)")))
        })
        let reactor = self.reactor
        // The instance is loop-confined: the watcher thread only carries it back to the loop.
        let instanceBox = SendableBox(instance)
        PluginSpawner.spawn(
            executable: executable, arguments: ["--shm-path=\(path)"] + arguments,
            environment: [pluginHostPIDEnvironmentVariable: "\(Sys.processID)"], logger: configuration.logger,
            onSpawn: { result in
                let delivered = reactor.execute {
                    switch result {
                    case .success(let child):
                        let instance = instanceBox.value
                        // Sends a kill asked for meanwhile (given up on, or retired).
                        instance.child = child
                        instance.startedAt = .now
                        self.announceStart(instance)
                    case .failure(let error):
                        instanceBox.value.status = .exited(code: -1)
                        self.finished(instanceBox.value)
                        instanceBox.value.resolve(.failure(error))
                    }
                }
                // The reactor shut down while the process started: nothing on the loop will
                // stop it, and no host serves its segment any more. This thread reaps it.
                if !delivered, case .success(let child) = result { _ = try? child.signal(SIGKILL) }
            },
            onExit: { status in
                reactor.execute {
                    instanceBox.value.status = status
                    self.exited(instanceBox.value, status)
                }
            })
    }

    /// Emits ``PluginEvent/started(pid:)`` for `instance` if both have happened: its start
    /// succeeded, and its pid is known. Called after each, so whichever comes second emits
    /// it: the spawner's thread reports the pid through the loop, and a fast handshake can
    /// come first.
    private func announceStart(_ instance: PluginInstance) {
        if instance.started, let pid = instance.pid { emit(.started(pid: pid)) }
    }

    private func accepted(_ transport: ShmTransport, by instance: PluginInstance) {
        guard instance.session == nil, !instance.hasExited else {
            transport.close(error: TransportError(.closed, "plugin \(configuration.name): connection not expected"))
            return
        }
        var sessionConfiguration = configuration.session
        sessionConfiguration.logger[metadataKey: "plugin"] = "\(configuration.name)"
        let session = Session(transport: transport, role: .initiator, router: router, configuration: sessionConfiguration)
        instance.session = session
        session.onClose { [self] in sessionClosed(instance) }
        session.start { [self] result in
            switch result {
            case .success:
                instance.resolve(.success(session))
            case .failure(let error):
                instance.resolve(.failure(PluginHostError(.handshakeFailed, "handshake with \(configuration.name) failed: \(error)", underlying: error)))
            }
        }
    }

    /// The session of `instance` closed: callers stop using it now (its process is dying or
    /// misbehaved); the process gets a moment to exit on its own, then is killed.
    private func sessionClosed(_ instance: PluginInstance) {
        // Callers now wait for a restart after its exit, if the policy will allow one then
        // (`waitForSession`). During a hot restart they wait for its new process; once
        // stopped, for nothing.
        if state.current === instance { setReady(nil) }
        // (The session's start reports a close during the handshake first, as a failed
        // handshake: this only makes sure the start ends.)
        instance.resolve(.failure(PluginHostError(
            .handshakeFailed, "plugin \(configuration.name) closed the connection during the handshake", underlying: instance.session?.closeReason)))
        // An abandoned process is killed already, or as soon as its pid is known.
        if !instance.hasExited && !instance.abandoned {
            instance.timers.append(reactor.schedule(after: .seconds(2)) { instance.kill(SIGKILL) })
        }
    }

    private var canRestart: Bool { consecutiveRestarts < configuration.restartPolicy.maxRestarts }

    /// Whether `instance` has stayed up long enough that its exit resets the restart count.
    private func outlivedResetAfter(_ instance: PluginInstance) -> Bool {
        ContinuousClock.now - instance.startedAt >= configuration.restartPolicy.resetAfter
    }

    /// Whether the policy restarts the installed `instance` once it exits: it may restart
    /// now, or will once that exit resets the count. Asked before the exit, it can only turn
    /// from false to true by then (the process's age grows; nothing else changes the count
    /// while it is installed).
    private func willRestart(afterExitOf instance: PluginInstance) -> Bool {
        canRestart || (configuration.restartPolicy.maxRestarts > 0 && outlivedResetAfter(instance))
    }

    /// The process of `instance` was reaped.
    private func exited(_ instance: PluginInstance, _ status: PluginExitStatus) {
        if let pid = instance.pid { emit(.exited(pid: pid, status: status)) }
        lastExit = status
        finished(instance)
        instance.resolve(.failure(PluginHostError(.exitedBeforeHandshake, "plugin \(configuration.name) \(status) before its handshake")))
        guard state.current === instance else { return }
        setReady(nil)
        // A process that stayed up resetAfter resets the count (once stopped, nothing reads it).
        if outlivedResetAfter(instance) { consecutiveRestarts = 0 }
        switch state {
        case .stopped:
            state = .stopped(current: nil)
        case .swapping(_, let starting):
            // Its new process takes over; if that fails, the hot restart schedules the
            // restart instead.
            state = .swapping(old: nil, starting: starting)
        case .running:
            scheduleRestart(after: "plugin \(configuration.name) \(status)")
        case .notRunning, .starting, .backingOff:
            preconditionFailure("plugin \(configuration.name): no process is installed in \(state)")
        }
    }

    /// With no process installed (it exited, or a start failed): starts a new process after
    /// the policy's backoff, or gives up when it allows no more.
    private func scheduleRestart(after why: String) {
        guard canRestart else {
            state = .notRunning
            let reason = "\(why); the restart policy allows no more restarts"
            emit(.gaveUp(reason: reason))
            failWaiters(reason)
            return
        }
        consecutiveRestarts += 1
        let attempt = consecutiveRestarts
        let delay = configuration.restartPolicy.backoff(attempt: attempt)
        let timer = reactor.schedule(after: delay) { [self] in
            // A hot restart and `stop()` cancel this timer, and nothing installs a process
            // while it waits.
            guard case .backingOff = state else {
                assertionFailure("plugin \(configuration.name): a restart timer fired in \(state)")
                return
            }
            // A hot restart begun while this start is in flight supersedes it: its completion
            // does not run then.
            startInstance(as: State.starting) { [self] result in
                switch result {
                case .success(let instance):
                    install(instance)
                case .failure(let error):
                    // `stop()` (or the reactor's shutdown) failed it: nothing restarts.
                    if state.isStopped { return }
                    scheduleRestart(after: error.message)
                }
            }
        }
        state = .backingOff(timer: timer)
        emit(.restarting(attempt: attempt, delay: delay))
    }

    /// Releases what `instance` held: its timers, its segment and socket files.
    private func finished(_ instance: PluginInstance) {
        instance.cancelTimers()
        instance.listener?.close()
        instance.listener = nil
        let hooks = instance.onExit
        instance.onExit.removeAll()
        instances[instance.generation] = nil
        for hook in hooks { hook() }
    }

    private func hotRestart(executable newExecutable: String?, arguments newArguments: [String]?, _ completion: @escaping (Result<Void, PluginHostError>) -> Void) {
        // The process the swap begins with, if any.
        let old: PluginInstance?
        switch state {
        case .stopped:
            // (Once the reactor shuts down, `restart` is refused before it gets here.)
            completion(.failure(PluginHostError(.stopped, "plugin \(configuration.name) is stopping")))
            return
        case .swapping:
            completion(.failure(PluginHostError(.alreadyRestarting, "plugin \(configuration.name) is already restarting")))
            return
        case .running(let instance):
            old = instance
        case .notRunning:
            old = nil
        // A crash restart is superseded, whether it waits for its backoff or its process is
        // starting (then killed before it serves; its start reports nothing): one start is in
        // flight at a time. This process replaces the crashed one (or, if it fails, a restart
        // is scheduled again below).
        case .backingOff(let timer):
            timer.cancel()
            old = nil
        case .starting(let superseded):
            // (A crash restart's: the launch's start has ended before anyone can call this.)
            superseded.abandon()
            old = nil
        }
        let previous = (executable, arguments)
        if let newExecutable { executable = newExecutable }
        if let newArguments { arguments = newArguments }
        setReady(nil)
        startInstance(as: { .swapping(old: old, starting: $0) }) { [self] result in
            // `old` once more: nil now if it has exited meanwhile.
            let old: PluginInstance?
            switch state {
            case .swapping(let current, _):
                old = current
            case .stopped:
                // `stop()` (or the reactor's shutdown) failed the start and the waiters, and
                // retires every process.
                (executable, arguments) = previous
                completion(result.map { _ in () })
                return
            case .notRunning, .starting, .running, .backingOff:
                preconditionFailure("plugin \(configuration.name): a hot restart ended in \(state)")
            }
            switch result {
            case .success(let instance):
                install(instance)
                consecutiveRestarts = 0
                if let old { retire(old) }
                completion(.success(()))
            case .failure(let error):
                (executable, arguments) = previous
                if let old, let session = old.session, session.phase == .ready {
                    install(old)
                } else if let old {
                    // Its connection closed during the swap: its exit schedules the restart,
                    // if the policy allows one then (callers wait for it), else nothing will
                    // serve.
                    state = .running(old)
                    if !willRestart(afterExitOf: old) { failWaiters(error.message) }
                } else {
                    // No process left (the old one exited during the swap, or the swap began
                    // in a crash's backoff): restart per the policy, as after a crash.
                    scheduleRestart(after: "\(error.message); the old process \(lastExit.map { "\($0)" } ?? "is gone")")
                }
                completion(.failure(error))
            }
        }
    }

    /// Gracefully shuts down `instance`'s session and kills the process if it lingers.
    private func retire(_ instance: PluginInstance, then done: (() -> Void)? = nil) {
        if instance.hasExited {
            done?()
            return
        }
        if let done { instance.onExit.append(done) }
        instance.session?.shutdownGracefully(grace: configuration.grace, reason: .shutdown, message: "plugin replaced")
        if instance.session == nil { instance.kill(SIGTERM) }
        instance.timers.append(reactor.schedule(after: configuration.grace + .seconds(1)) { instance.kill(SIGKILL) })
    }

    /// ``stop()`` calls waiting for every process to be gone; ``allStopped()`` ends them.
    private var stopsWaiting: [() -> Void] = []

    private func stopAll(_ completion: @escaping () -> Void) {
        endRestarts(.stopped, why: "plugin \(configuration.name) stopped")
        state = .stopped(current: nil)
        stopsWaiting.append(completion)
        guard !instances.isEmpty else { return allStopped() }
        // The shutdown hook stays until then: a reactor that shuts down first ends the stop.
        for instance in Array(instances.values) {
            // `finished` takes each process out before its hooks run, and none is added once
            // stopped: the last exit finds none left.
            retire(instance) { [self] in if instances.isEmpty { allStopped() } }
        }
    }

    /// Every process is gone, or the reactor is shutting down (after which no exit reaches
    /// the loop): `events` finishes, and every ``stop()`` waiting returns.
    private func allStopped() {
        removeShutdownHook()
        finishEvents()
        let waiting = stopsWaiting
        stopsWaiting.removeAll()
        for completion in waiting { completion() }
    }
}
