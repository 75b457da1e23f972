#if canImport(Glibc)
import Glibc
#endif

/// A plain HTTP response a ``WebSocketListener`` sends for a GET that is not an upgrade.
///
/// It is sent with `Content-Length`, `Connection: close` and `Cache-Control: no-store`, and
/// the connection closes after it.
public struct WebSocketHTTPResponse: Sendable {
    /// The HTTP status code; the reason phrase is derived from it.
    public var status: Int
    /// The `Content-Type` header value.
    public var contentType: String
    /// The response body.
    public var body: [UInt8]

    /// A response with `body` as it is; status 200 by default.
    public init(status: Int = 200, contentType: String, body: [UInt8]) {
        self.status = status
        self.contentType = contentType
        self.body = body
    }

    /// A response whose body is `text` in UTF-8; status 200 and `text/plain; charset=utf-8`
    /// by default.
    public init(status: Int = 200, contentType: String = "text/plain; charset=utf-8", text: String) {
        self.init(status: status, contentType: contentType, body: Array(text.utf8))
    }
}

/// Accepts WebSocket connections (RFC 6455 server side) on a TCP port of a reactor, and
/// answers plain HTTP GET requests on the same port. Loop-confined.
///
/// - An upgrade request (`GET` with `Upgrade: websocket`, `Connection: Upgrade`,
///   `Sec-WebSocket-Version: 13` and a valid `Sec-WebSocket-Key`) whose `Origin` is allowed
///   is answered `101` and becomes a ``WebSocketTransport`` handed to `onConnection`.
/// - A malformed upgrade is answered `400` (`426` for another version), a disallowed
///   `Origin` `403`, a head over ``Configuration/maxHeadSize`` `431`; a handshake that does
///   not finish within ``Configuration/handshakeTimeout`` (a slow-loris client) is closed.
/// - Any other `GET` goes to ``Configuration/httpHandler``: its response, or `404`.
public final class WebSocketListener: ReactorRegistration {
    /// What the listener accepts.
    public struct Configuration: Sendable {
        /// Exact `Origin` values (e.g. `"http://localhost:8080"`) allowed to upgrade.
        public var allowedOrigins: Set<String> = []
        /// Allow an `Origin` equal to `http://` + the request's `Host` (a page served by
        /// this listener).
        public var allowSameOrigin = true
        /// Allow every `Origin` (development only).
        public var allowAnyOrigin = false
        /// Requests without an `Origin` header come from non-browser clients; allowed by default.
        public var allowMissingOrigin = true
        /// Largest HTTP request head, in bytes.
        public var maxHeadSize = 8 * 1024
        /// Time allowed from accept to a complete handshake (and for a plain HTTP exchange).
        public var handshakeTimeout: Duration = .seconds(10)
        /// Largest rapace payload a new transport accepts. A ``Session`` serving the
        /// transport replaces it with its own `limits.maxPayloadSize`.
        public var maxIncomingPayload: UInt32 = 16 << 20
        /// Answers a plain `GET path` (query string included); nil → 404. Runs on the loop.
        public var httpHandler: (@Sendable (_ path: String) -> WebSocketHTTPResponse?)?

        /// The defaults: same-origin and Origin-less upgrades allowed, 8 KiB heads, 10 s
        /// handshakes, 16 MiB payloads, and no HTTP handler (every plain GET gets 404).
        public init() {}
    }

    /// The reactor whose loop thread the listener and its transports run on.
    public let reactor: Reactor
    /// The bound address (with the real port when listening on port 0).
    public var address: SocketAddress { listener.address }
    /// The configuration the listener was created with.
    public let configuration: Configuration
    /// Accepts the TCP connections (and pauses when out of descriptors).
    private var listener: StreamListener!
    private let onConnection: (WebSocketTransport) -> Void
    private var handshakes: [ObjectIdentifier: WebSocketHandshakeConnection] = [:]
    /// Whether the listener has closed: by ``close()``, or because its reactor shut down.
    /// Loop thread only.
    public private(set) var isClosed = false

    /// Binds and listens on `address` (loopback by default). Call on the loop thread.
    public init(reactor: Reactor, address: SocketAddress = .tcp(host: "127.0.0.1", port: 0), configuration: Configuration = Configuration(), backlog: Int32 = 256, onConnection: @escaping (WebSocketTransport) -> Void) throws(TransportError) {
        reactor.preconditionInLoop()
        guard case .tcp = address else { throw TransportError(.connectFailed, "WebSocket listens on TCP only, not \(address)") }
        self.reactor = reactor
        self.configuration = configuration
        self.onConnection = onConnection
        listener = try StreamListener(reactor: reactor, address: address, backlog: backlog, onAcceptedSocket: { _ in })
        listener.onSocket = { [unowned self] client in self.accepted(client) }
        reactor.register(self)
    }

    /// Connections still in their HTTP handshake. Loop thread only.
    public var pendingHandshakeCount: Int { handshakes.count }

    /// Stops listening and drops connections still handshaking. Idempotent.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        listener.close()
        for connection in handshakes.values { connection.abort() }
        handshakes.removeAll()
        reactor.unregister(self)
    }

    func reactorWillShutDown() { close() }

    private func accepted(_ client: Int32) {
        guard !isClosed else {
            Sys.close(client)
            return
        }
        let connection = WebSocketHandshakeConnection(reactor: reactor, socket: client, peerDescription: "ws \(address)#\(client)", maxHeadSize: configuration.maxHeadSize)
        let key = ObjectIdentifier(connection)
        handshakes[key] = connection
        connection.onHead = { [unowned self, unowned connection] head, tooLarge, rest in
            self.handshakes[key] = nil
            self.handle(connection, head: head, tooLarge: tooLarge, rest: rest)
        }
        connection.onFailure = { [unowned self] _ in self.handshakes[key] = nil }
        connection.start(timeout: configuration.handshakeTimeout)
    }

    private func handle(_ connection: WebSocketHandshakeConnection, head: WebSocketHandshake.Head?, tooLarge: Bool, rest: [UInt8]) {
        guard let head else {
            reject(connection, tooLarge ? 431 : 400, tooLarge ? "request head too large" : "malformed HTTP request")
            return
        }
        guard head.startLine[2] == "HTTP/1.1" else { return reject(connection, 400, "HTTP/1.1 required") }
        guard head.startLine[0] == "GET" else { return reject(connection, 405, "only GET is served", extra: [("Allow", "GET")]) }
        let path = String(head.startLine[1])
        let wantsUpgrade = head.header("upgrade") != nil || head.header("sec-websocket-key") != nil
        guard wantsUpgrade else {
            serveHTTP(connection, path: path)
            return
        }
        guard head.headerContainsToken("upgrade", "websocket"), head.headerContainsToken("connection", "upgrade") else {
            return reject(connection, 400, "Upgrade: websocket and Connection: Upgrade are required")
        }
        guard head.header("sec-websocket-version") == "13" else {
            return reject(connection, 426, "only WebSocket version 13 is supported", extra: [("Sec-WebSocket-Version", "13")])
        }
        guard let key = head.header("sec-websocket-key"), Base64.decode(key)?.count == 16 else {
            return reject(connection, 400, "Sec-WebSocket-Key must be 16 base64-encoded bytes")
        }
        guard originAllowed(head) else { return reject(connection, 403, "Origin not allowed") }
        let response = WebSocketHandshake.response(status: 101, reason: "Switching Protocols", headers: [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", WebSocketHandshake.acceptValue(forKey: key)),
        ])
        connection.release()
        let transport = WebSocketTransport(
            reactor: reactor, socket: connection.fd, role: .server, peerDescription: connection.peerDescription,
            input: rest, output: response, maxIncomingPayload: configuration.maxIncomingPayload)
        onConnection(transport)
    }

    private func originAllowed(_ head: WebSocketHandshake.Head) -> Bool {
        guard let origin = head.header("origin") else { return configuration.allowMissingOrigin }
        if configuration.allowAnyOrigin || configuration.allowedOrigins.contains(origin) { return true }
        if configuration.allowSameOrigin, let host = head.header("host"), origin == "http://\(host)" { return true }
        return false
    }

    private func serveHTTP(_ connection: WebSocketHandshakeConnection, path: String) {
        guard let response = configuration.httpHandler?(path) else {
            return reject(connection, 404, "not found")
        }
        connection.respondAndClose(WebSocketHandshake.response(
            status: response.status, reason: WebSocketHandshake.reasonPhrase(response.status),
            headers: [("Content-Type", response.contentType), ("Content-Length", "\(response.body.count)"), ("Connection", "close"), ("Cache-Control", "no-store")],
            body: response.body))
    }

    private func reject(_ connection: WebSocketHandshakeConnection, _ status: Int, _ message: String, extra: [(String, String)] = []) {
        let body = Array("\(message)\n".utf8)
        connection.respondAndClose(WebSocketHandshake.response(
            status: status, reason: WebSocketHandshake.reasonPhrase(status),
            headers: [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "\(body.count)"), ("Connection", "close")] + extra,
            body: body))
    }
}
