import EchoService
import Glibc
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

/// A hand-written service that serves some methods synchronously
/// (`RPCService.handleImmediately`) and records how each call was served.
final class ImmediateService: RPCService {
    static let add = MethodDescriptor(service: "Immediate", method: "add", kind: .unary)
    static let fail = MethodDescriptor(service: "Immediate", method: "fail", kind: .unary)
    static let crash = MethodDescriptor(service: "Immediate", method: "crash", kind: .unary)
    static let inspect = MethodDescriptor(service: "Immediate", method: "inspect", kind: .unary)
    static let note = MethodDescriptor(service: "Immediate", method: "note", kind: .notification)
    static let later = MethodDescriptor(service: "Immediate", method: "later", kind: .unary)
    static let items = MethodDescriptor(service: "Immediate", method: "items", kind: .serverStream)
    static let slow = MethodDescriptor(service: "Immediate", method: "slow", kind: .unary)

    struct Crash: Error {}

    /// "immediate NAME" or "async NAME", in the order the calls were served.
    let log = Mutex<[String]>([])
    let notes = Mutex<[UInt64]>([])

    var methods: [MethodDescriptor] { [Self.add, Self.fail, Self.crash, Self.inspect, Self.note, Self.later, Self.items, Self.slow] }

    func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        switch method {
        case Self.add.id:
            record("immediate add")
            let (a, b) = try request.decode { (try $0.readVarint64(), try $0.readVarint64()) }
            return .encoding { $0.writeVarint(a &+ b) }
        case Self.fail.id:
            record("immediate fail")
            throw RPCError(.notFound, "no such thing", trailers: [MetadataEntry("why", [1])])
        case Self.crash.id:
            record("immediate crash")
            throw Crash()
        case Self.inspect.id:
            record("immediate inspect")
            // What a synchronous handler sees: no task of its own, the context it was given,
            // and no ServerContext.current unless the service binds it.
            let inTask = withUnsafeCurrentTask { $0 != nil }
            let hasDeadline = context.deadline != nil
            let current = ServerContext.current != nil
            let onLoop = context.session.reactor.inLoop
            return .encoding { writer in
                for flag in [inTask, hasDeadline, current, onLoop] { writer.writeVarint(flag ? 1 : 0) }
            }
        case Self.note.id:
            record("immediate note")
            let value = try request.decode { try $0.readVarint64() }
            notes.withLock { $0.append(value) }
            return .empty
        case Self.slow.id:
            // Blocks the loop for the requested milliseconds (nothing can interrupt it).
            record("immediate slow")
            let milliseconds = try request.decode { try $0.readVarint64() }
            usleep(UInt32(milliseconds * 1000))
            return .encoding { $0.writeVarint(milliseconds) }
        case Self.items.id:
            // Never asked: a server stream is always served by `handle`.
            record("immediate items")
            return .empty
        default:
            return nil
        }
    }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        switch method {
        case Self.later.id:
            record("async later")
            try await Task.sleep(for: .milliseconds(1))
            return .encoding { $0.writeVarint(7) }
        case Self.items.id:
            record("async items")
            try await context.send(encoded: .encoding { $0.writeVarint(1) })
            try await context.send(encoded: .encoding { $0.writeVarint(2) })
            return .empty
        default:
            record("async unexpected")
            throw RPCError(.internal, "served asynchronously")
        }
    }

    private func record(_ entry: String) { log.withLock { $0.append(entry) } }
}

@Suite("Synchronous dispatch (handleImmediately)", .sharesProcess)
struct ImmediateDispatchTests {
    @Test("synchronous methods are answered inline with no task; async ones and streams go to handle")
    func dispatch() async throws {
        let service = ImmediateService()
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor, serverServices: [service])
                let sum = try await pair.client.call(ImmediateService.add.id, request: .encoding { $0.writeVarint(40); $0.writeVarint(2) })
                #expect(try sum.decode { try $0.readVarint64() } == 42)
                #expect(try await pair.client.call(ImmediateService.later.id, request: .empty).decode { try $0.readVarint64() } == 7)

                var items: [UInt64] = []
                for try await item in pair.client.serverStream(ImmediateService.items.id, request: .empty) {
                    items.append(try item.decode { try $0.readVarint64() })
                }
                #expect(items == [1, 2])

                let registrations = await onLoop(serverReactor) { serverReactor.registrationCount }
                let flags = try await pair.client.call(ImmediateService.inspect.id, request: .empty, options: .timeout(.seconds(30)))
                let (inTask, hasDeadline, current, loopThread) = try flags.decode {
                    (try $0.readVarint64(), try $0.readVarint64(), try $0.readVarint64(), try $0.readVarint64())
                }
                #expect(inTask == 0)
                #expect(hasDeadline == 1)
                #expect(current == 0)
                #expect(loopThread == 1)

                // Nothing is left behind: no incoming call, no deadline timer.
                #expect(await onLoop(serverReactor) { pair.server.incoming.count } == 0)
                #expect(await onLoop(serverReactor) { serverReactor.registrationCount } == registrations)
                await pair.client.closeAndWait()
            }
        }
        #expect(service.log.withLock { $0 } == ["immediate add", "async later", "async items", "immediate inspect"])
    }

    @Test("errors of a synchronous handler map as handle's: RPCError as thrown, PostcardError INVALID_ARGUMENT, others INTERNAL")
    func errors() async throws {
        try await withReactor { reactor in
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverServices: [ImmediateService()])
            await #expect(throws: RPCError(.notFound, "no such thing", trailers: [MetadataEntry("why", [1])])) {
                _ = try await pair.client.call(ImmediateService.fail.id, request: .empty)
            }
            await #expect {
                _ = try await pair.client.call(ImmediateService.crash.id, request: .empty)
            } throws: { ($0 as? RPCError)?.code == .internal }
            await #expect {
                _ = try await pair.client.call(ImmediateService.add.id, request: Payload([0xFF, 0xFF]))
            } throws: { ($0 as? RPCError)?.code == .invalidArgument }
            // The session still serves.
            let sum = try await pair.client.call(ImmediateService.add.id, request: .encoding { $0.writeVarint(1); $0.writeVarint(1) })
            #expect(try sum.decode { try $0.readVarint64() } == 2)
            await pair.client.closeAndWait()
        }
    }

    @Test("a synchronous handler that returns after the call's deadline is answered DEADLINE_EXCEEDED, not with its result")
    func resultPastDeadline() async throws {
        try await withReactor("client") { clientReactor in
            try await withReactor("server") { serverReactor in
                let pair = try await SessionPair.make(clientReactor: clientReactor, serverReactor: serverReactor, serverServices: [ImmediateService()])
                // The deadline travels only as OpenChannel metadata (as over TCP), so the
                // caller sets no timer of its own and reads what the server answers.
                let budget = MetadataEntry(Session.deadlineMetadataKey, [20, 0, 0, 0])  // 20 ms
                do {
                    _ = try await boundedCall(pair.client, ImmediateService.slow.id, .encoding { $0.writeVarint(60) }, CallOptions(metadata: [budget]))
                    Issue.record("the result of a handler that ran 60 ms past a 20 ms deadline was delivered")
                } catch let error as RPCError {
                    #expect(error.code == .deadlineExceeded, "\(error)")
                }
                // Within its deadline the same handler's result arrives.
                let quick = try await boundedCall(pair.client, ImmediateService.slow.id, .encoding { $0.writeVarint(1) }, CallOptions(metadata: [MetadataEntry(Session.deadlineMetadataKey, [0x30, 0x75, 0, 0])]))
                #expect(try quick.decode { try $0.readVarint64() } == 1)
                await pair.client.closeAndWait()
            }
        }
    }

    @Test("a synchronous notification runs once and sends nothing back")
    func notification() async throws {
        let service = ImmediateService()
        try await withReactor { reactor in
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor, serverServices: [service])
            let received = await onLoop(reactor) { pair.client.statistics.framesReceived }
            for value in 1...3 as ClosedRange<UInt64> {
                try await pair.client.notify(ImmediateService.note.id, request: .encoding { $0.writeVarint(value) })
            }
            // A call after the notifications: the sessions process frames in order, so a reply
            // to any notification would reach the client before this call's reply.
            _ = try await pair.client.call(ImmediateService.add.id, request: .encoding { $0.writeVarint(0); $0.writeVarint(0) })
            #expect(service.notes.withLock { $0 } == [1, 2, 3])
            // The call's reply is the only frame the client received.
            #expect(await onLoop(reactor) { pair.client.statistics.framesReceived } - received == 1)
            // And the client keeps no record of the notifications.
            #expect(await onLoop(reactor) { pair.client.outgoing.count } == 0)
            await pair.client.closeAndWait()
        }
    }

    @Test("the default handleImmediately declines every call: services without it are served by handle")
    func defaultDeclines() async throws {
        try await withReactor { reactor in
            let pair = try await SessionPair.make(clientReactor: reactor, serverReactor: reactor)
            let call = IncomingCall(channelID: 2, kind: .call, metadata: [], metadataDeadline: nil, initialCredits: 0)
            let server = EchoServer(DefaultEcho())
            call.serve(ServiceRouter.Entry(descriptor: EchoMethods.add, service: server), deadline: nil)
            let context = ServerContext(session: pair.server, call: call)
            let request = Payload.encoding { $0.writeZigZag(2); $0.writeZigZag(3) }
            #expect(try server.handleImmediately(method: EchoMethods.add.id, request: request, context: context) == nil)
            #expect(try await EchoClient(pair.client).add(2, 3) == 5)
            await pair.client.closeAndWait()
        }
    }
}

/// `session.call`, bounded: these calls set no timer of their own (the deadline travels only
/// as metadata), so a server that never answers would otherwise hang the test.
private func boundedCall(_ session: Session, _ method: UInt32, _ request: Payload, _ options: CallOptions) async throws -> Payload {
    try await withTimeout(.seconds(10), "a call with only a metadata deadline") {
        try await session.call(method, request: request, options: options)
    }
}
