#if canImport(Glibc)
import Glibc
#endif
import CRapaceShim

/// The bootstrap of a shared-memory connection (Docs/shm.md, "Bootstrap").
///
/// The host creates the segment at `PATH` and listens on the Unix socket `PATH.sock`. A
/// plugin that knows only `PATH` opens the segment, connects to `PATH.sock`, and receives one
/// 16-byte message — `"RPCEBOOT"`, layout version u32 LE, segment epoch u32 LE — carrying two
/// eventfds as SCM_RIGHTS: first the plugin's doorbell (the host rings it), then the host's
/// doorbell (the plugin rings it). The socket then stays open and silent: end of file on it
/// means the other process is gone.
enum ShmBootstrap {
    static let magic: [UInt8] = Array("RPCEBOOT".utf8)
    static let messageSize = 16

    static func socketPath(for segmentPath: String) -> String { segmentPath + ".sock" }
}

/// The host side of a shared-memory connection: owns the segment and the bootstrap socket,
/// accepts one plugin at a time, and prepares the segment again after each one. Loop-confined.
public final class ShmListener: ReactorRegistration {
    public let reactor: Reactor
    public let segment: ShmSegment
    public var path: String { segment.path }
    private var listener: StreamListener?
    private let onConnection: (ShmTransport) -> Void
    private var active: ShmTransport?
    /// A plugin has been connected: the segment must be prepared before the next one.
    private var used = false
    public private(set) var isClosed = false

    /// Creates the segment at `path` (default config: 256 / 64 KiB / 128) and starts listening
    /// for a plugin on `path.sock`. Call on the loop thread.
    public init(reactor: Reactor, path: String, config: ShmConfig = .default, onConnection: @escaping (ShmTransport) -> Void) throws {
        reactor.preconditionInLoop()
        self.reactor = reactor
        self.onConnection = onConnection
        segment = try ShmSegment.create(path: path, config: config)
        let socketPath = ShmBootstrap.socketPath(for: path)
        do {
            listener = try StreamListener(reactor: reactor, address: .unix(path: socketPath), backlog: 16) { [unowned self] fd in
                self.accept(fd)
            }
        } catch {
            unlink(path)
            throw error
        }
        chmod(socketPath, 0o600)
        reactor.register(self)
    }

    /// The transport of the plugin connected now, if any.
    public var activeTransport: ShmTransport? { active }

    private func accept(_ fd: Int32) {
        guard active == nil, !isClosed else {
            Sys.close(fd)  // one plugin per segment: a second one is refused
            return
        }
        let plugin: Int32
        let host: Int32
        do throws(SystemError) {
            plugin = try Sys.eventfd()
            do throws(SystemError) { host = try Sys.eventfd() } catch {
                Sys.close(plugin)
                throw error
            }
        } catch {
            Sys.close(fd)
            return
        }
        if used {
            // Prepared only now, not when the previous plugin left: it may still have been
            // reading the rings on its way out. Fresh rings, every slot free except those
            // this process still holds (from any earlier connection).
            segment.reset()
        }
        used = true
        var message = ShmBootstrap.magic
        withUnsafeBytes(of: ShmLayout.version.littleEndian) { message.append(contentsOf: $0) }
        let epoch = rapace_load_acquire_u32(segment.base + ShmLayout.epochOffset)
        withUnsafeBytes(of: epoch.littleEndian) { message.append(contentsOf: $0) }
        let fds: [Int32] = [plugin, host]
        let sent = message.withUnsafeBytes { raw in rapace_send_with_fds(fd, raw.baseAddress, raw.count, fds, 2) }
        guard sent == message.count else {
            Sys.close(plugin)
            Sys.close(host)
            Sys.close(fd)
            return
        }
        // The plugin has its own copies now; we keep `plugin` to ring it and `host` to watch.
        let transport = ShmTransport(
            reactor: reactor, side: .host, segment: segment, doorbell: host, peerDoorbell: plugin, socket: fd,
            peerDescription: "shm plugin at \(segment.path)")
        active = transport
        transport.whenClosed { [unowned self] in self.active = nil }
        onConnection(transport)
    }

    /// Stops accepting, closes the active connection, removes the segment and socket files.
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        listener?.close()
        active?.close(error: TransportError(.closed, "host closed the segment"))
        unlink(segment.path)
        reactor.unregister(self)
    }

    func reactorWillShutDown() { close() }
}

extension ShmTransport {
    /// The plugin side: waits (up to `timeout`, polling every 20 ms) for the host's segment at
    /// `path`, opens it (checking `config` when given; otherwise adopting the header's),
    /// connects to `path.sock`, receives the doorbells, and returns the transport.
    ///
    /// The transport is loop-confined: use the box's value only on `reactor`'s loop thread.
    public static func connect(path: String, reactor: Reactor, config: ShmConfig? = nil, timeout: Duration = .seconds(5)) async throws -> SendableBox<ShmTransport> {
        let deadline = ContinuousClock.now + timeout
        // 1. The segment file.
        var segment: ShmSegment?
        var lastError: ShmError?
        while segment == nil {
            if access(path, F_OK) == 0 {
                do throws(ShmError) {
                    segment = try ShmSegment.open(path: path, expecting: config)
                } catch {
                    if error.code == .configMismatch || error.code == .badSegment { throw error }
                    lastError = error
                }
            }
            if segment == nil {
                guard ContinuousClock.now < deadline else {
                    throw ShmError(.segmentNotFound, "no rapace segment appeared at \(path) within \(timeout)" + (lastError.map { " (last error: \($0.message))" } ?? ""))
                }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        // 2. The bootstrap socket and the doorbells.
        let socketPath = ShmBootstrap.socketPath(for: path)
        var connected: Int32 = -1
        while connected < 0 {
            let fd = try Sys.socketStream(domain: AF_UNIX)
            let resolved = try SocketAddress.unix(path: socketPath).resolve()
            let done = try? resolved.withSockaddr { (pointer, length) throws(SystemError) in
                try Sys.connect(fd, pointer, length, describing: socketPath)
            }
            if done == true {
                connected = fd
            } else {
                Sys.close(fd)  // refused, missing, or (never for Unix sockets) in progress: retry
            }
            if connected < 0 {
                guard ContinuousClock.now < deadline else {
                    throw ShmError(.timeout, "the host of \(path) is not accepting on \(socketPath) within \(timeout)")
                }
                try await Task.sleep(for: .milliseconds(20))
            }
        }
        var message = [UInt8](repeating: 0, count: ShmBootstrap.messageSize)
        var fds: [Int32] = [-1, -1]
        var received: Int32 = 0
        var got = 0
        while got == 0 {
            let n = message.withUnsafeMutableBytes { raw in rapace_recv_with_fds(connected, raw.baseAddress, raw.count, &fds, 2, &received) }
            if n > 0 { got = n; break }
            if n == 0 {
                Sys.close(connected)
                throw ShmError(.io, "the host of \(path) closed the bootstrap socket (another plugin may be connected)")
            }
            guard ContinuousClock.now < deadline else {
                Sys.close(connected)
                throw ShmError(.timeout, "no bootstrap message from the host of \(path) within \(timeout)")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        guard got == ShmBootstrap.messageSize, Array(message[0..<8]) == ShmBootstrap.magic, received == 2 else {
            for index in 0..<Int(received) { Sys.close(fds[index]) }
            Sys.close(connected)
            throw ShmError(.badSegment, "the host of \(path) sent an invalid bootstrap message")
        }
        let pluginDoorbell = fds[0]
        let hostDoorbell = fds[1]
        let opened = segment!
        let socketFD = connected
        let result = await reactor.suspendOnLoop(orIfShutDown: SendableBox<ShmTransport>?.none) { continuation in
            continuation.resume(returning: SendableBox(ShmTransport(
                reactor: reactor, side: .plugin, segment: opened, doorbell: pluginDoorbell, peerDoorbell: hostDoorbell,
                socket: socketFD, peerDescription: "shm host at \(path)")))
        }
        guard let result else {
            // No transport will own them: give the descriptors back.
            Sys.close(pluginDoorbell)
            Sys.close(hostDoorbell)
            Sys.close(socketFD)
            throw ShmError(.io, "the reactor has shut down")
        }
        return result
    }
}

