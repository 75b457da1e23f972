/// The error of a failed call: a status code and message, as the peer sent them or as the
/// runtime produced them (for example `UNAVAILABLE` when the peer went away).
///
/// Handlers throw it to answer with a specific code; the caller receives the same code,
/// message, details and trailers.
public struct RPCError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The status code.
    public var code: StatusCode
    /// A human-readable explanation; may be empty.
    public var message: String
    /// Opaque bytes for the application, carried unchanged in the CallResult's `Status`;
    /// empty when there are none.
    public var details: [UInt8]
    /// Metadata sent after the call: in the CallResult when a handler throws this error,
    /// from it when a caller receives one. Empty for errors the runtime produced locally.
    public var trailers: [MetadataEntry]

    /// An error with `code` and `message`, and optionally details and trailers to send.
    public init(_ code: StatusCode, _ message: String, details: [UInt8] = [], trailers: [MetadataEntry] = []) {
        self.code = code
        self.message = message
        self.details = details
        self.trailers = trailers
    }

    /// The same as ``init(_:_:details:trailers:)``, with labelled arguments.
    public init(code: StatusCode, message: String, details: [UInt8] = [], trailers: [MetadataEntry] = []) {
        self.init(code, message, details: details, trailers: trailers)
    }

    public var description: String { message.isEmpty ? "\(code)" : "\(code): \(message)" }

    /// Maps any error a handler threw to the status the caller should receive.
    public init(handlerError error: any Error) {
        switch error {
        case let rpc as RPCError: self = rpc
        case let convertible as any RPCErrorConvertible: self = convertible.rpcError
        case is CancellationError: self.init(.cancelled, "handler was cancelled")
        case let postcard as PostcardError: self.init(.invalidArgument, "could not decode the arguments: \(postcard.message)")
        default: self.init(.internal, String(describing: error))
        }
    }

    init(status: Status, trailers: [MetadataEntry]) {
        self.init(status.code, status.message, details: status.details, trailers: trailers)
    }

    var status: Status { Status(code: code, message: message, details: details) }
}

/// An error type that knows which status the caller should see.
public protocol RPCErrorConvertible: Error {
    /// The status (code, message, details, trailers) the caller receives when a handler
    /// throws this error.
    var rpcError: RPCError { get }
}
