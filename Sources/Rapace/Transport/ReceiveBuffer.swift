/// Bytes read from a socket and not consumed yet: `storage[start..<end]` of one array that
/// reads fill in place, so a received byte is copied once at most (into the frame that
/// keeps it), never from a read buffer into a decoding buffer first.
///
/// Shared by the stream and WebSocket decoders. When the free space at the end runs short,
/// the unconsumed bytes move to the front; the array grows only for a frame larger than it.
struct ReceiveBuffer {
    /// The array; the bytes in `start..<end` are the unconsumed ones. A decoder may rewrite
    /// them in place (WebSocket unmasking) but not move them.
    var storage: [UInt8]
    private(set) var start = 0
    private(set) var end = 0
    private let initialCapacity: Int

    init(capacity: Int = 64 * 1024) {
        initialCapacity = capacity
        storage = [UInt8](repeating: 0, count: capacity)
    }

    /// Unconsumed bytes.
    var count: Int { end - start }
    var isEmpty: Bool { end == start }

    /// The unconsumed byte at `offset` from `start`.
    subscript(offset: Int) -> UInt8 { storage[start + offset] }

    /// Calls `body` with free space of at least `minimum` bytes at the end (a socket read goes
    /// straight into it); `body` returns how many bytes it wrote (negative: none).
    mutating func withWritableSpace<E: Error>(minimum: Int, _ body: (UnsafeMutableRawBufferPointer) throws(E) -> Int) throws(E) -> Int {
        if storage.count - end < minimum {
            if start > 0 {
                // Compact: move the unconsumed bytes to the front.
                let count = end - start
                let from = start
                storage.withUnsafeMutableBytes { raw in
                    raw.baseAddress!.copyMemory(from: raw.baseAddress! + from, byteCount: count)
                }
                start = 0
                end = count
            }
            if storage.count - end < minimum {
                storage.append(contentsOf: repeatElement(0, count: max(minimum, storage.count)))
            }
        }
        let writable = end
        let result: Result<Int, E> = storage.withUnsafeMutableBytes { raw in
            do throws(E) { return .success(try body(UnsafeMutableRawBufferPointer(rebasing: raw[writable...]))) } catch { return .failure(error) }
        }
        let written = try result.get()
        if written > 0 { end += written }
        return written
    }

    /// One `read(2)` from `fd` into at least `minimum` bytes of free space: nil when nothing
    /// is there (EAGAIN), a count of 0 at the end of the stream. `drained` says the read came
    /// back short, so the socket is empty: with level-triggered epoll another read would only
    /// return EAGAIN, and the caller skips that system call.
    mutating func read(from fd: Int32, minimum: Int) throws(SystemError) -> (count: Int, drained: Bool)? {
        var offered = 0
        let count = try withWritableSpace(minimum: minimum) { (space) throws(SystemError) -> Int in
            offered = space.count
            switch try Sys.read(fd, space) {
            case .done(let count): return count
            case .wouldBlock: return -1
            }
        }
        return count < 0 ? nil : (count, count < offered)
    }

    /// Appends bytes that did not come from a read into the buffer (handshake leftovers, tests).
    mutating func append<Bytes: Collection<UInt8>>(_ bytes: Bytes) {
        _ = withWritableSpace(minimum: bytes.count) { space in
            space.copyBytes(from: bytes)
            return bytes.count
        }
    }

    /// Marks `count` bytes from `start` as consumed. An emptied buffer starts over at the
    /// front, and gives back the memory a large frame made it grow to.
    mutating func consume(_ count: Int) {
        precondition(count <= end - start, "ReceiveBuffer: consuming more than is buffered")
        start += count
        if start == end {
            start = 0
            end = 0
            if storage.count > 4 * initialCapacity { storage = [UInt8](repeating: 0, count: initialCapacity) }
        }
    }

    /// Calls `body` with the unconsumed bytes.
    func withUnconsumedBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try storage.withUnsafeBytes { raw in try body(UnsafeRawBufferPointer(rebasing: raw[start..<end])) }
    }
}
