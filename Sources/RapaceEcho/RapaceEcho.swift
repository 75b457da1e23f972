import ArgumentParser
import GeneratedEcho
import Logging
import Rapace

#if canImport(Glibc)
import Glibc
#endif

@main
struct RapaceEcho: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rapace-echo",
        abstract: "Serve or call rapace's Echo service over TCP, a Unix domain socket, shared memory or WebSocket.",
        subcommands: [Serve.self, Call.self, Plugin.self])
}

/// Shared-memory geometry and payload limit options.
struct ShmOptions: ParsableArguments {
    @Option(name: .long, help: "Descriptors per ring (serve --shm).")
    var ringCapacity: UInt32 = ShmConfig.default.ringCapacity

    @Option(name: .long, help: "Bytes per slot (serve --shm).")
    var slotSize: UInt32 = ShmConfig.default.slotSize

    @Option(name: .long, help: "Slots in the pool (serve --shm).")
    var slotCount: UInt32 = ShmConfig.default.slotCount

    @Option(name: .long, help: "Largest payload accepted, in bytes (default 16 MiB).")
    var maxPayload: UInt32 = 16 << 20

    var config: ShmConfig { ShmConfig(ringCapacity: ringCapacity, slotSize: slotSize, slotCount: slotCount) }

    func sessionConfiguration(logger: Logger) -> Session.Configuration {
        var configuration = Session.Configuration()
        configuration.logger = logger
        configuration.limits.maxPayloadSize = maxPayload
        return configuration
    }
}

/// `--tcp HOST:PORT` or `--unix PATH`.
struct AddressOptions: ParsableArguments {
    @Option(name: .long, help: "TCP address as HOST:PORT (port 0 picks a free port when serving).")
    var tcp: String?

    @Option(name: .long, help: "Unix domain socket path.")
    var unix: String?

    @Option(name: .long, help: "Shared-memory segment path (serve: the host creates it; call: the plugin side opens it).")
    var shm: String?

    @Option(name: .long, help: "WebSocket address as HOST:PORT (serve: also serves a demo page on GET /; call: ws://HOST:PORT/).")
    var ws: String?

    func validate() throws {
        let given = [tcp, unix, shm, ws].compactMap { $0 }.count
        if given == 0 { throw ValidationError("pass --tcp HOST:PORT, --unix PATH, --shm PATH or --ws HOST:PORT") }
        if given > 1 { throw ValidationError("pass only one of --tcp, --unix, --shm and --ws") }
    }

    func address() throws -> SocketAddress {
        switch (tcp, unix) {
        case (let tcp?, nil): return try SocketAddress.parseTCP(tcp)
        case (nil, let path?): return .unix(path: path)
        default: throw ValidationError("pass --tcp HOST:PORT or --unix PATH")
        }
    }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve Echo until SIGINT or SIGTERM; prints `listening on <address>` once ready.")

    @OptionGroup var address: AddressOptions
    @OptionGroup var shmOptions: ShmOptions

    @Option(name: .long, help: "Seconds in-flight calls get to finish after SIGINT/SIGTERM.")
    var grace: Double = 5

    @Option(name: .long, help: ArgumentHelp(
        "Ping each peer SECONDS after its handshake and after each Pong (off by default; only peers that support the ping feature).",
        valueName: "seconds"))
    var keepalive: Double?

    @Option(name: .long, help: ArgumentHelp(
        "Seconds a keepalive Ping may go unanswered before the connection is closed (default: the --keepalive interval).",
        valueName: "seconds"))
    var keepaliveTimeout: Double?

    @Flag(name: .long, help: "Log session events to stderr.")
    var verbose = false

    @Option(name: .long, help: "Folder with index.html and rapace.js for --ws (default: tools/web of the source tree).")
    var webRoot: String?

    func validate() throws {
        // Above 0 and at most a day: Duration.seconds(_:) traps on what it cannot represent.
        let valid = { (seconds: Double) in seconds > 0 && seconds <= 86_400 }
        if let keepalive, !valid(keepalive) { throw ValidationError("--keepalive takes a number of seconds above 0, at most 86400") }
        if let keepaliveTimeout {
            guard keepalive != nil else { throw ValidationError("--keepalive-timeout needs --keepalive") }
            if !valid(keepaliveTimeout) { throw ValidationError("--keepalive-timeout takes a number of seconds above 0, at most 86400") }
        }
    }

    /// The keepalive `--keepalive` and `--keepalive-timeout` ask for, if any.
    var keepaliveSetting: Session.Keepalive? {
        guard let keepalive else { return nil }
        return Session.Keepalive(interval: .seconds(keepalive), timeout: .seconds(keepaliveTimeout ?? keepalive))
    }

    func run() async throws {
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = .info
            return handler
        }
        var sessionLogger = Logger(label: "rapace-echo")
        sessionLogger.logLevel = verbose ? .debug : .warning
        let logger = sessionLogger
        let reactor = try Reactor.start(name: "rapace-echo")
        var configuration = shmOptions.sessionConfiguration(logger: logger)
        configuration.keepalive = keepaliveSetting
        var echo = DefaultEcho()
        if verbose {
            echo.onSleepEnd = { @Sendable (cancelled: Bool, slept: Duration) in
                logger.info("sleep ended after \(slept) (cancelled: \(cancelled))")
            }
        }
        let server = RapaceServer(reactor: reactor, services: [EchoServer(echo)], configuration: configuration)
        var webSocketListener: SendableBox<WebSocketListener>?
        if let path = address.shm {
            print("listening on \(try await server.listen(shm: path, config: shmOptions.config))")
        } else if let ws = address.ws {
            let (bound, listener) = try await server.listenWebSocket(on: try SocketAddress.parseTCP(ws), configuration: try WebDemo.configuration(root: webRoot ?? WebDemo.defaultRoot))
            webSocketListener = listener
            print("listening on ws://\(bound)/")
        } else {
            print("listening on \(try await server.listen(on: try address.address()))")
        }
        fflush(nil)

        _ = await SignalWatcher.waitForAny(on: reactor)
        if let webSocketListener { await server.closeWebSocketListener(webSocketListener) }
        await server.shutdownGracefully(grace: Duration.milliseconds(Int64(grace * 1000)))
        reactor.shutdown()
    }
}

struct Call: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Call one Echo method and print the result.",
        discussion: """
            Methods: echo MESSAGE | add A B | fail CODE MESSAGE | countdown FROM |
            checksum TEXT | sleep MILLISECONDS | blob SIZE
            """)

    @OptionGroup var address: AddressOptions
    @OptionGroup var shmOptions: ShmOptions

    @Option(name: .long, help: "Deadline for the call in milliseconds.")
    var timeoutMs: UInt32?

    @Argument(help: "The method: echo, add, fail, countdown, checksum, sleep, blob.")
    var method: String

    @Argument(help: "The method's arguments.")
    var arguments: [String] = []

    func run() async throws {
        let reactor = try Reactor.start(name: "rapace-call")
        defer { reactor.shutdown() }
        let session: Session
        let configuration = shmOptions.sessionConfiguration(logger: Logger(label: "rapace-echo"))
        if let path = address.shm {
            session = try await Session.connect(shm: path, reactor: reactor, configuration: configuration)
        } else if let ws = address.ws, case .tcp(let host, let port) = try SocketAddress.parseTCP(ws) {
            session = try await Session.connect(webSocketHost: host, port: port, reactor: reactor, configuration: configuration)
        } else {
            session = try await Session.connect(to: try address.address(), reactor: reactor, configuration: configuration)
        }
        var options = CallOptions()
        if let timeoutMs { options.timeout = .milliseconds(Int64(timeoutMs)) }
        let echo = EchoClient(session, options: options)
        do {
            try await invoke(echo)
        } catch let error as RPCError {
            FileHandleStderr.write("error: \(error.code.name) (\(error.code.rawValue)): \(error.message)\n")
            await session.closeAndWait()
            throw ExitCode(1)
        }
        await session.closeAndWait()
    }

    private func argument(_ index: Int, _ name: String) throws -> String {
        guard index < arguments.count else { throw ValidationError("\(method) needs \(name)") }
        return arguments[index]
    }

    private func number<T: FixedWidthInteger>(_ index: Int, _ name: String, as: T.Type) throws -> T {
        let text = try argument(index, name)
        guard let value = T(text) else { throw ValidationError("\(name) must be an integer, got \"\(text)\"") }
        return value
    }

    private func invoke(_ echo: EchoClient) async throws {
        switch method {
        case "echo":
            print(try await echo.echo(try argument(0, "MESSAGE")))
        case "add":
            print(try await echo.add(try number(0, "A", as: Int32.self), try number(1, "B", as: Int32.self)))
        case "fail":
            try await echo.fail(code: try number(0, "CODE", as: UInt32.self), message: try argument(1, "MESSAGE"))
            print("ok")
        case "countdown":
            for try await value in try echo.countdown(from: try number(0, "FROM", as: UInt32.self)) { print(value) }
        case "checksum":
            print(try await echo.checksum(Array(try argument(0, "TEXT").utf8)))
        case "sleep":
            try await echo.sleep(milliseconds: try number(0, "MILLISECONDS", as: UInt32.self))
            print("ok")
        case "blob":
            let bytes = try await echo.blob(size: try number(0, "SIZE", as: UInt32.self))
            print("\(bytes.count) bytes, fnv1a64 \(MethodID.fnv1a64(bytes))")
        default:
            throw ValidationError("unknown method \"\(method)\" (echo, add, fail, countdown, checksum, sleep, blob)")
        }
    }
}

/// The plugin side of shared memory, serving Echo to the host that created the segment.
struct Plugin: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Connect to a host's shared-memory segment as the plugin and serve Echo to it until the host goes away.")

    @Option(name: .long, help: "The host's segment path.")
    var shm: String

    @Option(name: .long, help: "Seconds to wait for the segment to appear.")
    var wait: Double = 5

    @OptionGroup var shmOptions: ShmOptions

    func run() async throws {
        let reactor = try Reactor.start(name: "rapace-plugin")
        defer { reactor.shutdown() }
        let configuration = shmOptions.sessionConfiguration(logger: Logger(label: "rapace-echo.plugin"))
        let session = try await Session.connect(
            shm: shm, reactor: reactor, services: [EchoServer(DefaultEcho())], configuration: configuration,
            timeout: .milliseconds(Int64(wait * 1000)))
        print("connected to \(shm)")
        fflush(nil)
        await session.closed()
    }
}

enum FileHandleStderr {
    static func write(_ text: String) {
        var bytes = Array(text.utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}
