import Foundation
import GeneratedEcho
import RapaceMacros
import RapaceTestSupport
import Synchronization
import Testing


/// Generated clients against generated servers, over the in-memory transport and a Unix
/// domain socket.
@Suite("@Service: generated clients and servers", .sharesProcess)
struct ServiceBehaviourTests {
    @Test("every unary shape: no/labelled/unlabelled/several arguments, Void, structs, optionals, byte buffers", arguments: TestTransport.allCases)
    func unaryShapes(transport: TestTransport) async throws {
        let log = ShapesLog()
        try await withConnection(transport, serving: [ShapesServer(ShapesImplementation(log: log))]) { (session: Session) async throws in
            let shapes = ShapesClient(session)
            try await shapes.ping()
            #expect(try await shapes.version() == "1.0")
            #expect(try await shapes.describe(point: Point(x: 3, y: -4), label: "p") == "p(3, -4)")
            #expect(try await shapes.sum([1, -2, 3, .max]) == Int64.max &+ 2)
            #expect(try await shapes.sum([]) == 0)
            #expect(try await shapes.scale(Point(x: 2, y: 5), by: -3) == Point(x: -6, y: -15))
            #expect(try await shapes.lookup(["a": 1, "b": 2], key: "b") == 2)
            #expect(try await shapes.lookup(["a": 1], key: nil) == nil)
            #expect(try await shapes.lookup([:], key: "a") == nil)

            let bytes = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            #expect(try await shapes.reverse(bytes) == bytes.reversed())
            #expect(try await shapes.reverse([]) == [])
            let sliced = try await shapes.slice(Payload(bytes), from: 10, count: 50_000)
            #expect(sliced.bytes == Array(bytes[10..<50_010]))
            #expect(try await shapes.slice(Payload([1, 2, 3]), from: 1, count: 1).bytes == [2])

            // The explicit-options variant of each method.
            #expect(try await shapes.version(options: .timeout(.seconds(5))) == "1.0")
        }
    }

    @Test("handler errors arrive with their code and message; unknown ids and bad arguments get the spec's codes", arguments: TestTransport.allCases)
    func errors(transport: TestTransport) async throws {
        try await withConnection(transport, serving: [ShapesServer(ShapesImplementation(log: ShapesLog()))]) { (session: Session) async throws in
            let shapes = ShapesClient(session)
            for (code, message) in [(UInt32(3), "bad argument"), (404, "not here"), (13, ""), (1000, "application")] {
                let error = await rpcError { try await shapes.fail(code: code, message: message) }
                #expect(error?.code.rawValue == code)
                #expect(error?.message == message)
            }
            // The options variant throws RPCError in its type.
            do throws(RPCError) {
                try await shapes.fail(code: 7, message: "denied", options: .default)
                Issue.record("fail returned")
            } catch {
                #expect(error.code == .permissionDenied)
            }
            #expect(await rpcError { _ = try await shapes.slice(Payload([1]), from: 0, count: 2) }?.code == .outOfRange)

            // Not a method of the service.
            #expect(await rpcError { _ = try await session.call(0x1234_5678, request: .empty) }?.code == .unimplemented)
            // Undecodable and trailing arguments.
            #expect(await rpcError { _ = try await session.call(ShapesMethods.sum.id, request: Payload([0x05, 0x02])) }?.code == .invalidArgument)
            #expect(await rpcError { _ = try await session.call(ShapesMethods.ping.id, request: Payload([0x00])) }?.code == .invalidArgument)
            #expect(await rpcError { _ = try await session.call(ShapesMethods.describe.id, request: Payload([0x00, 0x00, 0x02, 0xC3])) }?.code == .invalidArgument)
            // The session still works.
            #expect(try await shapes.version() == "1.0")
        }
    }

    @Test("server streams: typed items in order, through the stream and through a writer; a failing stream ends with its code", arguments: TestTransport.allCases)
    func streams(transport: TestTransport) async throws {
        let log = ShapesLog()
        try await withConnection(transport, serving: [ShapesServer(ShapesImplementation(log: log))]) { (session: Session) async throws in
            let shapes = ShapesClient(session)
            var items: [UInt32] = []
            for try await item in try shapes.count(to: 1000) { items.append(item) }
            #expect(items == Array(1...1000))

            var empty: [UInt32] = []
            for try await item in try shapes.count(to: 0) { empty.append(item) }
            #expect(empty.isEmpty)

            // Through the protocol requirement: the client forwards every item to the writer.
            let collected = Mutex<[Point]>([])
            try await shapes.points(3, failCode: 0, into: RapaceStreamWriter { point in collected.withLock { $0.append(point) } })
            #expect(collected.withLock { $0 } == [Point(x: 0, y: 0), Point(x: 1, y: -1), Point(x: 2, y: -2)])

            var received: [Point] = []
            let error = await rpcError {
                for try await point in try shapes.points(2, failCode: 409, options: .default) { received.append(point) }
            }
            #expect(received.count == 2)
            #expect(error?.code.rawValue == 409)
            #expect(error?.message == "failed after 2 points")
        }
    }

    @Test("a slow stream consumer holds the server to the credit window", arguments: TestTransport.allCases)
    func streamCredits(transport: TestTransport) async throws {
        let log = ShapesLog()
        try await withConnection(transport, serving: [ShapesServer(ShapesImplementation(log: log))]) { (session: Session) async throws in
            // Items 1…100 encode as one byte each: a 4-byte window admits 4 items.
            let stream = try ShapesClient(session).count(to: 100, options: CallOptions(streamWindow: 4))
            var iterator = stream.makeAsyncIterator()
            #expect(try await iterator.next() == 1)
            try await log.wait(until: { $0.streamed >= 4 })
            try await Task.sleep(for: .milliseconds(100))
            #expect(log.snapshot.streamed == 4, "the server sent past the window")

            var expected: UInt32 = 2
            while let item = try await iterator.next() {
                #expect(item == expected)
                expected += 1
            }
            #expect(expected == 101)
            try await log.wait(until: { $0.streamEnded == "finished" })
        }
    }

    @Test("cancelling a call cancels the handler; dropping a stream stops the server's writer", arguments: TestTransport.allCases)
    func cancellation(transport: TestTransport) async throws {
        let log = ShapesLog()
        try await withConnection(transport, serving: [ShapesServer(ShapesImplementation(log: log))]) { (session: Session) async throws in
            let shapes = ShapesClient(session)
            let call = Task { try await shapes.wait(milliseconds: 10_000) }
            // Cancelled once its handler runs (a call cancelled before it is sent never
            // reaches the handler at all).
            try await log.wait(until: { $0.waitsStarted == 1 }, timeout: .seconds(10))
            call.cancel()
            let error = await rpcError { try await call.value }
            #expect(error?.code == .cancelled)
            try await log.wait(until: { $0.waitEnded == "cancelled" })

            // A deadline cancels the handler too.
            let late = await rpcError { try await shapes.wait(milliseconds: 10_000, options: .timeout(.milliseconds(50))) }
            #expect(late?.code == .deadlineExceeded)

            do {
                let stream = try shapes.count(to: 1_000_000, options: CallOptions(streamWindow: 16))
                var iterator = stream.makeAsyncIterator()
                #expect(try await iterator.next() == 1)
                #expect(try await iterator.next() == 2)
            }
            try await log.wait(until: { $0.streamEnded != nil })
            #expect(log.snapshot.streamEnded != "finished")
            #expect(try await shapes.version() == "1.0")
        }
    }

    @Test("notifications reach the handler with no reply; a failing one goes unheard", arguments: TestTransport.allCases)
    func notifications(transport: TestTransport) async throws {
        let log = ShapesLog()
        try await withConnection(transport, serving: [ShapesServer(ShapesImplementation(log: log))]) { (session: Session) async throws in
            let shapes = ShapesClient(session)
            try await shapes.record("first")
            try await shapes.record("fail")
            try await shapes.record("second")
            try await log.wait(until: { $0.events.count == 2 })
            #expect(log.snapshot.events == ["first", "second"])
            #expect(ShapesMethods.record.kind == .notification)
            #expect(try await shapes.version() == "1.0")
        }
    }

    @Test("handlers read the call's metadata through ServerContext.current")
    func serverContext() async throws {
        try await withConnection(.inMemory, serving: [ShapesServer(ShapesImplementation(log: ShapesLog()))]) { (session: Session) async throws in
            let shapes = ShapesClient(session, options: CallOptions(metadata: [MetadataEntry("tenant", [7, 8])]))
            #expect(try await shapes.metadata(key: "tenant") == [7, 8])
            #expect(try await shapes.metadata(key: "absent") == nil)
            #expect(ServerContext.current == nil)
        }
    }

    @Test("the server calls handlers that are sync, throwing, async or both; the client offers them all as async throws", arguments: TestTransport.allCases)
    func handlerEffects(transport: TestTransport) async throws {
        try await withConnection(transport, serving: [EffectsServer(EffectsImplementation())]) { (session: Session) async throws in
            let effects = EffectsClient(session)
            #expect(try await effects.plain(1) == 2)
            #expect(try await effects.throwing(1) == 3)
            #expect(await rpcError { _ = try await effects.throwing(-1) }?.code.rawValue == 400)
            #expect(try await effects.asynchronous(1) == 4)
            #expect(try await effects.both(1) == 5)
            try await effects.nothing()
            #expect(try await effects.consume("con", suffix: "sumed") == "consumed")
            // Synchronous methods are served at once, on the loop and outside any task, with
            // ServerContext.current bound to the call.
            #expect(try await effects.inTask() == false)
            #expect(try await effects.tenant() == nil)
            let tenant = EffectsClient(session, options: CallOptions(metadata: [MetadataEntry("tenant", [7, 8])]))
            #expect(try await tenant.tenant() == [7, 8])
        }
    }

    @Test("the session serves a generated server's synchronous methods through handleImmediately, the async ones through handle")
    func immediateDispatch() async throws {
        let server = EntryPointRecorder(EffectsServer(EffectsImplementation()))
        try await withConnection(.inMemory, serving: [server]) { (session: Session) async throws in
            let effects = EffectsClient(session)
            #expect(try await effects.plain(1) == 2)
            #expect(try await effects.asynchronous(1) == 4)
            #expect(try await effects.both(1) == 5)
            try await effects.nothing()
            #expect(await rpcError { _ = try await effects.throwing(-1) }?.code.rawValue == 400)
            // Undecodable arguments of a synchronous method: INVALID_ARGUMENT, as from handle.
            #expect(await rpcError { _ = try await session.call(EffectsMethods.plain, request: Payload([0xFF, 0xFF]), options: .default) }?.code == .invalidArgument)
        }
        #expect(server.log.withLock { $0 } == [
            "immediate plain", "async asynchronous", "async both", "immediate nothing", "immediate throwing", "immediate plain",
        ])
    }

    @Test("one session serves several generated servers, routed by id")
    func multiService() async throws {
        let log = ShapesLog()
        let recorder = TracingRecorder()
        let services: [any RPCService] = [
            ShapesServer(ShapesImplementation(log: log)),
            TracingSinkServer(recorder),
            CalculatorServer(Adder()),
            GeneratedEcho.EchoServer(DefaultEcho()),
            EffectsServer(EffectsImplementation()),
        ]
        let router = try ServiceRouter(services)
        #expect(Set(router.methods.map(\.id)).count == router.methods.count)
        #expect(router.methods.count == ShapesMethods.all.count + TracingSinkMethods.all.count + 1 + 7 + EffectsMethods.all.count)
        try await withConnection(.inMemory, serving: services) { (session: Session) async throws in
            #expect(try await ShapesClient(session).version() == "1.0")
            #expect(try await TracingSinkClient(session).newSpan(SpanMeta(name: "span", target: "t", level: 2)) == 1)
            #expect(try await CalculatorClient(session).add(40, 2) == 42)
            #expect(try await GeneratedEcho.EchoClient(session).echo("hi") == "hi")
            #expect(try await EffectsClient(session).plain(9) == 10)
            // Calls interleave across services on one session.
            let sums = try await withThrowingTaskGroup(of: Int32.self) { group in
                for index in 0..<50 {
                    group.addTask { try await CalculatorClient(session).add(Int32(index), 1) }
                    group.addTask { try await EffectsClient(session).both(Int32(index)) }
                }
                return try await group.reduce(0, +)
            }
            let expected: Int32 = (0..<50).reduce(0) { total, index in total + 2 * Int32(index) + 5 }
            #expect(sums == expected)
        }
        #expect(recorder.spans.withLock { $0 } == ["span"])
    }

    @Test("two services with one id cannot share a session")
    func duplicateIDsAcrossServices() throws {
        #expect(CalculatorTwinMethods.add.id == CalculatorMethods.add.id)
        #expect(throws: RPCError.self) { try ServiceRouter([CalculatorServer(Adder()), CalculatorTwinServer(Adder())]) }
    }

    @Test("code written against the protocol runs the same on a local implementation and a remote client")
    func clientConformsToTheProtocol() async throws {
        func exercise(_ echo: some Echo) async throws -> [String] {
            var out = [try await echo.echo("x"), String(try await echo.add(2, 3))]
            let items = Mutex<[UInt32]>([])
            try await echo.countdown(from: 3, writer: RapaceStreamWriter { item in items.withLock { $0.append(item) } })
            out.append(items.withLock { $0 }.map(String.init).joined(separator: ","))
            return out
        }
        let local = try await exercise(DefaultEcho())
        let remote = try await withConnection(.inMemory, serving: [GeneratedEcho.EchoServer(DefaultEcho())]) { (session: Session) async throws in
            try await exercise(GeneratedEcho.EchoClient(session))
        }
        #expect(local == ["x", "5", "3,2,1"])
        #expect(remote == local)
    }
}

/// Forwards to a service and records which entry point the session used for each call.
final class EntryPointRecorder<Inner: RPCService>: RPCService {
    let inner: Inner
    let log = Mutex<[String]>([])

    init(_ inner: Inner) { self.inner = inner }

    var methods: [MethodDescriptor] { inner.methods }

    func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        let reply: Payload?
        do {
            reply = try inner.handleImmediately(method: method, request: request, context: context)
        } catch {
            record(method, "immediate")
            throw error
        }
        if reply != nil { record(method, "immediate") }
        return reply
    }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        record(method, "async")
        return try await inner.handle(method: method, request: request, context: context)
    }

    private func record(_ method: UInt32, _ entry: String) {
        let name = inner.methods.first { $0.id == method }?.method ?? "?"
        log.withLock { $0.append("\(entry) \(name)") }
    }
}

