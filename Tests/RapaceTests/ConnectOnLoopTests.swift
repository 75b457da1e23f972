import EchoService
import Foundation
import RapaceTestSupport
import Testing

@testable import Rapace

/// Once the peer has accepted a connection its handshake timeout runs, so the connecting
/// side must not wait for anything but its own loop before its Hello goes out. The
/// `Session.connect` forms run their steps on the reactor they connect with: an executor
/// the caller keeps busy (here a third reactor, held until the host's handshake has ended;
/// in a full test run, the cooperative threads busy with synchronous tests) does not
/// hold them up.
///
/// Shared memory only: a plugin connects, then polls for the bootstrap message the host
/// sends when it accepts, so its next steps always come after the accept, and without
/// the loop they waited for the caller's executor. Over TCP or a Unix socket the one such
/// step, after the transport's connect completes, races the host's accept (the kernel
/// completes the connection first), so a test of it would fail without the fix only now
/// and then; those forms use the same `onLoopThroughout`.
@Suite("Connecting runs on the session's loop", .sharesProcess)
struct ConnectOnLoopTests {
    /// A host on `hostReactor` that, when it accepts a connection, holds `caller`'s loop
    /// until its own session's handshake has ended (at most 10 s) and records how it ended.
    final class Host: Sendable {
        let caller: Reactor
        let handshake = Locked<Result<Void, RPCError>?>(nil)
        private let ended = DispatchSemaphore(value: 0)

        init(caller: Reactor) { self.caller = caller }

        /// Serves Echo on `transport` as `role`, with the default 5 s handshake timeout.
        /// Loop thread only.
        func accept(_ transport: any FrameTransport, role: Role) {
            // From now on the handshake timeout runs: the caller's executor is busy until
            // the handshake has ended, one way or the other.
            caller.execute { [ended] in _ = ended.wait(timeout: .now() + 10) }
            guard let session = try? Session(transport: transport, role: role, services: [EchoServer(DefaultEcho())]) else { return }
            session.start { [self] result in
                handshake.withLock { $0 = result }
                ended.signal()
            }
        }
    }

    @Test("over shared memory, a plugin whose calling executor is busy still shakes hands in time")
    func sharedMemory() async throws {
        let path = ShmPath("connect-on-loop")
        defer { path.cleanUp() }
        try await withReactor("connect-caller") { caller in
            try await withReactor("connect-host") { hostReactor in
                let host = Host(caller: caller)
                let listener = try await hostReactor.run {
                    SendableBox(try ShmListener(reactor: hostReactor, path: path.path) { host.accept($0, role: .initiator) })
                }
                defer { hostReactor.execute { listener.value.close() } }
                try await withReactor("connect-plugin") { pluginReactor in
                    let connecting = Task(executorPreference: caller) { try await Session.connect(shm: path.path, reactor: pluginReactor) }
                    let session = try await value(of: connecting, within: .seconds(30), "the connect")
                    try Self.expectReady(host)
                    #expect(try await EchoClient(session).add(2, 3) == 5)
                    await session.closeAndWait()
                }
            }
        }
    }

    /// Expects the host's handshake to have succeeded.
    static func expectReady(_ host: Host, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let outcome = try #require(host.handshake.withLock { $0 }, "the host's handshake has not ended", sourceLocation: sourceLocation)
        if case .failure(let error) = outcome {
            Issue.record("the host's handshake failed: \(error)", sourceLocation: sourceLocation)
        }
    }
}
