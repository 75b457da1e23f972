#if canImport(Glibc)
import Glibc
#endif

/// Accepts stream connections (TCP or Unix domain) on a reactor. Loop-confined.
///
/// Each accepted connection becomes a ``StreamTransport`` handed to `onConnection`.
/// Closing the listener stops accepting (and removes a Unix socket file it created);
/// connections already accepted are unaffected.
public final class StreamListener: ReactorRegistration {
    /// The reactor whose loop thread the listener runs on (and accepted transports too).
    public let reactor: Reactor
    /// The bound address (with the real port when listening on port 0).
    public let address: SocketAddress
    private let fd: Int32
    private var watcher: IOWatcher?
    /// Receives each accepted socket (owns it). The WebSocket listener sets it after init.
    var onSocket: (Int32) -> Void
    private let isUnix: Bool
    /// Whether ``close()`` removes the Unix socket file at `address`.
    private let removesSocketFile: Bool
    /// Armed while accepting is paused after running out of descriptors or memory.
    private var resumeTimer: ReactorTimer?
    /// Whether the listener has closed: by ``close()``, or because its reactor shut down.
    /// Loop thread only.
    public private(set) var isClosed = false

    /// Binds and listens on `address`. Call on the loop thread.
    ///
    /// For a Unix path, an existing socket file is replaced (whether or not a process still
    /// listens on it: the new listener takes the path); a path that exists and is not a
    /// socket is an error.
    public convenience init(reactor: Reactor, address: SocketAddress, backlog: Int32 = 256, onConnection: @escaping (StreamTransport) -> Void) throws(TransportError) {
        try self.init(reactor: reactor, address: address, backlog: backlog, onAcceptedSocket: { _ in })
        let isUnix = self.isUnix
        let description = "\(self.address)"
        onSocket = { [reactor] client in
            onConnection(StreamTransport(reactor: reactor, socket: client, isUnixDomain: isUnix, peerDescription: "\(description)#\(client)"))
        }
    }

    /// Binds and listens; each accepted socket (non-blocking, close-on-exec) goes to
    /// `onAcceptedSocket`, which owns it (the shared-memory bootstrap uses this).
    ///
    /// `removesSocketFileOnClose: false` is for a Unix socket that is moved away from the
    /// path it was bound at (the bootstrap renames it into place, and may bind it through
    /// `/proc/self/fd/N/…`, a path that names something else once `N` is closed): its owner
    /// removes the file, and ``close()`` leaves `address` alone.
    init(
        reactor: Reactor, address: SocketAddress, backlog: Int32 = 256, removesSocketFileOnClose: Bool = true,
        onAcceptedSocket: @escaping (Int32) -> Void
    ) throws(TransportError) {
        reactor.preconditionInLoop()
        self.reactor = reactor
        self.onSocket = onAcceptedSocket
        let resolved = try address.resolve()
        isUnix = resolved.domain == AF_UNIX
        removesSocketFile = isUnix && removesSocketFileOnClose
        if case .unix(let path) = address, try Self.existingSocket(at: path) {
            Sys.unlink(path)
        }
        let socket: Int32
        do throws(SystemError) {
            socket = try Sys.socketStream(domain: resolved.domain)
        } catch {
            throw TransportError(.connectFailed, "socket for \(address): \(error)", systemError: error)
        }
        do throws(SystemError) {
            if !isUnix { Sys.setReuseAddress(socket) }
            try resolved.withSockaddr { (pointer, length) throws(SystemError) in
                try Sys.bind(socket, pointer, length, describing: "\(address)")
            }
            try Sys.listen(socket, backlog: backlog)
        } catch {
            Sys.close(socket)
            throw TransportError(.connectFailed, "cannot listen on \(address): \(error.errno)", systemError: error)
        }
        fd = socket
        if case .tcp(let host, _) = address, let port = ResolvedAddress.boundPort(of: socket) {
            self.address = .tcp(host: host, port: port)
        } else {
            self.address = address
        }
        let watcher = IOWatcher(reactor: reactor, fd: socket, onReadable: {})
        self.watcher = watcher
        watcher.onReadable = { [unowned self] in self.acceptReady() }
        watcher.setReadEnabled(true)
        reactor.register(self)
    }

    private func acceptReady() {
        // At most 64 accepts per wakeup, so a flood of connections cannot starve the loop.
        for _ in 0..<64 where !isClosed {
            let result: IOResult<Int32>
            do throws(SystemError) {
                result = try Sys.accept(fd)
            } catch {
                if Self.outOfResources.contains(error.errno.rawValue) {
                    pauseAccepting()
                    return
                }
                continue  // ECONNABORTED and the like concern that one connection only
            }
            guard case .done(let client) = result else { return }
            onSocket(client)
        }
    }

    /// Out of descriptors or memory: the pending connection stays queued and the socket stays
    /// readable, so accepting again at once would spin. Pause for a moment instead.
    private static let outOfResources: Set<Int32> = [EMFILE, ENFILE, ENOBUFS, ENOMEM]
    static let acceptPause: Duration = .milliseconds(100)

    private func pauseAccepting() {
        guard resumeTimer == nil else { return }
        watcher?.setReadEnabled(false)
        resumeTimer = reactor.schedule(after: Self.acceptPause) { [unowned self] in
            resumeTimer = nil
            guard !isClosed else { return }
            watcher?.setReadEnabled(true)
        }
    }

    /// Stops listening. Idempotent.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        resumeTimer?.cancel()
        resumeTimer = nil
        watcher?.close()
        watcher = nil
        Sys.close(fd)
        if removesSocketFile, case .unix(let path) = address { Sys.unlink(path) }
        reactor.unregister(self)
    }

    func reactorWillShutDown() { close() }
}

extension StreamListener {
    /// Whether a socket exists at `path` (a stale one to replace); throws when something
    /// else does, which a listener must not remove or replace.
    static func existingSocket(at path: String) throws(TransportError) -> Bool {
        guard let info = try? Sys.linkStatus(path) else { return false }
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw TransportError(.connectFailed, "cannot listen on \(path): the path exists and is not a socket")
        }
        return true
    }
}
