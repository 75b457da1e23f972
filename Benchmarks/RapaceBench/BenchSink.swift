import Rapace
import Synchronization

/// The bench's own service, served by the plugin process next to Echo:
/// - `bump` (notification): adds its argument to a counter;
/// - `bump_now` (notification): the same bytes and the same work, served by a synchronous
///   handler (``handleImmediately(method:request:context:)``: inline on the loop thread, no
///   task), for the "sync handler" notification row;
/// - `total`: returns the counter (a sync point after a notification burst);
/// - `consume([u8]) -> u64`: returns the byte count, reading only the length prefix, so a
///   payload sweep measures the transport and not the server touching the bytes;
/// - `setSpin(u64)`: sets the serving side's shared-memory spin budget in nanoseconds
///   (0 = no spin), so one run measures with and without spinning on both sides.
final class BenchSink: RPCService, Sendable {
    static let bump = MethodDescriptor(service: "BenchSink", method: "bump", kind: .notification)
    static let bumpNow = MethodDescriptor(service: "BenchSink", method: "bump_now", kind: .notification)
    static let total = MethodDescriptor(service: "BenchSink", method: "total", kind: .unary)
    static let consume = MethodDescriptor(service: "BenchSink", method: "consume", kind: .unary)
    static let setSpin = MethodDescriptor(service: "BenchSink", method: "set_spin", kind: .unary)

    private let counter = Atomic<UInt64>(0)

    var methods: [MethodDescriptor] { [Self.bump, Self.bumpNow, Self.total, Self.consume, Self.setSpin] }

    /// Serves `bump_now` at once; every other method on a task (`handle`).
    func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        guard method == Self.bumpNow.id else { return nil }
        try bump(request)
        return .empty
    }

    nonisolated(nonsending) func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        switch method {
        case Self.bump.id, Self.bumpNow.id:
            try bump(request)
            return .empty
        case Self.total.id:
            try request.decode { _ in }
            let value = counter.load(ordering: .relaxed)
            return .encoding { $0.writeVarint(value) }
        case Self.consume.id:
            // The length prefix, then a view of the bytes (no copy, not read).
            let count = try request.decode { reader -> Int in
                let count = try reader.readCount(minimumElementSize: 1)
                _ = try reader.readRawBytes(count: count)
                return count
            }
            return .encoding { $0.writeVarint(UInt64(count)) }
        case Self.setSpin.id:
            let nanos = try request.decode { try $0.readVarint64() }
            let policy: ShmSpinPolicy = nanos == 0 ? .disabled : .adaptive(maximum: .nanoseconds(Int64(clamping: nanos)))
            let session = context.session
            // The connection the call came in on (a Unix-socket session ignores it).
            session.reactor.executeOrRunNow { (session.frameTransport as? ShmTransport)?.spinPolicy = policy }
            return .empty
        default:
            throw RPCError(.unimplemented, "BenchSink has no method 0x\(String(method, radix: 16))")
        }
    }

    /// `bump`'s work: adds the request's varint to the counter.
    private func bump(_ request: Payload) throws {
        let amount = try request.decode { try $0.readVarint64() }
        counter.add(amount, ordering: .relaxed)
    }
}
