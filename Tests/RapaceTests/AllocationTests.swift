import CRapaceMallocCounter
import EchoService
import Glibc
import RapaceTestSupport
import Testing

@testable import Rapace

// Allocations per call, counted with the malloc counter (MallocCounterTests.swift). Both
// sessions of a pair run on one reactor, so every allocation of a round trip (the caller,
// the transport both ways, the server, the handler and its task) happens on that reactor's
// loop thread, and that thread alone counts. Nothing of a call runs on another thread: the
// async-client rows check that every call resumes on the loop thread.

@Suite(
    "Allocations per call (malloc counter, both sessions on one reactor thread)", .sharesProcess,
    .enabled(if: MallocCounter.isAvailable, "the malloc counter is off: not glibc, or a sanitizer build"))
struct AllocationTests {
    @Test("allocations per call stay within the pinned count", arguments: AllocationRow.all)
    func perCall(_ row: AllocationRow) async throws {
        // A counter that counts nothing would pass every bound.
        try #require(rapace_malloc_counter_is_interposed(), "malloc is not the counter's: nothing would be counted")
        let total = try await withTimeout(.seconds(60), row.testDescription) { try await row.measure() }
        let calls = UInt64(AllocationRow.calls)
        #expect(
            total <= row.bound * calls,
            "\(row.testDescription): \(total) allocations over \(calls) calls (\(Double(total) / Double(calls)) per call), pinned at \(row.bound) per call (\(AllocationRow.buildName) build)")
    }
}

/// What one row measures, and the allocations per call it may make.
///
/// Measured 2026-11-21 with Swift 6.3.1 on Linux (glibc 2.36): per call, in both sessions
/// together, exactly these counts in each of 45 debug runs (15 of them with a busy loop on
/// the same CPU) and 10 release runs; the bounds allow nothing more. What each allocation is
/// (attributed with gdb, a breakpoint on every counted allocation and its call stack):
///
/// In every build:
/// - **C**, 1: the caller's `CallHandle` (callback and async API alike). The caller's
///   OpenChannel and request, the server's CallResult and the async API's continuation
///   allocate nothing; a synchronously served call reuses its `IncomingCall`.
/// - **T**, 5: a handler on a task (`Echo.add`): the `IncomingCall` (not reused: the
///   handler's context keeps it), the handler closure's context (`Session.startHandler`),
///   the closure `Task.immediate` wraps it in, the task, and the task allocator's first
///   slab, which holds the executor-preference record.
/// - **M**, 2 per flush: the in-memory transport's `flush` allocates the closure that
///   carries the frames to the peer's loop, and a new outbox buffer (`removeAll(keepingCapacity:)`
///   cannot keep the one that closure still shares). A round trip is 2 flushes (4), a
///   notification 1 (2).
///
/// In a debug build only (unspecialized generic code, which a release build specializes
/// or folds away):
/// - **F**: `FrameFlags` array literals (`[.data, .endOfStream]`): the array, and a
///   coroutine frame for each element `SetAlgebra.init` reads: 3 for the request
///   (`beginCall`), 4 for the reply (`sendCallResult`), 4 for a notification.
/// - **E**, 64 per frame: the stream encoder's `append(contentsOf: repeatElement(0, count: 64))`
///   (`Frame.appendDescriptorAndPayload`) reads each zero through a coroutine frame: 192 per
///   round trip (OpenChannel, request, reply), 128 per notification.
/// - **L**, 1 per element: `for … in` over an array reads each element through a coroutine
///   frame: the reactor's queued work and flush targets (`Reactor.runPending`; a task's jobs
///   are queued work too), the in-memory transport's delivered frames
///   (`InMemoryTransport.receive`).
/// - **S**, 1: `EchoServer.handle`'s unoptimized async frame does not fit the task's first
///   slab: a second slab.
///
/// A change that adds or removes an allocation moves these: see "Allocation tests" in
/// Docs/testing.md for how to update them.
struct AllocationRow: Sendable, CustomTestStringConvertible {
    enum Transport: Sendable {
        /// `InMemoryTransport`, both ends on one reactor.
        case inMemory
        /// `StreamTransport` over a Unix socketpair, both ends on one reactor.
        case unixSocket
    }

    enum Workload: Sendable {
        /// `Session.startCall` (the callback API) of `add(2, 3)`, each call started from the
        /// previous one's completion, as rapace-bench's callback driver does; served by Echo's
        /// async handler (`Echo.add`, on a task) or synchronously (``SyncAdd``).
        case callback(synchronousHandler: Bool)
        /// `Session.sendNotification` (NO_REPLY) served synchronously by ``SyncSink``, the
        /// next one sent when the server has served the last.
        case notification
        /// `EchoClient.add(2, 3)` (Echo's async handler), or `Session.call` to ``SyncAdd``,
        /// from a task on the reactor.
        case asyncClient(synchronousHandler: Bool)
    }

    let transport: Transport
    let workload: Workload
    /// Allocations per call in a debug build (`swift test`, what CI runs).
    let debug: UInt64
    /// Allocations per call in a release build (`swift test -c release -Xswiftc -enable-testing`).
    let release: UInt64

    /// The bound of this build.
    var bound: UInt64 {
        #if DEBUG
        debug
        #else
        release
        #endif
    }

    static var buildName: String {
        #if DEBUG
        "debug"
        #else
        "release"
        #endif
    }

    var testDescription: String {
        let over = transport == .inMemory ? "in-memory" : "Unix socket"
        switch workload {
        case .callback(let synchronous): return "callback API, \(synchronous ? "synchronous" : "async") handler, \(over)"
        case .notification: return "notification, synchronous handler, \(over)"
        case .asyncClient(let synchronous): return "async client on the reactor, \(synchronous ? "synchronous" : "async") handler, \(over)"
        }
    }

    /// The rows, each with the sum its bounds make (the letters are explained above).
    static let all: [AllocationRow] = [
        // Release: C 1 + M 4. Debug: + F 7 + L 5 (2 in runPending, 3 frames received).
        AllocationRow(transport: .inMemory, workload: .callback(synchronousHandler: true), debug: 17, release: 5),
        // The row above + T 5 (debug: + S 1).
        AllocationRow(transport: .inMemory, workload: .callback(synchronousHandler: false), debug: 23, release: 10),
        // Release: M 2. Debug: + F 4 + L 4 (2 in runPending, 2 frames received).
        AllocationRow(transport: .inMemory, workload: .notification, debug: 10, release: 2),
        // Release: C 1 + M 4 + T 5. Debug: + F 7 + L 8 (5 in runPending, 3 frames received) + S 1.
        AllocationRow(transport: .inMemory, workload: .asyncClient(synchronousHandler: false), debug: 26, release: 10),
        // Release: C 1 + M 4. Debug: + F 7 + L 8.
        AllocationRow(transport: .inMemory, workload: .asyncClient(synchronousHandler: true), debug: 20, release: 5),
        // Release: C 1, Docs/performance.md's "one malloc per round trip in both processes
        // together (the CallHandle)". Debug: + F 7 + E 192 + L 2.
        AllocationRow(transport: .unixSocket, workload: .callback(synchronousHandler: true), debug: 202, release: 1),
        // The row above + T 5 (debug: + S 1).
        AllocationRow(transport: .unixSocket, workload: .callback(synchronousHandler: false), debug: 208, release: 6),
        // Release: none, on either side. Debug: F 4 + E 128 + L 1.
        AllocationRow(transport: .unixSocket, workload: .notification, debug: 133, release: 0),
        // Release: C 1 + T 5 (the async API's continuation allocates nothing). Debug: + F 7 +
        // E 192 + L 3 + S 1.
        AllocationRow(transport: .unixSocket, workload: .asyncClient(synchronousHandler: false), debug: 209, release: 6),
        // Release: C 1. Debug: + F 7 + E 192 + L 3.
        AllocationRow(transport: .unixSocket, workload: .asyncClient(synchronousHandler: true), debug: 203, release: 1),
    ]

    /// Operations before measuring: the session's tables, its spare call records and the
    /// reactor's queues reach their steady size.
    static let warmup = 200
    /// Operations per measured window.
    static let calls = 1_000

    /// Runs ``warmup`` operations, then ``calls`` more, one after the other, and returns the
    /// allocations the loop thread made during the latter. The count starts and ends at the
    /// same point of the cycle (an operation answered, the next not yet started) in one
    /// uninterrupted run, so nothing but whole operations is counted: no hop from the test's
    /// task, whose timing would vary what the loop does around it.
    func measure() async throws -> UInt64 {
        try await withPair(transport) { reactor, client, sink in
            switch workload {
            case .callback(let synchronous):
                let methodID = synchronous ? SyncAdd.add.id : EchoMethods.add.id
                return try await LoopDriver(session: client, operation: .call(methodID)).run(warmup: Self.warmup, counted: Self.calls)
            case .notification:
                return try await LoopDriver(session: client, operation: .notification(sink)).run(warmup: Self.warmup, counted: Self.calls)
            case .asyncClient(let synchronous):
                return try await measureAsyncClient(reactor, client, synchronousHandler: synchronous, warmup: Self.warmup, counted: Self.calls)
            }
        }
    }
}

// MARK: Services and drivers

/// `Echo.add`'s bytes served by a synchronous handler (`handleImmediately`), like
/// rapace-bench's `SyncEcho`: inline on the loop thread, no task.
private struct SyncAdd: RPCService {
    static let add = MethodDescriptor(service: "AllocationSyncEcho", method: "add", kind: .unary)

    var methods: [MethodDescriptor] { [Self.add] }

    func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        guard method == Self.add.id else { return nil }
        let (a, b) = try request.decode { (try $0.decode(Int32.self), try $0.decode(Int32.self)) }
        return Payload.encoding { $0.writeZigZag(Int64(a &+ b)) }
    }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        guard let reply = try handleImmediately(method: method, request: request, context: context) else {
            throw RPCError(.unimplemented, "no such method")
        }
        return reply
    }
}

/// A notification served synchronously (like rapace-bench's `BenchSink.bump_now`) that tells
/// the test's driver, on the loop thread, that it was served.
private final class SyncSink: RPCService, @unchecked Sendable {
    // @unchecked Sendable: `served` is set before any notification is sent, then called on the
    // loop thread only.
    static let bump = MethodDescriptor(service: "AllocationSink", method: "bump_now", kind: .notification)

    var methods: [MethodDescriptor] { [Self.bump] }
    /// Called on the loop thread for each notification served.
    var served: () -> Void = {}

    func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        guard method == Self.bump.id else { return nil }
        _ = try request.decode { try $0.readVarint64() }
        served()
        return .empty
    }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        throw RPCError(.internal, "served asynchronously")
    }
}

/// The request both add methods take: `add(2, 3)`, two zigzag varints (inline, built once).
private let addRequest = Payload.encoding { $0.writeZigZag(2); $0.writeZigZag(3) }

/// Whether `payload` is the reply to `add(2, 3)`: zigzag(5), one byte. Read in place, so the
/// check allocates nothing.
private func isFive(_ payload: Payload) -> Bool {
    payload.withUnsafeBytes { $0.count == 1 && $0[0] == 10 }
}

/// Runs operations one after the other on a session's loop thread, each started when the
/// previous one has been answered (a call's completion, or the server's handler for a
/// notification), and counts the loop thread's allocations from the last warm-up answer to
/// the last answer. Loop-confined while it runs.
private final class LoopDriver: @unchecked Sendable {
    // @unchecked Sendable: `run` hands it to the loop thread, which alone touches its state
    // until it resumes `run`'s continuation; `run` is called once.
    enum Operation {
        /// `startCall(method, addRequest)`, each reply checked.
        case call(UInt32)
        /// `sendNotification(SyncSink.bump, 1)`; the sink's `served` starts the next one.
        case notification(SyncSink)
    }

    private let session: Session
    private let operation: Operation
    private let notificationRequest = Payload.encoding { $0.writeVarint(1) }
    private var warmup = 0
    private var answers = 0
    private var total = 0
    private var before: UInt64 = 0
    private var continuation: CheckedContinuation<Result<UInt64, TestFailure>, Never>?

    init(session: Session, operation: Operation) {
        self.session = session
        self.operation = operation
        if case .notification(let sink) = operation {
            sink.served = { [unowned self] in self.answered(nil) }
        }
    }

    /// Runs `warmup` + `counted` operations; returns the allocations the loop thread made
    /// from the `warmup`th answer to the last.
    func run(warmup: Int, counted: Int) async throws -> UInt64 {
        precondition(warmup > 0 && counted > 0)
        let result = await withCheckedContinuation { continuation in
            session.reactor.execute {
                self.continuation = continuation
                self.warmup = warmup
                self.total = warmup + counted
                self.next()
            }
        }
        return try result.get()
    }

    private func next() {
        switch operation {
        case .call(let methodID):
            session.startCall(methodID, request: addRequest) { [self] result in
                switch result {
                case .success(let reply) where isFive(reply): answered(nil)
                case .success: answered("add(2, 3) did not answer 5")
                case .failure(let error): answered("call failed: \(error)")
                }
            }
        case .notification:
            if let error = session.sendNotification(SyncSink.bump.id, request: notificationRequest) {
                answered("notification not sent: \(error)")
            }
        }
    }

    private func answered(_ failure: String?) {
        guard let continuation else { return }
        answers += 1
        if let failure {
            if rapace_malloc_counter_is_enabled() { _ = MallocCounter.stop(since: before) }
            self.continuation = nil
            continuation.resume(returning: .failure(TestFailure("operation \(answers): \(failure)")))
            return
        }
        if answers == warmup { before = MallocCounter.start() }
        if answers == total {
            let allocations = MallocCounter.stop(since: before)
            self.continuation = nil
            continuation.resume(returning: .success(allocations))
            return
        }
        next()
    }
}

/// One `add(2, 3)` through the async API: `EchoClient.add` (Echo's async handler), or
/// `Session.call` to ``SyncAdd``; whether it answered 5.
///
/// Not inlined: with it inlined into the closure of ``measureAsyncClient(_:_:synchronousHandler:warmup:counted:)``,
/// Swift 6.3.1 crashes (signal 11 in LLVM's coroutine splitting) compiling that closure in a
/// release build.
@inline(never)
private func asyncAdd(_ echo: EchoClient, _ session: Session, synchronousHandler: Bool) async throws -> Bool {
    if synchronousHandler {
        let reply = try await session.call(SyncAdd.add, request: addRequest, options: .default)
        return isFive(reply)
    }
    let sum = try await echo.add(2, 3)
    return sum == 5
}

/// `warmup` + `counted` calls of ``asyncAdd(_:_:synchronousHandler:)`` from one task on the
/// reactor; returns the allocations the loop thread made during the last `counted`. Every
/// call must start and resume on the loop thread (checked).
private func measureAsyncClient(_ reactor: Reactor, _ session: Session, synchronousHandler: Bool, warmup: Int, counted: Int) async throws -> UInt64 {
    try await reactor.run {
        guard reactor.inLoop else { throw TestFailure("reactor.run did not run the task on the loop thread") }
        let echo = EchoClient(session)
        var offLoop = 0
        var wrong = 0
        var before: UInt64 = 0
        do {
            for index in 0..<(warmup + counted) {
                if index == warmup { before = MallocCounter.start() }
                let ok = try await asyncAdd(echo, session, synchronousHandler: synchronousHandler)
                if !ok { wrong += 1 }
                if !reactor.inLoop { offLoop += 1 }
            }
        } catch {
            if rapace_malloc_counter_is_enabled() { _ = MallocCounter.stop(since: before) }
            throw error
        }
        let allocations = MallocCounter.stop(since: before)
        guard offLoop == 0, wrong == 0 else { throw TestFailure("\(offLoop) calls resumed off the loop thread, \(wrong) wrong answers") }
        return allocations
    }
}

/// A client and a server session on one reactor, over `transport`, the server serving Echo
/// (async handler), ``SyncAdd`` and a ``SyncSink`` (passed to `body`). Both are closed after.
private func withPair<T>(
    _ transport: AllocationRow.Transport, _ body: (Reactor, Session, SyncSink) async throws -> T
) async throws -> T {
    let sink = SyncSink()
    let services: [any RPCService] = [EchoServer(DefaultEcho()), SyncAdd(), sink]
    return try await withReactor("allocations") { reactor in
        let client: Session
        let server: Session
        switch transport {
        case .inMemory:
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverServices: services)
            (client, server) = (pair.client, pair.server)
        case .unixSocket:
            let sessions = try await onLoopThrowing(reactor) { () throws -> SendableBox<(Session, Session)> in
                var fds: [Int32] = [-1, -1]
                let type = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
                guard socketpair(AF_UNIX, type, 0, &fds) == 0 else { throw TestFailure("socketpair failed: errno \(errno)") }
                let clientEnd = StreamTransport(reactor: reactor, socket: fds[0], isUnixDomain: true, peerDescription: "allocations-client")
                let serverEnd = StreamTransport(reactor: reactor, socket: fds[1], isUnixDomain: true, peerDescription: "allocations-server")
                return SendableBox((
                    try Session(transport: clientEnd, role: .initiator, services: []),
                    try Session(transport: serverEnd, role: .acceptor, services: services)
                ))
            }
            (client, server) = sessions.value
            try await startTogether(client, server)
        }
        do {
            let value = try await body(reactor, client, sink)
            await client.closeAndWait()
            await server.closeAndWait()
            return value
        } catch {
            await client.closeAndWait()
            await server.closeAndWait()
            throw error
        }
    }
}
