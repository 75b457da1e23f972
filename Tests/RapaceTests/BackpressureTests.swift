import Dispatch
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// `Session.whenOutputDrained`: a producer faster than its peer keeps the transport's queue
/// bounded and continues when the backlog is written, over each transport that can fill.
@Suite("Output backpressure", .sharesProcess)
struct BackpressureTests {
    /// Counts notifications and their payload bytes.
    final class Sink: RPCService, Sendable {
        static let take = MethodDescriptor(service: "Sink", method: "take", kind: .notification)
        static let received = MethodDescriptor(service: "Sink", method: "received", kind: .unary)
        let totals = Mutex<(messages: UInt64, bytes: UInt64)>((0, 0))

        var methods: [MethodDescriptor] { [Self.take, Self.received] }

        func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
            switch method {
            case Self.take.id:
                let count = UInt64(request.count)
                totals.withLock { $0 = ($0.messages + 1, $0.bytes + count) }
                return .empty
            case Self.received.id:
                let (messages, bytes) = totals.withLock { $0 }
                return .encoding {
                    $0.writeVarint(messages)
                    $0.writeVarint(bytes)
                }
            default:
                throw RPCError(.unimplemented, "no such method")
            }
        }
    }

    /// Sends `total` notifications of `size` bytes on the loop, never letting more than
    /// `limit` bytes wait in the transport: past it, it continues from `whenOutputDrained`.
    final class Producer: @unchecked Sendable {
        // @unchecked Sendable: used only on the session's loop thread.
        let session: Session
        let total: Int
        let payload: Payload
        let limit: Int
        var sent = 0
        /// Waits for the transport's drain: registrations that left output queued after
        /// the flush `whenOutputDrained` makes.
        var waits = 0
        var largestQueue = 0
        /// Callbacks that ran inside `whenOutputDrained`, or came with output still queued
        /// or on a closed session (none may: the producer never closes its session), and
        /// what the first saw.
        var badCallbacks = 0
        var firstBadCallback: String?
        private var insideBurst = false
        var done: CheckedContinuation<Void, any Error>?

        init(session: Session, total: Int, size: Int, limit: Int) {
            self.session = session
            self.total = total
            self.payload = Payload([UInt8](repeating: 7, count: size))
            self.limit = limit
        }

        func run() async throws {
            try await withCheckedThrowingContinuation { continuation in
                session.reactor.execute {
                    self.done = continuation
                    self.burst()
                }
            }
        }

        func burst() {
            let outer = insideBurst
            insideBurst = true
            defer { insideBurst = outer }
            while sent < total && session.queuedOutputBytes < limit {
                if let error = session.sendNotification(Sink.take.id, request: payload) {
                    done?.resume(throwing: error)
                    done = nil
                    return
                }
                sent += 1
                largestQueue = max(largestQueue, session.queuedOutputBytes)
            }
            if sent == total {
                done?.resume()
                done = nil
                return
            }
            session.whenOutputDrained { [self] in
                // Counted here on the loop thread, asserted from the test's task (an issue
                // recorded here might not be attributed to the test).
                let queued = session.queuedOutputBytes
                if insideBurst || queued != 0 || session.phase == .closed {
                    badCallbacks += 1
                    if firstBadCallback == nil {
                        firstBadCallback = "\(insideBurst ? "inside the call, " : "")\(queued) bytes queued, phase \(session.phase)"
                    }
                }
                burst()
            }
            // It flushed: what is still queued, the callback waits for the transport to write.
            if session.queuedOutputBytes > 0 { waits += 1 }
        }
    }

    private func received(_ session: Session) async throws -> (messages: UInt64, bytes: UInt64) {
        try await session.call(Sink.received.id, request: .empty).decode { (try $0.readVarint64(), try $0.readVarint64()) }
    }

    @Test("over shared memory: a 4-descriptor ring; the queue stays bounded and every notification arrives")
    func sharedMemory() async throws {
        let path = ShmPath("drain")
        defer { path.cleanUp() }
        let sink = Sink()
        try await withReactor("drain-host") { hostReactor in
            let server = RapaceServer(reactor: hostReactor, services: [sink])
            try await server.listen(shm: path.path, config: ShmConfig(ringCapacity: 4, slotSize: 4096, slotCount: 8))
            try await withReactor("drain-plugin") { reactor in
                let session = try await Session.connect(shm: path.path, reactor: reactor)
                // 40-byte payloads travel in slots: both the ring and the pool fill.
                let producer = Producer(session: session, total: 20_000, size: 40, limit: 2048)
                try await withTimeout(.seconds(60), "20 000 notifications through a 4-descriptor ring") { try await producer.run() }
                let got = try await received(session)
                #expect(got.messages == 20_000 && got.bytes == 20_000 * 40)
                let (waits, largest, stalls, bad, firstBad) = await onLoop(reactor) {
                    (producer.waits, producer.largestQueue, (session.frameTransport as! ShmTransport).statistics.stalls, producer.badCallbacks, producer.firstBadCallback)
                }
                #expect(waits > 0 && stalls > 0, "the producer never had to wait")
                #expect(bad == 0, "drain callbacks with output still queued or the session closed; the first: \(firstBad ?? "-")")
                // One notification is two frames: OpenChannel (64 B) and the request (64 + 40 B).
                #expect(largest < 2048 + 2 * 64 + 40)
                await session.closeAndWait()
            }
            await server.shutdownGracefully()
        }
    }

    /// A `Sink` server on its own reactor over a Unix socket, and a client session on another.
    private func withUnixPair(_ tag: String, _ body: (Session, Reactor, Reactor) async throws -> Void) async throws {
        let socketPath = temporarySocketPath(tag)
        defer { unlink(socketPath) }
        try await withReactor("\(tag)-server") { serverReactor in
            let server = RapaceServer(reactor: serverReactor, services: [Sink()])
            let address = try await server.listen(on: .unix(path: socketPath))
            try await withReactor("\(tag)-client") { reactor in
                let session = try await Session.connect(to: address, reactor: reactor)
                try await body(session, serverReactor, reactor)
                await session.closeAndWait()
            }
            await server.shutdownGracefully()
        }
    }

    @Test("over a Unix socket: the peer stops reading for a while; the producer waits instead of queueing megabytes")
    func unixSocket() async throws {
        try await withUnixPair("drain") { session, serverReactor, reactor in
            // The server's loop sleeps: the socket buffers fill and writes would block.
            serverReactor.execute { usleep(300_000) }
            let producer = Producer(session: session, total: 400, size: 64 * 1024, limit: 256 * 1024)
            try await withTimeout(.seconds(60), "400 notifications of 64 KiB") { try await producer.run() }
            let got = try await received(session)
            #expect(got.messages == 400 && got.bytes == 400 * 64 * 1024)
            let (waits, largest, bad, firstBad) = await onLoop(reactor) {
                (producer.waits, producer.largestQueue, producer.badCallbacks, producer.firstBadCallback)
            }
            #expect(waits > 0, "the producer never had to wait")
            #expect(bad == 0, "drain callbacks with output still queued or the session closed; the first: \(firstBad ?? "-")")
            #expect(largest < 256 * 1024 + 2 * (64 * 1024 + 200))
        }
    }

    @Test("what is sent before the handshake ends counts as queued, and a drain waiter waits for it")
    func outputQueuedUntilReadyCounts() async throws {
        try await withReactor { reactor in
            let (a, b) = InMemoryTransport.makePair(reactor, reactor)
            let sink = Sink()
            let server = try Session(transport: b, role: .acceptor, services: [sink])
            let client = try Session(transport: a, role: .initiator)
            // The bytes queued after sending, and what was queued when the waiter ran.
            let seen = Locked<(queued: Int, whenDrained: Int?)>((0, nil))
            await onLoop(reactor) {
                for _ in 0..<3 { client.sendNotification(Sink.take.id, request: Payload([UInt8](repeating: 7, count: 100))) }
                let queued = client.queuedOutputBytes
                seen.withLock { $0.queued = queued }
                client.whenOutputDrained {
                    let now = client.queuedOutputBytes
                    seen.withLock { $0.whenDrained = now }
                }
            }
            #expect(seen.withLock { $0.queued } == 3 * (2 * FrameDescriptor.size + 100), "three 100-byte notifications (OpenChannel and request descriptors, payload) wait for the handshake")
            // Two turns later (the waiter's turn came in between): nothing was sent, so the
            // output has not drained.
            await onLoop(reactor) {}
            await onLoop(reactor) {}
            #expect(seen.withLock { $0.whenDrained } == nil, "the drain waiter ran before the handshake sent anything")
            try await startTogether(client, server)
            #expect(await waitUntil(timeout: .seconds(5)) { seen.withLock { $0.whenDrained } != nil }, "the drain waiter never ran")
            #expect(seen.withLock { $0.whenDrained } == 0)
            #expect(await waitUntil(timeout: .seconds(5)) { sink.totals.withLock { $0 } == (3, 300) }, "\(sink.totals.withLock { $0 })")
            await client.closeAndWait()
        }
    }

    @Test("a waiter runs when the session closes with output still queued, and on the next turn on a closed session")
    func closeReleasesWaiters() async throws {
        try await withUnixPair("drain-close") { session, serverReactor, reactor in
            // The server's loop reads nothing until the test is done with it (at most 30 s,
            // so that a test that fails first does not leave it blocked for good).
            let serverMayRead = DispatchSemaphore(value: 0)
            serverReactor.execute { _ = serverMayRead.wait(timeout: .now() + 30) }
            defer { serverMayRead.signal() }
            let big = Payload([UInt8](repeating: 1, count: 1 << 20))
            let queued = await onLoop(reactor) {
                for _ in 0..<16 { session.sendNotification(Sink.take.id, request: big) }
                session.frameTransport.flush()
                return session.queuedOutputBytes
            }
            #expect(queued > 0, "16 MiB fit the socket buffer: the test proves nothing")
            let waiterFinished = Atomic(false)
            let waiter = Task {
                await session.outputDrained()
                waiterFinished.store(true, ordering: .releasing)
            }
            // The waiter is registered, and still waits when the session closes: output is
            // queued (the server still reads nothing) and nothing has resumed it.
            #expect(await waitUntil(timeout: .seconds(5)) { await onLoop(reactor) { session.drainWaiters.count == 1 } }, "the waiter never registered")
            let (waiting, stillQueued) = await onLoop(reactor) { (session.drainWaiters.count, session.queuedOutputBytes) }
            #expect(waiting == 1 && stillQueued > 0, "the output drained before the session closed (\(stillQueued) bytes queued): the test proves nothing")
            let finishedBeforeClose = waiterFinished.load(ordering: .acquiring)
            #expect(!finishedBeforeClose, "the waiter finished before the session closed")
            await session.closeAndWait()
            try await value(of: waiter, within: .seconds(5), "the drain waiter after close")
            // On a closed session the callback runs on a later turn of the loop, never
            // inside the call.
            let ran = Atomic(false)
            let ranInside = await onLoop(reactor) {
                session.whenOutputDrained { ran.store(true, ordering: .releasing) }
                return ran.load(ordering: .acquiring)
            }
            #expect(!ranInside, "the callback ran inside whenOutputDrained")
            #expect(await waitUntil(timeout: .seconds(5)) { ran.load(ordering: .acquiring) }, "the callback did not run on a closed session")
        }
    }
}
