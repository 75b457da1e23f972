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
        /// Records the session accepted.
        public var forwarded: UInt64
        /// Records dropped: the buffer was full, the session refused them (the host is going
        /// away), or the attached session had closed (what was still buffered then, and what
        /// is produced until the next ``attach(to:)``). Records produced before the first
        /// attach, or before the attached session's handshake is done, are buffered (up to
        /// ``Configuration/bufferCapacity``), not dropped.
        public var dropped: UInt64
        /// Records waiting in the buffer now.
        public var queued: Int
        /// The most records that ever waited in the buffer at once.
        public var peakQueued: Int
    }

    /// The largest strings a record carries; longer ones are cut (and marked) so that one
    /// record always fits a session's payload limit and the host's memory stays bounded.
    public enum Limits {
        /// Messages, in UTF-8 bytes.
        public static let message = 16 * 1024
        /// Field values, in UTF-8 bytes.
        public static let value = 4 * 1024
        /// Names, targets, levels, files and field names, in UTF-8 bytes.
        public static let name = 256
        /// Fields per record.
        public static let fields = 64
    }

    /// A record waiting to be sent.
    enum Pending: Sendable {
        /// `new_span`, bracketed by `enter(parent)`/`exit(parent)` when it has a parent.
        case newSpan(SpanMeta, parent: UInt64?)
        case record(UInt64, [TraceField])
        case event(EventMeta)
        case dropSpan(UInt64)
    }

    /// A span as the forwarder numbered it: its id on the connection of `connection`.
    struct SpanReference: Sendable, Hashable {
        let id: UInt64
        let connection: UInt64
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
        /// Which connection span ids belong to: 1 until the second ``attach(to:)``, which
        /// starts numbering again from 1 (as the host does for a new connection).
        var connection: UInt64 = 1
        var attachedOnce = false
        var session: Session?
        /// The attached session has finished its handshake: records schedule drains. Until
        /// then they wait in the buffer.
        var ready = false
        /// The host went away: nothing more can be sent.
        var detached = false
        var drainScheduled = false
        /// A drain waits for the transport to write its backlog (`whenOutputDrained`).
        var retryPending = false
        var peakQueued = 0
        /// Records accepted, and records handed to the session (sequence numbers).
        var accepted: UInt64 = 0
        var handedOver: UInt64 = 0
        var flushWaiters: [(UInt64, CheckedContinuation<Void, Never>)] = []

        var count: Int { queue.count - head }
    }

    public let configuration: Configuration
    let state = Mutex(State())
    let filterState: Mutex<TracingFilter>
    /// The ``FilterSummary`` of the filter in force, packed into one word so that a reader
    /// never sees half of a change; stored under `filterState`'s lock, read without it.
    let packedFilterSummary: Atomic<Int>
    /// Set when a record is buffered, cleared when a drain leaves the buffer empty: lets a
    /// reply barrier with nothing to send skip the lock.
    let mayHaveQueued = Atomic<Bool>(false)

    /// A forwarder that is not installed anywhere yet: make log handlers with
    /// ``makeLogHandler(label:)`` and spans with ``tracer``, or call ``bootstrap(_:)``.
    public init(_ configuration: Configuration = Configuration()) {
        self.configuration = configuration
        let filter = configuration.filter
        filterState = Mutex(filter)
        packedFilterSummary = Atomic(FilterSummary(filter).packed)
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
    /// With ``Configuration/localHandler`` it also hands each record to that handler (at
    /// the handler's own level), while the host's filter keeps deciding what is forwarded.
    public func makeLogHandler(label: String) -> any LogHandler {
        ForwardingLogHandler(label: label, tracing: self, local: configuration.localHandler?(label))
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
        // Under the lock: racing calls leave the summary of the filter that won.
        filterState.withLock { current in
            current = filter
            packedFilterSummary.store(FilterSummary(filter).packed, ordering: .relaxed)
        }
    }

    /// What log calls read of the filter in force, without its lock.
    var filterSummary: FilterSummary { FilterSummary(packed: packedFilterSummary.load(ordering: .relaxed)) }

    /// Whether a record of `level` from `target` passes the filter in force. One atomic load
    /// when the filter has one level for every target (the usual case); its lock otherwise.
    func allows(_ level: TraceLevel, target: String) -> Bool {
        let summary = filterSummary
        if summary.levelDecidesAlone { return summary.passes(level) }
        return filterState.withLock { $0.allows(level, target: target) }
    }

    /// The part of a filter that log calls read without its lock.
    struct FilterSummary: Hashable {
        /// Ordinal in ``PluginTracing/loggerLevels`` of the lowest level any target passes
        /// (what `logLevel` reports); `loggerLevels.count` when everything is off.
        let lowestLoggerLevel: Int
        /// The filter has one level for every target, so `lowestLoggerLevel` alone decides
        /// whether a record passes, whatever its target.
        let levelDecidesAlone: Bool

        init(_ filter: TracingFilter) {
            lowestLoggerLevel = PluginTracing.loggerLevelOrdinal(filter.lowestLevel)
            levelDecidesAlone = filter.directives.isEmpty && filter.defaultLevel != nil
        }

        init(packed: Int) {
            lowestLoggerLevel = packed >> 1
            levelDecidesAlone = packed & 1 != 0
        }

        var packed: Int { lowestLoggerLevel << 1 | (levelDecidesAlone ? 1 : 0) }

        /// The lowest swift-log level any target passes; nil when everything is off.
        var lowestLevel: Logger.Level? {
            lowestLoggerLevel < PluginTracing.loggerLevels.count ? PluginTracing.loggerLevels[lowestLoggerLevel] : nil
        }

        /// Whether `level` reaches the lowest level (the whole decision when
        /// `levelDecidesAlone`). The wire levels map in order onto swift-log's, so comparing
        /// there is comparing on the wire.
        func passes(_ level: TraceLevel) -> Bool {
            guard let lowest = lowestLevel else { return false }
            return level.loggerLevel >= lowest
        }
    }

    /// swift-log's levels in order (what ``FilterSummary/lowestLoggerLevel`` indexes).
    static let loggerLevels = Logger.Level.allCases

    static func loggerLevelOrdinal(_ level: TraceLevel?) -> Int {
        guard let level else { return loggerLevels.count }  // off: above critical
        return loggerLevels.firstIndex(of: level.loggerLevel)!
    }

    // MARK: Attaching to a session

    /// Starts sending over `session` (the plugin's session with its host): what was
    /// logged before is sent first. When the session closes, forwarding stops and later
    /// records are counted as dropped.
    ///
    /// Nothing is sent before the session's handshake is done: records wait in the buffer
    /// (a session would only queue them, past ``Configuration/maxQueuedOutputBytes``, and
    /// lose them unsent if the handshake failed; they count as dropped then). Attached
    /// before its handshake is done — during it, or before it starts, as
    /// `PluginRuntime.serve(_:tracing:)` does so that what a handler logs precedes its reply
    /// from the host's first call on — the session gets its hooks at once and the records
    /// once it is ready (`Session.whenReady`).
    ///
    /// Attaching to a later session (a plugin that reconnects) starts a new connection:
    /// span ids count from 1 again, and spans of the previous connection are no longer
    /// referenced.
    public func attach(to session: Session) {
        session.reactor.executeOrRunNow { [self] in
            let phase = session.phase
            let again = state.withLock { state -> Bool in
                let again = state.session === session
                if !again {
                    if state.attachedOnce {
                        state.connection &+= 1
                        state.nextSpanID = 1
                    }
                    state.ready = false
                }
                state.attachedOnce = true
                state.session = session
                state.detached = phase == .closed
                return again
            }
            if phase == .closed {
                detach(session)
                return
            }
            if !again {
                session.onClose { [self] in detach(session) }
                // What a handler logged goes out before its reply.
                session.beforeEachReply { [weak self] in self?.drainBeforeReply() }
            }
            // Now if ready, else at the handshake's end (a failed one closes the session,
            // and `onClose` detaches); a repeated attach finds the session ready or adds
            // nothing that drains twice (`sessionIsReady` drains only what is scheduled).
            session.whenReady { [self] result in if case .success = result { sessionIsReady(session) } }
        }
    }

    /// `session`, if it is still the attached one, has finished its handshake: sends what
    /// is buffered and lets records schedule drains from now on (loop thread).
    private func sessionIsReady(_ session: Session) {
        let drainNow = state.withLock { state -> Bool in
            guard state.session === session, !state.detached else { return false }
            state.ready = true
            return state.claimDrain() != nil
        }
        if drainNow { drain(session) }
    }

    /// Waits until every record produced before this call has been handed to the session
    /// and the transport was asked to write it. Returns at once when no session is attached
    /// (nothing could be sent) or forwarding has stopped, and as soon as forwarding stops
    /// while it waits (the session closed, or refused records because the host sent
    /// GoAway): what was not sent then is counted as dropped. With a session attached
    /// before its handshake is done it waits for the handshake too (see ``attach(to:)``).
    public func flush() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let (ready, session) = state.withLock { state -> (Bool, Session?) in
                guard state.session != nil, !state.detached, state.handedOver < state.accepted else { return (true, nil) }
                state.flushWaiters.append((state.accepted, continuation))
                // Before the handshake the drain at its end releases the waiter.
                return (false, state.claimDrain())
            }
            if ready {
                continuation.resume()
            } else if let session, !session.reactor.execute({ self.drain(session) }) {
                // The reactor is gone: so is every chance to send.
                for waiter in releaseAll() { waiter.resume() }
            }
        }
    }

    /// Counters so far.
    public var statistics: Statistics {
        state.withLock { Statistics(forwarded: $0.forwarded, dropped: $0.droppedTotal, queued: $0.count, peakQueued: $0.peakQueued) }
    }

    // MARK: Producing

    /// Buffers a log record or span event; `parent` is the span it happened in.
    func enqueueEvent(_ meta: EventMeta, parent: SpanReference?) {
        var meta = Self.clipped(meta)
        _ = enqueue { state in
            meta.parentSpanID = parent.flatMap { $0.connection == state.connection ? $0.id : nil }
            return .event(meta)
        }
    }

    /// Buffers the start of a span under `parent`; returns the span's reference, or nil
    /// when the buffer was full.
    func enqueueNewSpan(_ meta: SpanMeta, parent: SpanReference?) -> SpanReference? {
        let meta = Self.clipped(meta)
        return enqueue { state in
            .newSpan(meta, parent: parent.flatMap { $0.connection == state.connection ? $0.id : nil })
        }
    }

    /// Buffers fields recorded on `span` (nothing when it belongs to an earlier connection).
    func enqueueRecord(_ fields: [TraceField], on span: SpanReference) {
        let fields = Self.clipped(fields)
        _ = enqueue { state in span.connection == state.connection ? .record(span.id, fields) : nil }
    }

    /// Buffers the close of `span`; never dropped for a full buffer.
    func enqueueDropSpan(_ span: SpanReference) {
        _ = enqueue { state in span.connection == state.connection ? .dropSpan(span.id) : nil }
    }

    /// Buffers what `make` builds under the lock (nil: nothing to send). Returns the new
    /// span's reference for `newSpan`, the record's otherwise, nil when it was dropped.
    private func enqueue(_ make: (State) -> Pending?) -> SpanReference? {
        var claimed: Session?
        let result = state.withLock { state -> SpanReference? in
            guard let record = make(state) else { return nil }
            let droppable: Bool
            if case .dropSpan = record { droppable = false } else { droppable = true }
            let reference: SpanReference?
            if state.detached || (droppable && state.droppableQueued >= configuration.bufferCapacity) {
                if droppable {
                    state.droppedSinceReport &+= 1
                    state.droppedTotal &+= 1
                    mayHaveQueued.store(true, ordering: .releasing)  // the drop report is due
                }
                reference = nil
            } else {
                state.queue.append(record)
                mayHaveQueued.store(true, ordering: .releasing)
                if droppable { state.droppableQueued += 1 }
                state.peakQueued = max(state.peakQueued, state.count)
                state.accepted &+= 1
                if case .newSpan = record {
                    reference = SpanReference(id: state.nextSpanID, connection: state.connection)
                    state.nextSpanID &+= 1
                } else {
                    reference = SpanReference(id: 0, connection: state.connection)
                }
            }
            // The record, or the drop report it made due.
            claimed = state.claimDrain()
            return reference
        }
        scheduleDrain(claimed)
        return result
    }

    static func clip(_ text: String, _ limit: Int) -> String {
        guard text.utf8.count > limit else { return text }
        return String(text.prefix(utf8Bytes: limit - 3)) + "…"  // "…" takes 3 bytes
    }

    /// `fields` within the limits: the first ``Limits/fields`` of them, names and values cut
    /// (``clip(_:_:)``), and `fields_omitted` counting the rest. With `keepingSorted` (fields
    /// sorted by name, as ``EventMeta/fields`` are) the result is sorted too: a cut name ends
    /// in "…", which can sort it after its neighbours, and `fields_omitted` goes where its
    /// name sorts rather than last.
    static func clipped(_ fields: [TraceField], keepingSorted: Bool = false) -> [TraceField] {
        guard fields.count > Limits.fields || fields.contains(where: { $0.name.utf8.count > Limits.name || $0.value.utf8.count > Limits.value }) else {
            return fields
        }
        var result = fields.prefix(Limits.fields).map { TraceField(name: clip($0.name, Limits.name), value: clip($0.value, Limits.value)) }
        if fields.count > Limits.fields { result.append(TraceField(name: "fields_omitted", value: String(fields.count - Limits.fields))) }
        if keepingSorted { result.sort { $0.name < $1.name } }
        return result
    }

    static func clipped(_ meta: EventMeta) -> EventMeta {
        var meta = meta
        meta.message = clip(meta.message, Limits.message)
        meta.target = clip(meta.target, Limits.name)
        meta.file = meta.file.map { clip($0, Limits.name) }
        meta.fields = clipped(meta.fields, keepingSorted: true)
        return meta
    }

    static func clipped(_ meta: SpanMeta) -> SpanMeta {
        var meta = meta
        meta.name = clip(meta.name, Limits.name)
        meta.target = clip(meta.target, Limits.name)
        meta.file = meta.file.map { clip($0, Limits.name) }
        meta.fields = clipped(meta.fields)
        return meta
    }

    /// Asks the loop to send what is buffered now (the tracer's `forceFlush`).
    func kick() {
        scheduleDrain(state.withLock { $0.claimDrain() })
    }

    // MARK: Sending (loop thread)

    /// Sends what is buffered now, if anything, ahead of a reply the session is about to
    /// queue (the session calls this; loop thread).
    func drainBeforeReply() {
        // The common case, nothing buffered: no lock on the reply path. Records this thread
        // logged (the handler's) are always seen.
        guard mayHaveQueued.load(ordering: .acquiring) else { return }
        guard let claimed = state.withLock({ $0.claimDrain(beforeReply: true) }) else { return }
        // The replying session is on this thread; the attached one is too, unless the plugin
        // attached tracing to a session of another reactor since.
        if claimed.reactor.inLoop { drain(claimed) } else { scheduleDrain(claimed) }
    }

    /// Runs ``drain(_:)`` for `session` on its loop (a drain ``State/claimDrain(beforeReply:)`` claimed).
    private func scheduleDrain(_ session: Session?) {
        guard let session else { return }
        session.reactor.execute { self.drain(session) }
    }

    static let batchSize = 128
    static let batchesPerTurn = 16

    /// Sends buffered records to `scheduled`, the session the drain was claimed for, while
    /// the transport keeps up; its loop thread only.
    func drain(_ scheduled: Session) {
        scheduled.reactor.assertInLoop()
        let (session, current) = state.withLock { state -> (Session?, Session?) in
            // `ready` is set once the attached session's handshake is done, and cleared by the
            // next attach. A drain claimed for an earlier session (on its own loop) or before
            // the handshake's end sends nothing: the current session's turn comes from its
            // handshake's end (``sessionIsReady(_:)``), or is claimed now if that has passed.
            guard state.session === scheduled, state.ready else {
                state.drainScheduled = false
                return (nil, state.claimDrain())
            }
            return (scheduled, nil)
        }
        guard let session else {
            scheduleDrain(current)
            return
        }
        for _ in 0..<Self.batchesPerTurn {
            if session.queuedOutputBytes > configuration.maxQueuedOutputBytes {
                // Past the limit (perhaps only because this drain's frames are not written
                // yet): go on once the transport has written its backlog. `whenOutputDrained`
                // writes what is queued and runs the retry on a later loop turn once the
                // queue is empty; records keep accumulating in the bounded buffer meanwhile.
                // One waiter at a time.
                let arm = state.withLock { state -> Bool in
                    defer { state.retryPending = true }
                    return !state.retryPending
                }
                if arm {
                    session.whenOutputDrained { [self] in
                        state.withLock { $0.retryPending = false }
                        drain(session)
                    }
                }
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
                waiters = state.takeFlushWaiters()
                if take == 0 && dropped == 0 {
                    mayHaveQueued.store(false, ordering: .releasing)
                    state.drainScheduled = false
                    return false
                }
                return true
            }
            if dropped > 0 { _ = send(dropReport(dropped), on: session) }
            var sent: UInt64 = 0
            var refused: UInt64 = 0
            var refusal: RPCError?
            for record in batch {
                if refusal != nil {
                    refused += 1
                    continue
                }
                if let error = send(record, on: session) {
                    refused += 1
                    // UNAVAILABLE: the session is closing or the host sent GoAway; nothing
                    // more will be accepted. Anything else concerns this record only.
                    if error.code == .unavailable { refusal = error }
                } else {
                    sent += 1
                }
            }
            state.withLock { state in
                state.forwarded &+= sent
                state.droppedTotal &+= refused
            }
            if refusal != nil {
                detach(session)
                // The waiters taken above were counted as handed over: nothing more will be
                // sent for them, so they are done too.
                for waiter in waiters { waiter.resume() }
                return
            }
            if !waiters.isEmpty {
                session.frameTransport.flush()
                for waiter in waiters { waiter.resume() }
            }
            if !more { return }
        }
        // Plenty left: let the loop serve I/O, then continue.
        session.reactor.execute { [self] in drain(session) }
    }

    /// Sends one record; the session's refusal, if it refused.
    private func send(_ record: Pending, on session: Session) -> RPCError? {
        switch record {
        case .newSpan(let meta, let parent):
            if let parent { _ = session.sendNotification(TracingSinkMethods.enter.id, request: TracingSinkRequest.spanID(parent)) }
            var refusal = session.sendNotification(TracingSinkMethods.newSpan.id, request: TracingSinkRequest.newSpan(meta))
            if let error = refusal, error.code != .unavailable {
                // Too large for this session's limit: the host must still count the span,
                // or every later id on the connection would be off by one.
                let bare = SpanMeta(name: Self.clip(meta.name, 64), target: Self.clip(meta.target, 64), level: meta.level)
                refusal = session.sendNotification(TracingSinkMethods.newSpan.id, request: TracingSinkRequest.newSpan(bare))
            }
            if let parent { _ = session.sendNotification(TracingSinkMethods.exit.id, request: TracingSinkRequest.spanID(parent)) }
            return refusal
        case .record(let id, let fields):
            return session.sendNotification(TracingSinkMethods.record.id, request: TracingSinkRequest.record(id, fields))
        case .event(let meta):
            return session.sendNotification(TracingSinkMethods.event.id, request: TracingSinkRequest.event(meta))
        case .dropSpan(let id):
            return session.sendNotification(TracingSinkMethods.dropSpan.id, request: TracingSinkRequest.spanID(id))
        }
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

    /// `session` closed or refuses records: if it is still the attached one, count what is
    /// left as dropped and release flush waiters.
    private func detach(_ session: Session) {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            guard state.session === session else { return [] }
            state.detached = true
            state.session = nil
            state.ready = false
            return state.dropEverything()
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Forgets everything buffered (counted as dropped); the flush waiters to resume.
    private func releaseAll() -> [CheckedContinuation<Void, Never>] {
        state.withLock { $0.dropEverything() }
    }
}

extension PluginTracing.State {
    /// Claims the drain: when there is something to send (records, or a drop report that is
    /// due) and the attached session is ready to take it, marks a drain scheduled and returns
    /// that session, whose loop is to run ``PluginTracing/drain(_:)``; nil when there is nothing
    /// to claim. Not while a drain is scheduled already, which sends what is here too; but
    /// `beforeReply` (the session is about to queue a reply, and a scheduled drain would run
    /// after it) claims it anyway, unless that drain waits for the transport's backlog (its
    /// retry sends these records, and records sent now would only queue behind it).
    mutating func claimDrain(beforeReply: Bool = false) -> Session? {
        guard ready, !detached, let session, count > 0 || droppedSinceReport > 0 else { return nil }
        guard beforeReply ? !retryPending : !drainScheduled else { return nil }
        drainScheduled = true
        return session
    }

    mutating func dropEverything() -> [CheckedContinuation<Void, Never>] {
        droppedTotal &+= UInt64(droppableQueued)
        queue = []
        head = 0
        droppableQueued = 0
        drainScheduled = false
        handedOver = accepted
        return takeFlushWaiters()
    }

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
