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
/// doorbell (the plugin rings it). The plugin uses the connection only if that epoch is the
/// one in the header of the segment it mapped (each segment file starts at a random epoch).
/// The socket then stays open and silent: end of file on it means the other process is gone.
package enum ShmBootstrap {
    /// What follows a segment's path in its bootstrap socket's (`PATH.sock`).
    package static let socketSuffix = ".sock"
    static let magic: [UInt8] = Array("RPCEBOOT".utf8)
    static let messageSize = 16
    /// How many times a plugin maps the segment and connects again when the bootstrap
    /// message belongs to another segment than the one it mapped (all within its timeout).
    static let staleSegmentAttempts = 5

    static func socketPath(for segmentPath: String) -> String { segmentPath + socketSuffix }

    /// Listens on the Unix socket `socketPath`, which only ever appears there with mode
    /// 0600: the socket is bound and listening in a new private directory (mode 0700) next
    /// to `socketPath`, made 0600, then renamed onto `socketPath` (atomically replacing a
    /// stale socket); the directory is removed. Nobody can connect to it before the rename.
    /// A path that exists and is not a socket is an error, and so is a `socketPath` too long
    /// for a Unix socket address (plugins connect to it by that name).
    static func listen(reactor: Reactor, socketPath: String, onAcceptedSocket: @escaping (Int32) -> Void) throws -> StreamListener {
        _ = try SocketAddress.unix(path: socketPath).resolve()  // names the length and the limit
        _ = try StreamListener.existingSocket(at: socketPath)  // a stale socket is replaced by the rename
        let slash = socketPath.lastIndex(of: "/")
        let directory = slash.map { String(socketPath[..<$0]) } ?? "."
        let privateDirectory: String
        let handle: Int32
        do throws(SystemError) {
            privateDirectory = try Sys.makeTemporaryDirectory(prefix: directory + "/rapace-bind-")
            do throws(SystemError) { handle = try Sys.openDirectoryHandle(privateDirectory) } catch {
                Sys.removeDirectory(privateDirectory)
                throw error
            }
        } catch {
            throw ShmError(.io, "cannot create a private directory next to \(socketPath) to bind it in: \(error.errno)", systemError: error)
        }
        defer {
            // After the rename `s` is gone (ENOENT); after a failure (a listener that threw
            // once bind had created it, a failed chmod or rename) it must go for the
            // directory to go.
            Sys.unlink("s", in: handle)
            Sys.close(handle)
            Sys.removeDirectory(privateDirectory)
        }
        // `DIR/rapace-bind-XXXXXX/s` is longer than `socketPath` (`DIR/NAME.sock`) when NAME
        // has fewer than 15 bytes, so it can exceed sun_path (107 bytes) where `socketPath`
        // fits. Then the socket is bound through this process's own name for the directory,
        // `/proc/self/fd/N/s` (N: the handle), which is short whatever the directory's path;
        // the chmod and the rename go through the handle in every case. Not chdir
        // (process-wide: other threads resolve relative paths meanwhile), not a shorter
        // directory elsewhere (the rename must stay on one file system, and the socket must
        // never be reachable with another mode), not a symbolic link (a file more to create
        // and remove). A path that fits is bound as it is, so /proc is needed only for the
        // long ones. The socket's own address (getsockname) is the path it was bound at;
        // clients see `socketPath`.
        let direct = privateDirectory + "/s"
        let bindPath = (try? SocketAddress.unix(path: direct).resolve()) != nil ? direct : "/proc/self/fd/\(handle)/s"
        // The listener must not remove `bindPath` when it closes: the socket has moved, and a
        // /proc/self/fd path would name whatever reuses the descriptor number by then.
        let listener = try StreamListener(
            reactor: reactor, address: .unix(path: bindPath), backlog: 16, removesSocketFileOnClose: false, onAcceptedSocket: onAcceptedSocket)
        do throws(SystemError) {
            try Sys.chmod("s", in: handle, 0o600, directoryPath: privateDirectory)
            try Sys.rename("s", in: handle, to: socketPath, directoryPath: privateDirectory)
        } catch {
            listener.close()
            throw ShmError(.io, "cannot put the bootstrap socket in place at \(socketPath): \(error)", systemError: error)
        }
        return listener
    }
}

/// The host side of a shared-memory connection: owns the segment and the bootstrap socket,
/// accepts one plugin at a time, and prepares the segment again after each one. Loop-confined.
public final class ShmListener: ReactorRegistration {
    /// The reactor whose loop thread the listener and its transports run on.
    public let reactor: Reactor
    /// The segment the listener created; every plugin connection uses it in turn.
    public let segment: ShmSegment
    /// The segment file's path (the bootstrap socket is this path + `.sock`).
    public var path: String { segment.path }
    /// The bootstrap socket's path (`path` + `.sock`).
    private var socketPath: String { ShmBootstrap.socketPath(for: segment.path) }
    private var listener: StreamListener?
    private let onConnection: (ShmTransport) -> Void
    private var active: ShmTransport?
    /// A plugin has been connected: the segment must be prepared before the next one.
    private var used = false
    /// Whether the listener has closed: by ``close()``, or because its reactor shut down.
    /// Loop thread only.
    public private(set) var isClosed = false

    /// Creates the segment at `path` (default config: 256 / 64 KiB / 128) and starts listening
    /// for a plugin on `path.sock`. Call on the loop thread.
    public init(reactor: Reactor, path: String, config: ShmConfig = .default, onConnection: @escaping (ShmTransport) -> Void) throws {
        reactor.preconditionInLoop()
        self.reactor = reactor
        self.onConnection = onConnection
        segment = try ShmSegment.create(path: path, config: config)
        do {
            listener = try ShmBootstrap.listen(reactor: reactor, socketPath: ShmBootstrap.socketPath(for: path)) { [unowned self] fd in
                self.accept(fd)
            }
        } catch {
            Sys.unlink(path)
            segment.releaseHostLock()
            throw error
        }
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
        withUnsafeBytes(of: segment.epoch.littleEndian) { message.append(contentsOf: $0) }
        let sent = try? message.withUnsafeBytes { raw in
            Result { () throws(SystemError) in try Sys.send(fd, raw, passing: [plugin, host]) }
        }.get()
        guard case .done(message.count)? = sent else {
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

    /// Stops accepting, closes the active connection, removes the segment and socket files,
    /// and then drops the lock that marked them as a live host's (the segment may stay
    /// mapped a while, for buffers still held).
    public func close() {
        guard !isClosed else { return }
        isClosed = true
        listener?.close()
        Sys.unlink(socketPath)
        active?.close(error: TransportError(.closed, "host closed the segment"))
        Sys.unlink(segment.path)
        segment.releaseHostLock()
        reactor.unregister(self)
    }

    func reactorWillShutDown() { close() }
}

extension ShmTransport {
    /// The plugin side: waits (up to `timeout`, polling every 20 ms) for the host's segment at
    /// `path`, opens it (checking `config` when given; otherwise adopting the header's),
    /// connects to `path.sock`, receives the doorbells, and returns the transport.
    ///
    /// The bootstrap message carries the epoch of the host's segment. If the mapped segment
    /// has another one, `path` was replaced after it was opened (the host restarted): the
    /// file now at `path` is mapped instead, or, if that one does not match either, the
    /// plugin maps and connects again, up to ``ShmBootstrap/staleSegmentAttempts`` times
    /// within `timeout`. It then fails with `ShmError.staleSegment`, naming both epochs.
    ///
    /// The transport is loop-confined: use the box's value only on `reactor`'s loop thread.
    public static func connect(path: String, reactor: Reactor, config: ShmConfig? = nil, timeout: Duration = .seconds(5)) async throws -> SendableBox<ShmTransport> {
        let deadline = ContinuousClock.now + timeout
        let socketPath = ShmBootstrap.socketPath(for: path)
        var segment = try await awaitSegment(path: path, config: config, deadline: deadline, timeout: timeout)
        var attempt = 1
        while true {
            guard let bootstrap = try await receiveBootstrap(path: path, deadline: deadline, timeout: timeout) else {
                // The host closed the socket without a word: it serves another plugin. After a
                // stale attempt that may be our own last connection, whose end the host has not
                // seen yet: try again (until the timeout).
                guard attempt > 1, ContinuousClock.now < deadline else {
                    throw ShmError(.io, "the host of \(path) closed the bootstrap socket (another plugin may be connected)")
                }
                try await Task.sleep(for: .milliseconds(20))
                continue
            }
            if segment.epoch != bootstrap.epoch,
                let current = try? ShmSegment.open(path: path, expecting: config), current.epoch == bootstrap.epoch
            {
                segment = current  // `path` was replaced after we opened it: the host's file is there now
            }
            if segment.epoch == bootstrap.epoch {
                return try await makeTransport(path: path, reactor: reactor, segment: segment, bootstrap: bootstrap)
            }
            // The host that answered is not the one whose segment is at `path` (or we mapped):
            // a host replaced in between, or one being replaced now. Start over.
            bootstrap.close()
            guard attempt < ShmBootstrap.staleSegmentAttempts, ContinuousClock.now < deadline else {
                let mapped = segment.epoch
                throw ShmError(
                    .staleSegment,
                    "the segment mapped from \(path) has epoch \(mapped), but the host answering on \(socketPath) sent epoch \(bootstrap.epoch) (\(attempt) attempts): \(path) keeps being replaced, or another host owns \(socketPath)")
            }
            attempt += 1
            try await Task.sleep(for: .milliseconds(20))
            segment = try await awaitSegment(path: path, config: config, deadline: deadline, timeout: timeout)
        }
    }

    /// Step 1: waits for the segment file at `path` and maps it.
    private static func awaitSegment(path: String, config: ShmConfig?, deadline: ContinuousClock.Instant, timeout: Duration) async throws -> ShmSegment {
        var lastError: ShmError?
        while true {
            do throws(ShmError) {
                return try ShmSegment.open(path: path, expecting: config)
            } catch {
                if error.code == .configMismatch || error.code == .badSegment { throw error }
                // Not there yet is what this loop waits out; anything else is worth naming.
                if error.systemError?.errno != .noSuchFile { lastError = error }
            }
            guard ContinuousClock.now < deadline else {
                throw ShmError(.segmentNotFound, "no rapace segment appeared at \(path) within \(timeout)" + (lastError.map { " (last error: \($0.message))" } ?? ""))
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// What the host sent over the bootstrap socket: the socket itself and the two doorbells
    /// (all owned by the receiver until a transport takes them), and the segment's epoch.
    private struct Bootstrap {
        var socket: Int32
        var pluginDoorbell: Int32
        var hostDoorbell: Int32
        var epoch: UInt32

        func close() {
            Sys.close(pluginDoorbell)
            Sys.close(hostDoorbell)
            Sys.close(socket)
        }
    }

    /// The connect errors the plugin waits out: nothing at `path.sock` yet (`ENOENT`), a
    /// socket there with no listener (`ECONNREFUSED`), a full backlog (`EAGAIN`).
    private static let retriedConnectErrors: Set<Errno> = [.noSuchFile, .connectionRefused, .wouldBlock]

    /// Step 2: connects to `path.sock` and receives the bootstrap message; nil if the host
    /// closed the connection without sending one (it refuses a second plugin).
    private static func receiveBootstrap(path: String, deadline: ContinuousClock.Instant, timeout: Duration) async throws -> Bootstrap? {
        let socketPath = ShmBootstrap.socketPath(for: path)
        let address = SocketAddress.unix(path: socketPath)
        var connected: Int32 = -1
        while true {
            do throws(TransportError) {
                // A Unix connect is never in progress: connected, or an error.
                connected = try address.startConnecting().fd
                break
            } catch {
                // Missing or refused (the host is not listening yet, or between its listener's
                // bind and listen) or a full backlog: retry until the deadline. Anything else
                // (a path too long for a socket, EACCES, EMFILE, not a stream socket) will not
                // go away by waiting.
                guard let errno = error.systemError?.errno, Self.retriedConnectErrors.contains(errno) else {
                    throw ShmError(.io, "cannot connect to the host of \(path) at \(socketPath): \(error.message)", systemError: error.systemError)
                }
            }
            guard ContinuousClock.now < deadline else {
                throw ShmError(.timeout, "the host of \(path) is not accepting on \(socketPath) within \(timeout)")
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        // Ours until the bootstrap is returned: every other exit (errors, cancellation) closes it.
        var handedOver = false
        defer { if !handedOver { Sys.close(connected) } }
        var message = [UInt8](repeating: 0, count: ShmBootstrap.messageSize)
        var fds: [Int32] = [-1, -1]
        var got = 0
        var received = 0
        while true {
            let result: IOResult<(bytes: Int, descriptors: Int)>
            do throws(SystemError) {
                result = try message.withUnsafeMutableBytes { raw in
                    Result { () throws(SystemError) in try Sys.receive(connected, into: raw, descriptors: &fds) }
                }.get()
            } catch {
                throw ShmError(.io, "cannot receive the bootstrap message from the host of \(path): \(error)", systemError: error)
            }
            if case .done(let count) = result {
                (got, received) = count
                if got > 0 { break }
                return nil
            }
            guard ContinuousClock.now < deadline else {
                throw ShmError(.timeout, "no bootstrap message from the host of \(path) within \(timeout)")
            }
            try await Task.sleep(for: .milliseconds(5))
        }
        let u32 = LittleEndianFields(bytes: message).u32
        guard got == ShmBootstrap.messageSize, Array(message[0..<8]) == ShmBootstrap.magic, received == 2 else {
            for index in 0..<received { Sys.close(fds[index]) }
            throw ShmError(.badSegment, "the host of \(path) sent an invalid bootstrap message")
        }
        guard u32(8) == ShmLayout.version else {
            for index in 0..<received { Sys.close(fds[index]) }
            throw ShmError(.badSegment, "the host of \(path) speaks segment layout version \(u32(8)); this build speaks version \(ShmLayout.version)")
        }
        handedOver = true
        return Bootstrap(socket: connected, pluginDoorbell: fds[0], hostDoorbell: fds[1], epoch: u32(12))
    }

    /// Step 3: the transport, made on the loop; it owns the bootstrap's descriptors.
    private static func makeTransport(path: String, reactor: Reactor, segment: ShmSegment, bootstrap: Bootstrap) async throws -> SendableBox<ShmTransport> {
        let result = await reactor.suspendOnLoop(orIfShutDown: SendableBox<ShmTransport>?.none) { continuation in
            continuation.resume(returning: SendableBox(ShmTransport(
                reactor: reactor, side: .plugin, segment: segment, doorbell: bootstrap.pluginDoorbell, peerDoorbell: bootstrap.hostDoorbell,
                socket: bootstrap.socket, peerDescription: "shm host at \(path)")))
        }
        guard let result else {
            bootstrap.close()  // no transport will own them: give the descriptors back
            throw ShmError(.io, "the reactor has shut down")
        }
        return result
    }
}
