#if canImport(Glibc)
import Glibc
#endif

/// The WebSocket transport (spec 8.2, RFC 6455) over a socket whose opening handshake is done.
///
/// Every rapace frame travels as one binary message: the 64-byte descriptor followed by the
/// payload, no length prefix. A message under 64 bytes, or over 64 + ``maxIncomingPayload``
/// (close 1009), a text message (close 1003) or a WebSocket protocol violation (close 1002,
/// e.g. an unmasked frame from a client) is a framing error: the transport stops reading,
/// reports ``FrameTransportHandler/transportDidFailFraming(_:)``, and when the session closes
/// it, sends a Close frame with that code. Ping is answered with Pong; a Close from the peer
/// is echoed and ends the connection. A local ``close(error:)`` sends Close and waits (at most
/// ``closeTimeout``) for the peer's Close before closing the socket; the handler hears
/// `transportDidClose` at once. Client frames are masked with a random key per frame.
///
/// After a framing error the connection is failed as RFC 6455 §7.1.7 says: once the Close
/// is written out, the sending side is shut down, so the peer reads end of file after it (a
/// browser waits for the server to close the TCP connection, §7.1.1, and never closes its
/// side first). Input is still read until the peer's end of file (or its Close, when
/// the failure left the frames in step: a text message, a binary message too short or whose
/// descriptor disagrees with its length), so that closing does not reset the connection
/// before the peer has read our Close; ``closeTimeout`` bounds the wait for a peer that never
/// closes.
///
/// Create one with ``WebSocketListener`` (server side) or
/// ``connect(host:port:path:origin:reactor:timeout:completion:)`` (client side).
/// Loop-confined, like every transport.
public final class WebSocketTransport: FrameTransport, ReactorRegistration {
    /// Which end of the WebSocket connection this is (decides masking).
    ///
    /// `server`: accepted by a ``WebSocketListener``; expects masked frames, sends unmasked
    /// ones. `client`: connected out; masks every frame it sends.
    public enum Role: Sendable { case server, client }

    public let reactor: Reactor
    /// False: a WebSocket peer is assumed to be on another clock (deadlines go in metadata).
    public let sharesMonotonicClock = false
    public let peerDescription: String
    /// Which end this is: `.server` from a ``WebSocketListener``, `.client` from `connect`.
    public let role: Role
    public var maxIncomingPayload: UInt32 {
        didSet { decoder.maxMessageSize = FrameDescriptor.size + Int(maxIncomingPayload) }
    }
    /// How long a local close waits for the peer's Close frame before closing the socket.
    public var closeTimeout: Duration = .seconds(2)

    private let fd: Int32
    private var watcher: IOWatcher?
    private var decoder: WebSocketFrameDecoder
    private var handler: (any FrameTransportHandler)?
    private var output: SocketOutput
    private var maskKeys = MaskKeySource()
    /// The handler has been told the connection ended (or it never started and was closed).
    private var isClosed = false
    /// The socket is closed and the transport unregistered (read by the tests).
    private(set) var isFinished = false
    private var readingStopped = false
    /// Sent Close; waiting for the peer's Close or EOF.
    private var lingering = false
    private var lingerTimer: ReactorTimer?
    /// The close code a framing failure will send.
    private var failureCloseCode: WebSocketCloseCode?
    /// The framing failure left the decoder out of step with the frames (it threw): input is
    /// discarded unread from then on, the peer's Close included.
    private var inputDesynchronised = false
    /// Shut the sending side down once the queued output, which ends with our Close, is
    /// written (a failing close).
    private var shutdownWhenWritten = false
    private var pendingInput: [UInt8]

    /// Wraps a connected, non-blocking socket after the opening handshake. `input` holds
    /// bytes read past the handshake; `output` bytes still to send (the 101 response).
    /// The transport owns (and closes) `fd`. Call on the loop thread.
    init(reactor: Reactor, socket fd: Int32, role: Role, peerDescription: String, input: [UInt8] = [], output: [UInt8] = [], maxIncomingPayload: UInt32 = 16 << 20) {
        reactor.preconditionInLoop()
        self.reactor = reactor
        self.fd = fd
        self.role = role
        self.peerDescription = peerDescription
        self.maxIncomingPayload = maxIncomingPayload
        self.decoder = WebSocketFrameDecoder(expectMasked: role == .server, maxMessageSize: FrameDescriptor.size + Int(maxIncomingPayload))
        self.output = SocketOutput(output)
        self.pendingInput = input
        Sys.setNoDelay(fd)
        self.watcher = IOWatcher(reactor: reactor, fd: fd, onReadable: {}, onWritable: {})
        watcher?.onReadable = { [unowned self] in self.readable() }
        watcher?.onWritable = { [unowned self] in self.flush() }
        reactor.register(self)
        if !output.isEmpty { flushSocket() }
    }

    public func start(handler: any FrameTransportHandler) {
        reactor.preconditionInLoop()
        guard !isClosed else {
            handler.transportDidClose(TransportError(.closed, "transport already closed"))
            return
        }
        self.handler = handler
        watcher?.setReadEnabled(true)
        if !pendingInput.isEmpty {
            decoder.append(pendingInput)
            pendingInput = []
            processInput()
            if !isClosed { handler.transportDidFinishReceiveBatch() }
        }
    }

    public func send(_ frame: consuming Frame) {
        guard !isClosed else { return }
        let length = FrameDescriptor.size + frame.payload.count
        let mask: UInt32? = role == .client ? maskKeys.next() : nil
        WebSocketFrameEncoder.appendHeader(opcode: .binary, length: length, mask: mask, into: &output.bytes)
        let start = output.bytes.count
        frame.appendDescriptorAndPayload(to: &output.bytes)
        if let mask { WebSocketFrameEncoder.applyMask(mask, in: &output.bytes, range: start..<output.bytes.count) }
    }

    public func flush() {
        guard !isFinished else { return }
        flushSocket()
    }

    public var queuedOutputBytes: Int { output.count }

    public func close(error: TransportError?) {
        guard !isClosed else { return }
        isClosed = true
        let handler = self.handler
        self.handler = nil
        if error?.code == .io {
            finish()
        } else {
            let code = failureCloseCode ?? (error == nil ? .normal : error?.code == .protocolViolation ? .protocolError : .goingAway)
            // Failing the connection: the peer learns of the end from our end of file too.
            shutdownWhenWritten = failureCloseCode != nil
            sendControl(.close, WebSocketFrameEncoder.closeBody(code, reason: error?.message ?? ""))
            beginLinger()
        }
        handler?.transportDidClose(error)
    }

    func reactorWillShutDown() {
        if !isClosed {
            isClosed = true
            let handler = self.handler
            self.handler = nil
            finish()
            handler?.transportDidClose(TransportError(.closed, "reactor shut down"))
        } else {
            finish()
        }
    }

    // MARK: internals

    private func sendControl(_ opcode: WebSocketOpcode, _ body: [UInt8]) {
        WebSocketFrameEncoder.appendFrame(opcode: opcode, payload: body, mask: role == .client ? maskKeys.next() : nil, into: &output.bytes)
        flushSocket()
    }

    /// After our Close: keep reading (discarding data) until the peer's Close, EOF or the timeout.
    private func beginLinger() {
        guard !isFinished else { return }
        lingering = true
        readingStopped = false
        watcher?.setReadEnabled(true)
        lingerTimer = reactor.schedule(after: closeTimeout) { [weak self] in self?.finish() }
    }

    /// Closes the socket and unregisters. Idempotent.
    private func finish() {
        guard !isFinished else { return }
        isFinished = true
        lingerTimer?.cancel()
        lingerTimer = nil
        watcher?.close()
        watcher = nil
        Sys.close(fd)
        output.discard()
        reactor.unregister(self)
    }

    private func flushSocket() {
        guard !isFinished, !output.isEmpty else { return }
        do throws(SystemError) {
            switch try output.write(to: fd) {
            case .blocked:
                watcher?.setWriteEnabled(true)
            case .drained(let afterBacklog):
                watcher?.setWriteEnabled(false)
                if shutdownWhenWritten {
                    shutdownWhenWritten = false
                    Sys.shutdownWrite(fd)  // nothing follows our Close
                }
                if afterBacklog && !isClosed { handler?.transportDidDrainOutput() }
            }
        } catch {
            fail(io: TransportError(.io, "write to \(peerDescription) failed: \(error)", systemError: error))
        }
    }

    private func fail(io error: TransportError) {
        if isClosed { finish() } else { close(error: error) }
    }

    private func readable() {
        guard !isFinished, !readingStopped else { return }
        for _ in 0..<16 {
            let read: (count: Int, drained: Bool)?
            do throws(SystemError) {
                read = try decoder.read(from: fd)
            } catch {
                fail(io: TransportError(.io, "read from \(peerDescription) failed: \(error)", systemError: error))
                return
            }
            guard let read else { break }
            if read.count == 0 {
                if isClosed { finish(); return }
                let partial = decoder.hasPartialMessage
                close(error: partial ? TransportError(.protocolViolation, "connection closed inside a WebSocket message") : nil)
                finish()
                return
            }
            // After a framing error that left the decoder out of step, it still holds the bad
            // bytes: while we wait for the peer's EOF (or the timer), its input is discarded.
            if inputDesynchronised {
                decoder.discardBuffered()
                continue
            }
            processInput()
            if isFinished || readingStopped { return }
            if read.drained { break }
        }
        if !isClosed { handler?.transportDidFinishReceiveBatch() }
    }

    private func processInput() {
        var pongs = false
        defer { if pongs { flushSocket() } }
        while !isFinished && !readingStopped {
            let event: WebSocketEvent?
            do throws(WebSocketProtocolError) {
                event = try decoder.next()
            } catch {
                if lingering { finish(); return }
                failFraming(error.closeCode, error.message, desynchronised: true)
                return
            }
            guard let event else { return }
            switch event {
            case .binary(let bytes):
                guard !lingering else { continue }
                deliver(bytes)
            case .text:
                guard !lingering else { continue }
                failFraming(.unsupportedData, "text message (rapace accepts only binary messages)")
            case .ping(let body):
                guard !lingering else { continue }
                WebSocketFrameEncoder.appendFrame(opcode: .pong, payload: body, mask: role == .client ? maskKeys.next() : nil, into: &output.bytes)
                pongs = true
            case .pong:
                continue
            case .close(let code, let reason):
                if lingering { finish(); return }
                // Echo the code, then close (the handler hears a clean close for 1000/1001).
                isClosed = true
                let handler = self.handler
                self.handler = nil
                sendControl(.close, code.map { WebSocketFrameEncoder.closeBody($0, reason: "") } ?? [])
                finish()
                let clean = code == nil || code == .normal || code == .goingAway
                handler?.transportDidClose(clean ? nil : TransportError(.closed, "peer closed the WebSocket with code \(code!.rawValue)\(reason.isEmpty ? "" : ": \(reason)")"))
                return
            }
        }
    }

    private func deliver(_ bytes: [UInt8]) {
        guard bytes.count >= FrameDescriptor.size else {
            failFraming(.protocolError, "binary message of \(bytes.count) bytes is shorter than the 64-byte descriptor")
            return
        }
        let payloadLength = bytes.count - FrameDescriptor.size
        let descriptor = bytes.withUnsafeBytes { FrameDescriptor(decoding: $0.baseAddress!) }
        // The message array is ours: the payload shares it instead of copying.
        let payload = payloadLength <= FrameDescriptor.inlineCapacity
            ? bytes.withUnsafeBytes { Payload(inline: UnsafeRawBufferPointer(rebasing: $0[FrameDescriptor.size...])) }
            : Payload(storage: .array(bytes[FrameDescriptor.size...]))
        let frame = Frame(descriptor: descriptor, payload: payload)
        guard Int(frame.descriptor.payloadLength) == payloadLength else {
            failFraming(.protocolError, "descriptor payload_len \(frame.descriptor.payloadLength) differs from message length − 64 = \(payloadLength)")
            return
        }
        handler?.transportDidReceive(frame)
    }

    /// Stops reading and reports the violation; the close that follows sends `code`.
    /// `desynchronised`: the decoder threw, so what it holds and what follows cannot be
    /// parsed as frames (otherwise, the failure was a whole message rapace refuses).
    private func failFraming(_ code: WebSocketCloseCode, _ message: String, desynchronised: Bool = false) {
        readingStopped = true
        watcher?.setReadEnabled(false)
        failureCloseCode = code
        inputDesynchronised = desynchronised
        let error = TransportError(.protocolViolation, "WebSocket close \(code.rawValue): \(message)")
        if let handler { handler.transportDidFailFraming(error) } else { close(error: error) }
    }
}
