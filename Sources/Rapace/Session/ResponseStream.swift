/// Receives the items of one server stream (loop-confined) and grants credits back as the
/// consumer takes them.
final class StreamReceiver: @unchecked Sendable {
    // @unchecked Sendable: every field is touched only on the session's loop thread;
    // iterators reach it through `reactor.suspendOnLoop(with:orIfShutDown:_:)`.
    let reactor: Reactor
    /// The call, once it started; nil while a ``PendingServerStream`` waits for a session.
    private(set) var handle: CallHandle?
    /// Bytes of item payload the caller accepts before granting more.
    let window: UInt32
    /// Bytes the peer may still send.
    private(set) var creditRemaining: UInt32
    private var consumedUngranted: UInt32 = 0
    private var items: [Payload] = []
    private var head = 0
    private var terminal: Result<Void, RPCError>?
    private var waiter: UnsafeContinuation<Result<Payload?, RPCError>, Never>?
    /// Runs once if the consumer cancels before the call started (see ``PendingServerStream``).
    var onCancelBeforeStart: (() -> Void)?

    /// A receiver for a call that starts now.
    init(handle: CallHandle, window: UInt32) {
        self.reactor = handle.session.reactor
        self.handle = handle
        self.window = window
        self.creditRemaining = window
    }

    /// A receiver whose call starts later, on a session of `reactor` (``bind(_:)``).
    init(reactor: Reactor, window: UInt32) {
        self.reactor = reactor
        self.window = window
        self.creditRemaining = window
    }

    /// Whether the stream has ended (completed, failed or cancelled by the consumer).
    var isFinished: Bool { terminal != nil }

    /// Attaches the call that feeds this receiver, which was created without one.
    func bind(_ handle: CallHandle) {
        precondition(self.handle == nil, "rapace: a stream receiver is bound to one call only")
        precondition(handle.session.reactor === reactor, "rapace: a stream must start on a session of its own reactor")
        self.handle = handle
        onCancelBeforeStart = nil
    }

    /// Whether an item of `size` bytes fits the credit the caller granted; takes it if so.
    func accept(_ size: UInt32) -> Bool {
        guard size <= creditRemaining else { return false }
        creditRemaining -= size
        return true
    }

    func deliver(_ item: Payload) {
        if let waiter {
            self.waiter = nil
            consumed(item.count)
            waiter.resume(returning: .success(item))
        } else {
            items.append(item)
        }
    }

    func finish(_ result: Result<Void, RPCError>) {
        guard terminal == nil else { return }
        terminal = result
        onCancelBeforeStart = nil
        if let waiter, head == items.count {
            self.waiter = nil
            waiter.resume(returning: result.map { nil })
        }
    }

    /// Hands the next item (or the end) to `continuation`, now or when it arrives.
    func next(_ continuation: UnsafeContinuation<Result<Payload?, RPCError>, Never>) {
        if head < items.count {
            let item = items[head]
            head += 1
            if head == items.count {
                items.removeAll(keepingCapacity: true)
                head = 0
            }
            consumed(item.count)
            continuation.resume(returning: .success(item))
        } else if let terminal {
            continuation.resume(returning: terminal.map { nil })
        } else if waiter != nil {
            continuation.resume(returning: .failure(RPCError(.failedPrecondition, "a stream can only be iterated by one task at a time")))
        } else {
            waiter = continuation
        }
    }

    /// Returns consumed bytes to the peer in batches of half the window.
    private func consumed(_ count: Int) {
        consumedUngranted &+= UInt32(clamping: count)
        guard terminal == nil, consumedUngranted >= max(window / 2, 1) else { return }
        let grant = consumedUngranted
        consumedUngranted = 0
        creditRemaining &+= grant
        if let handle, let channelID = handle.channelID {
            handle.session.grantCredits(grant, on: channelID)
        }
    }

    /// The consumer gave up: cancel the call, or tell the owner of a call not started yet.
    func cancel() {
        guard terminal == nil else { return }
        if let handle {
            handle.cancel()
        } else if let hook = onCancelBeforeStart {
            onCancelBeforeStart = nil
            hook()
        }
        finish(.failure(RPCError(.cancelled, "stream cancelled by the caller")))
    }
}

/// Cancels the stream when the last reference to the sequence and its iterators goes away.
final class StreamLifetime: Sendable {
    let receiver: StreamReceiver
    init(receiver: StreamReceiver) { self.receiver = receiver }
    deinit {
        let receiver = self.receiver
        receiver.reactor.execute { receiver.cancel() }
    }
}

/// The items of a server-streaming call, postcard-encoded, in order.
///
/// Iterate it from one task at a time. Credits flow back to the server as items are
/// consumed, so a slow consumer slows the server down instead of buffering without bound.
/// Cancelling the iterating task, or dropping the stream before its end, cancels the call.
/// The iteration throws ``RPCError`` when the call fails.
public struct RawStream: AsyncSequence, Sendable {
    public typealias Element = Payload
    let lifetime: StreamLifetime

    init(receiver: StreamReceiver) { lifetime = StreamLifetime(receiver: receiver) }

    public func makeAsyncIterator() -> Iterator { Iterator(lifetime: lifetime) }

    /// Iterates the items: ``next()`` waits for the next item on the session's loop (taking
    /// it grants credit back), returns nil after the last one, and throws ``RPCError`` when
    /// the call fails. Iterators of one stream share its items: iterate with one at a time.
    ///
    /// `next` runs on the iterating task's executor until it suspends (`for try await`
    /// calls ``next(isolation:)``), like `Session.call`.
    public struct Iterator: AsyncIteratorProtocol {
        let lifetime: StreamLifetime

        /// The next item on the caller's isolation (what `for try await` calls).
        public mutating func next(isolation actor: isolated (any Actor)?) async throws -> Payload? {
            try await next()
        }

        public nonisolated(nonsending) mutating func next() async throws -> Payload? {
            let receiver = lifetime.receiver
            let reactor = receiver.reactor
            let result = await withTaskCancellationHandler {
                // The receiver travels as the argument: a closure that captures nothing
                // allocates nothing on the loop.
                await reactor.suspendOnLoop(with: receiver, orIfShutDown: Result<Payload?, RPCError>.failure(Session.reactorGone)) { receiver, continuation in
                    receiver.next(continuation)
                }
            } onCancel: {
                reactor.execute { receiver.cancel() }
            }
            return try result.get()
        }
    }
}

/// The items of a server-streaming call, decoded as `Element`.
public struct RapaceStream<Element: Decodable & Sendable>: AsyncSequence, Sendable {
    /// The postcard-encoded items underneath.
    public let raw: RawStream
    /// The items of `raw`, each decoded as `Element` as it is taken.
    public init(_ raw: RawStream) { self.raw = raw }

    public func makeAsyncIterator() -> Iterator { Iterator(base: raw.makeAsyncIterator()) }

    /// Iterates the decoded items. An item that does not decode as `Element` throws
    /// ``RPCError`` with `DECODE_ERROR`; other failures are those of ``RawStream/Iterator``.
    public struct Iterator: AsyncIteratorProtocol {
        var base: RawStream.Iterator

        /// The next item on the caller's isolation (what `for try await` calls).
        public mutating func next(isolation actor: isolated (any Actor)?) async throws -> Element? {
            try await next()
        }

        public nonisolated(nonsending) mutating func next() async throws -> Element? {
            guard let payload = try await base.next() else { return nil }
            return try payload.withUnsafeBytes { raw in
                do {
                    return try Postcard.decode(Element.self, from: raw)
                } catch let error as PostcardError {
                    throw RPCError(.decodeError, "undecodable stream item: \(error.message)")
                }
            }
        }
    }
}
