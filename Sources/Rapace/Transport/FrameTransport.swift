/// A connection that moves rapace frames. Transports are callback-driven and confined to
/// their reactor's loop thread: every method is called there, and every handler callback
/// comes from there.
///
/// A transport delivers frames in order, reports the end of the connection exactly once
/// (``FrameTransportHandler/transportDidClose(_:)``), and never calls its handler after that.
/// Framing errors (spec 8.x) are reported through
/// ``FrameTransportHandler/transportDidFailFraming(_:)``: the transport stops reading and
/// the session tells the peer (GoAway) and closes it.
public protocol FrameTransport: AnyObject {
    /// The reactor whose loop runs this transport.
    var reactor: Reactor { get }
    /// True when both peers share this kernel's CLOCK_MONOTONIC (SHM, in-memory, Unix
    /// sockets): deadlines then travel in `deadline_ns`, otherwise in OpenChannel metadata.
    var sharesMonotonicClock: Bool { get }
    /// Largest payload the transport accepts from the peer; checked before allocating.
    var maxIncomingPayload: UInt32 { get set }
    /// A human-readable description of the peer, for logs.
    var peerDescription: String { get }
    /// The largest payload this transport can carry at all (the SHM pool), or nil when it
    /// has no limit of its own. A session never advertises or accepts more.
    var payloadCapacity: UInt32? { get }
    /// Bytes accepted by ``send(_:)`` that have not reached the peer yet (descriptor and
    /// payload, or the stream encoding): what is queued because the socket or the ring is
    /// full. Producers that can drop or delay work (log forwarding) watch it to stay bounded.
    var queuedOutputBytes: Int { get }
    /// Starts delivering frames to `handler` (held strongly until the transport closes).
    func start(handler: any FrameTransportHandler)
    /// Queues a frame. The frame must have been prepared (`Frame.prepareForSending()`).
    /// Frames queued after the transport closed are dropped. The frame is consumed: a
    /// transport that queues it keeps it without taking another reference (its payload
    /// bytes may still be copied: see each transport).
    func send(_ frame: consuming Frame)
    /// Writes queued frames now (transports may also flush on their own).
    func flush()
    /// Closes the connection. Pending output is flushed best-effort first. The handler
    /// receives `transportDidClose` with `error` (nil for a clean close).
    func close(error: TransportError?)
}

extension FrameTransport {
    public var payloadCapacity: UInt32? { nil }
}

/// Receives a transport's frames and its end.
public protocol FrameTransportHandler: AnyObject {
    /// One frame arrived.
    func transportDidReceive(_ frame: Frame)
    /// A batch of frames (one read) has been delivered: a good time to flush replies.
    func transportDidFinishReceiveBatch()
    /// The connection ended: `nil` for a clean close by either side, else why.
    func transportDidClose(_ error: TransportError?)
    /// The peer broke the framing rules. The transport has stopped reading; the handler
    /// tells the peer (GoAway) and closes the transport.
    func transportDidFailFraming(_ error: TransportError)
    /// The transport gave up on `frame` (it took it in ``FrameTransport/send(_:)``) and
    /// will not send it. Shared memory does this when no slots came free for the payload
    /// within its stall limit; the frames of the same channel queued behind it go too (the
    /// peer must not see a channel with a hole in it), and each is reported here after it,
    /// in order. The handler fails what a frame belonged to (`RESOURCE_EXHAUSTED`, naming
    /// `reason`) and tells the peer; the connection goes on.
    func transportDidRefuse(_ frame: Frame, reason: String)
    /// Output that had to wait (the socket or the ring was full, or no slots were free) has
    /// all reached the peer: ``FrameTransport/queuedOutputBytes`` is 0 again. Called once per
    /// backlog, from inside a flush; defer work that sends more.
    func transportDidDrainOutput()
}

extension FrameTransportHandler {
    public func transportDidDrainOutput() {}
}

/// A transport-level failure.
public struct TransportError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Value: Hashable, Sendable { case closed, protocolViolation, io, connectFailed, timeout }
        let value: Value
        /// The peer closed or the connection was closed locally.
        public static let closed = Code(value: .closed)
        /// The peer sent bytes that break the framing rules.
        public static let protocolViolation = Code(value: .protocolViolation)
        /// An I/O error from the operating system.
        public static let io = Code(value: .io)
        /// A connection attempt failed.
        public static let connectFailed = Code(value: .connectFailed)
        /// An operation did not finish in time.
        public static let timeout = Code(value: .timeout)
        public var description: String { "\(value)" }
    }

    /// What kind of failure.
    public var code: Code
    /// What happened, for logs and errors (naming the address or operation, where there is one).
    public var message: String
    /// The underlying system error, if any.
    public var systemError: SystemError?

    /// An error of kind `code`, with the system error underneath it if there is one.
    public init(_ code: Code, _ message: String, systemError: SystemError? = nil) {
        self.code = code
        self.message = message
        self.systemError = systemError
    }

    public var description: String { "\(code): \(message)" }
}
