import RapaceTestSupport
import Testing

@testable import Rapace

/// Answers every call with what its deadline looked like on arrival: whether OpenChannel
/// carried `rapace.deadline_remaining_ms`, that budget, and whether the handler has a deadline.
final class DeadlineProbe: RPCService {
    static let probe = MethodDescriptor(service: "DeadlineProbe", method: "probe", kind: .unary)

    var methods: [MethodDescriptor] { [Self.probe] }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        let entry = context.metadata.first { $0.key == Session.deadlineMetadataKey }
        let budget = entry.map { entry in entry.value.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) } }
        let hasDeadline = context.deadline != nil
        return .encoding { writer in
            writer.writeVarint(entry == nil ? 0 : 1)
            writer.writeVarint(UInt64(budget ?? 0))
            writer.writeVarint(hasDeadline ? 1 : 0)
        }
    }
}

@Suite("deadlines between peers on different clocks (TCP)", .sharesProcess)
struct DeadlineCarrierTests {
    @Test("a timeout too long for the clock sends no deadline over TCP, as it sends none in deadline_ns")
    func endOfTimeIsNoDeadline() async throws {
        try await withReactor { reactor in
            let server = RapaceServer(reactor: reactor, services: [DeadlineProbe()])
            let address = try await server.listen(on: .tcp(host: "127.0.0.1", port: 0))
            let client = try await Session.connect(to: address, reactor: reactor)
            func probe(_ options: CallOptions) async throws -> (carried: UInt64, budget: UInt64, deadline: UInt64) {
                let reply = try await client.call(DeadlineProbe.probe, request: .empty, options: options)
                return try reply.decode { (try $0.readVarint64(), try $0.readVarint64(), try $0.readVarint64()) }
            }
            // An ordinary timeout travels as the remaining budget (the probe can tell): at
            // most the timeout, and no less than what is left of it once the answer is back
            // (the caller rounds up), however long the call took.
            let sent = ContinuousClock.now
            let thirty = try await probe(.timeout(.seconds(30)))
            let elapsed = ContinuousClock.now - sent
            #expect(thirty.carried == 1 && thirty.deadline == 1)
            #expect(thirty.budget <= 30_000)
            #expect(Duration.milliseconds(thirty.budget) >= .seconds(30) - elapsed, "a budget of \(thirty.budget) ms after \(elapsed)")
            // The end of time: nothing sent, no deadline at the callee.
            let endless = try await probe(.timeout(.seconds(Int64.max)))
            #expect(endless.carried == 0 && endless.budget == 0 && endless.deadline == 0)
            let none = try await probe(.default)
            #expect(none.carried == 0 && none.deadline == 0)
            await client.closeAndWait()
            await server.shutdownGracefully()
        }
    }
}
