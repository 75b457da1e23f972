#if canImport(Glibc)
import Glibc
#endif

extension StreamTransport {
    /// Connects to `address` without blocking the loop; `completion` runs on the loop.
    /// Call on the reactor's loop thread. Name resolution of a non-numeric host blocks briefly.
    public static func connect(to address: SocketAddress, reactor: Reactor, timeout: Duration = .seconds(10), completion: @escaping (Result<StreamTransport, TransportError>) -> Void) {
        reactor.preconditionInLoop()
        let fd: Int32
        let isUnix: Bool
        let connected: Bool
        do throws(TransportError) {
            (fd, isUnix, connected) = try address.startConnecting()
        } catch {
            completion(.failure(error))
            return
        }
        if connected {
            completion(.success(StreamTransport(reactor: reactor, socket: fd, isUnixDomain: isUnix, peerDescription: "\(address)")))
            return
        }
        // In progress: wait for writability (or the timeout).
        let pending = PendingConnect(reactor: reactor, fd: fd, address: address, completion: completion)
        let watcher = IOWatcher(reactor: reactor, fd: fd, onReadable: {})
        pending.watcher = watcher
        reactor.register(pending)
        pending.timer = reactor.schedule(after: timeout) {
            pending.finish(.failure(TransportError(.timeout, "connect to \(address) timed out after \(timeout)")), closeFD: true)
        }
        watcher.onWritable = {
            let error = Sys.socketError(fd)
            if error == 0 {
                pending.finish(.success(()), closeFD: false)
                completion(.success(StreamTransport(reactor: reactor, socket: fd, isUnixDomain: isUnix, peerDescription: "\(address)")))
            } else {
                let failure = SystemError("connect(\(address))", errno: Errno(rawValue: error))
                pending.finish(.failure(TransportError(.connectFailed, "cannot connect to \(address): \(failure.errno)", systemError: failure)), closeFD: true)
            }
        }
        watcher.setWriteEnabled(true)
    }

    /// Connects to `address` from any thread.
    ///
    /// The transport is loop-confined: use the box's value only on `reactor`'s loop thread.
    public static func connect(to address: SocketAddress, reactor: Reactor, timeout: Duration = .seconds(10)) async throws(TransportError) -> SendableBox<StreamTransport> {
        let result = await reactor.suspendOnLoop(orIfShutDown: Result<SendableBox<StreamTransport>, TransportError>.failure(Reactor.shutDownError)) { continuation in
            connect(to: address, reactor: reactor, timeout: timeout) { result in
                continuation.resume(returning: result.map { SendableBox($0) })
            }
        }
        return try result.get()
    }
}

extension SocketAddress {
    /// Resolves the address, opens a nonblocking stream socket and starts connecting it:
    /// the socket, whether it is a Unix domain socket, and whether the connect completed
    /// already (else, TCP only, it completes when the socket becomes writable). The socket
    /// is closed on failure.
    ///
    /// A Unix domain connect never stays in progress: it is connected on return, or throws.
    /// A Unix listener whose backlog is full throws `connectFailed` with `EAGAIN` (its
    /// ``TransportError/systemError``) and a message naming the backlog; it is worth
    /// retrying once the listener has accepted some, as are `ENOENT` (nothing bound at the
    /// path yet) and `ECONNREFUSED` (bound, not listening, or its listener closed).
    func startConnecting() throws(TransportError) -> (fd: Int32, isUnix: Bool, connected: Bool) {
        let resolved = try resolve()
        let fd: Int32
        do throws(SystemError) { fd = try Sys.socketStream(domain: resolved.domain) } catch {
            throw TransportError(.connectFailed, "socket for \(self): \(error)", systemError: error)
        }
        do throws(SystemError) {
            let connected = try resolved.withSockaddr { (pointer, length) throws(SystemError) in
                try Sys.connect(fd, pointer, length, describing: "\(self)")
            }
            return (fd, resolved.domain == AF_UNIX, connected)
        } catch {
            Sys.close(fd)
            if resolved.domain == AF_UNIX && error.errno == .wouldBlock {
                throw TransportError(.connectFailed, "cannot connect to \(self): the listener's backlog is full (EAGAIN); retry once it accepts", systemError: error)
            }
            throw TransportError(.connectFailed, "cannot connect to \(self): \(error.errno)", systemError: error)
        }
    }
}

/// A connect in progress (loop-confined). Registered with the reactor so a shutdown fails
/// it instead of leaving the caller waiting.
private final class PendingConnect: ReactorRegistration {
    let reactor: Reactor
    let fd: Int32
    let address: SocketAddress
    var watcher: IOWatcher?
    var timer: ReactorTimer?
    var completion: ((Result<StreamTransport, TransportError>) -> Void)?

    init(reactor: Reactor, fd: Int32, address: SocketAddress, completion: @escaping (Result<StreamTransport, TransportError>) -> Void) {
        self.reactor = reactor
        self.fd = fd
        self.address = address
        self.completion = completion
    }

    func reactorWillShutDown() {
        finish(.failure(TransportError(.closed, "reactor shut down while connecting to \(address)")), closeFD: true)
    }

    /// Stops watching; on failure closes the socket and reports the error. Idempotent.
    func finish(_ result: Result<Void, TransportError>, closeFD: Bool) {
        guard completion != nil else { return }
        reactor.unregister(self)
        watcher?.close()
        watcher = nil
        timer?.cancel()
        timer = nil
        let completion = self.completion
        self.completion = nil
        if closeFD { Sys.close(fd) }
        if case .failure(let error) = result { completion?(.failure(error)) }
    }
}

/// Carries a loop-confined object across an async boundary to code that hands it back to
/// the same loop. The value must only be used on its reactor's loop thread.
public struct SendableBox<Value>: @unchecked Sendable {
    // @unchecked Sendable: used only to return loop-confined objects to callers that
    // touch them on the loop (documented at each use).
    /// The boxed value; use it on its reactor's loop thread only.
    public let value: Value
    /// Boxes `value` (usually on its loop thread, to hand it across an `await`).
    public init(_ value: Value) { self.value = value }
}
