// Calls this side makes: the callback API (loop thread) and the async facade over it.

extension Session {
    // MARK: Callback API

    /// Starts a unary call. Loop thread only; `completion` runs on the loop exactly once.
    @discardableResult
    public func startCall(_ methodID: UInt32, request: Payload, options: CallOptions = .default, completion: @escaping (Result<Payload, RPCError>) -> Void) -> CallHandle {
        reactor.preconditionInLoop()
        let handle = CallHandle(session: self)
        beginCall(handle, methodID, request, options, .unary(completion))
        return handle
    }

    /// Starts a server-streaming call. Loop thread only. Items and the end arrive through
    /// the returned stream (iterate it from any task).
    public func startServerStream(_ methodID: UInt32, request: Payload, options: CallOptions = .default) -> RawStream {
        reactor.preconditionInLoop()
        let handle = CallHandle(session: self)
        let receiver = StreamReceiver(handle: handle, window: max(options.streamWindow, 1))
        beginCall(handle, methodID, request, options, .stream(receiver))
        return RawStream(receiver: receiver)
    }

    /// Sends a notification (`NO_REPLY`). Loop thread only. Returns an error when it could
    /// not be sent (closed session, payload too large, peer going away).
    @discardableResult
    public func sendNotification(_ methodID: UInt32, request: Payload) -> RPCError? {
        reactor.preconditionInLoop()
        if phase == .idle || phase == .handshaking {
            queuedUntilReady.append(request: request) { [self] in _ = sendNotification(methodID, request: request) }
            return nil
        }
        if let refusal = refusalForNewCall(request: request, countsAsPending: false) { return refusal }
        let channelID = allocateChannelID()
        sendControl(.openChannel, OpenChannel(channelID: channelID, kind: .call))
        var frame = Frame(
            descriptor: FrameDescriptor(messageID: takeMessageID(), channelID: channelID, methodID: methodID, flags: [.data, .endOfStream, .noReply]),
            payload: request)
        frame.prepareForSending()
        send(frame)
        scheduleFlush()
        return nil
    }

    // MARK: Async API

    /// Makes a unary call and returns the postcard-encoded result.
    ///
    /// Cancelling the calling task sends CancelChannel(clientCancel), which cancels the
    /// remote handler, and throws `CANCELLED`.
    ///
    /// It runs on the caller's executor (`nonisolated(nonsending)`) instead of switching to
    /// the generic executor: from a task on the reactor the call begins inline on the loop
    /// thread. (From an actor the call still leaves it once: `withTaskCancellationHandler`
    /// runs its operation on the generic executor in Swift 6.3.)
    public nonisolated(nonsending) func call(_ methodID: UInt32, request: Payload, options: CallOptions = .default) async throws(RPCError) -> Payload {
        let handle = CallHandle(session: self)
        let reactor = self.reactor
        let result = await withTaskCancellationHandler {
            // On the loop already (a task preferring the reactor) the call begins inline, and
            // the closure, capturing nothing, allocates nothing.
            await reactor.suspendOnLoop(
                with: (handle, methodID, request, options), orIfShutDown: Result<Payload, RPCError>.failure(Session.reactorGone)
            ) { call, continuation in
                call.0.session.beginCall(call.0, call.1, call.2, call.3, .resume(continuation))
            }
        } onCancel: {
            reactor.execute { handle.cancel() }
        }
        return try result.get()
    }

    /// Starts a server-streaming call; iterate the result for the items.
    public func serverStream(_ methodID: UInt32, request: Payload, options: CallOptions = .default) -> RawStream {
        let handle = CallHandle(session: self)
        let receiver = StreamReceiver(handle: handle, window: max(options.streamWindow, 1))
        reactor.executeOrRunNow {
            self.beginCall(handle, methodID, request, options, .stream(receiver))
        }
        return RawStream(receiver: receiver)
    }

    /// Sends a notification and returns once it is queued for the transport.
    public nonisolated(nonsending) func notify(_ methodID: UInt32, request: Payload) async throws(RPCError) {
        let result = await reactor.suspendOnLoop(with: (self, methodID, request), orIfShutDown: Session.reactorGone as RPCError?) { call, continuation in
            continuation.resume(returning: call.0.sendNotification(call.1, request: call.2))
        }
        if let result { throw result }
    }

    // MARK: Machinery

    func allocateChannelID() -> UInt32 {
        let id = nextChannelID
        nextChannelID &+= 2
        return id
    }

    /// Why a payload borrowing a sent ``ShmBuffer`` is not sent (``Payload/borrowsSentBuffer``).
    static let sentBufferRefusal = RPCError(
        .failedPrecondition, "the payload borrows an ShmBuffer that was already sent, whose slots belong to the peer now: allocate a new buffer to send again")

    /// Why a new call cannot start now, or nil when it can.
    func refusalForNewCall(request: Payload, countsAsPending: Bool) -> RPCError? {
        if phase == .closed { return closeReason ?? RPCError(.unavailable, "session closed") }
        if request.borrowsSentBuffer { return Self.sentBufferRefusal }
        if goAwaySentLastChannel != nil { return RPCError(.unavailable, "session is shutting down") }
        if let peerGoAway { return RPCError(.unavailable, "peer is going away (\(peerGoAway.reason)): \(peerGoAway.message)") }
        let maxPayload = effectiveLimits.maxPayloadSize
        if maxPayload != 0 && request.count > Int(maxPayload) {
            return RPCError(.resourceExhausted, "request of \(request.count) bytes exceeds the max payload size of \(maxPayload) bytes")
        }
        if countsAsPending {
            let pendingLimit = effectiveLimits.maxPendingCalls
            if pendingLimit != 0 && outgoing.count >= Int(pendingLimit) {
                return RPCError(.resourceExhausted, "\(outgoing.count) calls pending (limit \(pendingLimit))")
            }
            let channelLimit = effectiveLimits.maxChannels
            if channelLimit != 0 && outgoing.count >= Int(channelLimit) {
                return RPCError(.resourceExhausted, "\(outgoing.count) channels open (limit \(channelLimit))")
            }
        }
        if nextChannelID > UInt32.max - 2 { return RPCError(.resourceExhausted, "channel ids exhausted on this connection") }
        return nil
    }

    func beginCall(_ handle: CallHandle, _ methodID: UInt32, _ request: Payload, _ options: CallOptions, _ kind: OutgoingCall) {
        if handle.cancelled {
            kind.fail(RPCError(.cancelled, "call cancelled by the caller"))
            return
        }
        switch phase {
        case .idle, .handshaking:
            queuedUntilReady.append(request: request) { [self] in beginCall(handle, methodID, request, options, kind) }
            return
        case .ready, .closed:
            break
        }
        if let refusal = refusalForNewCall(request: request, countsAsPending: true) {
            kind.fail(refusal)
            return
        }
        // Only a call with a deadline reads the clock.
        let now = options.hasDeadline ? Sys.monotonicNanoseconds() : 0
        let deadline = options.effectiveDeadline(now: now)
        if let deadline, deadline.monotonicNanoseconds <= now {
            kind.fail(RPCError(.deadlineExceeded, "deadline already passed before the call started"))
            return
        }
        let channelID = allocateChannelID()
        handle.channelID = channelID
        var deadlineField = FrameDescriptor.noDeadline
        var deadlineEntry: MetadataEntry?
        if let deadline {
            if transport.sharesMonotonicClock {
                deadlineField = deadline.monotonicNanoseconds
            } else {
                let remaining = deadline.monotonicNanoseconds - now  // > 0: checked above
                let remainingMs = UInt32(clamping: remaining.dividedRoundingUp(by: 1_000_000))
                deadlineEntry = MetadataEntry(Session.deadlineMetadataKey, withUnsafeBytes(of: remainingMs.littleEndian) { Array($0) })
            }
        }
        let channelKind: ChannelKind
        let credits: UInt32
        switch kind {
        case .unary, .resume:
            channelKind = .call
            credits = .max
        case .stream(let receiver):
            channelKind = .stream
            credits = receiver.window
        }
        // Encoded from the options in place: no OpenChannel value, no copy of the metadata.
        var open = PostcardWriter()
        OpenChannel.encode(channelID: channelID, kind: channelKind, metadata: options.metadata, extra: deadlineEntry, initialCredits: credits, into: &open)
        sendControlPayload(.openChannel, open.payload)
        var flags: FrameFlags = [.data, .endOfStream]
        if options.highPriority { flags.insert(.highPriority) }
        var frame = Frame(
            descriptor: FrameDescriptor(messageID: takeMessageID(), channelID: channelID, methodID: methodID, flags: flags, deadlineNanoseconds: deadlineField),
            payload: request)
        frame.prepareForSending()
        send(frame)
        handle.completion = kind
        outgoing[channelID] = handle
        if let deadline {
            handle.timer = reactor.schedule(atMonotonicNanoseconds: deadline.monotonicNanoseconds, now: now) { [self] in
                cancelOutgoing(channelID, reason: .deadlineExceeded, error: RPCError(.deadlineExceeded, "deadline exceeded"))
            }
        }
        scheduleFlush()
    }

    /// Fails an outgoing call locally and tells the peer with CancelChannel.
    func cancelOutgoing(_ channelID: UInt32, reason: CancelReason, error: RPCError) {
        guard let call = outgoing.removeValue(forKey: channelID) else { return }
        if phase == .ready {
            sendControl(.cancelChannel, CancelChannel(channelID: channelID, reason: reason))
            scheduleFlush()
        }
        call.fail(error)
        closeIfDrained()
    }

    /// Grants stream credits back to the peer.
    func grantCredits(_ bytes: UInt32, on channelID: UInt32) {
        guard phase == .ready, outgoing[channelID] != nil else { return }
        sendControl(.grantCredits, GrantCredits(channelID: channelID, bytes: bytes))
        scheduleFlush()
    }

    func receiveResponse(_ frame: Frame) {
        let channelID = frame.descriptor.channelID
        guard let call = outgoing[channelID] else { return }  // late or unknown: dropped
        guard case .stream(let receiver)? = call.completion, !frame.descriptor.flags.contains(.endOfStream) else {
            // A unary call's result, or a stream's terminal frame (a call in `outgoing` always
            // has its completion; completing a stream's finishes its receiver).
            outgoing.remove(channelID)
            call.finish()?.complete(Session.decodeCallResult(frame.payload))
            closeIfDrained()
            return
        }
        let size = UInt32(clamping: frame.payload.count)
        guard receiver.accept(size) || !effectiveFeatures.contains(.creditFlowControl) else {
            cancelOutgoing(channelID, reason: .protocolViolation, error: RPCError(.protocolError, "stream credit overrun: item of \(size) bytes with \(receiver.creditRemaining) bytes of credit left"))
            return
        }
        let inFlight = receiver.window - receiver.creditRemaining
        if inFlight > statistics.maxStreamBytesInFlight { statistics.maxStreamBytesInFlight = inFlight }
        receiver.deliver(frame.payload)
    }

    /// Decodes a CallResult: the body on success (borrowed from the payload where it can
    /// be), the status as an error otherwise.
    static func decodeCallResult(_ payload: Payload) -> Result<Payload, RPCError> {
        // The common answer, OK with no message, details or trailers, is read in place: code,
        // message length, details length and trailer count are four zero bytes, then the
        // body's option tag. Anything else takes the full decoder below.
        let common = payload.withUnsafeBytes { raw -> Range<Int>?? in
            guard raw.count >= 5, raw[0] == 0, raw[1] == 0, raw[2] == 0, raw[3] == 0 else { return nil }
            switch raw[4] {
            case 0: return raw.count == 5 ? .some(nil) : nil
            case 1:
                var reader = PostcardReader(UnsafeRawBufferPointer(rebasing: raw[5...]))
                guard let length = try? reader.readCount(minimumElementSize: 1), 5 + reader.offset + length == raw.count else { return nil }
                return .some((5 + reader.offset)..<raw.count)
            default: return nil
            }
        }
        if let common { return .success(common.map { payload.slice($0) } ?? .empty) }
        let parsed = payload.withUnsafeBytes { raw -> Result<(Status, [MetadataEntry], Range<Int>?), PostcardError> in
            do throws(PostcardError) {
                var reader = PostcardReader(raw)
                let status = try Status(from: &reader)
                let trailers = try reader.readMetadata()
                var body: Range<Int>?
                if try reader.readOptionalTag() {
                    let length = try reader.readCount(minimumElementSize: 1)
                    let start = reader.offset
                    _ = try reader.readRawBytes(count: length)
                    body = start..<(start + length)
                }
                try reader.finish()
                return .success((status, trailers, body))
            } catch {
                return .failure(error)
            }
        }
        switch parsed {
        case .failure(let error):
            return .failure(RPCError(.decodeError, "undecodable CallResult: \(error.message)"))
        case .success(let (status, trailers, body)):
            if status.code != .ok { return .failure(RPCError(status: status, trailers: trailers)) }
            guard let body else { return .success(.empty) }
            return .success(payload.slice(body))
        }
    }

    /// OpenChannel metadata key carrying the remaining deadline budget over TCP/WebSocket.
    public static let deadlineMetadataKey = "rapace.deadline_remaining_ms"
}

extension Session: RPCCaller {
    /// Makes a unary call to `method`, by its id, as `call(method.id, request:options:)` does.
    public nonisolated(nonsending) func call(_ method: MethodDescriptor, request: Payload, options: CallOptions) async throws(RPCError) -> Payload {
        try await call(method.id, request: request, options: options)
    }

    /// Starts a server-streaming call to `method`, by its id, as
    /// `serverStream(method.id, request:options:)` does.
    public func serverStream(_ method: MethodDescriptor, request: Payload, options: CallOptions) -> RawStream {
        serverStream(method.id, request: request, options: options)
    }

    /// Sends a notification to `method`, by its id, as `notify(method.id, request:)` does.
    public nonisolated(nonsending) func notify(_ method: MethodDescriptor, request: Payload) async throws(RPCError) {
        try await notify(method.id, request: request)
    }
}
