/// A call this side made, waiting for its response (loop-confined).
final class OutgoingCall {
    enum Kind {
        case unary((Result<Payload, RPCError>) -> Void)
        case stream(StreamReceiver)
    }

    let channelID: UInt32
    let methodID: UInt32
    let kind: Kind
    var timer: ReactorTimer?

    init(channelID: UInt32, methodID: UInt32, kind: Kind) {
        self.channelID = channelID
        self.methodID = methodID
        self.kind = kind
    }

    /// Completes the call with an error. The caller has already removed it from the table.
    func fail(_ error: RPCError) {
        timer?.cancel()
        timer = nil
        OutgoingCall.fail(kind, error)
    }

    /// Completes a call of `kind` with an error (also one that never got a channel).
    static func fail(_ kind: Kind, _ error: RPCError) {
        switch kind {
        case .unary(let completion): completion(.failure(error))
        case .stream(let receiver): receiver.finish(.failure(error))
        }
    }
}

/// A handle on a call started with the callback API, for cancelling it.
public final class CallHandle: @unchecked Sendable {
    // @unchecked Sendable: fields are only touched on the session's loop thread.
    // Strong on purpose: a weak reference would make every retain/release of the session
    // take the runtime's slow path. A handle lives as long as its call or stream.
    let session: Session
    var channelID: UInt32?
    var cancelled = false

    init(session: Session) { self.session = session }

    /// Cancels the call: it fails with `CANCELLED` and CancelChannel(clientCancel) tells the
    /// peer to cancel its handler. A no-op once the call has completed. Loop thread only.
    public func cancel() {
        guard !cancelled else { return }
        cancelled = true
        guard let channelID else { return }
        session.reactor.assertInLoop()
        session.cancelOutgoing(channelID, reason: .clientCancel, error: RPCError(.cancelled, "call cancelled by the caller"))
    }
}

/// Calls into a peer's services. ``Session`` conforms; generated and hand-written clients
/// are written against this protocol so they work over any session (or anything that
/// forwards to one, such as a plugin handle that survives restarts).
public protocol RPCCaller: Sendable {
    /// A unary call: returns the postcard-encoded result.
    func call(_ method: MethodDescriptor, request: Payload, options: CallOptions) async throws(RPCError) -> Payload
    /// A server-streaming call: the items, postcard-encoded.
    func serverStream(_ method: MethodDescriptor, request: Payload, options: CallOptions) -> RawStream
    /// A notification (`NO_REPLY`): returns once sent.
    func notify(_ method: MethodDescriptor, request: Payload) async throws(RPCError)
}
