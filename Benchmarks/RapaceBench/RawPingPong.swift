import ArgumentParser
import CRapaceShim
import Histogram

#if canImport(Glibc)
import Glibc
#endif

/// The raw baseline's server (hidden): accepts one connection, then reads exactly
/// `--request-bytes` and answers `--response-bytes`, with blocking `read`/`send`, until
/// the client closes. Prints `listening on ADDRESS` once it accepts connections.
struct RawEchoServer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "raw-echo-server",
        abstract: "Raw ping-pong server for the baselines (started by `rapace-bench stream`).",
        shouldDisplay: false)

    @Option(name: .long, help: "Numeric IPv4 HOST:PORT (port 0 picks a free port).")
    var tcp: String?

    @Option(name: .long, help: "Unix domain socket path.")
    var unix: String?

    @Option(name: .long, help: "Bytes per request.")
    var requestBytes: Int = 64

    @Option(name: .long, help: "Bytes per response.")
    var responseBytes: Int = 64

    func validate() throws {
        guard (tcp == nil) != (unix == nil) else { throw ValidationError("pass exactly one of --tcp HOST:PORT and --unix PATH") }
        guard requestBytes > 0, responseBytes > 0 else { throw ValidationError("message sizes must be positive") }
    }

    func run() throws {
        // Die with the bench even if it is killed with SIGKILL (the bench spawns from a
        // thread that outlives us, see ChildProcess.spawn). Without a connection yet, also notice a new
        // parent process id; once connected, the bench's death is EOF.
        let parent = getppid()
        _ = rapace_set_parent_death_signal(SIGTERM)
        if parent == 1 { throw BenchError("raw-echo-server: the bench is already gone") }
        let address: RawAddress = try unix.map { .unix(path: $0) } ?? RawAddress.parseTCP(tcp ?? "")
        if case .unix(let path) = address { unlink(path) }
        let (listener, bound) = try RawSocket.listen(on: address)
        print("listening on \(bound)")
        fflush(nil)

        let connection: Int32
        do {
            connection = try RawSocket.acceptOne(listener, tcp: address.isTCP) { getppid() == parent }
        } catch {
            close(listener)
            if case .unix(let path) = address { unlink(path) }
            throw error
        }
        close(listener)
        if case .unix(let path) = address { unlink(path) }
        defer { close(connection) }

        let request = UnsafeMutableRawPointer.allocate(byteCount: requestBytes, alignment: 16)
        let response = UnsafeMutableRawPointer.allocate(byteCount: responseBytes, alignment: 16)
        defer {
            request.deallocate()
            response.deallocate()
        }
        response.initializeMemory(as: UInt8.self, repeating: 0x5A, count: responseBytes)
        while try RawSocket.readExactly(connection, request, requestBytes) {
            try RawSocket.writeAll(connection, response, responseBytes)
        }
    }
}

/// The client side of the raw baseline: one blocking socket, one write of the request and
/// one blocking read of the whole response per round trip.
final class RawPingPongClient {
    private var fd: Int32
    private let requestBytes: Int
    private let responseBytes: Int
    private let request: UnsafeMutableRawPointer
    private let response: UnsafeMutableRawPointer
    private var roundTrips = 0

    init(connectingTo address: RawAddress, requestBytes: Int, responseBytes: Int) throws {
        fd = try RawSocket.connect(to: address)
        self.requestBytes = requestBytes
        self.responseBytes = responseBytes
        request = UnsafeMutableRawPointer.allocate(byteCount: requestBytes, alignment: 16)
        request.initializeMemory(as: UInt8.self, repeating: 0xA5, count: requestBytes)
        response = UnsafeMutableRawPointer.allocate(byteCount: responseBytes, alignment: 16)
    }

    /// Runs `warmup` unrecorded then `iterations` recorded round trips.
    func measure(warmup: Int, iterations: Int) throws -> Histogram<UInt64> {
        guard fd >= 0 else { throw BenchError("raw ping-pong client already closed") }
        var histogram = Samples.newHistogram()
        for index in 0..<(warmup + iterations) {
            let start = monotonicNanoseconds()
            try RawSocket.writeAll(fd, request, requestBytes)
            guard try RawSocket.readExactly(fd, response, responseBytes) else {
                throw BenchError("raw-echo-server closed the connection after \(roundTrips) round trips")
            }
            let elapsed = monotonicNanoseconds() - start
            roundTrips += 1
            if index >= warmup { histogram.record(elapsed) }
        }
        return histogram
    }

    /// Closes the connection (the server then exits). Idempotent.
    func close() {
        guard fd >= 0 else { return }
        Glibc.close(fd)
        fd = -1
    }

    deinit {
        close()
        request.deallocate()
        response.deallocate()
    }
}
