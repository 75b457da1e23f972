#if canImport(Glibc)
import Glibc
#endif

/// The stream transport (spec 8.1) over a connected TCP or Unix domain socket.
///
/// Frames are length-prefixed and written with one `send` per flush, so frames produced in
/// one loop turn (OpenChannel plus the request, a batch of responses) leave together.
/// Reading decodes as many frames as one wakeup brings, then tells the handler the batch
/// ended. Loop-confined, like every transport.
public final class StreamTransport: FrameTransport, ReactorRegistration {
    public let reactor: Reactor
    public let sharesMonotonicClock: Bool
    public let peerDescription: String
    public var maxIncomingPayload: UInt32 {
        get { decoder.maxPayload }
        set { decoder.maxPayload = newValue }
    }

    private let fd: Int32
    // Loop-confined, and `@exclusivity(unchecked)`: the runtime check (`swift_beginAccess`,
    // several per frame) could never fire. Only the loop thread touches these, and no
    // access stays open while other code runs: the handler is called after `decoder.next()`
    // returned, with `handler` copied out, and the closures inside `decoder` and `output`
    // accesses only make the `read`/`write` system call.
    @exclusivity(unchecked) private var watcher: IOWatcher?
    @exclusivity(unchecked) private var decoder: StreamFrameDecoder
    @exclusivity(unchecked) private var handler: (any FrameTransportHandler)?
    @exclusivity(unchecked) private var output = SocketOutput()
    @exclusivity(unchecked) private var isClosed = false
    @exclusivity(unchecked) private var readingStopped = false

    /// Wraps a connected, non-blocking socket; the transport owns (and closes) `fd`.
    /// Call on the reactor's loop thread.
    public init(reactor: Reactor, socket fd: Int32, isUnixDomain: Bool, peerDescription: String) {
        reactor.preconditionInLoop()
        self.reactor = reactor
        self.fd = fd
        self.sharesMonotonicClock = isUnixDomain
        self.peerDescription = peerDescription
        self.decoder = StreamFrameDecoder(maxPayload: 16 << 20)
        if !isUnixDomain { Sys.setNoDelay(fd) }
        self.watcher = IOWatcher(reactor: reactor, fd: fd, onReadable: {}, onWritable: {})
        watcher?.onReadable = { [unowned self] in self.readable() }
        watcher?.onWritable = { [unowned self] in self.writable() }
        reactor.register(self)
    }

    public func start(handler: any FrameTransportHandler) {
        reactor.preconditionInLoop()
        guard !isClosed else {
            handler.transportDidClose(TransportError(.closed, "transport already closed"))
            return
        }
        self.handler = handler
        watcher?.setReadEnabled(true)
    }

    public func send(_ frame: consuming Frame) {
        guard !isClosed else { return }
        StreamFrameDecoder.encode(frame, into: &output.bytes)
    }

    public var queuedOutputBytes: Int { output.count }

    public func flush() {
        guard !isClosed, !output.isEmpty else { return }
        do throws(SystemError) {
            switch try output.write(to: fd) {
            case .blocked:
                watcher?.setWriteEnabled(true)
            case .drained(let afterBacklog):
                watcher?.setWriteEnabled(false)
                if afterBacklog { handler?.transportDidDrainOutput() }
            }
        } catch {
            close(error: TransportError(.io, "write to \(peerDescription) failed: \(error)", systemError: error))
        }
    }

    public func close(error: TransportError?) {
        guard !isClosed else { return }
        if error == nil || error?.code == .protocolViolation {
            // Best effort: the goodbye frames (GoAway, CloseChannel) should reach the peer.
            flush()
            guard !isClosed else { return }
        }
        isClosed = true
        watcher?.close()
        watcher = nil
        Sys.close(fd)
        output.discard()
        reactor.unregister(self)
        let handler = self.handler
        self.handler = nil
        handler?.transportDidClose(error)
    }

    func reactorWillShutDown() {
        close(error: TransportError(.closed, "reactor shut down"))
    }

    private func writable() {
        flush()
    }

    private func readable() {
        guard !isClosed, !readingStopped else { return }
        var reads = 0
        while reads < 16 && !isClosed && !readingStopped {
            reads += 1
            let read: (count: Int, drained: Bool)?
            do throws(SystemError) {
                read = try decoder.read(from: fd)
            } catch {
                close(error: TransportError(.io, "read from \(peerDescription) failed: \(error)", systemError: error))
                return
            }
            guard let read else { break }  // EAGAIN
            if read.count == 0 {
                let partial = decoder.hasPartialFrame
                close(error: partial ? TransportError(.protocolViolation, "connection closed inside a frame") : nil)
                return
            }
            deliverFrames()
            if read.drained { break }
        }
        handler?.transportDidFinishReceiveBatch()
    }

    private func deliverFrames() {
        // One reference to the handler for the whole batch (a close ends the loop below).
        guard let handler else { return }
        while !isClosed && !readingStopped {
            let frame: Frame?
            do throws(TransportError) {
                frame = try decoder.next()
            } catch {
                // Stop reading; the session answers (GoAway) and closes us.
                readingStopped = true
                watcher?.setReadEnabled(false)
                handler.transportDidFailFraming(error)
                return
            }
            guard let frame else { return }
            handler.transportDidReceive(frame)
        }
    }
}
