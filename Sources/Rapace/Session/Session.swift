import Logging

/// One rapace connection: the handshake, calls in both directions, streams with credit
/// flow control, cancellation, deadlines, keepalive and graceful shutdown, over any
/// ``FrameTransport``.
///
/// A session is confined to its reactor's loop thread. Two APIs sit on top:
/// - the **callback API** (`startCall(…, completion:)`, `start(onReady:)`, …) must be called
///   on the loop thread and completes there, with no task or continuation involved;
/// - the **async API** (``call(_:request:options:)``, ``serverStream(_:request:options:)``,
///   ``start()``, …) may be called from anywhere. From a task running on the reactor
///   (`Task(executorPreference: reactor)`) it runs inline with no thread hop; from elsewhere
///   it hops once to the loop and back.
///
/// Both peers can serve and call on the same session: pass the services this side serves
/// to the initializer, and call the peer's services through the session (or a typed client
/// built on it).
public final class Session: @unchecked Sendable {
    // @unchecked Sendable: all mutable state below is confined to `reactor`'s loop thread.
    // Public entry points either assert that (callback API) or hop there (async API).

    /// Tunables of a session.
    public struct Configuration: Sendable {
        /// Limits this side enforces and advertises (0 = unlimited).
        public var limits: Limits
        /// How long to wait for the peer's Hello.
        public var handshakeTimeout: Duration
        /// Ping the peer every `interval`; close when no Pong arrives within `timeout`.
        public var keepalive: Keepalive?
        /// Parameters sent in Hello.
        public var params: [MetadataEntry]
        /// How long an item of a stream this side serves may wait when it is larger than all
        /// the credit the caller has granted so far (a caller that opened with no credit, or
        /// with a window smaller than the item, and grants more ahead of consuming). When no
        /// grant makes room in time, the item's `send` throws `RESOURCE_EXHAUSTED`. Items that
        /// fit the credit granted so far wait for the caller's grants without this bound.
        public var creditGrowthTimeout: Duration
        /// Where the session logs (protocol errors, rejected handshakes, closes).
        public var logger: Logger

        /// Creates a configuration. The defaults: 16 MiB payloads, 8192 channels and 8192
        /// pending calls, a 5 s handshake timeout, no keepalive, no Hello parameters, a 2 s
        /// credit growth timeout, and a logger labelled `rapace.session`. A transport with a
        /// payload capacity of its own (SHM) lowers `limits.maxPayloadSize` to it when the
        /// session is created.
        public init(
            limits: Limits = Limits(maxPayloadSize: 16 << 20, maxChannels: 8192, maxPendingCalls: 8192),
            handshakeTimeout: Duration = .seconds(5), keepalive: Keepalive? = nil,
            params: [MetadataEntry] = [], creditGrowthTimeout: Duration = .seconds(2),
            logger: Logger = Logger(label: "rapace.session")
        ) {
            self.limits = limits
            self.handshakeTimeout = handshakeTimeout
            self.keepalive = keepalive
            self.params = params
            self.creditGrowthTimeout = creditGrowthTimeout
            self.logger = logger
        }
    }

    /// Keepalive settings: a Ping every `interval`, Pong expected within `timeout`.
    /// Keepalive runs only when both peers advertise ``FeatureSet/ping``.
    public struct Keepalive: Sendable {
        /// How long after the handshake, and after each expected Pong, the next Ping goes out.
        public var interval: Duration
        /// How long a Ping may go unanswered; then the session closes with `UNAVAILABLE`
        /// (the transport error is ``TransportError/Code/timeout``).
        public var timeout: Duration
        /// Keepalive with a Ping every `interval` and a Pong expected within `timeout`.
        public init(interval: Duration, timeout: Duration) {
            self.interval = interval
            self.timeout = timeout
        }
    }

    /// Where the session is in its life.
    public enum Phase: Sendable, Equatable {
        /// `idle`: created, not started; `handshaking`: Hello sent, waiting for the peer's;
        /// `ready`: the peer's Hello was accepted, calls flow; `closed`: ended, for good.
        case idle, handshaking, ready, closed
    }

    /// Counters for tests and diagnostics.
    public struct Statistics: Sendable {
        /// Largest number of item bytes received on one stream and not yet re-granted
        /// (never more than the window the caller granted).
        public var maxStreamBytesInFlight: UInt32 = 0
        /// Frames this session handed to its transport, control frames included.
        public var framesSent: UInt64 = 0
        /// Frames the transport delivered, counted on arrival before any check (frames the
        /// session then drops count too).
        public var framesReceived: UInt64 = 0
        /// Protocol errors that closed the session: the peer broke a rule the session checks
        /// (the session answers with GoAway(protocolError), or CloseChannel during the
        /// handshake), or the transport closed for a framing violation. 0 or 1, since the
        /// first one closes the session. Rejected handshakes do not count.
        public var protocolErrors: UInt64 = 0
        /// Frames the transport gave up on (``FrameTransportHandler/transportDidRefuse(_:reason:)``).
        public var framesRefused: UInt64 = 0
    }

    /// The reactor whose loop thread the session is confined to (its transport's).
    public let reactor: Reactor
    /// Which side of the connection this is: the initiator uses odd channel ids, the
    /// acceptor even ones.
    public let role: Role
    /// The configuration the session was created with, its `limits.maxPayloadSize` lowered
    /// to the transport's ``FrameTransport/payloadCapacity`` where the transport has one.
    public let configuration: Configuration
    let transport: any FrameTransport
    /// Loop-confined, like the rest of the session's state (see "Loop-confined state" below
    /// for why its exclusivity is not checked at run time).
    @exclusivity(unchecked) var router: ServiceRouter

    /// The transport under this session (loop-confined, like the session), for
    /// transport-specific features such as ``ShmTransport/allocateBuffer(count:)``.
    public var frameTransport: any FrameTransport { transport }

    /// Runs `body` on the loop thread right before each reply (the final frame of a call
    /// this side serves) is queued, so what `body` sends precedes the reply: the tracing
    /// bridge sends the records a handler logged before the handler's answer. Loop thread only.
    package func beforeEachReply(_ body: @escaping () -> Void) {
        reactor.preconditionInLoop()
        replyBarriers.append(body)
    }

    /// Bytes sent on this session that have not been handed to the peer yet: what the
    /// transport holds (``FrameTransport/queuedOutputBytes``) plus the frames of calls and
    /// notifications made before the handshake ended, which wait for it (two descriptors and
    /// the request each). Loop thread only.
    public var queuedOutputBytes: Int {
        reactor.preconditionInLoop()
        return transport.queuedOutputBytes + queuedUntilReady.bytes
    }
    var logger: Logger

    // Loop-confined state.
    //
    // The properties every call or frame touches are `@exclusivity(unchecked)`: the runtime
    // check (`swift_beginAccess`, 3–5 per function on the per-call path) cannot find a
    // conflict here, because
    // - they are only touched on the loop thread (the session is loop-confined), and
    // - no access to them stays open while other code runs: reads copy the value out,
    //   writes are one assignment or one short mutation of a table (`incoming[id] = call`,
    //   `append`, `removeValue`) that calls no handler, completion or transport; code that
    //   calls out over a table's contents iterates a copy (`closeNow`, reply barriers).
    // Keep it that way: never call out of the session inside an `inout` access (a
    // `withUnsafe…`/`modify` closure) to one of these properties.
    /// Where the session is in its life; set by the session only. Loop thread only.
    @exclusivity(unchecked) public internal(set) var phase: Phase = .idle
    /// The peer's Hello, once received.
    public internal(set) var peerHello: Hello?
    /// Limits in force after the handshake (the smaller non-zero value of each side's).
    @exclusivity(unchecked) public internal(set) var effectiveLimits: Limits
    /// Features both sides support.
    @exclusivity(unchecked) public internal(set) var effectiveFeatures: FeatureSet = []
    /// Counters updated as frames pass (see ``Statistics``). Loop thread only.
    @exclusivity(unchecked) public internal(set) var statistics = Statistics()
    /// Why the session closed, once it has.
    @exclusivity(unchecked) public internal(set) var closeReason: RPCError?

    @exclusivity(unchecked) var nextMessageID: UInt64 = 1
    @exclusivity(unchecked) var nextChannelID: UInt32
    /// Calls this side made that wait for their response, by channel.
    @exclusivity(unchecked) var outgoing = IDTable<CallHandle>()
    @exclusivity(unchecked) var incoming = IDTable<IncomingCall>()
    /// Answered calls kept for the next channels the peer opens (see `recycle(_:)`).
    @exclusivity(unchecked) var spareIncoming: [IncomingCall] = []
    @exclusivity(unchecked) var highestPeerChannel: UInt32 = 0
    /// The peer's ids below `highestPeerChannel` that it never opened.
    @exclusivity(unchecked) var skippedPeerChannels = SkippedChannels()
    @exclusivity(unchecked) var goAwaySentLastChannel: UInt32?
    @exclusivity(unchecked) var peerGoAway: GoAway?
    var readyWaiters: [(Result<Void, RPCError>) -> Void] = []
    var closeWaiters: [() -> Void] = []
    var drainWaiters: [() -> Void] = []
    /// A turn that runs the drain waiters is queued (``scheduleDrainWaiters()``).
    var drainTurnScheduled = false
    /// Calls and notifications made before the handshake ended (``UntilReady``).
    @exclusivity(unchecked) var queuedUntilReady = UntilReady()
    var handshakeTimer: ReactorTimer?
    var graceTimer: ReactorTimer?
    var keepaliveTimer: ReactorTimer?
    var pongDeadlineTimer: ReactorTimer?
    var outstandingPing: UInt64?
    var pingCounter: UInt64 = 0
    var pingWaiters: [UInt64: (Result<Void, RPCError>) -> Void] = [:]
    @exclusivity(unchecked) var flushScheduled = false
    /// Run before each reply is queued (see ``beforeEachReply(_:)``).
    @exclusivity(unchecked) var replyBarriers: [() -> Void] = []
    var shutdownHookID: Int?

    /// Creates a session over `transport`. Call on the transport's loop thread, then ``start(onReady:)``
    /// (or the async ``start()``).
    ///
    /// - Parameters:
    ///   - role: `.initiator` for the side that opened the connection (odd channel ids),
    ///     `.acceptor` for the other (even ids).
    ///   - services: what this side serves; two methods with one id is an error.
    public convenience init(transport: any FrameTransport, role: Role, services: [any RPCService] = [], configuration: Configuration = Configuration()) throws(RPCError) {
        self.init(transport: transport, role: role, router: try ServiceRouter(services), configuration: configuration)
    }

    /// A session over a router built once for many connections (``RapaceServer``, and the
    /// processes of a `PluginProcess`).
    package init(transport: any FrameTransport, role: Role, router: ServiceRouter, configuration: Configuration) {
        self.reactor = transport.reactor
        self.transport = transport
        self.role = role
        self.router = router
        var configuration = configuration
        if let capacity = transport.payloadCapacity {
            let limit = configuration.limits.maxPayloadSize
            configuration.limits.maxPayloadSize = limit == 0 ? capacity : min(limit, capacity)
        }
        self.configuration = configuration
        self.logger = configuration.logger
        self.logger[metadataKey: "peer"] = "\(transport.peerDescription)"
        self.effectiveLimits = configuration.limits
        self.nextChannelID = role == .initiator ? 1 : 2
        transport.maxIncomingPayload = configuration.limits.maxPayloadSize == 0 ? .max : configuration.limits.maxPayloadSize
    }

    // MARK: Lifecycle (callback API)

    /// Starts the session: sends Hello and begins reading. `onReady` runs on the loop once
    /// the peer's Hello is accepted, or with the error that ended the handshake.
    public func start(onReady: @escaping (Result<Void, RPCError>) -> Void) {
        whenReady(onReady)
        guard phase == .idle else { return }
        phase = .handshaking
        // Timers and hooks capture the session strongly (a weak reference would put every
        // retain/release of the session on the runtime's slow path); closeNow cancels them all.
        shutdownHookID = reactor.addShutdownHook { [self] in
            closeNow(RPCError(.unavailable, "reactor shut down"), transportError: TransportError(.closed, "reactor shut down"))
        }
        // Hello is queued before the transport starts: starting may deliver the peer's Hello
        // at once (a shared-memory ring that already holds it), and the work queued until
        // ready, which then runs, must not send anything ahead of our Hello.
        let hello = Hello(
            role: role, limits: configuration.limits,
            methods: router.methods.map { MethodInfo(methodID: $0.id, name: $0.fullName) },
            params: configuration.params)
        // Armed before the transport starts: a handshake that completes inside `start`
        // cancels it; armed afterwards it would outlive such a handshake by the whole timeout
        // (holding the session until it fires).
        handshakeTimer = reactor.schedule(after: configuration.handshakeTimeout) { [self] in
            guard phase == .handshaking else { return }
            rejectHandshake("no Hello from the peer within \(configuration.handshakeTimeout)")
        }
        sendControl(.hello, hello)
        transport.start(handler: self)
        transport.flush()
    }

    /// Calls `body` with the handshake's outcome once it has one (at once if it has): the
    /// session is ready, or it closed first. Loop thread only. Unlike
    /// ``start(onReady:)`` it does not start the session: register before `start` to act on
    /// readiness wherever the session is started.
    public func whenReady(_ body: @escaping (Result<Void, RPCError>) -> Void) {
        reactor.preconditionInLoop()
        switch phase {
        case .idle, .handshaking: readyWaiters.append(body)
        case .ready: body(.success(()))
        case .closed: body(.failure(closeReason ?? RPCError(.unavailable, "session closed")))
        }
    }

    /// Calls `body` once the session has closed (at once if it already has).
    public func onClose(_ body: @escaping () -> Void) {
        reactor.preconditionInLoop()
        if phase == .closed { body() } else { closeWaiters.append(body) }
    }

    // MARK: Output backpressure

    /// Calls `body` on the loop thread once everything sent on this session so far has
    /// reached the peer (the socket or the ring took it: ``queuedOutputBytes`` is 0; what was
    /// sent before the handshake ended waits for it), or the session has closed (`body` then
    /// finds it closed). Never inside this call: `body` runs
    /// from a later turn of the loop, after the backlog is written, or on the next turn
    /// when nothing is waiting. (Only once the reactor has shut down, when no later turn
    /// will come, does it run at once.)
    ///
    /// The way to produce faster than a peer consumes without growing the queue or polling:
    /// send (notifications, say) until ``queuedOutputBytes`` passes a limit of your choice,
    /// then continue from `body`. A `body` that registers again does not nest, however fast
    /// the peer reads: each round is a turn of its own, and the loop's other work (other
    /// connections too) runs between rounds. Loop thread only.
    public func whenOutputDrained(_ body: @escaping () -> Void) {
        reactor.preconditionInLoop()
        drainWaiters.append(body)
        // The turn flushes what is still queued; what the flush cannot write keeps the waiters
        // for the transport's report (`transportDidDrainOutput`). Nothing here flushes: a
        // flush that fails closes the session, which would run `body` inside this call.
        scheduleDrainWaiters()
    }

    /// Suspends until everything sent on this session so far has reached the peer, or the
    /// session has closed (``whenOutputDrained(_:)`` for async producers).
    public nonisolated(nonsending) func outputDrained() async {
        await reactor.suspendOnLoop(with: self, orIfShutDown: ()) { session, continuation in
            session.whenOutputDrained { continuation.resume() }
        }
    }

    /// Runs the drain waiters on a later turn of the loop (once, however many ask), never
    /// inside the caller: a waiter that registers again from its body would nest a call per
    /// round and keep the loop to itself for the whole send. Once the reactor has shut down
    /// no turn will come, so they run at once (the session is closed by then).
    func scheduleDrainWaiters() {
        guard !drainWaiters.isEmpty, !drainTurnScheduled else { return }
        drainTurnScheduled = true
        let queued = reactor.execute { [self] in
            drainTurnScheduled = false
            runDrainWaiters()
        }
        if !queued {
            drainTurnScheduled = false
            runDrainWaiters()
        }
    }

    /// Runs the waiters if the output is still drained (or the session closed); output
    /// queued since the drain was reported keeps them waiting for the transport's next report.
    func runDrainWaiters() {
        guard !drainWaiters.isEmpty else { return }
        // Calls made before the handshake ended are not sent yet: its end schedules the waiters again.
        if !queuedUntilReady.isEmpty { return }
        if phase != .closed && transport.queuedOutputBytes > 0 {
            transport.flush()
            if transport.queuedOutputBytes > 0 { return }
        }
        let waiters = drainWaiters
        drainWaiters.removeAll()
        for waiter in waiters { waiter() }
    }

    /// Closes the connection now: pending calls fail `UNAVAILABLE`, handlers are cancelled.
    public func close() {
        reactor.preconditionInLoop()
        closeNow(RPCError(.unavailable, "session closed locally"), transportError: nil)
    }

    /// Begins a graceful shutdown: sends GoAway(`reason`), accepts no new channels, lets
    /// calls in flight finish, then closes; after `grace` it closes regardless.
    public func shutdownGracefully(grace: Duration = .seconds(5), reason: GoAwayReason = .shutdown, message: String = "shutting down") {
        reactor.preconditionInLoop()
        if phase == .handshaking {
            // Nothing may be sent before the peer's Hello, and nothing is in flight: just close.
            closeNow(RPCError(.unavailable, "session shut down during the handshake"), transportError: nil)
            return
        }
        guard phase == .ready else { return }
        if goAwaySentLastChannel == nil {
            goAwaySentLastChannel = highestPeerChannel
            sendGoAway(reason, message)
            transport.flush()
        }
        if closeIfDrained() { return }
        graceTimer?.cancel()
        graceTimer = reactor.schedule(after: grace) { [self] in
            closeNow(RPCError(.unavailable, "graceful shutdown: grace period over"), transportError: nil)
        }
    }

    // MARK: Lifecycle (async API)

    /// Starts the session and waits for the handshake to finish.
    public func start() async throws(RPCError) {
        let result = await reactor.suspendOnLoop(orIfShutDown: Result<Void, RPCError>.failure(Session.reactorGone)) { continuation in
            self.start { continuation.resume(returning: $0) }
        }
        try result.get()
    }

    /// What async calls fail with once the session's reactor has shut down.
    package static let reactorGone = RPCError(.unavailable, "the session's reactor has shut down")

    /// Waits until the session has closed.
    public func closed() async {
        // A reactor that shut down closed its sessions on the way.
        await reactor.suspendOnLoop(orIfShutDown: ()) { continuation in self.onClose { continuation.resume() } }
    }

    /// Sends GoAway, waits for calls in flight (at most `grace`), and closes.
    public func shutdownGracefully(grace: Duration = .seconds(5)) async {
        reactor.executeOrRunNow { self.shutdownGracefully(grace: grace, reason: .shutdown, message: "shutting down") }
        await closed()
    }

    /// Closes the session from any thread and waits until it has closed.
    public func closeAndWait() async {
        reactor.executeOrRunNow { self.close() }
        await closed()
    }

    // MARK: Sending

    func takeMessageID() -> UInt64 {
        let id = nextMessageID
        nextMessageID &+= 1
        return id
    }

    func sendControl(_ verb: ControlVerb, _ message: some WireMessage) {
        // Most control messages (OpenChannel, CancelChannel, GrantCredits) fit the writer's
        // inline storage: no allocation.
        var writer = PostcardWriter()
        message.encode(into: &writer)
        sendControlPayload(verb, writer.payload)
    }

    func sendControlPayload(_ verb: ControlVerb, _ payload: Payload) {
        var frame = Frame(
            descriptor: FrameDescriptor(messageID: takeMessageID(), channelID: 0, methodID: verb.rawValue, flags: .control),
            payload: payload)
        frame.prepareForSending()
        send(frame)
    }

    @inline(__always)
    func send(_ frame: consuming Frame) {
        statistics.framesSent &+= 1
        transport.send(frame)
    }

    /// Flushes the transport once the current unit of loop work is done, so that frames
    /// produced together leave in one write.
    func scheduleFlush() {
        guard !flushScheduled else { return }
        flushScheduled = true
        reactor.requestFlush(self)
    }

    // MARK: Closing

    /// Closes when GoAway was exchanged and nothing is in flight; returns whether it closed.
    @discardableResult
    func closeIfDrained() -> Bool {
        guard phase != .closed, goAwaySentLastChannel != nil || peerGoAway != nil else { return false }
        guard incoming.isEmpty && outgoing.isEmpty else { return false }
        closeNow(RPCError(.unavailable, peerGoAway.map { "peer went away: \($0.message)" } ?? "session shut down"), transportError: nil)
        return true
    }

    /// Fails the connection with a protocol error: GoAway(protocolError), then close.
    func failProtocol(_ why: String) {
        guard phase != .closed else { return }
        statistics.protocolErrors &+= 1
        logger.warning("protocol error, closing: \(why)")
        if phase == .ready {
            sendGoAway(.protocolError, why)
        } else {
            sendControl(.closeChannel, CloseChannel(channelID: 0, reason: .error(why)))
        }
        closeNow(RPCError(.protocolError, why), transportError: TransportError(.protocolViolation, why))
    }

    /// Sends GoAway(`reason`, last channel = the highest the peer opened, `message`), the
    /// message shortened when the whole would exceed the peer's max payload (which the peer
    /// must reject): around it go the reason, the last channel id, its length and the empty
    /// metadata.
    func sendGoAway(_ reason: GoAwayReason, _ message: String) {
        let lastChannel = highestPeerChannel
        let writer = Session.encoding(fitting: Int(effectiveLimits.maxPayloadSize), message: message) { message, writer in
            GoAway(reason: reason, lastChannelID: lastChannel, message: message).encode(into: &writer)
        }
        sendControlPayload(.goAway, writer.payload)
    }

    /// Rejects the handshake: CloseChannel(0, error), then close.
    func rejectHandshake(_ why: String) {
        guard phase != .closed else { return }
        logger.warning("handshake rejected: \(why)")
        sendControl(.closeChannel, CloseChannel(channelID: 0, reason: .error(why)))
        closeNow(RPCError(.unavailable, "handshake failed: \(why)"), transportError: TransportError(.protocolViolation, why))
    }

    /// Tears the session down: the transport closes, every pending call fails with `error`,
    /// every handler is cancelled, waiters run. Idempotent.
    func closeNow(_ error: RPCError, transportError: TransportError?) {
        guard phase != .closed else { return }
        phase = .closed
        closeReason = error
        handshakeTimer?.cancel()
        graceTimer?.cancel()
        keepaliveTimer?.cancel()
        pongDeadlineTimer?.cancel()
        if let shutdownHookID { reactor.removeShutdownHook(shutdownHookID) }
        transport.close(error: transportError)
        let calls = outgoing
        outgoing.removeAll()
        for call in calls.values { call.fail(error) }
        let served = incoming
        incoming.removeAll()
        spareIncoming.removeAll()
        for call in served.values { call.abandon() }
        for body in queuedUntilReady.takeAll() { body() }  // each finds the session closed and fails
        let waiters = readyWaiters
        readyWaiters.removeAll()
        for waiter in waiters { waiter(.failure(error)) }
        let pings = pingWaiters
        pingWaiters.removeAll()
        for waiter in pings.values { waiter(.failure(error)) }
        scheduleDrainWaiters()
        let closers = closeWaiters
        closeWaiters.removeAll()
        for closer in closers { closer() }
    }
}

extension Session {
    /// Sets the services this side serves on a session built by hand (for example over a
    /// transport from `ShmTransport.connect`), replacing those passed to the initializer.
    ///
    /// Call it before ``start(onReady:)``, from the thread that created the session or its
    /// loop: the Hello lists this side's methods, so they are fixed once the handshake
    /// begins. Two methods with one id are an error, and nothing changes then.
    public func setService(_ services: any RPCService...) throws(RPCError) {
        try setServices(services)
    }

    /// Like ``setService(_:)``, with an array.
    public func setServices(_ services: [any RPCService]) throws(RPCError) {
        guard phase == .idle else {
            throw RPCError(.failedPrecondition, "setService must be called before start(): the Hello has already listed this side's methods")
        }
        router = try ServiceRouter(services)
    }
}

extension Session: ReactorFlushable {
    func reactorFlush() {
        flushScheduled = false
        transport.flush()
    }
}

extension Session: CustomStringConvertible {
    public var description: String { "Session(\(role), \(transport.peerDescription))" }
}

/// What waits for the handshake: the calls and notifications made before it ended, and the
/// bytes their frames will take (two descriptors — OpenChannel and the request — and the
/// request's payload each), which ``Session/queuedOutputBytes`` counts.
struct UntilReady {
    private var work: [() -> Void] = []
    private(set) var bytes = 0

    var isEmpty: Bool { work.isEmpty }

    mutating func append(request: Payload, _ body: @escaping () -> Void) {
        work.append(body)
        bytes += 2 * FrameDescriptor.size + request.count
    }

    /// Everything queued, in order, taken out (the session is ready, or closed): the caller
    /// runs it once this access has ended, since each body may look at the queue again
    /// (``Session/queuedOutputBytes``, a call made while the session closes).
    mutating func takeAll() -> [() -> Void] {
        defer {
            work = []
            bytes = 0
        }
        return work
    }
}
