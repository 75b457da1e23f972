/// A call status code (spec section 7). Values of 400 and up belong to the application.
public struct StatusCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var rawValue: UInt32
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    public init(integerLiteral value: UInt32) { self.rawValue = value }

    public static let ok: StatusCode = 0
    public static let cancelled: StatusCode = 1
    public static let unknown: StatusCode = 2
    public static let invalidArgument: StatusCode = 3
    public static let deadlineExceeded: StatusCode = 4
    public static let notFound: StatusCode = 5
    public static let alreadyExists: StatusCode = 6
    public static let permissionDenied: StatusCode = 7
    public static let resourceExhausted: StatusCode = 8
    public static let failedPrecondition: StatusCode = 9
    public static let aborted: StatusCode = 10
    public static let outOfRange: StatusCode = 11
    public static let unimplemented: StatusCode = 12
    public static let `internal`: StatusCode = 13
    public static let unavailable: StatusCode = 14
    public static let dataLoss: StatusCode = 15
    public static let unauthenticated: StatusCode = 16
    public static let incompatibleSchema: StatusCode = 17
    public static let protocolError: StatusCode = 50
    public static let invalidFrame: StatusCode = 51
    public static let invalidChannel: StatusCode = 52
    public static let invalidMethod: StatusCode = 53
    public static let decodeError: StatusCode = 54
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
