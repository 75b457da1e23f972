import ArgumentParser
import EchoService
import Histogram
import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// `rapace-bench ws`: `Echo.add(2, 3)` round trip over rapace's WebSocket transport, next to
/// a raw WebSocket echo (one binary message of the same size each way, through the same
/// WebSocket code, no rapace session) measured in the same run.
struct WebSocketBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ws",
        abstract: "p50/p99 round trip of Echo.add(2,3) over WebSocket vs a raw WebSocket echo, same run.",
        discussion: """
            Unlike `stream`, client and server run in this one process, each on its own \
            reactor thread, over 127.0.0.1 TCP. Both rows use the same sockets, framing and \
            masking code; the difference is rapace's session (OpenChannel, dispatch, \
            CallResult). The rows take turns in --rounds slices.
            """)

    @Option(name: .long, help: "Measured round trips per row.")
    var iterations: Int = 10_000

    @Option(name: .long, help: "Unrecorded round trips before each row's first slice.")
    var warmup: Int = 1_000

    @Option(name: .long, help: "Slices the rows take turns in.")
    var rounds: Int = 5

    func validate() throws {
        guard iterations > 0, warmup >= 0 else { throw ValidationError("--iterations must be positive and --warmup not negative") }
        guard rounds >= 1, rounds <= iterations else { throw ValidationError("--rounds must be between 1 and --iterations") }
    }

    func run() async throws {
        let serverReactor = try Reactor.start(name: "ws-bench-server")
        let clientReactor = try Reactor.start(name: "ws-bench-client")
        defer {
            clientReactor.shutdown()
            serverReactor.shutdown()
        }
        let server = RapaceServer(reactor: serverReactor, services: [EchoServer(DefaultEcho())])
        let (address, listener) = try await server.listenWebSocket()
        let raw = try await RawWebSocketEcho.start(on: serverReactor)
        guard case .tcp(_, let port) = address, case .tcp(_, let rawPort) = raw.address else { throw BenchError("not TCP") }

        let session = try await Session.connect(webSocketHost: "127.0.0.1", port: port, reactor: clientReactor)
        let rawClient = try await WebSocketTransport.connect(host: "127.0.0.1", port: rawPort, reactor: clientReactor)
        // A message the size of the rapace request frame (OpenChannel and request travel
        // as two messages; the raw row sends one of the request's size each way).
        let messageSize = RapaceMeasurements.addRequest().count

        var rapace = Samples.newHistogram()
        var rawHistogram = Samples.newHistogram()
        let slice = iterations / rounds
        for round in 0..<rounds {
            let count = round == rounds - 1 ? iterations - slice * (rounds - 1) : slice
            let warm = round == 0 ? warmup : 0
            let rapaceSlice = try await RapaceMeasurements.asyncOnReactor(session: session, reactor: clientReactor, warmup: warm, iterations: count)
            rapace.add(rapaceSlice)
            let rawSlice = try await RawWebSocketPingPong.measure(transport: rawClient, reactor: clientReactor, payloadSize: messageSize, warmup: warm, iterations: count)
            rawHistogram.add(rawSlice)
        }
        await session.closeAndWait()
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            clientReactor.execute {
                rawClient.value.close(error: nil)
                continuation.resume()
            }
        }
        await server.closeWebSocketListener(listener)
        await raw.close()
        await server.shutdownGracefully(grace: .seconds(1))

        let rows = [("raw WebSocket echo (baseline)", Samples(rawHistogram)), ("rapace Echo.add over WebSocket", Samples(rapace))]
        print("WebSocket round trip, 127.0.0.1, \(iterations) calls per row, in-process client and server")
        // Columns of 34 and 10 characters, each ending in at least one space.
        let header = Format.left("row", 33) + " " + Format.left("p50 µs", 9) + " " + Format.left("p99 µs", 9) + " " + Format.left("mean µs", 9) + " "
        print(header + "× baseline p50")
        for (name, samples) in rows {
            let ratio: Double = samples.p50 / max(1, rows[0].1.p50)
            var line = Format.left(name, 33) + " "
            for value in [samples.p50, samples.p99, samples.mean] { line += Format.left(Format.fixed(value / 1000, digits: 1), 9) + " " }
            print(line + Format.fixed(ratio, digits: 2))
        }
    }
}

/// A WebSocket server that sends every rapace frame it receives straight back.
final class RawWebSocketEcho: @unchecked Sendable {
    // @unchecked Sendable: the listener is loop-confined; `close` hops to the loop.
    let reactor: Reactor
    let address: SocketAddress
    private let listener: WebSocketListener

    private init(reactor: Reactor, listener: WebSocketListener) {
        self.reactor = reactor
        self.listener = listener
        self.address = listener.address
    }

    static func start(on reactor: Reactor) async throws -> RawWebSocketEcho {
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Result<SendableBox<RawWebSocketEcho>, TransportError>, Never>) in
            reactor.execute {
                do throws(TransportError) {
                    let listener = try WebSocketListener(reactor: reactor) { transport in
                        transport.start(handler: EchoHandler(transport: transport))
                    }
                    continuation.resume(returning: .success(SendableBox(RawWebSocketEcho(reactor: reactor, listener: listener))))
                } catch {
                    continuation.resume(returning: .failure(error))
                }
            }
        }
        return try result.get().value
    }

    func close() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            reactor.execute {
                self.listener.close()
                continuation.resume()
            }
        }
    }

    private final class EchoHandler: FrameTransportHandler {
        unowned let transport: WebSocketTransport
        init(transport: WebSocketTransport) { self.transport = transport }
        func transportDidReceive(_ frame: Frame) { transport.send(frame) }
        func transportDidFinishReceiveBatch() { transport.flush() }
        func transportDidClose(_ error: TransportError?) {}
        func transportDidFailFraming(_ error: TransportError) { transport.close(error: error) }
        func transportDidRefuse(_ frame: Frame, reason: String) { transport.close(error: TransportError(.io, reason)) }
    }
}

/// Ping-pong of one frame over a client WebSocketTransport, driven on its loop.
final class RawWebSocketPingPong: FrameTransportHandler {
    private let transport: WebSocketTransport
    private let frame: Frame
    private let warmup: Int
    private let iterations: Int
    private var index = 0
    private var started: UInt64 = 0
    private var histogram = Samples.newHistogram()
    private var continuation: CheckedContinuation<Histogram<UInt64>, any Error>?

    private init(transport: WebSocketTransport, payloadSize: Int, warmup: Int, iterations: Int) {
        self.transport = transport
        var frame = Frame(descriptor: FrameDescriptor(messageID: 1, channelID: 1, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]), payload: Payload([UInt8](repeating: 4, count: payloadSize)))
        frame.prepareForSending()
        self.frame = frame
        self.warmup = warmup
        self.iterations = iterations
    }

    static func measure(transport: SendableBox<WebSocketTransport>, reactor: Reactor, payloadSize: Int, warmup: Int, iterations: Int) async throws -> Histogram<UInt64> {
        try await withCheckedThrowingContinuation { continuation in
            reactor.execute {
                let driver = RawWebSocketPingPong(transport: transport.value, payloadSize: payloadSize, warmup: warmup, iterations: iterations)
                driver.continuation = continuation
                transport.value.start(handler: driver)
                driver.sendNext()
            }
        }
    }

    private func sendNext() {
        started = monotonicNanoseconds()
        transport.send(frame)
        transport.flush()
    }

    func transportDidReceive(_ frame: Frame) {
        let elapsed = monotonicNanoseconds() - started
        if index >= warmup { histogram.record(elapsed) }
        index += 1
        if index == warmup + iterations {
            let continuation = self.continuation
            self.continuation = nil
            continuation?.resume(returning: histogram)
        } else {
            sendNext()
        }
    }

    func transportDidFinishReceiveBatch() {}
    func transportDidClose(_ error: TransportError?) {
        continuation?.resume(throwing: BenchError("raw WebSocket echo closed: \(error.map { "\($0)" } ?? "cleanly")"))
        continuation = nil
    }
    func transportDidFailFraming(_ error: TransportError) {
        transport.close(error: error)
    }

    func transportDidRefuse(_ frame: Frame, reason: String) {
        transport.close(error: TransportError(.io, reason))
    }
}
