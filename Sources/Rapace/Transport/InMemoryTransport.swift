/// Two connected endpoints in one process (spec 8.3): frames are handed over without
/// serialization, in order, with the same handshake and limits as the other transports.
///
/// Each endpoint lives on its own reactor (both may share one). It is the reference
/// transport for tests and experiments.
public final class InMemoryTransport: FrameTransport, ReactorRegistration, @unchecked Sendable {
    // @unchecked Sendable: state is confined to `reactor`'s loop; the peer only reaches it
    // through `reactor.execute`.
    public let reactor: Reactor
    public var sharesMonotonicClock: Bool { true }
    public var maxIncomingPayload: UInt32 = 16 << 20
    public let peerDescription: String

    private weak var peer: InMemoryTransport?
    private var peerReactor: Reactor?
    private var handler: (any FrameTransportHandler)?
    private var outbox: [Frame] = []
    private var outboxBytes = 0
    private var inboxBeforeStart: [Frame] = []
    private var peerClosedBeforeStart = false
    private var isClosed = false
    private var isStarted = false

    private init(reactor: Reactor, name: String) {
        self.reactor = reactor
        self.peerDescription = name
    }

    /// Creates a connected pair: the first endpoint on `first`, the second on `second`.
    public static func makePair(_ first: Reactor, _ second: Reactor) -> (InMemoryTransport, InMemoryTransport) {
        let a = InMemoryTransport(reactor: first, name: "in-memory(b)")
        let b = InMemoryTransport(reactor: second, name: "in-memory(a)")
        a.peer = b
        a.peerReactor = second
        b.peer = a
        b.peerReactor = first
        return (a, b)
    }

    public func start(handler: any FrameTransportHandler) {
        reactor.preconditionInLoop()
        reactor.register(self)
        self.handler = handler
        isStarted = true
        let early = inboxBeforeStart
        inboxBeforeStart.removeAll()
        receive(early)
        if peerClosedBeforeStart { close(error: nil) }
    }

    public func send(_ frame: consuming Frame) {
        guard !isClosed else { return }
        // The peer reads the payload on its own thread, later: an allocated `ShmBuffer` may
        // be sent over its own segment by then, its slots the other process's. Copied now.
        if frame.payload.shmOrigin != nil { frame.payload = frame.payload.ownedCopy() }
        outboxBytes += FrameDescriptor.size + frame.payload.count
        outbox.append(frame)
    }

    /// What waits in the outbox for the next flush (delivery to the peer's loop is a
    /// queued closure, not counted).
    public var queuedOutputBytes: Int { outboxBytes }

    public func flush() {
        guard !isClosed, !outbox.isEmpty, let peer, let peerReactor else { return }
        let frames = SendableBox(outbox)
        outbox.removeAll(keepingCapacity: true)
        outboxBytes = 0
        peerReactor.execute { peer.receive(frames.value) }
    }

    private func receive(_ frames: [Frame]) {
        guard !isClosed else { return }
        guard isStarted else {
            inboxBeforeStart.append(contentsOf: frames)
            return
        }
        for frame in frames {
            guard !isClosed, let handler else { return }
            if frame.payload.count > Int(maxIncomingPayload) {
                handler.transportDidFailFraming(TransportError(.protocolViolation, "frame payload of \(frame.payload.count) bytes exceeds the max payload size of \(maxIncomingPayload) bytes"))
                return
            }
            handler.transportDidReceive(frame)
        }
        handler?.transportDidFinishReceiveBatch()
    }

    public func close(error: TransportError?) {
        guard !isClosed else { return }
        flush()
        isClosed = true
        reactor.unregister(self)
        if let peer, let peerReactor {
            peerReactor.execute { peer.peerDidClose() }
        }
        let handler = self.handler
        self.handler = nil
        handler?.transportDidClose(error)
    }

    private func peerDidClose() {
        if isStarted { close(error: nil) } else { peerClosedBeforeStart = true }
    }

    func reactorWillShutDown() { close(error: TransportError(.closed, "reactor shut down")) }
}
