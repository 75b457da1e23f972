/// A server-streaming call whose ``RawStream`` is handed out before the call starts: the
/// caller iterates it at once, and the owner later starts the call on a session it picks
/// then, or fails it. For callers that wait for a session, such as a plugin host while its
/// process restarts.
///
/// Keep the `PendingServerStream` and give the ``RawStream`` away: it must not be kept by
/// the owner, since dropping it is one way its consumer cancels. A consumer that cancels
/// (or drops the stream) before the call started ends the stream with `CANCELLED` and runs
/// the ``onCancel(_:)`` hook, so the owner can forget the stream.
///
/// Loop-confined: create it anywhere, call everything else on the reactor's loop thread.
package final class PendingServerStream: @unchecked Sendable {
    // @unchecked Sendable: `receiver` is loop-confined, and every method below checks that
    // it runs on the loop.
    private let receiver: StreamReceiver

    private init(receiver: StreamReceiver) { self.receiver = receiver }

    /// A stream whose items will come from a call on a session of `reactor`, and the
    /// handle that starts it. `options` only sets the stream's credit window here; pass
    /// them again to ``start(on:_:request:options:)``.
    package static func make(on reactor: Reactor, options: CallOptions) -> (stream: RawStream, pending: PendingServerStream) {
        let receiver = StreamReceiver(reactor: reactor, window: max(options.streamWindow, 1))
        return (RawStream(receiver: receiver), PendingServerStream(receiver: receiver))
    }

    /// Whether the stream already ended: its consumer cancelled or dropped it, or it was
    /// failed or started and completed.
    package var isFinished: Bool {
        receiver.reactor.preconditionInLoop()
        return receiver.isFinished
    }

    /// Runs `body` (once, on the loop) if the consumer cancels or drops the stream before
    /// ``start(on:_:request:options:)`` or ``fail(_:)``. Replaces an earlier hook.
    package func onCancel(_ body: @escaping () -> Void) {
        receiver.reactor.preconditionInLoop()
        guard !receiver.isFinished else { return }
        receiver.onCancelBeforeStart = body
    }

    /// Starts the call on `session`, which must run on the stream's reactor; its items and
    /// its end reach the stream from now on. A no-op when the stream already ended.
    package func start(on session: Session, _ methodID: UInt32, request: Payload, options: CallOptions) {
        receiver.reactor.preconditionInLoop()
        guard !receiver.isFinished else { return }
        let handle = CallHandle(session: session)
        receiver.bind(handle)
        session.beginCall(handle, methodID, request, options, .stream(receiver))
    }

    /// Ends the stream with `error` instead of starting its call. A no-op once the call
    /// started (its own end counts then) or the stream ended.
    package func fail(_ error: RPCError) {
        receiver.reactor.preconditionInLoop()
        guard receiver.handle == nil else { return }
        receiver.finish(.failure(error))
    }
}
