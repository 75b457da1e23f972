#if canImport(Glibc)
import Glibc
#endif

extension WebSocketTransport {
    /// Connects to `ws://host:port/path`, performs the opening handshake (checking
    /// `Sec-WebSocket-Accept`) and completes with a client-role transport; `completion` runs
    /// on the loop. The whole connect and handshake must finish within `timeout`.
    /// Call on the reactor's loop thread.
    public static func connect(host: String, port: UInt16, path: String = "/", origin: String? = nil, reactor: Reactor, timeout: Duration = .seconds(10), maxIncomingPayload: UInt32 = 16 << 20, completion: @escaping (Result<WebSocketTransport, TransportError>) -> Void) {
        reactor.preconditionInLoop()
        let fd: Int32
        do throws(TransportError) {
            // Connected or not yet: the request waits in the handshake's output until it is.
            fd = try SocketAddress.tcp(host: host, port: port).startConnecting().fd
        } catch {
            completion(.failure(error))
            return
        }
        let key = WebSocketHandshake.randomKey()
        let hostHeader = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        var headers = [("Host", hostHeader), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13")]
        if let origin { headers.append(("Origin", origin)) }
        var request = "GET \(path) HTTP/1.1\r\n"
        for (name, value) in headers { request += "\(name): \(value)\r\n" }
        request += "\r\n"
        let description = "ws://\(hostHeader)\(path)"
        let connection = WebSocketHandshakeConnection(reactor: reactor, socket: fd, peerDescription: description, maxHeadSize: 16 * 1024)
        var finished = false
        connection.onFailure = { error in
            guard !finished else { return }
            finished = true
            completion(.failure(error.code == .timeout ? error : TransportError(.connectFailed, "WebSocket connect to \(description) failed: \(error.message)", systemError: error.systemError)))
        }
        connection.onHead = { [unowned connection] head, _, rest in
            guard !finished else { return }
            finished = true
            guard let head, head.startLine[0] == "HTTP/1.1", head.startLine[1] == "101" else {
                connection.abort()
                let status = head.map { "\($0.startLine[1]) \($0.startLine[2])" } ?? "a malformed response"
                completion(.failure(TransportError(.connectFailed, "WebSocket upgrade to \(description) refused: \(status)")))
                return
            }
            guard head.headerContainsToken("upgrade", "websocket"), head.headerContainsToken("connection", "upgrade"),
                  head.header("sec-websocket-accept") == WebSocketHandshake.acceptValue(forKey: key) else {
                connection.abort()
                completion(.failure(TransportError(.connectFailed, "WebSocket upgrade to \(description): bad Upgrade, Connection or Sec-WebSocket-Accept")))
                return
            }
            connection.release()
            completion(.success(WebSocketTransport(reactor: reactor, socket: connection.fd, role: .client, peerDescription: description, input: rest, maxIncomingPayload: maxIncomingPayload)))
        }
        // The request waits in the output buffer until the socket is writable (connected).
        connection.start(timeout: timeout, initialOutput: Array(request.utf8))
    }

    /// Connects from any thread. The transport is loop-confined: use the box's value only on
    /// `reactor`'s loop thread.
    public static func connect(host: String, port: UInt16, path: String = "/", origin: String? = nil, reactor: Reactor, timeout: Duration = .seconds(10)) async throws(TransportError) -> SendableBox<WebSocketTransport> {
        let result = await reactor.suspendOnLoop(orIfShutDown: Result<SendableBox<WebSocketTransport>, TransportError>.failure(Reactor.shutDownError)) { continuation in
            connect(host: host, port: port, path: path, origin: origin, reactor: reactor, timeout: timeout) { result in
                continuation.resume(returning: result.map { SendableBox($0) })
            }
        }
        return try result.get()
    }
}

extension Session {
    /// Connects to a rapace server over WebSocket (`ws://host:port/path`) and completes the
    /// handshake as the initiator.
    public static func connect(webSocketHost host: String, port: UInt16, path: String = "/", origin: String? = nil, reactor: Reactor, services: [any RPCService] = [], configuration: Configuration = Configuration(), connectTimeout: Duration = .seconds(10)) async throws -> Session {
        try await onLoopThroughout(reactor) {
            let transport = try await WebSocketTransport.connect(host: host, port: port, path: path, origin: origin, reactor: reactor, timeout: connectTimeout)
            return try await start(transport: transport.value, role: .initiator, reactor: reactor, services: services, configuration: configuration)
        }
    }
}

extension RapaceServer {
    /// Starts a ``WebSocketListener`` whose connections this server serves (as acceptor).
    /// ``shutdownGracefully(grace:)`` closes it with the server's other listeners; to stop
    /// accepting earlier, close it (on the loop, or with ``closeWebSocketListener(_:)``).
    /// Returns the listener in a box: use its value only on the loop thread.
    public func listenWebSocket(on address: SocketAddress = .tcp(host: "127.0.0.1", port: 0), configuration: WebSocketListener.Configuration = WebSocketListener.Configuration()) async throws -> (address: SocketAddress, listener: SendableBox<WebSocketListener>) {
        try checkServices()
        let listener = try await reactor.suspendOnLoop(orThrowIfShutDown: Reactor.shutDownError) { () throws(TransportError) in
            let listener = try WebSocketListener(reactor: self.reactor, address: address, configuration: configuration) { [unowned self] transport in
                self.accept(transport)
            }
            self.webSocketListeners.append(listener)
            return SendableBox(listener)
        }
        return (listener.value.address, listener)
    }

    /// Closes a listener from ``listenWebSocket(on:configuration:)`` from any thread.
    public func closeWebSocketListener(_ listener: SendableBox<WebSocketListener>) async {
        // A reactor that shut down closed its listeners.
        await reactor.suspendOnLoop(orIfShutDown: ()) { continuation in
            listener.value.close()
            self.webSocketListeners.removeAll { $0 === listener.value }  // nothing keeps a closed one
            continuation.resume()
        }
    }
}
