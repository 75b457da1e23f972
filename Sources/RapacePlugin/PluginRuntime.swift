#if canImport(Glibc)
import Glibc
#endif
import Logging
import Rapace

/// The environment variable a ``PluginProcess`` host sets to its process id, so a plugin
/// can tell when its host died before the plugin armed its parent-death signal.
public let pluginHostPIDEnvironmentVariable = "RAPACE_PLUGIN_HOST_PID"

/// Collects the services one plugin serves; ``runMulti(_:)`` builds it.
///
/// ```swift
/// try await runMulti { builder in builder.addService(EchoServer(MyEcho())).addService(StatsServer(MyStats())) }
/// ```
/// A method id claimed by two services is detected in ``addService(_:)``; the first such
/// conflict is reported by ``build()`` (and by `runMulti` before it connects).
public final class PluginServiceBuilder: @unchecked Sendable {
    // @unchecked Sendable: used by one task while the plugin is being set up.
    private var router = ServiceRouter()
    private var services: [any RPCService] = []
    private var conflict: RPCError?

    public init() {}

    /// Adds `service`; when one of its method ids is already served, the builder remembers
    /// the conflict and ``build()`` fails with it.
    @discardableResult
    public func addService(_ service: any RPCService) -> PluginServiceBuilder {
        guard conflict == nil else { return self }
        do throws(RPCError) {
            try router.add(service)
            services.append(service)
        } catch {
            conflict = error
        }
        return self
    }

    /// The services added, or `.rpc` with the first duplicate-id conflict.
    public func build() throws(PluginError) -> [any RPCService] {
        if let conflict { throw .rpc(conflict) }
        return services
    }
}

/// How a plugin connects to its host: the arguments to read the segment path from, the
/// segment geometry, how long to wait for the segment, and the session's tunables.
public struct PluginRuntime: Sendable {
    /// The command line (the program name first, as in `CommandLine.arguments`).
    public var arguments: [String]
    /// The geometry the host's segment must have (default 256 / 64 KiB / 128).
    public var config: ShmConfig
    /// How long to wait for the host's segment (polled every 20 ms).
    public var waitTimeout: Duration
    /// Tunables of the session (its logger, limits, keepalive).
    public var session: Session.Configuration
    /// Arm the parent-death signal (SIGKILL) so the plugin never outlives its host.
    public var dieWithHost: Bool
    /// Runs once the handshake with the host is done, with the session: call the host's
    /// services on it (it is an ``RPCCaller``) or keep it for later.
    public var onConnected: (@Sendable (Session) -> Void)?
    /// Runs on the loop with the session before its handshake (for what must be in place
    /// before the host's first call, such as the tracing bridge's reply barrier).
    package var beforeHandshake: (@Sendable (Session) -> Void)?

    public init(
        arguments: [String] = CommandLine.arguments, config: ShmConfig = .default, waitTimeout: Duration = .seconds(5),
        session: Session.Configuration = Session.Configuration(logger: Logger(label: "rapace.plugin")),
        dieWithHost: Bool = true, onConnected: (@Sendable (Session) -> Void)? = nil
    ) {
        self.arguments = arguments
        self.config = config
        self.waitTimeout = waitTimeout
        self.session = session
        self.dieWithHost = dieWithHost
        self.onConnected = onConnected
    }

    /// The segment path: `--shm-path=PATH`, `--shm-path PATH`, or the first positional
    /// argument.
    public static func segmentPath(from arguments: [String]) throws(PluginError) -> String {
        var index = 1
        var positional: String?
        while index < arguments.count {
            let argument = arguments[index]
            if argument.hasPrefix("--shm-path=") {
                let path = String(argument.dropFirst("--shm-path=".count))
                guard !path.isEmpty else { throw .args("--shm-path= is empty") }
                return path
            }
            if argument == "--shm-path" {
                guard index + 1 < arguments.count, !arguments[index + 1].isEmpty else { throw .args("--shm-path needs a value") }
                return arguments[index + 1]
            }
            if positional == nil, !argument.hasPrefix("-"), !argument.isEmpty { positional = argument }
            index += 1
        }
        guard let positional else { throw .args("no shared-memory segment path was given") }
        return positional
    }

    /// Connects to the host and serves `services` until the host closes the connection.
    public func serve(_ services: [any RPCService]) async throws(PluginError) {
        let path = try Self.segmentPath(from: arguments)
        if dieWithHost {
            // The plugin dies with the thread that spawned it (PluginProcess spawns from a
            // thread that lives as long as the child). If the host died before this line,
            // our parent is already someone else: stop now.
            // Fails only for an invalid signal number; as before, the plugin runs on regardless.
            try? Sys.setParentDeathSignal(SIGKILL)
            if let text = getenv(pluginHostPIDEnvironmentVariable), let host = pid_t(String(cString: text)), Sys.parentProcessID != host {
                throw .transport("the host process \(host) is gone")
            }
        }
        // Duplicate ids fail here, before anything touches the segment.
        do throws(RPCError) { _ = try ServiceRouter(services) } catch { throw .rpc(error) }
        let reactor: Reactor
        do throws(SystemError) { reactor = try Reactor.start(name: "rapace-plugin") } catch {
            throw .transport("cannot start the reactor: \(error)")
        }
        defer { reactor.shutdown() }
        let session: Session
        do {
            session = try await Session.connect(
                shm: path, reactor: reactor, config: config, services: services, configuration: self.session, timeout: waitTimeout,
                beforeHandshake: beforeHandshake)
        } catch let error as ShmError {
            if error.code == .segmentNotFound {
                throw .shmTimeout(path: path, waited: waitTimeout)
            }
            throw .shmOpen(path: path, reason: error.message)
        } catch let error as RPCError {
            throw .rpc(error)
        } catch {
            throw .transport("\(error)")
        }
        onConnected?(session)
        await session.closed()
    }
}

/// Serves `service` to the host whose segment is named on the command line
/// (`--shm-path=PATH` or the first argument), with the default segment configuration;
/// returns when the host closes the connection.
///
/// ```swift
/// @main struct Main { static func main() async throws { try await run(EchoServer(MyEcho())) } }
/// ```
public func run(_ service: any RPCService) async throws(PluginError) {
    try await PluginRuntime().serve([service])
}

/// ``run(_:)`` with a segment configuration other than the default.
public func runWithConfig(_ service: any RPCService, _ config: ShmConfig) async throws(PluginError) {
    try await PluginRuntime(config: config).serve([service])
}

/// Serves several services on one session; `build` adds them to the builder. Two services
/// claiming one method id fail with `.rpc` before connecting; a method no service knows
/// gets `UNIMPLEMENTED`.
public func runMulti(_ build: @Sendable (PluginServiceBuilder) -> Void) async throws(PluginError) {
    try await runMultiWithConfig(.default, build)
}

/// ``runMulti(_:)`` with a segment configuration other than the default.
public func runMultiWithConfig(_ config: ShmConfig, _ build: @Sendable (PluginServiceBuilder) -> Void) async throws(PluginError) {
    let builder = PluginServiceBuilder()
    build(builder)
    try await PluginRuntime(config: config).serve(try builder.build())
}
