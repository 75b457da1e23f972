#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CRapaceShim

// The one place rapace makes system calls whose errno matters. A call goes through `retrying`
// (or `call`), which reads errno immediately after the call (no Swift code in between that
// could clobber it), retries EINTR, reports EAGAIN as `.wouldBlock` (`call`: an error too),
// and throws `SystemError` for everything else; the few that cannot (connect's own loop,
// mkdtemp, fdopendir, mmap, getsockopt(SO_ERROR), posix_spawn) read their error just as directly
// (Docs/architecture.md lists them). Nothing else in the module reads errno.

/// Outcome of a non-blocking I/O call.
@usableFromInline
enum IOResult<Value> {
    case done(Value)
    case wouldBlock
}

@usableFromInline
package enum Sys {
    /// Runs `body` until it returns something other than -1/EINTR.
    @inlinable
    static func retrying<T: FixedWidthInteger>(
        _ operation: @autoclosure () -> String, _ body: () -> T
    ) throws(SystemError) -> IOResult<T> {
        while true {
            let result = body()
            if result != -1 { return .done(result) }
            let code = Glibc.errno
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return .wouldBlock }
            throw SystemError(operation(), errno: Errno(rawValue: code))
        }
    }

    /// Like `retrying`, but `EAGAIN` is an error too (for calls that cannot block).
    @inlinable
    static func call<T: FixedWidthInteger>(
        _ operation: @autoclosure () -> String, _ body: () -> T
    ) throws(SystemError) -> T {
        while true {
            let result = body()
            if result != -1 { return result }
            let code = Glibc.errno
            if code == EINTR { continue }
            throw SystemError(operation(), errno: Errno(rawValue: code))
        }
    }

    // MARK: descriptors

    /// Closes `fd`. EINTR is not retried (Linux has already released the descriptor).
    package static func close(_ fd: Int32) {
        _ = Glibc.close(fd)
    }

    @inlinable
    static func read(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try retrying("read") { Glibc.read(fd, buffer.baseAddress, buffer.count) }
    }

    @inlinable
    static func write(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try retrying("write") { rapace_send(fd, buffer.baseAddress, buffer.count) }
    }

    /// `write(2)` for descriptors that are not sockets (eventfd, pipes).
    @inlinable
    static func writeFile(_ fd: Int32, _ buffer: UnsafeRawBufferPointer) throws(SystemError) -> IOResult<Int> {
        try retrying("write") { Glibc.write(fd, buffer.baseAddress, buffer.count) }
    }

    // MARK: Randomness

    /// Fills `buffer` from the kernel's CSPRNG (`getrandom`), retrying short reads and
    /// `EINTR`. Where the kernel refuses (no `getrandom`: a kernel before 3.17, or a seccomp
    /// filter), the standard library's generator fills the rest; it has other sources, and
    /// traps when it has none.
    static func fillRandom(_ buffer: UnsafeMutableRawBufferPointer) {
        var filled = 0
        while filled < buffer.count {
            let from = filled
            do throws(SystemError) {
                filled += try call("getrandom") { rapace_getrandom(buffer.baseAddress! + from, buffer.count - from) }
            } catch {
                var generator = SystemRandomNumberGenerator()
                fill(buffer, from: filled, using: &generator)
                return
            }
        }
    }

    /// Fills `buffer[start...]` from `generator`, eight bytes per draw (little-endian; the
    /// bytes of the last draw that do not fit are dropped). `fillRandom`'s fallback.
    static func fill(_ buffer: UnsafeMutableRawBufferPointer, from start: Int, using generator: inout some RandomNumberGenerator) {
        var index = start
        while index < buffer.count {
            let count = min(8, buffer.count - index)
            withUnsafeBytes(of: generator.next().littleEndian) { word in
                UnsafeMutableRawBufferPointer(rebasing: buffer[index..<(index + count)]).copyMemory(from: UnsafeRawBufferPointer(rebasing: word[..<count]))
            }
            index += count
        }
    }

    // MARK: eventfd

    static func eventfd() throws(SystemError) -> Int32 {
        try call("eventfd") { rapace_eventfd(0) }
    }

    /// Adds one to an eventfd counter. Saturation (EAGAIN) means a wakeup is pending anyway.
    @inlinable
    static func eventfdSignal(_ fd: Int32) {
        var one: UInt64 = 1
        _ = try? withUnsafeBytes(of: &one) { (p) throws(SystemError) in try writeFile(fd, p) }
    }

    /// Reads and resets an eventfd counter; returns 0 when it was already 0.
    @inlinable
    static func eventfdDrain(_ fd: Int32) -> UInt64 {
        var value: UInt64 = 0
        let r = try? withUnsafeMutableBytes(of: &value) { (p) throws(SystemError) in try read(fd, p) }
        if case .done(8)? = r { return value }
        return 0
    }

    // MARK: sockets

    static func socketStream(domain: Int32) throws(SystemError) -> Int32 {
        try call("socket") { rapace_socket_stream(domain) }
    }

    static func bind(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t, describing: String) throws(SystemError) {
        _ = try call("bind(\(describing))") { Glibc.bind(fd, address, length) }
    }

    static func listen(_ fd: Int32, backlog: Int32) throws(SystemError) {
        _ = try call("listen") { Glibc.listen(fd, backlog) }
    }

    /// Starts a non-blocking connect; returns false when it is still in progress
    /// (`EINPROGRESS`, TCP only: a Unix domain connect completes or fails at once).
    ///
    /// `EAGAIN` is an error, never "in progress": on a Unix domain socket it means the
    /// listener's backlog is full (the socket is left unconnected; it would look writable
    /// with no pending error, and its first write would fail `ENOTCONN`), on TCP that no
    /// local port or routing entry was free.
    static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t, describing: String) throws(SystemError) -> Bool {
        while true {
            if Glibc.connect(fd, address, length) == 0 { return true }
            let code = Glibc.errno
            if code == EINTR { continue }
            if code == EINPROGRESS { return false }
            throw SystemError("connect(\(describing))", errno: Errno(rawValue: code))
        }
    }

    static func accept(_ fd: Int32) throws(SystemError) -> IOResult<Int32> {
        try retrying("accept") { rapace_accept(fd, nil, nil) }
    }

    /// `sendmsg(2)` of `bytes` plus `descriptors` as one `SCM_RIGHTS` message
    /// (`MSG_NOSIGNAL`): the number of bytes sent. Each descriptor stays open here; the
    /// receiver gets its own copy.
    static func send(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, passing descriptors: [Int32]) throws(SystemError) -> IOResult<Int> {
        try retrying("sendmsg(SCM_RIGHTS)") {
            descriptors.withUnsafeBufferPointer { rapace_send_with_fds(fd, bytes.baseAddress, bytes.count, $0.baseAddress, Int32($0.count)) }
        }
    }

    /// `recvmsg(2)` into `buffer`, taking up to `descriptors.count` passed descriptors
    /// (close-on-exec) into `descriptors`; any beyond those are closed. Returns the number of
    /// bytes read (0 at end of file) and of descriptors received.
    static func receive(
        _ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, descriptors: inout [Int32]
    ) throws(SystemError) -> IOResult<(bytes: Int, descriptors: Int)> {
        var received: Int32 = 0
        let capacity = Int32(descriptors.count)
        let result = try retrying("recvmsg(SCM_RIGHTS)") {
            rapace_recv_with_fds(fd, buffer.baseAddress, buffer.count, &descriptors, capacity, &received)
        }
        switch result {
        case .done(let count): return .done((count, Int(received)))
        case .wouldBlock: return .wouldBlock
        }
    }

    /// For a socket that carries nothing but its liveness: reads one byte without blocking
    /// (a stray byte is discarded, so a level-triggered watcher does not fire again for it)
    /// and says whether the peer has gone: EOF, or an error other than EAGAIN/EINTR.
    static func discardByteAndCheckPeerGone(_ fd: Int32) -> Bool {
        var byte: UInt8 = 0
        switch try? retrying("recv(\(fd))", { recv(fd, &byte, 1, Int32(MSG_DONTWAIT)) }) {
        case .done(let count)?: return count == 0
        case .wouldBlock?: return false
        case nil: return true
        }
    }

    /// Shuts down the sending side of a socket (the peer reads EOF once it has read what was
    /// sent). Errors (ENOTCONN after a reset) are ignored: the caller closes the socket next,
    /// or its next read reports the reset.
    static func shutdownWrite(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
    }

    /// The pending error of a socket (SO_ERROR), 0 when none.
    static func socketError(_ fd: Int32) -> Int32 {
        var value: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &length) != 0 { return Glibc.errno }
        return value
    }

    static func setNoDelay(_ fd: Int32) {
        _ = rapace_set_nodelay(fd)
    }

    static func setReuseAddress(_ fd: Int32) {
        _ = rapace_set_reuseaddr(fd)
    }

    static func unlink(_ path: String) {
        _ = Glibc.unlink(path)
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    @inlinable
    static func monotonicNanoseconds() -> UInt64 { rapace_monotonic_ns() }

    /// The CPU this thread runs on now, or nil when unknown (no system call with glibc 2.35+).
    static func currentCPU() -> UInt32? {
        let cpu = rapace_current_cpu()
        return cpu >= 0 ? UInt32(cpu) : nil
    }

    /// CPUs online, read once.
    static let onlineCPUCount: Int = max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
}
