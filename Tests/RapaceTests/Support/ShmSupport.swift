import CRapaceShim
import EchoService
import Foundation
import RapaceTestSupport
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// A unique segment path under /dev/shm, with its bootstrap socket, removed by `cleanUp`.
struct ShmPath {
    let path: String
    init(_ tag: String) { path = temporaryPath(in: "/dev/shm", tag) }
    var socketPath: String { path + ".sock" }
    func cleanUp() {
        unlink(path)
        unlink(socketPath)
    }
    var filesExist: Bool { access(path, F_OK) == 0 || access(socketPath, F_OK) == 0 }
}

/// Listens on `path` on `reactor`'s loop and serves `services` to each plugin that connects:
/// one initiator session per connection, started at once. `prepare` runs with each accepted
/// transport before its session is made; `started` gets each session and how its start ended.
/// Both run on the loop. The caller closes the listener, on the loop.
func startShmHost(
    on reactor: Reactor, path: String, config: ShmConfig = .default, services: [any RPCService] = [EchoServer(DefaultEcho())],
    prepare: @escaping @Sendable (ShmTransport) -> Void = { _ in },
    started: @escaping @Sendable (Session, Result<Void, RPCError>) -> Void = { _, _ in }
) async throws -> SendableBox<ShmListener> {
    try await reactor.run {
        SendableBox(try ShmListener(reactor: reactor, path: path, config: config) { transport in
            prepare(transport)
            guard let session = try? Session(transport: transport, role: .initiator, services: services) else { return }
            session.start { result in started(session, result) }
        })
    }
}

/// A host (``startShmHost(on:path:config:services:prepare:started:)``) on its own reactor
/// with a fresh segment under /dev/shm, and a reactor for the plugin side: `body` gets the
/// path, the host's reactor, the listener and the plugin's reactor. However `body` ends, the
/// listener is closed, the reactors shut down and the files removed.
func withShmHost<T>(
    _ tag: String, config: ShmConfig = .default, services: [any RPCService] = [EchoServer(DefaultEcho())],
    prepare: @escaping @Sendable (ShmTransport) -> Void = { _ in },
    started: @escaping @Sendable (Session, Result<Void, RPCError>) -> Void = { _, _ in },
    _ body: (ShmPath, Reactor, SendableBox<ShmListener>, Reactor) async throws -> T
) async throws -> T {
    let path = ShmPath(tag)
    defer { path.cleanUp() }
    return try await withReactor("\(tag)-host") { hostReactor in
        let listener = try await startShmHost(on: hostReactor, path: path.path, config: config, services: services, prepare: prepare, started: started)
        defer { hostReactor.execute { listener.value.close() } }
        return try await withReactor("\(tag)-plugin") { pluginReactor in
            try await body(path, hostReactor, listener, pluginReactor)
        }
    }
}

/// `rapace-echo serve --shm PATH …` as a child process (the host).
final class ShmHostProcess: @unchecked Sendable {
    let process: ChildProcess
    let path: ShmPath

    init(_ tag: String, arguments: [String] = []) throws {
        path = ShmPath(tag)
        process = try ChildProcess(productsDirectory + "/rapace-echo", ["serve", "--shm", path.path] + arguments)
        let line = try process.readLine()
        guard line == "listening on \(path.path)" else {
            process.terminate()
            throw TestFailure("unexpected first line from rapace-echo serve --shm: \(line)")
        }
    }

    func stop() {
        process.terminate()
        path.cleanUp()
    }

    deinit { stop() }
}

/// `rapace-echo plugin --shm PATH` as a child process (serves Echo to the host).
final class ShmPluginProcess: @unchecked Sendable {
    let process: ChildProcess

    init(path: String, arguments: [String] = []) throws {
        process = try ChildProcess(productsDirectory + "/rapace-echo", ["plugin", "--shm", path] + arguments)
    }

    func waitConnected() throws {
        let line = try process.readLine()
        guard line.hasPrefix("connected to ") else { throw TestFailure("unexpected line from rapace-echo plugin: \(line)") }
    }

    deinit { process.terminate() }
}

/// What `connect` returns once the shared-memory host at hand lets a new plugin in, tried
/// again every 10 ms (for at most `timeout`) while it fails: a host refuses a plugin while it
/// still serves the previous one (it closes the socket without a message), and the end of
/// that one's connection may not have reached its loop yet. The last failure is rethrown.
func whenTheHostIsFree<T>(timeout: Duration = .seconds(10), _ connect: () async throws -> T) async throws -> T {
    let deadline = ContinuousClock.now + timeout
    while true {
        do {
            return try await connect()
        } catch {
            guard ContinuousClock.now < deadline else { throw error }
            try await Task.sleep(for: .milliseconds(10))
        }
    }
}

/// A plugin written by hand against the segment layout, for hostile-peer tests: it speaks
/// just enough of the protocol to get past the handshake, then writes whatever it is told.
final class RawShmPeer {
    let segment: ShmSegment
    let socket: Int32
    let pluginDoorbell: Int32
    let hostDoorbell: Int32
    private var tail: UInt64 = 0
    private var head: UInt64 = 0
    private var messageID: UInt64 = 1

    init(path: String) throws {
        segment = try ShmSegment.open(path: path, expecting: nil)
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        let resolved = try SocketAddress.unix(path: path + ".sock").resolve()
        let rc = resolved.withSockaddr { pointer, length in Glibc.connect(fd, pointer, length) }
        guard rc == 0 else {
            close(fd)
            throw TestFailure("connect to \(path).sock failed: errno \(errno)")
        }
        var message = [UInt8](repeating: 0, count: 16)
        var fds: [Int32] = [-1, -1]
        var received: Int32 = 0
        let n = message.withUnsafeMutableBytes { rapace_recv_with_fds(fd, $0.baseAddress, 16, &fds, 2, &received) }
        guard n == 16, received == 2 else {
            close(fd)
            throw TestFailure("bad bootstrap message")
        }
        socket = fd
        pluginDoorbell = fds[0]
        hostDoorbell = fds[1]
        tail = rapace_load_acquire_u64(segment.ringBase(1) + ShmLayout.ringTail)
        head = rapace_load_acquire_u64(segment.ringBase(0) + ShmLayout.ringHead)
    }

    deinit {
        close(socket)
        close(pluginDoorbell)
        close(hostDoorbell)
    }

    /// Writes a raw 64-byte descriptor into the plugin → host ring and rings the host.
    func push(_ descriptor: FrameDescriptor) {
        push(raw: descriptor.encodedBytes)
    }

    func push(raw: [UInt8]) {
        let ring = segment.ringBase(1)
        let entry = ring + ShmLayout.ringDescriptors + Int(tail % UInt64(segment.config.ringCapacity)) * 64
        raw.withUnsafeBytes { entry.copyMemory(from: $0.baseAddress!, byteCount: 64) }
        tail += 1
        rapace_store_release_u64(ring + ShmLayout.ringTail, tail)
        Sys.eventfdSignal(hostDoorbell)
    }

    /// Overwrites the producer index of the plugin → host ring (corruption test).
    func corruptTail(to value: UInt64) {
        rapace_store_release_u64(segment.ringBase(1) + ShmLayout.ringTail, value)
        Sys.eventfdSignal(hostDoorbell)
    }

    /// Sends Hello (acceptor) inline and reads the host's Hello; throws when the host's first
    /// descriptor is not one (it throws rather than records an issue: the raw peer runs on a
    /// thread of its own, where an issue may not be attributed to the test).
    func handshake() throws {
        var frame = Frame(descriptor: FrameDescriptor(messageID: nextID(), channelID: 0, methodID: 0, flags: .control), payload: Payload(Hello(role: .acceptor).encoded()))
        frame.prepareForSending()
        push(frame.descriptor)
        let hello = try nextHostDescriptor()
        guard hello.channelID == 0 && hello.methodID == 0 else {
            throw TestFailure("the host's first descriptor is not its Hello: channel \(hello.channelID), method \(hello.methodID)")
        }
        releaseSlots(of: hello)
    }

    func nextID() -> UInt64 {
        defer { messageID += 1 }
        return messageID
    }

    /// The next descriptor the host published (polling, bounded).
    func nextHostDescriptor(timeout: Duration = .seconds(5)) throws -> FrameDescriptor {
        let ring = segment.ringBase(0)
        let deadline = ContinuousClock.now + timeout
        while rapace_load_acquire_u64(ring + ShmLayout.ringTail) == head {
            guard ContinuousClock.now < deadline else { throw TestFailure("the host published nothing within \(timeout)") }
            usleep(1000)
        }
        let entry = ring + ShmLayout.ringDescriptors + Int(head % UInt64(segment.config.ringCapacity)) * 64
        let descriptor = FrameDescriptor(decoding: UnsafeRawPointer(entry))
        head += 1
        rapace_store_release_u64(ring + ShmLayout.ringHead, head)
        return descriptor
    }

    /// Frees the slots of a descriptor the host sent (as a real plugin would after reading it).
    func releaseSlots(of descriptor: FrameDescriptor) {
        guard !descriptor.isInline else { return }
        let slotSize = Int(segment.config.slotSize)
        let count = max(1, (Int(descriptor.payloadOffset) + Int(descriptor.payloadLength) + slotSize - 1) / slotSize)
        segment.clearSlotStates(Int(descriptor.payloadSlot)..<(Int(descriptor.payloadSlot) + count))
    }

    /// Claims a free slot as the plugin would (state 2) and stamps it with `generation`;
    /// returns its index.
    func claimSlot(generation: UInt32) -> Int? {
        for slot in 0..<Int(segment.config.slotCount) {
            let pointer = segment.slotStateWord(slot / SlotStates.slotsPerWord)
            let field = UInt64(3) << UInt64(2 * (slot % SlotStates.slotsPerWord))
            var found = rapace_load_acquire_u64(pointer)
            while found & field == 0 {
                if rapace_cas_u64(pointer, &found, found | (SlotStates.pattern(2) & field)) != 0 {
                    rapace_store_relaxed_u32(segment.slotGenerationPointer(slot), generation)
                    return slot
                }
            }
        }
        return nil
    }

    /// Writes `state` into a slot's field, whatever it held (a hostile peer's write).
    func forceSlotState(_ slot: Int, _ state: UInt64) {
        let pointer = segment.slotStateWord(slot / SlotStates.slotsPerWord)
        let shift = UInt64(2 * (slot % SlotStates.slotsPerWord))
        var found = rapace_load_acquire_u64(pointer)
        while rapace_cas_u64(pointer, &found, (found & ~(3 << shift)) | (state << shift)) == 0 {}
    }

    /// Whether the host closed the bootstrap socket within `timeout` (it drops the connection
    /// after a protocol violation).
    func hostClosed(within timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            var poller = pollfd(fd: socket, events: Int16(POLLIN), revents: 0)
            if poll(&poller, 1, 10) > 0 {
                var byte: UInt8 = 0
                if recv(socket, &byte, 1, Int32(MSG_DONTWAIT)) == 0 { return true }
            }
        }
        return false
    }
}

extension ShmSegment {
    /// Zeroes the state fields of `slots`, whatever they held, with one atomic AND (release)
    /// per state word: what a peer's free writes, for tests that play the peer.
    func clearSlotStates(_ slots: Range<Int>) {
        _ = SlotStates.forEachWord(slots) { word, mask in
            rapace_fetch_and_release_u64(slotStateWord(word), ~mask)
            return true
        }
    }

    /// A slot's state now (acquire): 0 free, else the tag of the side that allocated it.
    func slotState(_ slot: Int) -> UInt32 {
        let word = rapace_load_acquire_u64(slotStateWord(slot / SlotStates.slotsPerWord))
        return UInt32(truncatingIfNeeded: word >> UInt64(2 * (slot % SlotStates.slotsPerWord))) & 3
    }
}

extension LeaseBitmap {
    /// Whether `slot`'s bit is set.
    func contains(_ slot: Int) -> Bool { bits(ofStateWord: slot / SlotStates.slotsPerWord) >> UInt32(slot % SlotStates.slotsPerWord) & 1 != 0 }
}

/// Pins the calling thread to `cpu` (`sched_setaffinity` is behind `_GNU_SOURCE`: looked up
/// with dlsym). False when the CPU cannot be used.
func pinCurrentThread(to cpu: Int) -> Bool {
    typealias SetAffinity = @convention(c) (pid_t, Int, UnsafeRawPointer) -> Int32
    guard let handle = dlopen(nil, RTLD_NOW), let symbol = dlsym(handle, "sched_setaffinity") else { return false }
    let setAffinity = unsafeBitCast(symbol, to: SetAffinity.self)
    var mask = cpu_set_t()
    withUnsafeMutableBytes(of: &mask) { $0[cpu / 8] |= UInt8(1) << UInt8(cpu % 8) }
    return withUnsafeBytes(of: &mask) { setAffinity(0, $0.count, $0.baseAddress!) } == 0
}
