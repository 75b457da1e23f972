import Logging
import Rapace
import Synchronization
import Tracing

/// Forwards a plugin's logs (swift-log) and spans (swift-distributed-tracing) to its host
/// over the plugin's session, as `TracingSink` notifications in the order they happened.
///
/// ```swift
/// let tracing = PluginTracing.bootstrap()              // LoggingSystem + InstrumentationSystem
/// try await PluginRuntime().serve([MyServer()], tracing: tracing)
/// ```
///
/// Logging never blocks plugin work: a record is filtered, built and put in a bounded
/// buffer by the calling thread; the session's loop thread sends it. When the buffer is
/// full (the host or the transport cannot keep up) records are dropped, counted, and the
/// count is sent to the host as a `WARN` event of target `rapace.tracing` with the field
/// `dropped`. Span closes are never dropped, so the host never sees a forwarded span stay
/// open while the plugin lives. A log call inside an RPC handler only enqueues, so it
/// cannot deadlock with the loop that serves the handler.
///
/// Span ids are the plugin's own, from 1 per connection, in the order `new_span` is sent;
/// a span dropped at its start has no id, and its children name its nearest forwarded
/// ancestor as their parent.
public final class PluginTracing: Sendable {
    /// How much to buffer and what to forward at first.
    public struct Configuration: Sendable {
        /// The filter in force until the host sets another.
        public var filter: TracingFilter
        /// Records (log events, span starts, field updates) waiting to be sent at most;
        /// beyond it new records are dropped and counted.
        public var bufferCapacity: Int
        /// Bytes the transport may hold unsent before the forwarder waits for it to drain
        /// (records then stay in the buffer, and may be dropped there).
        public var maxQueuedOutputBytes: Int
        /// Also hand each log record to this handler (for example a `StreamLogHandler` on
        /// stderr, which a ``PluginProcess`` host also receives line by line).
        public var localHandler: (@Sendable (String) -> any LogHandler)?

        public init(
            filter: TracingFilter = TracingFilter(level: .info), bufferCapacity: Int = 8192, maxQueuedOutputBytes: Int = 256 << 10,
            localHandler: (@Sendable (String) -> any LogHandler)? = nil
        ) {
            self.filter = filter
            self.bufferCapacity = bufferCapacity
            self.maxQueuedOutputBytes = maxQueuedOutputBytes
            self.localHandler = localHandler
        }
    }

    /// What the forwarder has done so far.
    public struct Statistics: Sendable, Hashable {
        /// Records handed to the session.
        public var forwarded: UInt64
        /// Records dropped (buffer full, or produced after the host went away).
        public var dropped: UInt64
        /// Records waiting in the buffer now.
        public var queued: Int
    }

    /// A record waiting to be sent.
    enum Pending: Sendable {
        /// `new_span`, bracketed by `enter(parent)`/`exit(parent)` when it has a parent.
        case newSpan(SpanMeta, parent: UInt64?)
        case record(UInt64, [TraceField])
        case event(EventMeta)
        case dropSpan(UInt64)
    }

    struct State {
        var queue: [Pending] = []
        var head = 0
        /// Records in the queue that count against the capacity (all but span closes).
        var droppableQueued = 0
        var droppedSinceReport: UInt64 = 0
        var droppedTotal: UInt64 = 0
        var forwarded: UInt64 = 0
        var nextSpanID: UInt64 = 1
        var session: Session?
        /// The host went away: nothing more can be sent.
        var detached = false
        var drainScheduled = false
        /// Records accepted, and records handed to the session (sequence numbers).
        var accepted: UInt64 = 0
        var handedOver: UInt64 = 0
        var flushWaiters: [(UInt64, CheckedContinuation<Void, Never>)] = []

        var count: Int { queue.count - head }
    }

    public let configuration: Configuration
    let state = Mutex(State())
    let filterState: Mutex<TracingFilter>
    /// `Logger.Level` raw ordinal below which nothing passes (what `logLevel` reports).
    let lowestLoggerLevel: Atomic<Int>

    /// A forwarder that is not installed anywhere yet: make log handlers with
    /// ``makeLogHandler(label:)`` and spans with ``tracer``, or call ``bootstrap(_:)``.
    public init(_ configuration: Configuration = Configuration()) {
        self.configuration = configuration
        let filter = configuration.filter
        filterState = Mutex(filter)
        lowestLoggerLevel = Atomic(Self.loggerLevelOrdinal(filter.lowestLevel))
    }

    /// Creates a forwarder and installs it process-wide: `LoggingSystem.bootstrap` with
    /// its log handler and `InstrumentationSystem.bootstrap` with its tracer. Both may be
    /// bootstrapped once per process, so call this once, first thing in `main`.
    public static func bootstrap(_ configuration: Configuration = Configuration()) -> PluginTracing {
        let tracing = PluginTracing(configuration)
        LoggingSystem.bootstrap { label in tracing.makeLogHandler(label: label) }
        InstrumentationSystem.bootstrap(tracing.tracer)
        return tracing
    }

    /// A swift-log handler forwarding through this forwarder, with `label` as the target.
    public func makeLogHandler(label: String) -> any LogHandler {
        let forwarding = ForwardingLogHandler(label: label, tracing: self)
        guard let local = configuration.localHandler else { return forwarding }
        return MultiplexLogHandler([forwarding, local(label)])
    }

    /// The swift-distributed-tracing tracer forwarding through this forwarder.
    public var tracer: ForwardingTracer { ForwardingTracer(tracing: self) }

    /// The `TracingConfig` service the plugin serves so the host can set the filter.
    public var configService: any RPCService { TracingConfigServer(ConfigAdapter(tracing: self)) }

    // MARK: Filter

    /// The filter in force.
    public var filter: TracingFilter { filterState.withLock { $0 } }

    /// Replaces the filter with `text` parsed (``TracingFilter`` syntax); it applies to the
    /// next record.
    public func setFilter(_ text: String) throws(TracingFilterError) {
        setFilter(try TracingFilter(parsing: text))
    }

    /// Replaces the filter; it applies to the next record.
    public func setFilter(_ filter: TracingFilter) {
        filterState.withLock { $0 = filter }
        lowestLoggerLevel.store(Self.loggerLevelOrdinal(filter.lowestLevel), ordering: .relaxed)
    }

    func allows(_ level: TraceLevel, target: String) -> Bool {
        filterState.withLock { $0.allows(level, target: target) }
    }

    static func loggerLevelOrdinal(_ level: TraceLevel?) -> Int {
        guard let level else { return Logger.Level.allCases.count }  // off: above critical
        return Logger.Level.allCases.firstIndex(of: level.loggerLevel)!
    }

    // MARK: Attaching to a session

    /// Starts sending over `session` (the plugin's session with its host): what was
    /// logged before is sent first. When the session closes, forwarding stops and later
    /// records are counted as dropped.
    public func attach(to session: Session) {
        session.reactor.executeOrRunNow { [self] in
            let alreadyClosed = session.phase == .closed
            let schedule = state.withLock { state -> Bool in
                state.session = session
                state.detached = alreadyClosed
                guard !alreadyClosed, state.count > 0, !state.drainScheduled else { return false }
                state.drainScheduled = true
                return true
            }
            if alreadyClosed {
                detach()
                return
            }
            session.onClose { [self] in detach() }
            // What a handler logged goes out before its reply.
            session.beforeEachReply { [weak self] in self?.drainBeforeReply() }
            if schedule { drain() }
        }
    }

    /// Waits until every record produced before this call has been handed to the session
    /// and the transport was asked to write it (or forwarding has stopped).
    public func flush() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let (ready, reactor) = state.withLock { state -> (Bool, Reactor?) in
                if state.detached || state.handedOver >= state.accepted { return (true, nil) }
                state.flushWaiters.append((state.accepted, continuation))
                guard let session = state.session, !state.drainScheduled else { return (false, nil) }
                state.drainScheduled = true
                return (false, session.reactor)
            }
            if ready { continuation.resume() }
            reactor?.execute { self.drain() }
        }
    }

    /// Counters so far.
    public var statistics: Statistics {
        state.withLock { Statistics(forwarded: $0.forwarded, dropped: $0.droppedTotal, queued: $0.count) }
    }

    // MARK: Producing

    /// Buffers `record`; returns its span id for `newSpan` (0 when dropped) and 1 for any
    /// other accepted record, 0 when it was dropped.
    @discardableResult
    func enqueue(_ record: Pending) -> UInt64 {
        let droppable: Bool
        if case .dropSpan = record { droppable = false } else { droppable = true }
        var reactor: Reactor?
        let result = state.withLock { state -> UInt64 in
            if state.detached || (droppable && state.droppableQueued >= configuration.bufferCapacity) {
                if droppable {
                    state.droppedSinceReport &+= 1
                    state.droppedTotal &+= 1
                }
                return 0
            }
            state.queue.append(record)
            if droppable { state.droppableQueued += 1 }
            state.accepted &+= 1
            var id: UInt64 = 1
            if case .newSpan = record {
                id = state.nextSpanID
                state.nextSpanID &+= 1
            }
            if !state.drainScheduled, let session = state.session {
                state.drainScheduled = true
                reactor = session.reactor
            }
            return id
        }
        reactor?.execute { self.drain() }
        return result
    }

    /// Asks the loop to send what is buffered now (the tracer's `forceFlush`).
    func kick() {
        let reactor = state.withLock { state -> Reactor? in
            guard !state.drainScheduled, state.count > 0, let session = state.session else { return nil }
            state.drainScheduled = true
            return session.reactor
        }
        reactor?.execute { self.drain() }
    }

    // MARK: Sending (loop thread)

    /// Sends what is buffered now, if anything, ahead of a reply the session is about to
    /// queue (the session calls this; loop thread).
    func drainBeforeReply() {
        let pending = state.withLock { state -> Bool in
            guard state.count > 0 || state.droppedSinceReport > 0 else { return false }
            state.drainScheduled = true
            return true
        }
        if pending { drain() }
    }

    static let batchSize = 128
    static let batchesPerTurn = 16

    /// Sends buffered records while the transport keeps up; loop thread only.
    func drain() {
        guard let session = state.withLock({ $0.session }) else { return }
        session.reactor.assertInLoop()
        for _ in 0..<Self.batchesPerTurn {
            if session.queuedOutputBytes > configuration.maxQueuedOutputBytes {
                // The peer is not reading fast enough: look again shortly (records keep
                // accumulating in the bounded buffer meanwhile).
                _ = session.reactor.schedule(after: .milliseconds(1)) { [self] in drain() }
                return
            }
            var batch: [Pending] = []
            var dropped: UInt64 = 0
            var waiters: [CheckedContinuation<Void, Never>] = []
            let more = state.withLock { state -> Bool in
                dropped = state.droppedSinceReport
                state.droppedSinceReport = 0
                let take = min(Self.batchSize, state.count)
                batch = Array(state.queue[state.head..<(state.head + take)])
                state.head += take
                state.droppableQueued -= batch.reduce(0) { if case .dropSpan = $1 { $0 } else { $0 + 1 } }
                if state.head == state.queue.count {
                    state.queue.removeAll(keepingCapacity: state.queue.capacity <= 4 * Self.batchSize * Self.batchesPerTurn)
                    state.head = 0
                } else if state.head >= 4096 && state.head * 2 >= state.queue.count {
                    state.queue.removeFirst(state.head)
                    state.head = 0
                }
                state.handedOver &+= UInt64(take)
                state.forwarded &+= UInt64(take)
                waiters = state.takeFlushWaiters()
                if take == 0 && dropped == 0 {
                    state.drainScheduled = false
                    return false
                }
                return true
            }
            if dropped > 0 { send(dropReport(dropped), on: session) }
            for record in batch { send(record, on: session) }
            if !waiters.isEmpty {
                session.frameTransport.flush()
                for waiter in waiters { waiter.resume() }
            }
            if !more { return }
        }
        // Plenty left: let the loop serve I/O, then continue.
        session.reactor.execute { [self] in drain() }
    }

    private func send(_ record: Pending, on session: Session) {
        switch record {
        case .newSpan(let meta, let parent):
            if let parent { notify(TracingSinkMethods.enter, TracingSinkRequest.spanID(parent), on: session) }
            notify(TracingSinkMethods.newSpan, TracingSinkRequest.newSpan(meta), on: session)
            if let parent { notify(TracingSinkMethods.exit, TracingSinkRequest.spanID(parent), on: session) }
        case .record(let id, let fields):
            notify(TracingSinkMethods.record, TracingSinkRequest.record(id, fields), on: session)
        case .event(let meta):
            notify(TracingSinkMethods.event, TracingSinkRequest.event(meta), on: session)
        case .dropSpan(let id):
            notify(TracingSinkMethods.dropSpan, TracingSinkRequest.spanID(id), on: session)
        }
    }

    private func notify(_ method: MethodDescriptor, _ request: Payload, on session: Session) {
        // A refusal means the session is closing: `detach` runs from its close callback.
        _ = session.sendNotification(method.id, request: request)
    }

    private func dropReport(_ count: UInt64) -> Pending {
        .event(EventMeta(
            message: "dropped \(count) trace record(s): the plugin produced them faster than the host took them",
            target: Self.internalTarget, level: TraceLevel.warn.rawValue,
            fields: [TraceField(name: Self.droppedField, value: String(count))]))
    }

    /// The target of the forwarder's own events (drop reports).
    public static let internalTarget = "rapace.tracing"
    /// The field of a drop report carrying the number of records dropped.
    public static let droppedField = "dropped"

    /// The session closed: count what is left as dropped and release flush waiters.
    private func detach() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.detached = true
            state.session = nil
            state.droppedTotal &+= UInt64(state.droppableQueued)
            state.queue = []
            state.head = 0
            state.droppableQueued = 0
            state.drainScheduled = false
            state.handedOver = state.accepted
            return state.takeFlushWaiters()
        }
        for waiter in waiters { waiter.resume() }
    }
}

extension PluginTracing.State {
    mutating func takeFlushWaiters() -> [CheckedContinuation<Void, Never>] {
        guard !flushWaiters.isEmpty else { return [] }
        var ready: [CheckedContinuation<Void, Never>] = []
        flushWaiters.removeAll { waiter in
            guard waiter.0 <= handedOver else { return false }
            ready.append(waiter.1)
            return true
        }
        return ready
    }
}

/// `TracingConfig` served by a plugin's forwarder.
struct ConfigAdapter: TracingConfig {
    let tracing: PluginTracing

    func setFilter(_ filter: String) async throws {
        do throws(TracingFilterError) {
            try tracing.setFilter(filter)
        } catch {
            throw RPCError(.invalidArgument, error.description)
        }
    }
}
