import CRapaceShim
import EchoService
import Foundation
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// The shared-memory transport across processes: rapace-echo as host (`serve --shm`) or
/// plugin (`plugin --shm`), this test process on the other side.
@Suite("Shared memory", .serialized, .sharesProcess)
struct ShmTests {
    @Test("a path beside the segment that exists and is not a socket is refused, not replaced")
    func bootstrapPathThatIsNotASocket() async throws {
        let path = ShmPath("not-a-socket")
        defer { path.cleanUp() }
        #expect(FileManager.default.createFile(atPath: path.socketPath, contents: Data("keep".utf8)))
        try await withReactor("not-a-socket") { reactor in
            let message = await onLoop(reactor) { () -> String? in
                do {
                    _ = try ShmListener(reactor: reactor, path: path.path) { _ in }
                    return nil
                } catch {
                    return "\(error)"
                }
            }
            #expect(message?.contains("\(path.socketPath): the path exists and is not a socket") == true, "\(message ?? "no error")")
        }
        #expect(FileManager.default.contents(atPath: path.socketPath) == Data("keep".utf8))
        #expect(access(path.path, F_OK) != 0, "the failed listener left its segment behind")
    }

    @Test("connecting to a Unix listener whose backlog is full is a clear error (EAGAIN), not a socket that looks connected")
    func fullUnixBacklog() throws {
        let path = ShmPath("backlog")
        defer { path.cleanUp() }
        let address = SocketAddress.unix(path: path.socketPath)
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(listener) }
        let bound = try address.resolve().withSockaddr { pointer, length in bind(listener, pointer, length) }
        #expect(bound == 0 && listen(listener, 0) == 0)
        // Connections the listener does not accept fill its backlog.
        var held: [Int32] = []
        defer { for fd in held { close(fd) } }
        var failure: TransportError?
        for _ in 0..<8 {
            do throws(TransportError) {
                let attempt = try address.startConnecting()
                held.append(attempt.fd)
                #expect(attempt.connected, "a Unix connect is never in progress")
            } catch {
                failure = error
                break
            }
        }
        let error = try #require(failure, "8 connects to a listener with backlog 0 all succeeded")
        #expect(error.code == .connectFailed)
        #expect(error.systemError?.errno == .wouldBlock)
        #expect(error.message.contains("backlog is full"), "\(error.message)")
        // Once the listener accepts one, a retry connects. Only a connection the backlog
        // holds can be accepted: without one, accept() on this blocking listener would wait
        // forever.
        try #require(!held.isEmpty, "the first connect already failed: \(error)")
        close(accept(listener, nil, nil))
        let again = try address.startConnecting()
        held.append(again.fd)
        #expect(again.connected)
    }

    @Test("a plugin whose connect to the bootstrap socket fails for good reports why at once, not as a timeout")
    func bootstrapConnectFailsAtOnce() async throws {
        let path = ShmPath("dgram-socket")
        defer { path.cleanUp() }
        _ = try ShmSegment.create(path: path.path, config: ShmConfig(ringCapacity: 16, slotSize: 4096, slotCount: 4))
        // A datagram socket at PATH.sock: a stream connect to it fails EPROTOTYPE.
        let dgram = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        defer { close(dgram) }
        let bound = try SocketAddress.unix(path: path.socketPath).resolve().withSockaddr { pointer, length in bind(dgram, pointer, length) }
        #expect(bound == 0)
        try await withReactor("dgram-socket") { reactor in
            do {
                _ = try await ShmTransport.connect(path: path.path, reactor: reactor, timeout: .seconds(3))
                Issue.record("connected to a datagram socket")
            } catch let error as ShmError {
                // Not `.timeout`: the plugin gave up on this error, not at its timeout.
                #expect(error.code == .io, "\(error)")
                #expect(error.message.contains(path.socketPath), "\(error.message)")
                #expect(error.systemError?.errno == Errno(rawValue: EPROTOTYPE), "\(error)")
            }
        }
    }

    @Test("every Echo method over shared memory; the segment and socket are removed on exit")
    func everyMethod() async throws {
        let host = try ShmHostProcess("every")
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            let session = try await Session.connect(shm: host.path.path, reactor: reactor, config: .default)
            let echo = EchoClient(session)
            #expect(try await echo.echo("héllo over shared memory, longer than sixteen bytes") == "héllo over shared memory, longer than sixteen bytes")
            #expect(try await echo.add(20, 22) == 42)
            do {
                try await echo.fail(code: 404, message: "not here")
                Issue.record("fail returned")
            } catch let error as RPCError {
                #expect(error.code == StatusCode(404) && error.message == "not here")
            }
            var items: [UInt32] = []
            for try await item in echo.countdown(from: 1000) { items.append(item) }
            #expect(items == Array((1...1000).reversed()))
            let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            #expect(try await echo.checksum(data) == MethodID.fnv1a64(data))
            try await echo.sleep(milliseconds: 5)
            let blob = try await echo.blob(size: 1 << 20)
            #expect(blob.count == 1 << 20 && blob.enumerated().allSatisfy { $0.element == UInt8($0.offset % 251) })
            await session.closeAndWait()
        }
        host.process.signal(SIGTERM)
        #expect(try host.process.wait() == 0)
        #expect(!host.path.filesExist)
    }

    @Test("a 16 MiB argument and a 16 MiB result (runs of many slots)")
    func sixteenMiB() async throws {
        let limit = ["--slot-count", "320", "--max-payload", "\(20 << 20)"]  // 20 MiB pool
        let host = try ShmHostProcess("big", arguments: limit)
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            var configuration = Session.Configuration()
            configuration.limits.maxPayloadSize = 20 << 20
            let session = try await Session.connect(shm: host.path.path, reactor: reactor, configuration: configuration)
            let echo = EchoClient(session)
            let data = [UInt8](unsafeUninitializedCapacity: 16 << 20) { buffer, count in
                for index in 0..<(16 << 20) { buffer[index] = UInt8(truncatingIfNeeded: index &* 2_654_435_761 >> 7) }
                count = 16 << 20
            }
            #expect(try await echo.checksum(data) == MethodID.fnv1a64(data))
            let blob = try await echo.blob(size: 16 << 20)
            #expect(blob.count == 16 << 20)
            #expect(blob[(16 << 20) - 1] == UInt8(((16 << 20) - 1) % 251))
            await session.closeAndWait()
        }
    }

    @Test("zero copy, receiving: the handler's view points into the mapping")
    func zeroCopyReceive() async throws {
        let path = ShmPath("zc-recv")
        defer { path.cleanUp() }
        let probe = ZeroCopyProbe()
        try await withReactor("host") { reactor in
            let server = RapaceServer(reactor: reactor, services: [probe])
            try await server.listen(shm: path.path)
            // The plugin is another process: rapace-echo's client mode calls Echo.checksum.
            let text = String(repeating: "zero-copy ", count: 500)
            let child = try ChildProcess(productsDirectory + "/rapace-echo", ["call", "--shm", path.path, "checksum", text])
            let line = try await child.nextLine(timeout: .seconds(10))
            #expect(try await child.runToExit(timeout: .seconds(10)).waitStatus == 0)
            #expect(line == "\(MethodID.fnv1a64(Array(text.utf8)))")
            let seen = probe.seen.withLock { $0 }
            #expect(seen.count == 1)
            #expect(seen.first?.borrowed == true, "the request payload is a view into the segment")
            #expect(seen.first?.insidePool == true, "the bytes the handler read lie inside the mapped pool")
            await server.shutdownGracefully()
        }
        #expect(!path.filesExist)
    }

    /// Echo.checksum's argument (a postcard [u8]: varint length, then byte i = i × `multiplier`)
    /// written in place in a buffer of `session`'s segment, and the FNV-1a-64 it should get.
    func checksumArgumentInPlace(_ session: Session, count: Int, multiplier: Int) async throws -> (SendableBox<Payload>, UInt64) {
        try await session.reactor.run { () -> (SendableBox<Payload>, UInt64) in
            let transport = try #require(session.transport as? ShmTransport)
            var prefix = PostcardWriter()
            prefix.writeVarint(UInt64(count))
            let buffer = try #require(transport.allocateBuffer(count: prefix.bytes.count + count))
            var hash = MethodID.fnvOffsetBasis
            buffer.withUnsafeMutableBytes { bytes in
                for (index, byte) in prefix.bytes.enumerated() { bytes[index] = byte }
                for index in 0..<count {
                    let value = UInt8(truncatingIfNeeded: index &* multiplier)
                    bytes[prefix.bytes.count + index] = value
                    hash = (hash ^ UInt64(value)) &* MethodID.fnvPrime
                }
            }
            return (SendableBox(Payload(borrowing: buffer)), hash)
        }
    }

    @Test("zero copy, sending: a ShmBuffer written in place is sent without a copy")
    func zeroCopySend() async throws {
        let host = try ShmHostProcess("zc-send")
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            let session = try await Session.connect(shm: host.path.path, reactor: reactor)
            let count = 200_000
            // Checksum's argument is a postcard [u8]: varint length, then the bytes.
            let copiedBefore = try await reactor.run { (session.transport as! ShmTransport).statistics.bytesCopiedIn }
            let (payload, expected) = try await checksumArgumentInPlace(session, count: count, multiplier: 13)
            let reply = try await session.call(EchoMethods.checksum.id, request: payload.value)
            #expect(try reply.decode { try $0.readVarint64() } == expected)
            let stats = try await reactor.run { (session.transport as! ShmTransport).statistics }
            #expect(stats.zeroCopySends == 1)
            #expect(stats.bytesCopiedIn == copiedBefore, "no payload byte was copied into the segment")
            await session.closeAndWait()
        }
    }

    @Test("a sent ShmBuffer belongs to the peer: sending it again is refused, and nothing leaks")
    func sentBufferIsNotSentAgain() async throws {
        let host = try ShmHostProcess("zc-resend")
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            let session = try await Session.connect(shm: host.path.path, reactor: reactor)
            let echo = EchoClient(session)
            let count = 300_000
            let slotCount = try await reactor.run { (session.transport as! ShmTransport).segment.config.slotCount }
            // Everything that holds the buffer lives in this scope.
            do {
                let (payload, expected) = try await checksumArgumentInPlace(session, count: count, multiplier: 29)
                let reply = try await session.call(EchoMethods.checksum.id, request: payload.value)
                #expect(try reply.decode { try $0.readVarint64() } == expected)
                #expect((payload.value.externalStorage as? ShmBuffer)?.wasSent == true)
                #expect(payload.value.count == count + 3, "the size stays known after the send")
                // The peer has freed the run; an ordinary call of the same size may reuse it.
                let other = [UInt8](repeating: 0xEE, count: count)
                #expect(try await echo.checksum(other) == MethodID.fnv1a64(other))
                // Sending it again (a retry, say) would send whatever those slots hold now.
                for attempt in [payload.value, payload.value.slice(0..<1000)] {
                    await #expect {
                        _ = try await session.call(EchoMethods.checksum.id, request: attempt)
                    } throws: { error in
                        guard let error = error as? RPCError else { return false }
                        return error.code == .failedPrecondition && error.message.contains("already sent")
                    }
                }
                let notified = try await reactor.run { session.sendNotification(EchoMethods.checksum.id, request: payload.value) }
                #expect(notified?.code == .failedPrecondition)
                // The session still serves.
                #expect(try await echo.add(2, 3) == 5)
            }
            // Every slot is free once the buffer is released.
            let free = try await reactor.run { (session.transport as! ShmTransport).freeSlotCount }
            #expect(free == slotCount)
            await session.closeAndWait()
        }
    }

    @Test("a copy of a buffer's slice queued before the buffer itself is sent in place is made from its bytes")
    func sliceCopiedThenBufferSent() async throws {
        let host = try ShmHostProcess("zc-slice")
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            let session = try await Session.connect(shm: host.path.path, reactor: reactor)
            let slotCount = try await reactor.run { (session.transport as! ShmTransport).segment.config.slotCount }
            do {
                let (payload, _) = try await checksumArgumentInPlace(session, count: 100_000, multiplier: 3)
                // One turn: the slice's frame (copied when the transport places it) is queued
                // first, then the whole buffer's (published in place after it).
                let refusals = try await reactor.run { () -> [StatusCode?] in
                    [payload.value.slice(0..<1000), payload.value].map { session.sendNotification(EchoMethods.checksum.id, request: $0)?.code }
                }
                #expect(refusals == [nil, nil])
                #expect((payload.value.externalStorage as? ShmBuffer)?.wasSent == true)
                #expect(try await EchoClient(session).add(1, 2) == 3)
            }
            // The peer frees both runs once its handlers are done with them.
            #expect(await waitUntil { (try? await reactor.run { (session.transport as! ShmTransport).freeSlotCount }) == Int(slotCount) })
            await session.closeAndWait()
        }
    }

    @Test("a buffer sent over another transport, then in place over its own segment, reaches both intact")
    func bufferSentElsewhereThenInPlace() async throws {
        let host = try ShmHostProcess("zc-elsewhere")
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            try await withReactor("in-memory-peer") { peerReactor in
                let session = try await Session.connect(shm: host.path.path, reactor: reactor)
                let (near, far) = InMemoryTransport.makePair(reactor, peerReactor)
                let server = try Session(transport: far, role: .acceptor, services: [EchoServer(DefaultEcho())])
                let client = try Session(transport: near, role: .initiator, services: [])
                try await startTogether(client, server)
                let (payload, expected) = try await checksumArgumentInPlace(session, count: 100_000, multiplier: 7)
                // One turn: the in-memory call's frame goes to a peer whose loop is held up,
                // then the buffer goes out in place over its own segment. The peer reads its
                // frame only after that, when the buffer's slots are the host's.
                let (call, refusal) = try await reactor.run { () -> (Task<Payload, any Error>, StatusCode?) in
                    peerReactor.execute { Sys.sleep(.milliseconds(300)) }
                    let call = Task.immediate(executorPreference: reactor) { try await client.call(EchoMethods.checksum.id, request: payload.value) }
                    return (call, session.sendNotification(EchoMethods.checksum.id, request: payload.value)?.code)
                }
                #expect(refusal == nil)
                let reply = try await value(of: call, within: .seconds(10), "the in-memory call")
                #expect(try reply.decode { try $0.readVarint64() } == expected)
                #expect((payload.value.externalStorage as? ShmBuffer)?.wasSent == true)
                await client.closeAndWait()
                await server.closeAndWait()
                await session.closeAndWait()
            }
        }
    }

    /// Sends a buffer it allocated to its caller, then tries to answer with it again.
    struct Resender: RPCService {
        static let result = MethodDescriptor(service: "Resender", method: "result", kind: .unary)
        static let items = MethodDescriptor(service: "Resender", method: "items", kind: .serverStream)
        static let take = MethodDescriptor(service: "Resender", method: "take", kind: .notification)
        var methods: [MethodDescriptor] { [Self.result, Self.items] }

        func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
            let buffer = try #require((context.session.frameTransport as? ShmTransport)?.allocateBuffer(count: 64))
            buffer.withUnsafeMutableBytes { $0.copyBytes(from: (0..<64).map { UInt8($0) }) }
            let payload = Payload(borrowing: buffer)
            switch method {
            case Self.result.id:
                // Over to the caller as a notification (a method it does not serve: dropped, freed).
                #expect(context.session.sendNotification(Self.take.id, request: payload) == nil)
                return payload
            default:
                try await context.send(encoded: payload)
                try await context.send(encoded: payload)
                return .empty
            }
        }
    }

    @Test("a handler cannot answer with, or stream, an ShmBuffer it already sent")
    func sentBufferIsNotAnsweredAgain() async throws {
        let path = ShmPath("zc-answer")
        defer { path.cleanUp() }
        try await withReactor("host") { reactor in
            let server = RapaceServer(reactor: reactor, services: [Resender()])
            try await server.listen(shm: path.path)
            try await withReactor("plugin") { clientReactor in
                let session = try await Session.connect(shm: path.path, reactor: clientReactor)
                await #expect {
                    _ = try await session.call(Resender.result.id, request: .empty)
                } throws: { ($0 as? RPCError)?.code == .failedPrecondition }
                var items: [[UInt8]] = []
                await #expect {
                    for try await item in session.serverStream(Resender.items.id, request: .empty) { items.append(item.bytes) }
                } throws: { ($0 as? RPCError)?.code == .failedPrecondition }
                #expect(items == [(0..<64).map { UInt8($0) }], "the first send of the buffer arrives, the second is refused")
                let free = try await clientReactor.run { (session.transport as! ShmTransport).freeSlotCount }
                #expect(free == ShmConfig.default.slotCount)
                await session.closeAndWait()
            }
            await server.shutdownGracefully()
        }
        #expect(!path.filesExist)
    }

    @Test("every slot is free again after 10 000 mixed calls")
    func slotsReturn() async throws {
        let host = try ShmHostProcess("slots")
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            let session = try await Session.connect(shm: host.path.path, reactor: reactor)
            let echo = EchoClient(session)
            let medium = [UInt8](repeating: 9, count: 20_000)
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<8 {
                    group.addTask {
                        for index in 0..<1250 {
                            switch (worker + index) % 5 {
                            case 0: _ = try await echo.echo("a message that is longer than sixteen bytes \(index)")
                            case 1: _ = try await echo.checksum(medium)
                            case 2: _ = try await echo.blob(size: 70_000)  // two slots
                            case 3: _ = try await echo.add(1, 2)
                            default: for try await _ in echo.countdown(from: 3) {}
                            }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let total = Int(ShmConfig.default.slotCount)
            var free = 0
            for _ in 0..<200 {
                free = await onLoop(reactor) { (session.transport as! ShmTransport).freeSlotCount }
                if free == total { break }
                try await Task.sleep(for: .milliseconds(10))
            }
            #expect(free == total)
            await session.closeAndWait()
        }
    }

    @Test("a full ring and an exhausted pool make senders wait, never deadlock or lose frames")
    func backpressure() async throws {
        let host = try ShmHostProcess("tiny", arguments: ["--ring-capacity", "4", "--slot-size", "4096", "--slot-count", "4"])
        defer { host.stop() }
        try await withReactor("plugin") { reactor in
            let session = try await Session.connect(shm: host.path.path, reactor: reactor)
            let echo = EchoClient(session)
            let sums = try await withTimeout(.seconds(60), "300 concurrent calls on a 4-slot pool") {
                try await withThrowingTaskGroup(of: Bool.self) { group in
                    for index in 0..<300 {
                        group.addTask {
                            let data = [UInt8](repeating: UInt8(index % 256), count: 3000 + index)
                            let blob = try await echo.blob(size: 3000)
                            // A big request whose big answer needs slots while the request's own
                            // slots are still leased by the handler on the other side.
                            let text = String(repeating: "x", count: 2500 + index)
                            let echoed = try await echo.echo(text)
                            return try await echo.checksum(data) == MethodID.fnv1a64(data) && blob.count == 3000 && echoed == text
                        }
                    }
                    var good = 0
                    for try await ok in group where ok { good += 1 }
                    return good
                }
            }
            #expect(sums == 300)
            let stats = try await reactor.run { (session.transport as! ShmTransport).statistics }
            #expect(stats.stalls > 0, "the test did fill the ring or the pool")
            await session.closeAndWait()
        }
    }

    @Test("a hostile plugin: crafted descriptors are protocol errors for that connection only")
    func hostilePeer() async throws {
        let path = ShmPath("hostile")
        defer { path.cleanUp() }
        try await withReactor("host") { reactor in
            let server = RapaceServer(reactor: reactor, services: [EchoServer(DefaultEcho())])
            try await server.listen(shm: path.path)
            let unixPath = temporarySocketPath("hostile-healthy")
            let unix = try await server.listen(on: .unix(path: unixPath))
            try await withReactor("healthy") { clientReactor in
                let healthy = try await Session.connect(to: unix, reactor: clientReactor)
                let config = ShmConfig.default
                let slotSize = config.slotSize
                var cases: [(String, @Sendable (RawShmPeer) -> Void)] = [
                    ("bad slot index", { $0.push(FrameDescriptor(messageID: $0.nextID(), channelID: 1, methodID: 1, payloadSlot: 9999, payloadLength: 100, flags: .data)) }),
                    ("stale generation", { peer in
                        let slot = peer.claimSlot(generation: 5)!
                        peer.push(FrameDescriptor(messageID: peer.nextID(), channelID: 1, methodID: 1, payloadSlot: UInt32(slot), payloadGeneration: 4, payloadLength: 100, flags: .data))
                    }),
                    ("a run reaching past the peer's slot into a free one", { peer in
                        let slot = peer.claimSlot(generation: 7)!
                        peer.push(FrameDescriptor(messageID: peer.nextID(), channelID: 1, methodID: 1, payloadSlot: UInt32(slot), payloadGeneration: 7, payloadLength: slotSize + 1, flags: .data))
                    }),
                    ("a slot state that is no side's (3)", { peer in
                        let slot = peer.claimSlot(generation: 9)!
                        peer.forceSlotState(slot, 3)
                        peer.push(FrameDescriptor(messageID: peer.nextID(), channelID: 1, methodID: 1, payloadSlot: UInt32(slot), payloadGeneration: 9, payloadLength: 100, flags: .data))
                    }),
                    ("offset + length past the pool", { $0.push(FrameDescriptor(messageID: $0.nextID(), channelID: 1, methodID: 1, payloadSlot: config.slotCount - 1, payloadLength: 2 * slotSize, flags: .data)) }),
                    ("huge length", { $0.push(FrameDescriptor(messageID: $0.nextID(), channelID: 1, methodID: 1, payloadSlot: 0, payloadLength: 0xFFFF_FFF0, flags: .data)) }),
                    ("inline length over 16", { $0.push(FrameDescriptor(messageID: $0.nextID(), channelID: 1, methodID: 1, payloadLength: 40, flags: .data)) }),
                    ("channel 0 without CONTROL", { $0.push(FrameDescriptor(messageID: $0.nextID(), channelID: 0, methodID: 1, flags: .data)) }),
                    ("corrupt ring index", { $0.corruptTail(to: 1 << 40) }),
                ]
                for round in 0..<10 {
                    let bytes = (0..<64).map { _ in UInt8.random(in: 0...255) }
                    cases.append(("random descriptor \(round)", { peer in peer.push(raw: bytes) }))
                }
                let segmentPath = path.path
                for (name, attack) in cases {
                    // The raw peer blocks (the bootstrap message, the host's Hello, the end of
                    // the connection) while the host's loop and the healthy client's calls
                    // need the cooperative threads: it runs on a thread of its own
                    // (Docs/testing.md), one attack at a time.
                    let random = name.hasPrefix("random")
                    let peer = try await whenTheHostIsFree {
                        try await onOwnThread("hostile-peer") { Result { SendableBox(try RawShmPeer(path: segmentPath)) } }.get()
                    }
                    let closed = try await onOwnThread("hostile-peer") {
                        Result { () throws -> Bool in
                            try peer.value.handshake()
                            attack(peer.value)
                            // Random bytes may even form a valid frame; all that matters is
                            // that the host survives and keeps serving.
                            return peer.value.hostClosed(within: random ? .milliseconds(200) : .seconds(10))
                        }
                    }.get()
                    if !random { #expect(closed, "\(name): the host drops the connection") }
                    #expect(try await EchoClient(healthy).add(1, 1) == 2, "\(name): the other connection is still served")
                }
                // A well-behaved plugin is served after all that.
                let good = try await whenTheHostIsFree { try await Session.connect(shm: path.path, reactor: clientReactor) }
                #expect(try await EchoClient(good).echo("fine") == "fine")
                await good.closeAndWait()
                await healthy.closeAndWait()
            }
            await server.shutdownGracefully()
        }
        #expect(!path.filesExist)
    }

    @Test(
        "kill -9 of the plugin with 1000 calls in flight: all fail UNAVAILABLE within 100 ms; nothing leaks",
        .ownsProcess("a dead peer must be noticed within 100 ms"))
    func pluginKilled() async throws {
        let path = ShmPath("kill")
        defer { path.cleanUp() }
        try await withReactor("host") { reactor in
            let ready = Locked<SendableBox<Session>?>(nil)
            let listener = try await startShmHost(
                on: reactor, path: path.path, services: [], started: { session, _ in ready.withLock { $0 = SendableBox(session) } })
            let plugin = try ShmPluginProcess(path: path.path)
            try plugin.waitConnected()
            var session: Session?
            for _ in 0..<500 where session == nil {
                session = ready.withLock { $0?.value }
                try await Task.sleep(for: .milliseconds(2))
            }
            let host = try #require(session)
            let echo = EchoClient(host)
            #expect(try await echo.add(2, 2) == 4)
            let failedAt = Locked<[ContinuousClock.Instant]>([])
            let codes = Locked<[StatusCode]>([])
            let calls = (0..<1000).map { index in
                Task {
                    do {
                        try await echo.sleep(milliseconds: 30_000)
                    } catch let error as RPCError {
                        failedAt.withLock { $0.append(.now) }
                        codes.withLock { $0.append(error.code) }
                    } catch {}
                }
            }
            // Wait until all 1000 are in flight on the host.
            for _ in 0..<500 {
                if await onLoop(reactor, { host.outgoing.count }) == 1000 { break }
                try await Task.sleep(for: .milliseconds(5))
            }
            #expect(await onLoop(reactor) { host.outgoing.count } == 1000)
            let killedAt = ContinuousClock.now
            plugin.process.signal(SIGKILL)
            for call in calls { await call.value }
            let last = try #require(failedAt.withLock { $0.max() })
            #expect(last - killedAt < .milliseconds(100), "all pending calls failed \(last - killedAt) after the kill")
            #expect(codes.withLock { $0.count } == 1000 && codes.withLock { $0.allSatisfy { $0 == .unavailable } })
            try plugin.process.wait()
            // The host recycled the segment: every slot free, no transport left registered.
            let state = await onLoop(reactor) { (listener.value.activeTransport == nil, ShmSlotPool(segment: listener.value.segment, side: .host).freeCount) }
            #expect(state.0)
            #expect(state.1 == Int(ShmConfig.default.slotCount))
            await onLoop(reactor) { listener.value.close() }
        }
        #expect(!path.filesExist, "segment and socket files removed")
    }

    @Test("an idle connected pair uses at most 50 ms of CPU in 10 s", .ownsProcess("bounds the CPU time of an idle pair"))
    func idleCPU() async throws {
        let host = try ShmHostProcess("idle")
        defer { host.stop() }
        let plugin = try ShmPluginProcess(path: host.path.path)
        try plugin.waitConnected()
        try await Task.sleep(for: .milliseconds(200))
        let before = (try #require(cpuTicks(of: host.process.pid)), try #require(cpuTicks(of: plugin.process.pid)))
        try await Task.sleep(for: .seconds(10))
        // Both must still be alive (a dead process has no ticks to compare).
        let after = (try #require(cpuTicks(of: host.process.pid)), try #require(cpuTicks(of: plugin.process.pid)))
        let used = (after.0 - before.0) + (after.1 - before.1)  // ticks of 10 ms
        #expect(used * 10 <= 50, "idle pair used \(used * 10) ms of CPU in 10 s")
    }
}

/// Echo.checksum served in place: records whether the payload was a view into the segment.
final class ZeroCopyProbe: RPCService, Sendable {
    struct Observation: Sendable {
        let borrowed: Bool
        let insidePool: Bool
    }

    let seen = Mutex<[Observation]>([])

    var methods: [MethodDescriptor] { [EchoMethods.checksum] }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        let buffer = request.externalStorage as? ShmBuffer
        let (hash, inside) = try request.withUnsafeBytes { raw throws(PostcardError) -> (UInt64, Bool) in
            var reader = PostcardReader(raw)
            let count = try reader.readCount(minimumElementSize: 1)
            let bytes = try reader.readRawBytes(count: count)  // a view: no copy
            try reader.finish()
            var hash = MethodID.fnvOffsetBasis
            for byte in bytes { hash = (hash ^ UInt64(byte)) &* MethodID.fnvPrime }
            return (hash, buffer.map { $0.segment.poolContains(bytes.baseAddress!) } ?? false)
        }
        seen.withLock { $0.append(Observation(borrowed: buffer != nil, insidePool: inside)) }
        return .encoding { $0.writeVarint(hash) }
    }
}
