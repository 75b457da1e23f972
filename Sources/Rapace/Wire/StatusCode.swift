/// A call status code (spec section 7). Values of 400 and up belong to the application.
public struct StatusCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    /// The code as sent in `Status.code`. Any value is valid, named here or not.
    public var rawValue: UInt32
    /// The code `rawValue`.
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// The code `rawValue`, such as `StatusCode(404)` for an application code.
    @inlinable public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    /// The code written as a literal: `let code: StatusCode = 404`.
    public init(integerLiteral value: UInt32) { self.rawValue = value }

    /// 0 `OK`: success. A failed call never carries it; a handler that throws an
    /// ``RPCError`` with code 0 is answered `UNKNOWN` instead.
    public static let ok: StatusCode = 0
    /// 1 `CANCELLED`: the caller cancelled the call (its task, `CallHandle.cancel()`, or a
    /// stream dropped or cancelled before its end), the peer sent CancelChannel(clientCancel)
    /// or CloseChannel(normal) for it, or a handler threw `CancellationError`. A stream
    /// `send` that waits for credit when its call is cancelled or ends throws it too.
    public static let cancelled: StatusCode = 1
    /// 2 `UNKNOWN`: rapace answers it for a handler that threw an ``RPCError`` with code 0
    /// (which means OK on the wire).
    public static let unknown: StatusCode = 2
    /// 3 `INVALID_ARGUMENT`: the call's arguments did not decode, or left bytes over (the
    /// handler's `PostcardError`, or the generated server's argument decoding).
    public static let invalidArgument: StatusCode = 3
    /// 4 `DEADLINE_EXCEEDED`: the call's deadline passed: before it started (failed
    /// locally, nothing sent), while the caller waited (its timer fails the call and sends
    /// CancelChannel(deadlineExceeded)), or on the callee, which answers it and cancels
    /// the handler.
    public static let deadlineExceeded: StatusCode = 4
    /// 5 `NOT_FOUND`: for applications; rapace never produces it.
    public static let notFound: StatusCode = 5
    /// 6 `ALREADY_EXISTS`: two methods served on one session share an id (thrown by
    /// `Session.init` and `RapaceServer.listen`).
    public static let alreadyExists: StatusCode = 6
    /// 7 `PERMISSION_DENIED`: rapace produces it only for a call the peer cancelled with
    /// CancelChannel(permissionDenied); it never sends that reason itself.
    public static let permissionDenied: StatusCode = 7
    /// 8 `RESOURCE_EXHAUSTED`: a request, result or stream item above the max payload; too
    /// many calls pending or channels open; the connection's channel ids used up; a channel
    /// the peer refused (CancelChannel(resourceExhausted)); a stream item larger than the
    /// caller's window that no grant made room for within `creditGrowthTimeout`; a frame the
    /// shared-memory transport gave up on (no slots came free within its stall limit).
    public static let resourceExhausted: StatusCode = 8
    /// 9 `FAILED_PRECONDITION`: a stream iterated by two tasks at once, a stream item sent
    /// while the previous `send` still waits, `setService` after `start`, or a payload (a
    /// request, a result, a stream item) borrowing an `ShmBuffer` already sent.
    public static let failedPrecondition: StatusCode = 9
    /// 10 `ABORTED`: the peer closed the call's channel with CloseChannel(error); the
    /// message is the peer's text.
    public static let aborted: StatusCode = 10
    /// 11 `OUT_OF_RANGE`: for applications; rapace never produces it.
    public static let outOfRange: StatusCode = 11
    /// 12 `UNIMPLEMENTED`: the callee serves no method with the request's id.
    public static let unimplemented: StatusCode = 12
    /// 13 `INTERNAL`: a handler threw an error that is neither an ``RPCError`` nor
    /// ``RPCErrorConvertible`` (nor `CancellationError` or `PostcardError`); the message is
    /// the error's description.
    public static let `internal`: StatusCode = 13
    /// 14 `UNAVAILABLE`: the session is closed (locally, by the peer, a lost connection, a
    /// reactor shutdown, a failed handshake, a keepalive timeout) or one side is going away
    /// (GoAway). Spec 7: a call that fails because the peer went away reports it.
    public static let unavailable: StatusCode = 14
    /// 15 `DATA_LOSS`: for applications; rapace never produces it.
    public static let dataLoss: StatusCode = 15
    /// 16 `UNAUTHENTICATED`: rapace produces it only for a call the peer cancelled with
    /// CancelChannel(unauthenticated); it never sends that reason itself.
    public static let unauthenticated: StatusCode = 16
    /// 17 `INCOMPATIBLE_SCHEMA`: reserved by the spec; rapace never produces it.
    public static let incompatibleSchema: StatusCode = 17
    /// 50 `PROTOCOL_ERROR`: this side detected a protocol violation, either on the
    /// connection (the session closes and every pending call fails with it) or on one of
    /// its calls (a frame without RESPONSE on the call's channel, a stream item beyond the
    /// credit granted), or the peer cancelled a call with CancelChannel(protocolViolation).
    public static let protocolError: StatusCode = 50
    /// 51 `INVALID_FRAME`: reserved by the spec; rapace never produces it.
    public static let invalidFrame: StatusCode = 51
    /// 52 `INVALID_CHANNEL`: reserved by the spec; rapace never produces it.
    public static let invalidChannel: StatusCode = 52
    /// 53 `INVALID_METHOD`: the method's kind does not match the kind of channel the call
    /// was opened on (a `tunnel` channel matches none), or a served method hashes to the
    /// reserved id 0 (thrown by `Session.init` and `RapaceServer.listen`).
    public static let invalidMethod: StatusCode = 53
    /// 54 `DECODE_ERROR`: a response's CallResult did not decode, a ``RapaceStream`` item
    /// did not decode as its element type, or a generated client could not decode a result.
    public static let decodeError: StatusCode = 54
    /// 55 `ENCODE_ERROR`: generated code could not encode a call's arguments (the client
    /// fails the call locally) or a handler's result (the server answers with it).
    public static let encodeError: StatusCode = 55

    /// The spec's name (`UNAVAILABLE`), or `APP(n)` for application codes.
    public var name: String {
        switch rawValue {
        case 0: "OK"
        case 1: "CANCELLED"
        case 2: "UNKNOWN"
        case 3: "INVALID_ARGUMENT"
        case 4: "DEADLINE_EXCEEDED"
        case 5: "NOT_FOUND"
        case 6: "ALREADY_EXISTS"
        case 7: "PERMISSION_DENIED"
        case 8: "RESOURCE_EXHAUSTED"
        case 9: "FAILED_PRECONDITION"
        case 10: "ABORTED"
        case 11: "OUT_OF_RANGE"
        case 12: "UNIMPLEMENTED"
        case 13: "INTERNAL"
        case 14: "UNAVAILABLE"
        case 15: "DATA_LOSS"
        case 16: "UNAUTHENTICATED"
        case 17: "INCOMPATIBLE_SCHEMA"
        case 50: "PROTOCOL_ERROR"
        case 51: "INVALID_FRAME"
        case 52: "INVALID_CHANNEL"
        case 53: "INVALID_METHOD"
        case 54: "DECODE_ERROR"
        case 55: "ENCODE_ERROR"
        default: rawValue >= 400 ? "APP(\(rawValue))" : "CODE(\(rawValue))"
        }
    }

    public var description: String { name }

    /// The code for a name such as `"UNAVAILABLE"` or a decimal number.
    public init?(name: String) {
        if let number = UInt32(name) { self.init(rawValue: number); return }
        for raw in UInt32(0)...55 where StatusCode(rawValue: raw).name == name.uppercased() {
            self.init(rawValue: raw)
            return
        }
        return nil
    }
}
