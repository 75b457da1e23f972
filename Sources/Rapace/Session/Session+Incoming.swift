// Calls the peer makes to this side: OpenChannel, the request, dispatch to a service
// (inline when it serves the method synchronously, else on a task that runs on the
// reactor), deadlines, and the response or stream items.

extension Session {
    func receiveOpenChannel(_ message: OpenChannel, messageID: UInt64) {
        let id = message.channelID
        let peerParity: UInt32 = role == .initiator ? 0 : 1  // the peer's ids: even if we initiated
        guard id != 0, id % 2 == peerParity else {
            sendCancel(id, .protocolViolation)
            return
        }
        guard id > highestPeerChannel else {
            // Channel ids are never reused within a connection.
            sendCancel(id, .protocolViolation)
            return
        }
        skippedPeerChannels.noteOpened(id, after: highestPeerChannel)
        highestPeerChannel = id
        if let last = goAwaySentLastChannel, id > last {
            sendCancel(id, .resourceExhausted)
            return
        }
        let limit = configuration.limits.maxChannels
        if limit != 0 && incoming.count >= Int(limit) {
            sendCancel(id, .resourceExhausted)
            return
        }
        let pendingLimit = configuration.limits.maxPendingCalls
        if pendingLimit != 0 && incoming.count >= Int(pendingLimit) {
            sendCancel(id, .resourceExhausted)
            return
        }
        var metadataDeadline: Deadline?
        if let entry = message.metadata.first(where: { $0.key == Session.deadlineMetadataKey }), entry.value.count == 4 {
            let ms = UInt32(entry.value[0]) | UInt32(entry.value[1]) << 8 | UInt32(entry.value[2]) << 16 | UInt32(entry.value[3]) << 24
            metadataDeadline = Deadline(monotonicNanoseconds: Sys.monotonicNanoseconds().addingSaturating(UInt64(ms) * 1_000_000))
        }
        // Without negotiated credit flow control (feature bit 2) the caller grants nothing: no limit.
        let credits = effectiveFeatures.contains(.creditFlowControl) ? message.initialCredits : .max
        if let spare = spareIncoming.popLast() {
            spare.reuse(channelID: id, kind: message.kind, metadata: message.metadata, metadataDeadline: metadataDeadline, initialCredits: credits)
            incoming[id] = spare
        } else {
            incoming[id] = IncomingCall(channelID: id, kind: message.kind, metadata: message.metadata, metadataDeadline: metadataDeadline, initialCredits: credits)
        }
    }

    /// Finished calls kept for reuse by ``receiveOpenChannel(_:messageID:)``.
    static let spareIncomingLimit = 8

    /// Keeps `call` for a later channel if it has finished and nothing else references it
    /// (a handler that kept its ``ServerContext`` keeps the call: it is simply not reused).
    func recycle(_ call: inout IncomingCall) {
        // Only answered-inline calls come here: finished, no task (`reuse` checks it).
        // A handler that closed the session has emptied the spares for good: keep nothing.
        guard phase != .closed, spareIncoming.count < Session.spareIncomingLimit, isKnownUniquelyReferenced(&call) else { return }
        spareIncoming.append(call)
    }

    func sendCancel(_ channelID: UInt32, _ reason: CancelReason) {
        sendControl(.cancelChannel, CancelChannel(channelID: channelID, reason: reason))
        scheduleFlush()
    }

    func receiveRequest(_ frame: Frame) {
        let descriptor = frame.descriptor
        let channelID = descriptor.channelID
        guard var call = incoming[channelID] else {
            // Our ids and the peer's differ in parity, so only a miss here can be one of ours.
            if outgoing[channelID] != nil {
                // The peer answered our call without RESPONSE: that call cannot complete.
                cancelOutgoing(channelID, reason: .protocolViolation, error: RPCError(.protocolError, "peer sent a frame without RESPONSE on our call channel \(channelID)"))
                return
            }
            let peerParity: UInt32 = role == .initiator ? 0 : 1
            if channelID % 2 == peerParity && channelID <= highestPeerChannel && !skippedPeerChannels.contains(channelID) {
                return  // a channel that was opened and has ended (cancelled, refused): late frames are dropped
            }
            sendCancel(channelID, .protocolViolation)  // DATA on a channel never opened
            return
        }
        if descriptor.flags.contains(.credits) {
            // §1.2: `credit_grant` is valid for this frame's channel. A caller may grant along
            // with its request, or in a frame that carries nothing else (no DATA).
            grant(descriptor.creditGrant, to: call)
            if !descriptor.flags.contains(.data) { return }
        }
        guard !call.requestReceived else {
            // A second request frame: client streaming is not part of this protocol version.
            incoming[channelID] = nil
            call.abandon()
            sendCancel(channelID, .protocolViolation)
            closeIfDrained()
            return
        }
        call.requestReceived = true
        call.requestMessageID = descriptor.messageID
        call.methodID = descriptor.methodID
        call.noReply = descriptor.flags.contains(.noReply)

        guard let entry = router.lookup(descriptor.methodID) else {
            finishIncoming(call, .failure(RPCError(.unimplemented, "unknown method 0x\(String(descriptor.methodID, radix: 16, uppercase: true))")))
            return
        }
        let methodKind = entry.descriptor.kind  // one field: copying the descriptor would copy its strings
        switch (methodKind, call.kind) {
        case (.serverStream, .stream), (.unary, .call), (.notification, .call):
            break
        default:
            finishIncoming(call, .failure(RPCError(.invalidMethod, "\(entry.descriptor.fullName) is a \(methodKind) method; the channel was opened as \(call.kind)")))
            return
        }

        var deadline = call.metadataDeadline
        if descriptor.hasDeadline && transport.sharesMonotonicClock {
            let wire = Deadline(monotonicNanoseconds: descriptor.deadlineNanoseconds)
            if deadline == nil || wire < deadline! { deadline = wire }
        }
        // Only a call with a deadline reads the clock here; its timer is armed from this reading.
        var now: UInt64 = 0
        if let deadline {
            now = Sys.monotonicNanoseconds()
            if deadline.monotonicNanoseconds <= now {
                finishIncoming(call, .failure(RPCError(.deadlineExceeded, "deadline passed before the handler started")))
                return
            }
        }

        call.serve(entry, deadline: deadline)
        let request = frame.payload
        let context: ServerContext
        if methodKind == .serverStream {
            context = ServerContext(session: self, call: call)
        } else {
            switch answerImmediately(entry, request, call: call) {
            case .answered(let outcome):
                // A handler that never suspends answered right here, on the loop thread: no
                // task, and no deadline timer (none could fire before it returned).
                finishIncoming(call, outcome)
                recycle(&call)
                return
            case .notServed(let built):
                context = built
            }
        }
        startHandler(entry, request, context: context, now: now)
    }

    /// Runs the service's async handler for the context's call on a task, with its deadline
    /// timer (armed from `now`, the clock read when the deadline was checked).
    private func startHandler(_ entry: ServiceRouter.Entry, _ request: Payload, context: ServerContext, now: UInt64) {
        let call = context.call
        if let deadline = call.deadline {
            call.timer = reactor.schedule(atMonotonicNanoseconds: deadline.monotonicNanoseconds, now: now) { [self] in
                finishIncoming(call, .failure(RPCError(.deadlineExceeded, "deadline exceeded while \(entry.descriptor.fullName) was running")))
            }
        }
        // The handler starts right here, on the loop thread, and runs until it first suspends
        // (no enqueue, no extra loop turn); it resumes on the reactor afterwards. It captures
        // three references (entry, context's session and call) and the request.
        call.task = Task.immediate(executorPreference: reactor) {
            let outcome: Result<Payload, RPCError>
            do {
                outcome = .success(try await entry.service.handle(method: entry.descriptor.id, request: request, context: context))
            } catch {
                outcome = .failure(RPCError(handlerError: error))
            }
            let session = context.session
            if session.reactor.inLoop {
                session.finishIncoming(context.call, outcome)
            } else {
                session.reactor.execute { session.finishIncoming(context.call, outcome) }
            }
        }
    }

    private enum ImmediateAnswer {
        case answered(Result<Payload, RPCError>)
        /// The service serves the method on a task: the context built for asking, for it.
        case notServed(ServerContext)
    }

    /// Asks the route's service to serve the call synchronously (``RPCService/handleImmediately(method:request:context:)``).
    /// Everything before has put the session in a consistent state for re-entrant calls. When
    /// it answered, the context dies here, so the call record can be reused.
    private func answerImmediately(_ entry: ServiceRouter.Entry, _ request: Payload, call: IncomingCall) -> ImmediateAnswer {
        let context = ServerContext(session: self, call: call)
        do {
            guard let result = try entry.service.handleImmediately(method: entry.descriptor.id, request: request, context: context) else { return .notServed(context) }
            return .answered(.success(result))
        } catch {
            return .answered(.failure(RPCError(handlerError: error)))
        }
    }

    /// Sends the handler's outcome (unless the call was abandoned) and forgets the call.
    ///
    /// A result that comes after the call's deadline is answered `DEADLINE_EXCEEDED` instead
    /// (spec 6.2): a handler that never suspended (synchronous, or async without an await)
    /// ran past it with nothing able to interrupt it, and the caller has given up by then.
    func finishIncoming(_ call: IncomingCall, _ outcome: Result<Payload, RPCError>) {
        guard !call.finished else { return }
        call.finished = true
        call.failPendingSend(RPCError(.cancelled, "the call finished"))
        call.timer?.cancel()
        call.timer = nil
        if case .failure = outcome { call.task?.cancel() }
        incoming[call.channelID] = nil
        if phase == .ready && !call.noReply {
            for barrier in replyBarriers { barrier() }
            var outcome = outcome
            if case .success = outcome, let deadline = call.deadline, deadline.monotonicNanoseconds <= Sys.monotonicNanoseconds() {
                outcome = .failure(RPCError(.deadlineExceeded, "the handler returned after the call's deadline; its result was dropped"))
            }
            sendCallResult(outcome, messageID: call.requestMessageID, channelID: call.channelID, methodID: call.methodID, endsStream: call.kind == .stream)
        }
        closeIfDrained()
    }

    /// Sends the final frame of a served call: its CallResult (the body on success, unless
    /// `endsStream`: a stream's terminal frame carries none), never more than the peer accepts.
    func sendCallResult(_ outcome: Result<Payload, RPCError>, messageID: UInt64, channelID: UInt32, methodID: UInt32, endsStream: Bool) {
        var writer = PostcardWriter()
        var flags: FrameFlags = [.data, .endOfStream, .response]
        var outcome = outcome
        let maxPayload = effectiveLimits.maxPayloadSize
        // The checks of a body that is sent (a stream's terminal frame drops it).
        if !endsStream, case .success(let body) = outcome, body.borrowsSentBuffer {
            // Its bytes are the peer's now: the caller gets why instead of whatever they hold.
            outcome = .failure(Self.sentBufferRefusal)
        } else if !endsStream, case .success(let body) = outcome, maxPayload != 0, body.count + 16 > Int(maxPayload) {
            // CallResult adds at most 15 bytes around the body; never send what the peer must reject.
            outcome = .failure(RPCError(.resourceExhausted, "result of \(body.count) bytes exceeds the max payload size of \(maxPayload) bytes"))
        }
        var result: Payload?
        switch outcome {
        case .success(let body):
            if endsStream {
                CallResult(status: .ok, body: nil).encode(into: &writer)
            } else {
                result = CallResult.successPayload(body: body)
            }
        case .failure(var error):
            flags.insert(.error)
            if error.code == .ok {
                // ERROR is set exactly when the code is not 0: an "OK" failure is a bug in the handler.
                error = RPCError(.unknown, "handler failed with status 0: \(error.message)")
            }
            CallResult(status: error.status, trailers: error.trailers, body: nil).encode(into: &writer)
            if maxPayload != 0 && writer.count > Int(maxPayload) {
                // Never send what the peer must reject: keep the code and the message
                // (shortened if need be), drop the details and trailers.
                let code = error.code
                writer = Session.encoding(fitting: Int(maxPayload), message: error.message) { message, writer in
                    CallResult(status: Status(code: code, message: message), body: nil).encode(into: &writer)
                }
            }
        }
        var frame = Frame(
            descriptor: FrameDescriptor(messageID: messageID, channelID: channelID, methodID: methodID, flags: flags),
            payload: result ?? writer.payload)
        frame.prepareForSending()
        send(frame)
        scheduleFlush()
    }

    /// What `encode` writes with `message`, or, when that is more than `maxPayload` bytes (a
    /// limit the peer must enforce), with `message` ``shortened(_:toFit:)`` so that the whole
    /// fits. The room left for the message is measured by encoding an empty one (whose
    /// length prefix is one byte): no field sizes are counted by hand.
    static func encoding(fitting maxPayload: Int, message: String, _ encode: (String, inout PostcardWriter) -> Void) -> PostcardWriter {
        var writer = PostcardWriter()
        encode(message, &writer)
        guard maxPayload != 0 && writer.count > maxPayload else { return writer }
        var around = PostcardWriter()
        encode("", &around)
        writer = PostcardWriter()
        encode(shortened(message, toFit: maxPayload - (around.count - 1)), &writer)
        return writer
    }

    /// `text` shortened for a message that the peer's max payload bounds: at most its first
    /// 200 bytes, marked " (truncated)", cut at a Unicode scalar boundary, so that the
    /// message and its length prefix take at most `room` bytes (empty when not even the mark
    /// fits).
    static func shortened(_ text: String, toFit room: Int) -> String {
        let mark = " (truncated)"
        // The length prefix takes one byte below 128, two up to the 212 bytes written at most.
        let bytes = min(200 + mark.utf8.count, room - (room > 128 ? 2 : 1))
        guard bytes > mark.utf8.count else { return "" }
        return String(text.prefix(utf8Bytes: bytes - mark.utf8.count)) + mark
    }

    /// Sends one stream item for `call`, suspending while the caller has granted no room.
    nonisolated(nonsending) func sendStreamItem(_ item: Payload, on call: IncomingCall) async throws {
        let reactor = self.reactor
        let result = await withTaskCancellationHandler {
            await reactor.suspendOnLoop(with: (self, item, call), orIfShutDown: Result<Void, RPCError>.failure(Session.reactorGone)) { state, continuation in
                state.0.enqueueStreamItem(state.1, on: state.2, continuation)
            }
        } onCancel: {
            reactor.execute { call.failPendingSend(RPCError(.cancelled, "call cancelled")) }
        }
        try result.get()
    }

    private func enqueueStreamItem(_ item: Payload, on call: IncomingCall, _ continuation: UnsafeContinuation<Result<Void, RPCError>, Never>) {
        if call.finished || phase != .ready {
            continuation.resume(returning: .failure(RPCError(.cancelled, "the call is no longer active")))
            return
        }
        if call.noReply {
            // Items are responses, and a NO_REPLY request gets none (spec 6.1): nobody reads
            // them. Failing the send (rather than dropping the item) stops the handler, which
            // would otherwise produce for nobody, never suspending if credit never ran out.
            continuation.resume(returning: .failure(RPCError(.cancelled, "the caller asked for no reply (NO_REPLY): stream items are not sent")))
            return
        }
        if item.borrowsSentBuffer {
            continuation.resume(returning: .failure(Self.sentBufferRefusal))
            return
        }
        let size = item.count
        let maxPayload = effectiveLimits.maxPayloadSize
        if maxPayload != 0 && size > Int(maxPayload) {
            continuation.resume(returning: .failure(RPCError(.resourceExhausted, "stream item of \(size) bytes exceeds the max payload size of \(maxPayload) bytes")))
            return
        }
        if call.pendingSend != nil {
            continuation.resume(returning: .failure(RPCError(.failedPrecondition, "send the next stream item after the previous one completed")))
            return
        }
        call.pendingSend = (item, continuation)
        if size > Int(call.creditCeiling) {
            // More than the caller has ever granted at once: it fits only if the caller grants
            // ahead of consuming (or opened with no credit and grants now). Wait for that, but
            // not forever: a caller that only grants what it consumes never will.
            // The timer holds the call (no weak reference: that would allocate a side table);
            // every end of the pending send cancels it (`takePendingSend`).
            let timeout = configuration.creditGrowthTimeout
            call.creditTimer = reactor.schedule(after: timeout) { [call] in
                call.failPendingSend(RPCError(
                    .resourceExhausted,
                    "stream item of \(size) bytes exceeds the caller's window of \(call.creditCeiling) bytes, and no grant raised it within \(timeout)"))
            }
            return
        }
        sendPendingStreamItem(call)
    }

    /// Sends the parked item if its credit is there, and resumes its handler.
    func sendPendingStreamItem(_ call: IncomingCall) {
        guard let pending = call.takePendingSend(fitting: call.credits) else { return }
        if pending.item.borrowsSentBuffer {
            // Sent elsewhere while it waited for credit (checked when it was queued, too).
            pending.continuation.resume(returning: .failure(Self.sentBufferRefusal))
            return
        }
        call.credits -= UInt32(pending.item.count)
        var frame = Frame(
            descriptor: FrameDescriptor(messageID: call.requestMessageID, channelID: call.channelID, methodID: call.methodID, flags: [.data, .response]),
            payload: pending.item)
        frame.prepareForSending()
        send(frame)
        scheduleFlush()
        pending.continuation.resume(returning: .success(()))
    }
}
