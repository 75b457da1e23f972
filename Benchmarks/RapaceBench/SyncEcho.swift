import Rapace

/// The bench's second Echo-like service: `SyncEcho.add(i32, i32) -> i32`, Echo's `add` with a
/// **synchronous** handler (`RPCService.handleImmediately`), served next to the hand-written
/// async `EchoServer`.
///
/// Its request and reply are the bytes of `Echo.add` (two zigzag varints, one zigzag varint);
/// only the method id differs, and ids travel in the fixed-size frame descriptor. So the
/// bench's "synchronous handler" rows and its `Echo.add` rows move the same bytes and differ
/// only in how the server runs the handler: inline on the loop thread, or on a task.
struct SyncEcho: RPCService {
    static let add = MethodDescriptor(service: "SyncEcho", method: "add", kind: .unary)

    var methods: [MethodDescriptor] { [Self.add] }

    /// Serves `add` at once: it never suspends.
    func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        guard method == Self.add.id else { return nil }
        let (a, b) = try request.decode { (try $0.decode(Int32.self), try $0.decode(Int32.self)) }
        let result = a &+ b
        return Payload.encoding { $0.writeZigZag(Int64(result)) }
    }

    /// The same, for a session that asks (the session tries `handleImmediately` first).
    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        guard let reply = try handleImmediately(method: method, request: request, context: context) else {
            throw RPCError(.unimplemented, "SyncEcho has no method 0x\(String(method, radix: 16))")
        }
        return reply
    }
}

/// A typed client of ``SyncEcho``, written like `EchoClient.add`: it encodes the arguments on
/// every call and decodes the reply.
struct SyncEchoClient: Sendable {
    let caller: any RPCCaller

    init(_ caller: any RPCCaller) { self.caller = caller }

    nonisolated(nonsending) func add(_ a: Int32, _ b: Int32) async throws -> Int32 {
        let request = Payload.encoding { $0.writeZigZag(Int64(a)); $0.writeZigZag(Int64(b)) }
        let reply = try await caller.call(SyncEcho.add, request: request, options: .default)
        return try reply.decode { try $0.decode(Int32.self) }
    }
}
