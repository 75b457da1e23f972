/// A socket during the HTTP part of a WebSocket connection (either side): reads one HTTP
/// head with a size limit, writes a response, all under one deadline. Loop-confined.
final class WebSocketHandshakeConnection: ReactorRegistration {
    let reactor: Reactor
    let fd: Int32
    let peerDescription: String
    private let maxHeadSize: Int
    private var watcher: IOWatcher?
    private var timer: ReactorTimer?
    private var input: [UInt8] = []
    private var output = SocketOutput()
    private var isDone = false
    /// Draining the peer's bytes after an error response, until EOF or the deadline.
    private var draining = false
    /// Called once with the head (nil when malformed or too large) and the bytes after it.
    var onHead: ((WebSocketHandshake.Head?, _ tooLarge: Bool, _ rest: [UInt8]) -> Void)?
    /// Called when the deadline passes or the socket fails before a head arrived.
    var onFailure: ((TransportError) -> Void)?

    init(reactor: Reactor, socket fd: Int32, peerDescription: String, maxHeadSize: Int) {
        reactor.assertInLoop()
        self.reactor = reactor
        self.fd = fd
        self.peerDescription = peerDescription
        self.maxHeadSize = maxHeadSize
        let watcher = IOWatcher(reactor: reactor, fd: fd, onReadable: {})
        self.watcher = watcher
        watcher.onReadable = { [unowned self] in self.readable() }
        watcher.onWritable = { [unowned self] in self.writeOutput() }
        reactor.register(self)
    }

    /// Starts reading; the whole exchange must finish within `timeout`.
    func start(timeout: Duration, initialOutput: [UInt8] = []) {
        timer = reactor.schedule(after: timeout) { [weak self] in
            guard let self, !self.isDone else { return }
            let failure = self.onFailure
            self.onHead = nil
            self.onFailure = nil
            self.abort()
            failure?(TransportError(.timeout, "WebSocket handshake with \(self.peerDescription) did not finish within \(timeout)"))
        }
        watcher?.setReadEnabled(true)
        if !initialOutput.isEmpty {
            output.bytes = initialOutput
            writeOutput()
        }
    }

    /// Hands the socket over (to a transport): stops watching without closing it.
    func release() {
        guard !isDone else { return }
        isDone = true
        timer?.cancel()
        timer = nil
        watcher?.close()
        watcher = nil
        reactor.unregister(self)
    }

    /// Closes the socket now.
    func abort() {
        guard !isDone else { return }
        release()
        Sys.close(fd)
    }

    /// Sends `response`, then shuts the sending side, drains until EOF (or the deadline) and
    /// closes, so the peer reads the whole response before the connection ends.
    func respondAndClose(_ response: [UInt8]) {
        guard !isDone else { return }
        onHead = nil
        onFailure = nil
        draining = true
        output.bytes.append(contentsOf: response)
        watcher?.setReadEnabled(true)
        writeOutput()
    }

    func reactorWillShutDown() {
        // Report the failure (a client `connect` waits on it), then close.
        failNow(TransportError(.closed, "reactor shut down during the WebSocket handshake"))
    }

    private func writeOutput() {
        guard !isDone else { return }
        do throws(SystemError) {
            guard case .drained = try output.write(to: fd) else {
                watcher?.setWriteEnabled(true)
                return
            }
        } catch {
            failNow(TransportError(.io, "write to \(peerDescription) failed: \(error)", systemError: error))
            return
        }
        watcher?.setWriteEnabled(false)
        if draining { Sys.shutdownWrite(fd) }
    }

    private func failNow(_ error: TransportError) {
        let failure = onFailure
        onHead = nil
        onFailure = nil
        abort()
        failure?(error)
    }

    private func readable() {
        guard !isDone else { return }
        var chunk = [UInt8](repeating: 0, count: 4096)
        let result: IOResult<Int>
        do throws(SystemError) {
            result = try chunk.withUnsafeMutableBytes { raw -> Result<IOResult<Int>, SystemError> in
                    do throws(SystemError) { return .success(try Sys.read(fd, raw)) } catch { return .failure(error) }
                }.get()
        } catch {
            failNow(TransportError(.io, "read from \(peerDescription) failed: \(error)", systemError: error))
            return
        }
        guard case .done(let count) = result else { return }
        if draining {
            if count == 0 { abort() }
            return
        }
        if count == 0 {
            failNow(TransportError(.closed, "\(peerDescription) closed the connection during the WebSocket handshake"))
            return
        }
        input.append(contentsOf: chunk[0..<count])
        if let end = WebSocketHandshake.headEnd(in: input), end <= maxHeadSize {
            watcher?.setReadEnabled(false)
            let head = WebSocketHandshake.parseHead(input[0..<(end - 4)])
            let rest = Array(input[end...])
            input = []
            let callback = onHead
            onHead = nil
            callback?(head, false, rest)
        } else if input.count > maxHeadSize {
            watcher?.setReadEnabled(false)
            let callback = onHead
            onHead = nil
            input = []
            callback?(nil, true, [])
        }
    }
}
