/// How a call this side made completes: a unary completion, or the receiver of a stream's
/// items (loop-confined).
enum OutgoingCall {
    /// A unary call of the callback API.
    case unary((Result<Payload, RPCError>) -> Void)
    /// A unary call of the async API: its task resumes with the result (no closure to allocate).
    case resume(UnsafeContinuation<Result<Payload, RPCError>, Never>)
    case stream(StreamReceiver)

    /// Completes a unary call.
    func complete(_ result: Result<Payload, RPCError>) {
        switch self {
        case .unary(let completion): completion(result)
        case .resume(let continuation): continuation.resume(returning: result)
        case .stream(let receiver): receiver.finish(result.map { _ in () })
        }
    }

    /// Completes the call with an error (also one that never got a channel).
    func fail(_ error: RPCError) {
        complete(.failure(error))
    }
}

/// A handle on a call started with the callback API, for cancelling it.
///
/// The handle is also the session's record of the call while it is in flight (the value in
/// `Session.outgoing`): one object per call, not two.
public final class CallHandle: @unchecked Sendable {
    // @unchecked Sendable: fields are only touched on the session's loop thread.
    // @exclusivity(unchecked) on them for the same reason: one thread, and no access stays
    // open while other code runs (`finish()` takes the completion out before it is called),
    // so the runtime check (`swift_beginAccess`) could never fire.
    // Strong on purpose: a weak reference would make every retain/release of the session
    // take the runtime's slow path. A handle lives as long as its call or stream.
    let session: Session
    @exclusivity(unchecked) var channelID: UInt32?
    @exclusivity(unchecked) var cancelled = false
    /// How the call completes; set while the call is in `Session.outgoing`, nil before it
    /// started and once it completed (a stream's receiver refers back to its handle: the
    /// cycle ends with the call).
    @exclusivity(unchecked) var completion: OutgoingCall?
    /// The deadline timer, while the call is in flight.
    @exclusivity(unchecked) var timer: ReactorTimer?

    init(session: Session) { self.session = session }

    /// Takes the completion and stops the deadline timer: the call is over. The caller has
    /// already removed it from the table.
    func finish() -> OutgoingCall? {
        timer?.cancel()
        timer = nil
        return completion.take()  // moved out: no reference-count update
    }

    /// Completes the call with an error. The caller has already removed it from the table.
    func fail(_ error: RPCError) {
        finish()?.fail(error)
    }

    /// Cancels the call: it fails with `CANCELLED` and CancelChannel(clientCancel) tells the
    /// peer to cancel its handler. A no-op once the call has completed. Loop thread only.
    public func cancel() {
        // Checked before touching any state: the handle is Sendable, its state is not.
        session.reactor.preconditionInLoop()
        guard !cancelled else { return }
        cancelled = true
        guard let channelID else { return }
        session.cancelOutgoing(channelID, reason: .clientCancel, error: RPCError(.cancelled, "call cancelled by the caller"))
    }
}

/// Calls into a peer's services. ``Session`` conforms; generated and hand-written clients
/// are written against this protocol so they work over any session (or anything that
/// forwards to one, such as a plugin handle that survives restarts).
///
/// `call` and `notify` are `nonisolated(nonsending)`: they run on their caller's executor,
/// so a layer of client code adds no executor switch. A conformer declares its own the same
/// way; one declared without the attribute still conforms, through a thunk that switches to
/// the generic executor (for a task with an executor preference, that executor) first.
public protocol RPCCaller: Sendable {
    /// A unary call: returns the postcard-encoded result.
    nonisolated(nonsending) func call(_ method: MethodDescriptor, request: Payload, options: CallOptions) async throws(RPCError) -> Payload
    /// A server-streaming call: the items, postcard-encoded.
    func serverStream(_ method: MethodDescriptor, request: Payload, options: CallOptions) -> RawStream
    /// A notification (`NO_REPLY`): returns once sent.
    nonisolated(nonsending) func notify(_ method: MethodDescriptor, request: Payload) async throws(RPCError)
}
