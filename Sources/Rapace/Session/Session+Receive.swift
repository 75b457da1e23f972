import Logging

// The receive path: every frame the transport delivers passes through
// `transportDidReceive`, which checks it against the handshake state and the flag rules,
// then routes control verbs, responses to our calls, and requests to our services.

extension Session: FrameTransportHandler {
    public func transportDidReceive(_ frame: Frame) {
        statistics.framesReceived &+= 1
        let descriptor = frame.descriptor
        switch phase {
        case .idle, .closed:
            return
        case .handshaking:
            if descriptor.channelID == 0, descriptor.methodID == ControlVerb.closeChannel.rawValue,
                let close = try? CloseChannel(decoding: frame.payload.bytes), close.channelID == 0
            {
                // The peer rejected our Hello: report its reason, answer nothing.
                let why: String
                if case .error(let text) = close.reason { why = text } else { why = "closed by the peer" }
                logger.warning("peer rejected the handshake: \(why)")
                closeNow(RPCError(.unavailable, "handshake rejected by the peer: \(why)"), transportError: nil)
                return
            }
            guard descriptor.channelID == 0, descriptor.methodID == ControlVerb.hello.rawValue,
                descriptor.flags.contains(.control)
            else {
                rejectHandshake("expected Hello as the first frame, got channel \(descriptor.channelID) method \(descriptor.methodID) flags \(descriptor.flags)")
                return
            }
            receiveHello(frame.payload)
        case .ready:
            if descriptor.channelID == 0 {
                guard descriptor.flags.contains(.control) else {
                    failProtocol("frame on channel 0 without the CONTROL flag")
                    return
                }
                receiveControl(descriptor, frame.payload)
            } else {
                if descriptor.flags.contains(.control) {
                    failProtocol("CONTROL flag on channel \(descriptor.channelID)")
                    return
                }
                if descriptor.flags.contains(.response) {
                    receiveResponse(frame)
                } else {
                    receiveRequest(frame)
                }
            }
        }
    }

    public func transportDidFinishReceiveBatch() {
        transport.flush()
    }

    public func transportDidRefuse(_ frame: Frame, reason: String) {
        guard phase != .closed else { return }
        let descriptor = frame.descriptor
        let channelID = descriptor.channelID
        statistics.framesRefused &+= 1
        if channelID == 0 {
            // The control channel cannot skip a message and stay consistent.
            logger.warning("a control message could not be sent, closing: \(reason)")
            closeNow(RPCError(.resourceExhausted, "a control message could not be sent: \(reason)"), transportError: nil)
            return
        }
        logger.warning("a frame on channel \(channelID) could not be sent: \(reason)")
        // What the peer is told fits a descriptor's inline bytes: it must not need slots.
        let short = RPCError(.resourceExhausted, "pool full")
        if descriptor.flags.contains(.response) {
            if let call = incoming[channelID] {
                // A stream item: the stream ends here with RESOURCE_EXHAUSTED.
                finishIncoming(call, .failure(short))
            } else if descriptor.flags.contains(.endOfStream), phase == .ready {
                // The result of a call already answered: the caller gets the error instead.
                sendCallResult(.failure(short), messageID: descriptor.messageID, channelID: channelID, methodID: descriptor.methodID, endsStream: false)
            }
        } else if outgoing[channelID] != nil {
            // The request of a call this side makes.
            cancelOutgoing(channelID, reason: .resourceExhausted, error: RPCError(.resourceExhausted, "the request could not be sent: \(reason)"))
        } else if phase == .ready {
            // A notification: nothing waits for it, but the peer opened its channel.
            sendCancel(channelID, .resourceExhausted)
        }
    }

    public func transportDidDrainOutput() {
        // Reported from inside a flush: the waiters (which may send) run on a turn of their own.
        scheduleDrainWaiters()
    }

    public func transportDidClose(_ error: TransportError?) {
        guard phase != .closed else { return }
        let reason: RPCError
        if let error {
            reason = RPCError(.unavailable, "connection lost: \(error.message)")
            if error.code == .protocolViolation {
                statistics.protocolErrors &+= 1
                logger.warning("closing: \(error.message)")
            }
        } else {
            reason = RPCError(.unavailable, "connection closed by the peer")
        }
        closeNow(reason, transportError: error)
    }

    public func transportDidFailFraming(_ error: TransportError) {
        failProtocol(error.message)
    }

    // MARK: Handshake

    func receiveHello(_ payload: Payload) {
        let decoded = payload.withUnsafeBytes { raw -> Result<Hello, PostcardError> in
            do throws(PostcardError) { return .success(try Hello(decoding: raw)) } catch { return .failure(error) }
        }
        let hello: Hello
        switch decoded {
        case .success(let value): hello = value
        case .failure(let error):
            rejectHandshake("undecodable Hello: \(error.message)")
            return
        }
        if hello.protocolVersion >> 16 != Hello.currentVersion >> 16 {
            rejectHandshake("unsupported protocol version \(hello.protocolVersion >> 16).\(hello.protocolVersion & 0xFFFF) (this peer speaks 1.x)")
            return
        }
        if hello.role == role {
            rejectHandshake("both peers claim role \(role)")
            return
        }
        let ours = FeatureSet([.callEnvelope, .creditFlowControl, .ping])
        let missing = hello.requiredFeatures.subtracting(ours)
        if !missing.isEmpty {
            rejectHandshake("peer requires unsupported feature bits 0x\(String(missing.rawValue, radix: 16))")
            return
        }
        let ourRequired = FeatureSet([.callEnvelope])
        if !ourRequired.isSubset(of: hello.supportedFeatures) {
            rejectHandshake("peer does not support required feature bits 0x\(String(ourRequired.subtracting(hello.supportedFeatures).rawValue, radix: 16))")
            return
        }
        var ids = Set<UInt32>()
        for method in hello.methods where !ids.insert(method.methodID).inserted {
            rejectHandshake("peer lists method id 0x\(String(method.methodID, radix: 16)) twice")
            return
        }
        peerHello = hello
        effectiveFeatures = ours.intersection(hello.supportedFeatures)
        effectiveLimits = configuration.limits.negotiated(with: hello.limits)
        phase = .ready
        handshakeTimer?.cancel()
        handshakeTimer = nil
        startKeepaliveIfConfigured()
        for body in queuedUntilReady.takeAll() { body() }
        let waiters = readyWaiters
        readyWaiters.removeAll()
        for waiter in waiters { waiter(.success(())) }
        scheduleFlush()
        scheduleDrainWaiters()  // they waited for what was queued until now
    }

    // MARK: Control channel

    func receiveControl(_ descriptor: FrameDescriptor, _ payload: Payload) {
        guard let verb = ControlVerb(rawValue: descriptor.methodID) else {
            if descriptor.methodID < 100 {
                failProtocol("unknown control verb \(descriptor.methodID)")
            }
            return  // verbs of 100 and up are ignored
        }
        if verb == .ping || verb == .pong {
            guard payload.count == 8 else {
                failProtocol("\(verb) payload of \(payload.count) bytes (expected 8)")
                return
            }
            if verb == .ping {
                sendControlPayload(.pong, payload)
                scheduleFlush()
            } else {
                receivePong(payload)
            }
            return
        }
        do throws(PostcardError) {
            try payload.withUnsafeBytes { (raw) throws(PostcardError) in
                switch verb {
                case .hello:
                    failProtocol("second Hello after the handshake")
                case .openChannel:
                    receiveOpenChannel(try OpenChannel(decoding: raw), messageID: descriptor.messageID)
                case .closeChannel:
                    receiveCloseChannel(try CloseChannel(decoding: raw))
                case .cancelChannel:
                    receiveCancelChannel(try CancelChannel(decoding: raw))
                case .grantCredits:
                    receiveGrantCredits(try GrantCredits(decoding: raw))
                case .goAway:
                    receiveGoAway(try GoAway(decoding: raw))
                case .ping, .pong:
                    break
                }
            }
        } catch {
            failProtocol("undecodable \(verb) payload: \(error.message)")
        }
    }

    func receiveCloseChannel(_ message: CloseChannel) {
        if message.channelID == 0 {
            let why: String
            if case .error(let text) = message.reason { why = text } else { why = "peer closed the connection" }
            logger.info("peer closed the session: \(why)")
            closeNow(RPCError(.unavailable, "peer closed the session: \(why)"), transportError: nil)
            return
        }
        if let call = outgoing.removeValue(forKey: message.channelID) {
            switch message.reason {
            case .normal: call.fail(RPCError(.cancelled, "peer closed channel \(message.channelID)"))
            case .error(let text): call.fail(RPCError(.aborted, text))
            }
            closeIfDrained()
        } else if let call = incoming.removeValue(forKey: message.channelID) {
            call.abandon()
            closeIfDrained()
        }
    }

    func receiveCancelChannel(_ message: CancelChannel) {
        if let call = incoming.removeValue(forKey: message.channelID) {
            // The caller gave up: cancel the handler and send nothing more on this channel.
            call.abandon()
            closeIfDrained()
        } else if let call = outgoing.removeValue(forKey: message.channelID) {
            let text: String
            switch message.reason {
            case .resourceExhausted: text = "peer refused channel \(message.channelID): resource exhausted"
            case .protocolViolation: text = "peer reports a protocol violation on channel \(message.channelID)"
            default: text = "peer cancelled channel \(message.channelID) (\(message.reason))"
            }
            call.fail(RPCError(message.reason.statusCode, text))
            closeIfDrained()
        }
        // Cancel after EOS, or for a channel we never knew: a no-op.
    }

    func receiveGrantCredits(_ message: GrantCredits) {
        guard let call = incoming[message.channelID] else { return }
        grant(message.bytes, to: call)
    }

    /// Adds credit to a stream this side serves (GrantCredits, or a frame's CREDITS flag) and
    /// sends the item waiting for it, if it now fits.
    func grant(_ bytes: UInt32, to call: IncomingCall) {
        call.grant(bytes)
        sendPendingStreamItem(call)
    }

    func receiveGoAway(_ message: GoAway) {
        logger.info("peer sent GoAway(\(message.reason), last channel \(message.lastChannelID)): \(message.message)")
        peerGoAway = message
        // Calls the peer will not process fail now; the rest finish normally.
        let refused = outgoing.entries.filter { $0.key > message.lastChannelID }
        for (id, call) in refused {
            outgoing[id] = nil
            call.fail(RPCError(.unavailable, "peer is going away (\(message.reason)): \(message.message)"))
        }
        if message.reason == .protocolError {
            closeNow(RPCError(.unavailable, "peer reported a protocol error: \(message.message)"), transportError: nil)
            return
        }
        closeIfDrained()
    }

    // MARK: Keepalive

    func startKeepaliveIfConfigured() {
        guard let keepalive = configuration.keepalive, effectiveFeatures.contains(.ping) else { return }
        keepaliveTimer = reactor.schedule(after: keepalive.interval) { [self] in
            sendKeepalivePing()
        }
    }

    func sendKeepalivePing() {
        guard phase == .ready, let keepalive = configuration.keepalive else { return }
        pingCounter &+= 1
        outstandingPing = pingCounter
        var writer = PostcardWriter(reservingCapacity: 8)
        withUnsafeBytes(of: pingCounter.littleEndian) { writer.writeRawBytes($0) }
        sendControlPayload(.ping, writer.payload)
        transport.flush()
        pongDeadlineTimer = reactor.schedule(after: keepalive.timeout) { [self] in
            guard outstandingPing != nil else { return }
            logger.warning("no Pong within \(keepalive.timeout): closing")
            closeNow(RPCError(.unavailable, "keepalive: no Pong within \(keepalive.timeout)"), transportError: TransportError(.timeout, "keepalive timeout"))
        }
    }

    func receivePong(_ payload: Payload) {
        let value = payload.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        if let waiter = pingWaiters.removeValue(forKey: value) {
            waiter(.success(()))
            return
        }
        guard let expected = outstandingPing, value == expected else { return }
        outstandingPing = nil
        pongDeadlineTimer?.cancel()
        pongDeadlineTimer = nil
        startKeepaliveIfConfigured()
    }

    /// Sends a Ping and calls `completion` with the round-trip time when the Pong arrives
    /// (or an error when the session closes first). Loop thread only.
    public func ping(completion: @escaping (Result<Duration, RPCError>) -> Void) {
        reactor.preconditionInLoop()
        guard phase == .ready else {
            completion(.failure(closeReason ?? RPCError(.unavailable, "session not ready")))
            return
        }
        let started = Sys.monotonicNanoseconds()
        pingCounter &+= 1
        let token = pingCounter
        var writer = PostcardWriter(reservingCapacity: 8)
        withUnsafeBytes(of: token.littleEndian) { writer.writeRawBytes($0) }
        pingWaiters[token] = { result in
            completion(result.map { Duration.nanoseconds(Int64(Sys.monotonicNanoseconds() - started)) })
        }
        sendControlPayload(.ping, writer.payload)
        scheduleFlush()
    }
}
