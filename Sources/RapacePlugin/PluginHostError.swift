import Rapace

/// A host-side failure to launch or restart a plugin (``PluginProcess/launch(_:reactor:)``,
/// ``PluginProcess/restart(executable:arguments:)``): what kind of failure (``code``), what
/// happened (``message``, one line naming the plugin) and, when another error caused it, that
/// error (``underlying``).
///
/// Match on the code, not the message:
///
/// ```swift
/// do throws(PluginHostError) {
///     plugin = try await PluginProcess.launch(configuration, reactor: reactor)
/// } catch {
///     if error.code == .spawnFailed, let system = error.underlying as? SystemError, system.errno == .noSuchFile {
///         // the executable is not there
///     }
/// }
/// ```
///
/// Two errors are equal, and hash alike, when their codes and messages are: ``underlying``
/// takes no part (an `any Error` is neither `Equatable` nor `Hashable`). Its text is in the
/// message already, where there is one.
public struct PluginHostError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure. New kinds may be added; switch with a `default`.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Value: Hashable, Sendable {
            case spawnFailed, segmentCreationFailed, handshakeTimedOut, handshakeFailed, exitedBeforeHandshake, stopped, alreadyRestarting,
                reactorShutDown, serviceConflict
        }
        let value: Value
        /// The process could not be started: the executable is missing or not executable, or
        /// `posix_spawn` failed otherwise; or no thread could be started to spawn and watch
        /// it. ``PluginHostError/underlying`` is the `SystemError` of `posix_spawn` or of
        /// `pthread_create`.
        public static let spawnFailed = Code(value: .spawnFailed)
        /// The segment (or its bootstrap socket) could not be created: the directory is
        /// missing or not writable, `/dev/shm` is full, the path is too long for a socket
        /// (``PluginHostError/underlying`` is the error: an `ShmError` for the segment, a
        /// `TransportError` for the socket).
        public static let segmentCreationFailed = Code(value: .segmentCreationFailed)
        /// The process did not finish its handshake within
        /// ``PluginConfiguration/handshakeTimeout``; it is killed.
        public static let handshakeTimedOut = Code(value: .handshakeTimedOut)
        /// The process connected, but the rapace handshake did not complete: it was refused
        /// or failed (a protocol mismatch, the session's own handshake timeout), or the
        /// connection closed first (the process closed it, or died).
        /// ``PluginHostError/underlying`` is the session's `RPCError`, which says which.
        public static let handshakeFailed = Code(value: .handshakeFailed)
        /// The process exited before its handshake; the message names its exit status, and
        /// the plugin's own ``PluginError`` is in the log (its stderr).
        public static let exitedBeforeHandshake = Code(value: .exitedBeforeHandshake)
        /// ``PluginProcess/stop()`` was called: a start in flight was given up, or a restart
        /// was asked of a stopped plugin.
        public static let stopped = Code(value: .stopped)
        /// ``PluginProcess/restart(executable:arguments:)`` while another hot restart is
        /// still starting its process: one start is in flight at a time. (A crash restart in
        /// flight is superseded by the hot restart instead.)
        public static let alreadyRestarting = Code(value: .alreadyRestarting)
        /// The plugin's reactor has shut down (or is shutting down): nothing starts on it
        /// any more.
        public static let reactorShutDown = Code(value: .reactorShutDown)
        /// Two of ``PluginConfiguration/services`` claim one method id
        /// (``PluginHostError/underlying`` is the `RPCError` naming them).
        public static let serviceConflict = Code(value: .serviceConflict)
        public var description: String { "\(value)" }
    }

    /// What kind of failure.
    public var code: Code
    /// What happened, naming the plugin (and the executable, path, timeout or exit status).
    public var message: String
    /// The error that caused this one, where there is one: a `SystemError` (spawning), an
    /// `ShmError` (the segment), an `RPCError` (the handshake, the services). Not part of
    /// equality or hashing.
    public var underlying: (any Error)?

    /// An error of kind `code`, with the error that caused it, if any.
    public init(_ code: Code, _ message: String, underlying: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    public var description: String { message }

    /// Equal codes and messages; ``underlying`` is not compared.
    public static func == (lhs: PluginHostError, rhs: PluginHostError) -> Bool {
        lhs.code == rhs.code && lhs.message == rhs.message
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(code)
        hasher.combine(message)
    }
}
