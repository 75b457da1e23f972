import Rapace

/// Why a plugin could not start or stopped abnormally. Every case reads as one line that
/// says what went wrong and what to do about it (``message``).
public enum PluginError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The segment path is missing or invalid on the command line.
    case args(String)
    /// No segment appeared at the path within the wait (5 s by default).
    case shmTimeout(path: String, waited: Duration)
    /// The segment exists but could not be opened or used (not a segment, wrong
    /// configuration, bootstrap refused).
    case shmOpen(path: String, reason: String)
    /// The RPC layer refused the setup (the handshake failed, or two services claim one
    /// method id).
    case rpc(RPCError)
    /// The reactor or the connection failed.
    case transport(String)

    /// One line: what went wrong and what to do.
    public var message: String {
        switch self {
        case .args(let why):
            return "invalid arguments: \(why); the host passes the segment as --shm-path=PATH (or give PATH as the first argument)"
        case .shmTimeout(let path, let waited):
            return "no rapace segment appeared at \(path) within \(waited); start the plugin from its host, which creates the segment first"
        case .shmOpen(let path, let reason):
            return "cannot open the rapace segment at \(path): \(reason); make sure host and plugin agree on the segment (path and ShmConfig)"
        case .rpc(let error):
            return "RPC setup failed: \(error); check the services' method ids and that host and plugin speak the same protocol"
        case .transport(let why):
            return "transport failed: \(why); the host may have exited, check its log"
        }
    }

    public var description: String { message }
}
