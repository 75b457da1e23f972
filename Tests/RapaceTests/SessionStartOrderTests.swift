import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

/// Work queued on a session before it starts (calls, notifications) goes out after its
/// Hello, even when starting the transport hands it the peer's Hello at once.
@Suite("Session start order", .sharesProcess)
struct SessionStartOrderTests {
    /// Records the values it is notified of.
    final class Notes: RPCService, Sendable {
        static let note = MethodDescriptor(service: "Notes", method: "note", kind: .notification)
        let values = Mutex<[UInt64]>([])
        var methods: [MethodDescriptor] { [Self.note] }

        func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
            let value = try request.decode { try $0.readVarint64() }
            values.withLock { $0.append(value) }
            return .empty
        }
    }

    @Test("a notification queued before start, with the peer's Hello already in the ring, follows our Hello")
    func queuedWorkFollowsHello() async throws {
        let notes = Notes()
        let hostReady = Mutex(false)
        try await withShmHost(
            "start-order", services: [notes], started: { _, result in if case .success = result { hostReady.withLock { $0 = true } } }
        ) { path, _, _, pluginReactor in
            let transport = try await ShmTransport.connect(path: path.path, reactor: pluginReactor)
            // The host started its session when it handed over the segment: wait until its
            // Hello is in our ring, so that starting our transport delivers it at once.
            #expect(await waitUntil(timeout: .seconds(5)) { await onLoop(pluginReactor) { transport.value.idleHasWork() } })
            // The send's outcome is asserted here, on the test's task, not on the loop thread.
            let (session, sendError) = try await onLoopThrowing(pluginReactor) { () throws -> (SendableBox<Session>, RPCError?) in
                let session = try Session(transport: transport.value, role: .acceptor)
                let sendError = session.sendNotification(Notes.note.id, request: .encoding { $0.writeVarint(7) })
                session.start { _ in }
                return (SendableBox(session), sendError)
            }
            #expect(sendError == nil, "queueing the notification before start failed: \(sendError.map { "\($0)" } ?? "")")
            #expect(await waitUntil(timeout: .seconds(5)) { notes.values.withLock { $0 } == [7] })
            #expect(hostReady.withLock { $0 })
            #expect(await onLoop(pluginReactor) { session.value.phase } == .ready)
            // The handshake completed inside `start`: no handshake timer is left armed
            // (one armed after `start` held the session for the whole timeout).
            #expect(await onLoop(pluginReactor) { session.value.handshakeTimer?.isArmed ?? false } == false)
            await session.value.closeAndWait()
        }
    }
}
