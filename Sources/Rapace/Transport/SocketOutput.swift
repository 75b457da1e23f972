/// Bytes waiting to be written to a non-blocking socket: appended at the end, written from
/// the front. The one write loop of the stream and WebSocket transports and of the
/// WebSocket handshake.
///
/// It remembers whether a write would have blocked since the queue was last empty, so its
/// owner can watch for writability meanwhile and tell whoever produces the bytes when the
/// backlog is gone (``FrameTransportHandler/transportDidDrainOutput()``).
struct SocketOutput {
    /// What is queued; bytes before `start` are already written. Append to it freely.
    var bytes: [UInt8]
    private(set) var start = 0
    /// A write would have blocked and the queue has not been empty since.
    private(set) var isBacklogged = false

    init(_ bytes: [UInt8] = []) { self.bytes = bytes }

    /// Bytes not yet written.
    var count: Int { bytes.count - start }
    var isEmpty: Bool { start == bytes.count }

    /// What a ``write(to:)`` achieved.
    enum Progress {
        /// Everything queued is written; `afterBacklog` when an earlier write had blocked.
        case drained(afterBacklog: Bool)
        /// The socket took what it could; the rest waits for writability.
        case blocked
    }

    /// Writes as much as the socket takes. Errors other than `EAGAIN`/`EINTR` are thrown.
    mutating func write(to fd: Int32) throws(SystemError) -> Progress {
        while start < bytes.count {
            let from = start
            let result = try bytes.withUnsafeBytes { raw -> Result<IOResult<Int>, SystemError> in
                do throws(SystemError) {
                    return .success(try Sys.write(fd, UnsafeRawBufferPointer(rebasing: raw[from...])))
                } catch {
                    return .failure(error)
                }
            }.get()
            switch result {
            case .done(let written): start += written
            case .wouldBlock:
                isBacklogged = true
                if start >= 64 << 10 && start * 2 >= bytes.count {
                    // Under sustained backpressure the queue may never empty: drop what is
                    // written instead of keeping everything sent since it last did.
                    bytes.removeFirst(start)
                    start = 0
                }
                return .blocked
            }
        }
        // Everything written: keep a modest buffer for the next turn, drop a huge one.
        if bytes.capacity > 1 << 20 { bytes = [] } else { bytes.removeAll(keepingCapacity: true) }
        start = 0
        defer { isBacklogged = false }
        return .drained(afterBacklog: isBacklogged)
    }

    /// Forgets everything queued (the socket is closing).
    mutating func discard() {
        bytes = []
        start = 0
        isBacklogged = false
    }
}
