import EchoService
import Histogram
import Rapace

/// How the server runs the measured `add`: `Echo.add` on the hand-written async `EchoServer`
/// (a task per call), or `SyncEcho.add`, the same bytes served by a synchronous handler
/// (inline on the server's loop thread, no task).
enum ServerHandler: Sendable {
    case async
    case synchronous

    var methodID: UInt32 { self == .async ? EchoMethods.add.id : SyncEcho.add.id }
}

/// The three ways the bench drives `Echo.add(2, 3)` (or `SyncEcho.add(2, 3)`) over one rapace
/// session.
enum RapaceMeasurements {
    /// The request `EchoClient.add(2, 3)` sends (two zigzag varints).
    static func addRequest() -> Payload {
        Payload.encoding { writer in
            writer.writeZigZag(2)
            writer.writeZigZag(3)
        }
    }

    /// `EchoClient.add` from a task running on the reactor (`reactor.run`): each call runs
    /// inline on the loop thread and resumes there, with no thread hop.
    static func asyncOnReactor(session: Session, reactor: Reactor, warmup: Int, iterations: Int, handler: ServerHandler = .async) async throws -> Histogram<UInt64> {
        try await reactor.run {
            guard reactor.inLoop else { throw BenchError("reactor.run did not run the task on the loop thread") }
            let echo = EchoClient(session)
            let syncEcho = SyncEchoClient(session)
            var histogram = Samples.newHistogram()
            for index in 0..<(warmup + iterations) {
                let start = monotonicNanoseconds()
                let sum = switch handler {
                case .async: try await echo.add(2, 3)
                case .synchronous: try await syncEcho.add(2, 3)
                }
                let elapsed = monotonicNanoseconds() - start
                guard sum == 5 else { throw BenchError("Echo.add(2, 3) returned \(sum)") }
                if index >= warmup { histogram.record(elapsed) }
            }
            guard reactor.inLoop else { throw BenchError("the task left the loop thread during the run") }
            return histogram
        }
    }

    /// `EchoClient.add` from a task on the global concurrent executor: every call hops to
    /// the loop thread and its result hops back (reported for information).
    static func asyncOffLoop(session: Session, reactor: Reactor, warmup: Int, iterations: Int) async throws -> Histogram<UInt64> {
        try await Task.detached {
            guard !reactor.inLoop else { throw BenchError("the off-loop task runs on the loop thread") }
            let echo = EchoClient(session)
            var histogram = Samples.newHistogram()
            for index in 0..<(warmup + iterations) {
                let start = monotonicNanoseconds()
                let sum = try await echo.add(2, 3)
                let elapsed = monotonicNanoseconds() - start
                guard sum == 5 else { throw BenchError("Echo.add(2, 3) returned \(sum)") }
                if index >= warmup { histogram.record(elapsed) }
            }
            return histogram
        }.value
    }

    /// The callback API: `session.startCall(EchoMethods.add.id, …)` on the loop thread, the
    /// next call started from the previous one's completion (no task, no continuation).
    static func callbackOnLoop(session: Session, reactor: Reactor, warmup: Int, iterations: Int, handler: ServerHandler = .async) async throws -> Histogram<UInt64> {
        let driver = CallbackDriver(session: session, methodID: handler.methodID, warmup: warmup, iterations: iterations)
        return try await withCheckedThrowingContinuation { continuation in
            reactor.execute { driver.start(continuation) }
        }
    }
}

/// Runs the callback-API loop. Loop-confined: created anywhere, then only touched on the
/// session's loop thread.
private final class CallbackDriver: @unchecked Sendable {
    // @unchecked Sendable: after `start` every field is used on the loop thread only.
    private let session: Session
    private let methodID: UInt32
    private let warmup: Int
    private let total: Int
    private var index = 0
    private var started: UInt64 = 0
    private var histogram = Samples.newHistogram()
    private var continuation: CheckedContinuation<Histogram<UInt64>, any Error>?
    /// Built once: encoding it is not part of what a round trip measures.
    private let request = RapaceMeasurements.addRequest()

    init(session: Session, methodID: UInt32, warmup: Int, iterations: Int) {
        self.session = session
        self.methodID = methodID
        self.warmup = warmup
        self.total = warmup + iterations
    }

    func start(_ continuation: CheckedContinuation<Histogram<UInt64>, any Error>) {
        guard session.reactor.inLoop else {
            continuation.resume(throwing: BenchError("the callback driver did not start on the loop thread"))
            return
        }
        self.continuation = continuation
        if total == 0 { finish(.success(histogram)) } else { next() }
    }

    private func next() {
        started = monotonicNanoseconds()
        session.startCall(methodID, request: request) { [self] result in
            let elapsed = monotonicNanoseconds() - started
            do {
                let payload = try result.get()
                let sum = try payload.decode { try $0.decode(Int32.self) }
                guard sum == 5 else { throw BenchError("Echo.add(2, 3) returned \(sum)") }
            } catch {
                finish(.failure(error))
                return
            }
            if index >= warmup { histogram.record(elapsed) }
            index += 1
            if index == total { finish(.success(histogram)) } else { next() }
        }
    }

    private func finish(_ result: Result<Histogram<UInt64>, any Error>) {
        guard let continuation else { return }
        self.continuation = nil
        continuation.resume(with: result)
    }
}
