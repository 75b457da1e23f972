/// Serves a set of services on listeners (TCP, Unix, shared memory, WebSocket), one session
/// per connection.
///
/// ```swift
/// let reactor = try Reactor.start()
/// let server = RapaceServer(reactor: reactor, services: [EchoServer(DefaultEcho())])
/// let address = try await server.listen(on: .tcp(host: "127.0.0.1", port: 0))
/// …
/// await server.shutdownGracefully(grace: .seconds(5))
/// ```
public final class RapaceServer: @unchecked Sendable {
    // @unchecked Sendable: listeners and sessions are loop-confined; `listen` and
    // `shutdownGracefully` hop to the loop, `accept` and `connectionCount` must be called there.
    public let reactor: Reactor
    /// Built once (not per connection); an error is reported by every `listen`.
    private let router: Result<ServiceRouter, RPCError>
    let configuration: Session.Configuration
    private var listeners: [StreamListener] = []
    private var shmListeners: [ShmListener] = []
    var webSocketListeners: [WebSocketListener] = []
    private var sessions: [ObjectIdentifier: Session] = [:]
    private var isShuttingDown = false
    private var drainedWaiters: [() -> Void] = []

    /// - Parameters:
    ///   - services: served on every connection (checked for duplicate ids at `listen`).
    ///   - configuration: applied to every session.
    public init(reactor: Reactor, services: [any RPCService], configuration: Session.Configuration = Session.Configuration()) {
        self.reactor = reactor
        self.configuration = configuration
        do throws(RPCError) { router = .success(try ServiceRouter(services)) } catch { router = .failure(error) }
    }

    /// Fails with the services' error (two methods with one id) before anything listens.
    func checkServices() throws(RPCError) { _ = try router.get() }

    /// Starts listening; returns the bound address (with the real port for port 0).
    public func listen(on address: SocketAddress) async throws -> SocketAddress {
        try checkServices()
        return try await reactor.suspendOnLoop(orThrowIfShutDown: Reactor.shutDownError) { () throws(TransportError) in
            let listener = try StreamListener(reactor: self.reactor, address: address) { [unowned self] transport in
                self.accept(transport)
            }
            self.listeners.append(listener)
            return listener.address
        }
    }

    /// Creates a shared-memory segment at `path` and serves the plugin that connects to it
    /// (one at a time; the segment is prepared again after each). This side is the host:
    /// the initiator, with odd channel ids. Returns the segment path.
    @discardableResult
    public func listen(shm path: String, config: ShmConfig = .default) async throws -> String {
        try checkServices()
        return try await reactor.suspendOnLoop(orThrowIfShutDown: Reactor.shutDownError as any Error) {
            let listener = try ShmListener(reactor: self.reactor, path: path, config: config) { [unowned self] transport in
                self.accept(transport, role: .initiator)
            }
            self.shmListeners.append(listener)
            return listener.path
        }
    }

    /// Serves an already-connected transport (for example one from another listener type)
    /// in `role` (`.acceptor` for accepted sockets, `.initiator` for a shared-memory host).
    /// Loop thread only.
    public func accept(_ transport: any FrameTransport, role: Role = .acceptor) {
        reactor.preconditionInLoop()
        guard !isShuttingDown else {
            transport.close(error: nil)
            return
        }
        let session: Session
        switch router {
        case .success(let router):
            session = Session(transport: transport, role: role, router: router, configuration: configuration)
        case .failure(let error):
            transport.close(error: TransportError(.closed, error.message))
            return
        }
        let key = ObjectIdentifier(session)
        sessions[key] = session
        session.onClose { [unowned self] in
            self.sessions[key] = nil
            if self.sessions.isEmpty {
                let waiters = self.drainedWaiters
                self.drainedWaiters.removeAll()
                for waiter in waiters { waiter() }
            }
        }
        session.start { _ in }
    }

    /// The number of open connections. Loop thread only.
    public var connectionCount: Int {
        reactor.preconditionInLoop()
        return sessions.count
    }

    /// Stops accepting, sends GoAway on every connection, lets calls in flight finish (at
    /// most `grace`), and returns once every connection has closed.
    public func shutdownGracefully(grace: Duration = .seconds(5)) async {
        // After a reactor shutdown the listeners and sessions are closed already.
        await reactor.suspendOnLoop(orIfShutDown: ()) { continuation in
            self.isShuttingDown = true
            for listener in self.listeners { listener.close() }
            self.listeners.removeAll()
            for listener in self.webSocketListeners { listener.close() }
            self.webSocketListeners.removeAll()
            let shm = self.shmListeners
            self.shmListeners.removeAll()
            if self.sessions.isEmpty {
                for listener in shm { listener.close() }
                continuation.resume()
                return
            }
            self.drainedWaiters.append {
                for listener in shm { listener.close() }
                continuation.resume()
            }
            for session in Array(self.sessions.values) {
                session.shutdownGracefully(grace: grace, reason: .shutdown, message: "server shutting down")
            }
        }
    }
}

extension Session {
    /// The plugin side of shared memory: waits (up to `timeout`) for the host's segment at
    /// `path`, connects, and completes the handshake as the acceptor (even channel ids).
    public static func connect(shm path: String, reactor: Reactor, config: ShmConfig? = nil, services: [any RPCService] = [], configuration: Configuration = Configuration(), timeout: Duration = .seconds(5)) async throws -> Session {
        try await connect(shm: path, reactor: reactor, config: config, services: services, configuration: configuration, timeout: timeout, beforeHandshake: nil)
    }

    /// ``connect(shm:reactor:config:services:configuration:timeout:)``, running
    /// `beforeHandshake` on the loop with the new session before its Hello goes out (what it
    /// sets up is in place before the host's first call can arrive).
    package static func connect(
        shm path: String, reactor: Reactor, config: ShmConfig?, services: [any RPCService], configuration: Configuration, timeout: Duration,
        beforeHandshake: (@Sendable (Session) -> Void)?
    ) async throws -> Session {
        try await onLoopThroughout(reactor) {
            let transport = try await ShmTransport.connect(path: path, reactor: reactor, config: config, timeout: timeout)
            return try await start(transport: transport.value, role: .acceptor, reactor: reactor, services: services, configuration: configuration, beforeHandshake: beforeHandshake)
        }
    }

    /// Runs a connect's steps with `reactor` as the task's executor preference: each step
    /// resumes on the loop thread, never on the cooperative threads. Once the peer has
    /// accepted, its handshake timeout runs; a connect that hopped through the cooperative
    /// threads between the accept and our Hello (a shared-memory plugin's poll for the
    /// bootstrap message, the transport made on the loop, then the session) waited for a
    /// free one at each hop, and a pool kept busy by other work made it miss that timeout.
    static func onLoopThroughout<T>(_ reactor: Reactor, _ body: () async throws -> T) async throws -> T {
        try await withTaskExecutorPreference(reactor) { try await body() }
    }

    /// Creates a session over `transport` on its loop (then runs `beforeHandshake` with it)
    /// and completes the handshake.
    static func start(
        transport: any FrameTransport, role: Role, reactor: Reactor, services: [any RPCService], configuration: Configuration,
        beforeHandshake: (@Sendable (Session) -> Void)? = nil
    ) async throws -> Session {
        let box = SendableBox(transport)
        let result = await reactor.suspendOnLoop(orIfShutDown: Result<SendableBox<Session>, RPCError>.failure(Session.reactorGone)) { continuation in
            do throws(RPCError) {
                let session = try Session(transport: box.value, role: role, services: services, configuration: configuration)
                beforeHandshake?(session)
                session.start { result in
                    continuation.resume(returning: result.map { SendableBox(session) })
                }
            } catch {
                box.value.close(error: nil)
                continuation.resume(returning: .failure(error))
            }
        }
        return try result.get().value
    }

    /// Connects to a rapace server over TCP or a Unix socket and completes the handshake.
    ///
    /// - Parameter services: what this side serves to the server (calls both ways).
    public static func connect(to address: SocketAddress, reactor: Reactor, services: [any RPCService] = [], configuration: Configuration = Configuration(), connectTimeout: Duration = .seconds(10)) async throws -> Session {
        try await onLoopThroughout(reactor) {
            let transport = try await StreamTransport.connect(to: address, reactor: reactor, timeout: connectTimeout)
            return try await start(transport: transport.value, role: .initiator, reactor: reactor, services: services, configuration: configuration)
        }
    }
}
