// Control channel payloads (spec section 4), each a postcard struct with fields in order.
// These are hand-written against PostcardWriter/PostcardReader: they sit on every call's
// path, and the Codable machinery would add allocations for no benefit.

/// Control verbs, carried in `method_id` on channel 0.
public enum ControlVerb: UInt32, Sendable {
    case hello = 0
    case openChannel = 1
    case closeChannel = 2
    case cancelChannel = 3
    case grantCredits = 4
    case ping = 5
    case pong = 6
    case goAway = 7
}

/// One metadata or parameter entry: a string key and raw bytes.
public struct MetadataEntry: Hashable, Sendable {
    public var key: String
    public var value: [UInt8]
    public init(_ key: String, _ value: [UInt8]) {
        self.key = key
        self.value = value
    }
}

extension PostcardWriter {
    /// Writes `[(String, [u8])]`.
    @inlinable
    public mutating func writeMetadata(_ entries: [MetadataEntry]) {
        writeMetadata(entries, followedBy: nil)
    }

    /// Writes `entries` and then `extra`, when given, as one list: what `OpenChannel` sends
    /// with the deadline entry added, without building a combined array first.
    @inlinable
    mutating func writeMetadata(_ entries: [MetadataEntry], followedBy extra: MetadataEntry?) {
        writeVarint(UInt64(entries.count + (extra == nil ? 0 : 1)))
        for entry in entries { writeMetadataEntry(entry) }
        if let extra { writeMetadataEntry(extra) }
    }

    /// Writes one `(String, [u8])` entry of a metadata list.
    @inlinable
    public mutating func writeMetadataEntry(_ entry: MetadataEntry) {
        writeString(entry.key)
        writeByteArray(entry.value)
    }

    /// Writes a 0-based enum case index.
    @inlinable
    public mutating func writeEnumIndex(_ index: Int) { writeVarint(UInt64(index)) }
}

extension PostcardReader {
    /// Reads `[(String, [u8])]`. Each entry needs at least two bytes, which bounds the count.
    public mutating func readMetadata() throws(PostcardError) -> [MetadataEntry] {
        let count = try readCount(minimumElementSize: 2)
        if count == 0 { return [] }  // the common case: no buffer to reserve
        var entries: [MetadataEntry] = []
        entries.reserveCapacity(count)
        for _ in 0..<count {
            let key = try readString()
            let value = try readByteArray()
            entries.append(MetadataEntry(key, value))
        }
        return entries
    }

    /// Reads a collection count and checks it against the bytes left (no huge allocations).
    public mutating func readCount(minimumElementSize: Int) throws(PostcardError) -> Int {
        let start = offset
        let raw = try readVarint64()
        guard raw <= UInt64(remaining / max(minimumElementSize, 1)) else {
            throw PostcardError(code: .lengthTooLarge, message: "count \(raw) at offset \(start) exceeds the \(remaining) bytes left")
        }
        return Int(raw)
    }

    /// Reads an enum case index below `caseCount`.
    public mutating func readEnumIndex(caseCount: Int, type: String) throws(PostcardError) -> Int {
        let start = offset
        let raw = try readVarint64()
        guard raw < UInt64(caseCount) else {
            throw PostcardError(code: .invalidEnumIndex, message: "\(type) case index \(raw) at offset \(start) (valid: 0..<\(caseCount))")
        }
        return Int(raw)
    }
}

/// A type that is encoded and decoded by hand on the wire.
public protocol WireMessage: Sendable {
    func encode(into writer: inout PostcardWriter)
    init(from reader: inout PostcardReader) throws(PostcardError)
}

extension WireMessage {
    /// The postcard bytes of this message.
    public func encoded() -> [UInt8] {
        var writer = PostcardWriter(reservingCapacity: 32)
        encode(into: &writer)
        return writer.bytes
    }

    /// Decodes exactly one message from `bytes`; trailing bytes are an error.
    public init(decoding bytes: UnsafeRawBufferPointer) throws(PostcardError) {
        var reader = PostcardReader(bytes)
        self = try Self(from: &reader)
        try reader.finish()
    }

    /// Decodes exactly one message from `bytes`; trailing bytes are an error.
    public init(decoding bytes: [UInt8]) throws(PostcardError) {
        let result = bytes.withUnsafeBytes { (raw) -> Result<Self, PostcardError> in
            do throws(PostcardError) { return .success(try Self(decoding: raw)) } catch { return .failure(error) }
        }
        self = try result.get()
    }
}

// MARK: Hello

/// Which end of a connection a peer is.
public enum Role: Int, Sendable, CaseIterable {
    /// The side that opened the connection; allocates odd channel ids.
    case initiator = 0
    /// The side that accepted it; allocates even channel ids.
    case acceptor = 1

    /// The other role.
    public var peer: Role { self == .initiator ? .acceptor : .initiator }
}

/// Protocol limits; 0 means unlimited.
public struct Limits: Hashable, Sendable, WireMessage {
    public var maxPayloadSize: UInt32
    public var maxChannels: UInt32
    public var maxPendingCalls: UInt32

    public init(maxPayloadSize: UInt32 = 16 << 20, maxChannels: UInt32 = 0, maxPendingCalls: UInt32 = 0) {
        self.maxPayloadSize = maxPayloadSize
        self.maxChannels = maxChannels
        self.maxPendingCalls = maxPendingCalls
    }

    /// The effective limits of two peers: the smaller non-zero value of each field.
    public func negotiated(with other: Limits) -> Limits {
        func pick(_ a: UInt32, _ b: UInt32) -> UInt32 { a == 0 ? b : (b == 0 ? a : min(a, b)) }
        return Limits(
            maxPayloadSize: pick(maxPayloadSize, other.maxPayloadSize),
            maxChannels: pick(maxChannels, other.maxChannels),
            maxPendingCalls: pick(maxPendingCalls, other.maxPendingCalls))
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(maxPayloadSize))
        writer.writeVarint(UInt64(maxChannels))
        writer.writeVarint(UInt64(maxPendingCalls))
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        maxPayloadSize = try reader.readVarint32()
        maxChannels = try reader.readVarint32()
        maxPendingCalls = try reader.readVarint32()
    }
}

/// A method a peer serves, as listed in Hello.
public struct MethodInfo: Hashable, Sendable, WireMessage {
    public var methodID: UInt32
    /// 32-byte signature hash; all zero means "not provided".
    public var signatureHash: [UInt8]
    public var name: String?

    public init(methodID: UInt32, signatureHash: [UInt8] = [UInt8](repeating: 0, count: 32), name: String?) {
        precondition(signatureHash.count == 32, "sig_hash is exactly 32 bytes")
        self.methodID = methodID
        self.signatureHash = signatureHash
        self.name = name
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(methodID))
        writer.writeRawBytes(signatureHash)
        if let name {
            writer.writeByte(1)
            writer.writeString(name)
        } else {
            writer.writeByte(0)
        }
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        methodID = try reader.readVarint32()
        signatureHash = Array(try reader.readRawBytes(count: 32))
        name = try reader.readOptionalTag() ? try reader.readString() : nil
    }
}

/// Feature bits of the Hello handshake (spec section 5).
public struct FeatureSet: OptionSet, Hashable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let attachedStreams = FeatureSet(rawValue: 1 << 0)
    public static let callEnvelope = FeatureSet(rawValue: 1 << 1)
    public static let creditFlowControl = FeatureSet(rawValue: 1 << 2)
    public static let ping = FeatureSet(rawValue: 1 << 3)
}

/// The first frame each peer sends (control verb 0).
public struct Hello: Hashable, Sendable, WireMessage {
    /// Version 1.0: `major << 16 | minor`.
    public static let currentVersion: UInt32 = 0x0001_0000

    public var protocolVersion: UInt32
    public var role: Role
    public var requiredFeatures: FeatureSet
    public var supportedFeatures: FeatureSet
    public var limits: Limits
    public var methods: [MethodInfo]
    public var params: [MetadataEntry]

    public init(
        protocolVersion: UInt32 = Hello.currentVersion, role: Role,
        requiredFeatures: FeatureSet = [.callEnvelope],
        supportedFeatures: FeatureSet = [.callEnvelope, .creditFlowControl, .ping],
        limits: Limits = Limits(), methods: [MethodInfo] = [], params: [MetadataEntry] = []
    ) {
        self.protocolVersion = protocolVersion
        self.role = role
        self.requiredFeatures = requiredFeatures
        self.supportedFeatures = supportedFeatures
        self.limits = limits
        self.methods = methods
        self.params = params
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(protocolVersion))
        writer.writeEnumIndex(role.rawValue)
        writer.writeVarint(requiredFeatures.rawValue)
        writer.writeVarint(supportedFeatures.rawValue)
        limits.encode(into: &writer)
        writer.writeVarint(UInt64(methods.count))
        for method in methods { method.encode(into: &writer) }
        writer.writeMetadata(params)
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        protocolVersion = try reader.readVarint32()
        role = Role(rawValue: try reader.readEnumIndex(caseCount: 2, type: "Role"))!
        requiredFeatures = FeatureSet(rawValue: try reader.readVarint64())
        supportedFeatures = FeatureSet(rawValue: try reader.readVarint64())
        limits = try Limits(from: &reader)
        let count = try reader.readCount(minimumElementSize: 34)
        var methods: [MethodInfo] = []
        methods.reserveCapacity(count)
        for _ in 0..<count { methods.append(try MethodInfo(from: &reader)) }
        self.methods = methods
        params = try reader.readMetadata()
    }
}

// MARK: Channels

/// What a channel carries.
public enum ChannelKind: Int, Sendable, CaseIterable {
    case call = 0
    case stream = 1
    case tunnel = 2
}

/// Direction of an attached port.
public enum Direction: Int, Sendable, CaseIterable {
    case clientToServer = 0
    case serverToClient = 1
    case bidirectional = 2
}

/// Attaches a stream channel to a call (feature bit 0; decoded, not used by this implementation).
public struct AttachTo: Hashable, Sendable, WireMessage {
    public var callChannelID: UInt32
    public var portID: UInt32
    public var direction: Direction

    public init(callChannelID: UInt32, portID: UInt32, direction: Direction) {
        self.callChannelID = callChannelID
        self.portID = portID
        self.direction = direction
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(callChannelID))
        writer.writeVarint(UInt64(portID))
        writer.writeEnumIndex(direction.rawValue)
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        callChannelID = try reader.readVarint32()
        portID = try reader.readVarint32()
        direction = Direction(rawValue: try reader.readEnumIndex(caseCount: 3, type: "Direction"))!
    }
}

/// Control verb 1.
public struct OpenChannel: Hashable, Sendable, WireMessage {
    public var channelID: UInt32
    public var kind: ChannelKind
    public var attach: AttachTo?
    public var metadata: [MetadataEntry]
    public var initialCredits: UInt32

    public init(channelID: UInt32, kind: ChannelKind, attach: AttachTo? = nil, metadata: [MetadataEntry] = [], initialCredits: UInt32 = .max) {
        self.channelID = channelID
        self.kind = kind
        self.attach = attach
        self.metadata = metadata
        self.initialCredits = initialCredits
    }

    public func encode(into writer: inout PostcardWriter) {
        Self.encode(channelID: channelID, kind: kind, attach: attach, metadata: metadata, initialCredits: initialCredits, into: &writer)
    }

    /// Encodes an OpenChannel from its fields, with `extra` after `metadata` when given:
    /// what a caller sends without building the message (and copying its metadata) first.
    static func encode(
        channelID: UInt32, kind: ChannelKind, attach: AttachTo? = nil, metadata: [MetadataEntry], extra: MetadataEntry? = nil,
        initialCredits: UInt32, into writer: inout PostcardWriter
    ) {
        writer.writeVarint(UInt64(channelID))
        writer.writeEnumIndex(kind.rawValue)
        if let attach {
            writer.writeByte(1)
            attach.encode(into: &writer)
        } else {
            writer.writeByte(0)
        }
        writer.writeMetadata(metadata, followedBy: extra)
        writer.writeVarint(UInt64(initialCredits))
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        channelID = try reader.readVarint32()
        kind = ChannelKind(rawValue: try reader.readEnumIndex(caseCount: 3, type: "ChannelKind"))!
        attach = try reader.readOptionalTag() ? try AttachTo(from: &reader) : nil
        metadata = try reader.readMetadata()
        initialCredits = try reader.readVarint32()
    }
}

/// Why a channel closed.
public enum CloseReason: Hashable, Sendable {
    case normal
    case error(String)
}

/// Control verb 2. On channel 0 with an error it rejects a handshake.
public struct CloseChannel: Hashable, Sendable, WireMessage {
    public var channelID: UInt32
    public var reason: CloseReason

    public init(channelID: UInt32, reason: CloseReason) {
        self.channelID = channelID
        self.reason = reason
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(channelID))
        switch reason {
        case .normal: writer.writeEnumIndex(0)
        case .error(let text):
            writer.writeEnumIndex(1)
            writer.writeString(text)
        }
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        channelID = try reader.readVarint32()
        switch try reader.readEnumIndex(caseCount: 2, type: "CloseReason") {
        case 0: reason = .normal
        default: reason = .error(try reader.readString())
        }
    }
}

/// Why a channel was cancelled.
public enum CancelReason: Int, Sendable, CaseIterable {
    case clientCancel = 0
    case deadlineExceeded = 1
    case resourceExhausted = 2
    case protocolViolation = 3
    case unauthenticated = 4
    case permissionDenied = 5

    /// The status a caller reports when its call is cancelled for this reason.
    public var statusCode: StatusCode {
        switch self {
        case .clientCancel: .cancelled
        case .deadlineExceeded: .deadlineExceeded
        case .resourceExhausted: .resourceExhausted
        case .protocolViolation: .protocolError
        case .unauthenticated: .unauthenticated
        case .permissionDenied: .permissionDenied
        }
    }
}

/// Control verb 3.
public struct CancelChannel: Hashable, Sendable, WireMessage {
    public var channelID: UInt32
    public var reason: CancelReason

    public init(channelID: UInt32, reason: CancelReason) {
        self.channelID = channelID
        self.reason = reason
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(channelID))
        writer.writeEnumIndex(reason.rawValue)
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        channelID = try reader.readVarint32()
        reason = CancelReason(rawValue: try reader.readEnumIndex(caseCount: 6, type: "CancelReason"))!
    }
}

/// Control verb 4.
public struct GrantCredits: Hashable, Sendable, WireMessage {
    public var channelID: UInt32
    public var bytes: UInt32

    public init(channelID: UInt32, bytes: UInt32) {
        self.channelID = channelID
        self.bytes = bytes
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(channelID))
        writer.writeVarint(UInt64(bytes))
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        channelID = try reader.readVarint32()
        bytes = try reader.readVarint32()
    }
}

/// Why a peer is going away.
public enum GoAwayReason: Int, Sendable, CaseIterable {
    case shutdown = 0
    case maintenance = 1
    case overload = 2
    case protocolError = 3
}

/// Control verb 7.
public struct GoAway: Hashable, Sendable, WireMessage {
    public var reason: GoAwayReason
    /// The highest channel opened by the receiver that the sender will still finish.
    public var lastChannelID: UInt32
    public var message: String
    public var metadata: [MetadataEntry]

    public init(reason: GoAwayReason, lastChannelID: UInt32, message: String, metadata: [MetadataEntry] = []) {
        self.reason = reason
        self.lastChannelID = lastChannelID
        self.message = message
        self.metadata = metadata
    }

    public func encode(into writer: inout PostcardWriter) {
        writer.writeEnumIndex(reason.rawValue)
        writer.writeVarint(UInt64(lastChannelID))
        writer.writeString(message)
        writer.writeMetadata(metadata)
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        reason = GoAwayReason(rawValue: try reader.readEnumIndex(caseCount: 4, type: "GoAwayReason"))!
        lastChannelID = try reader.readVarint32()
        message = try reader.readString()
        metadata = try reader.readMetadata()
    }
}

// MARK: CallResult

/// The status of a finished call.
public struct Status: Hashable, Sendable, WireMessage {
    public var code: StatusCode
    public var message: String
    public var details: [UInt8]

    public init(code: StatusCode, message: String = "", details: [UInt8] = []) {
        self.code = code
        self.message = message
        self.details = details
    }

    public static let ok = Status(code: .ok)

    public func encode(into writer: inout PostcardWriter) {
        writer.writeVarint(UInt64(code.rawValue))
        writer.writeString(message)
        writer.writeByteArray(details)
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        code = StatusCode(rawValue: try reader.readVarint32())
        message = try reader.readString()
        details = try reader.readByteArray()
    }
}

/// The envelope every response and stream terminal carries (spec 6.1).
public struct CallResult: Hashable, Sendable, WireMessage {
    public var status: Status
    public var trailers: [MetadataEntry]
    /// The postcard-encoded return value on success (empty for Void), nil on error and on a
    /// stream terminal.
    public var body: [UInt8]?

    public init(status: Status, trailers: [MetadataEntry] = [], body: [UInt8]?) {
        self.status = status
        self.trailers = trailers
        self.body = body
    }

    public func encode(into writer: inout PostcardWriter) {
        status.encode(into: &writer)
        writer.writeMetadata(trailers)
        if let body {
            writer.writeByte(1)
            writer.writeByteArray(body)
        } else {
            writer.writeByte(0)
        }
    }

    /// Writes a successful CallResult around a body without building the struct.
    @inlinable
    public static func encodeSuccess(body: UnsafeRawBufferPointer, into writer: inout PostcardWriter) {
        writer.writeByte(0)  // code 0
        writer.writeByte(0)  // message ""
        writer.writeByte(0)  // details []
        writer.writeByte(0)  // trailers []
        writer.writeByte(1)  // Some
        writer.writeByteArray(body)
    }

    /// A successful CallResult around `body` as a payload: the writer keeps it inline (no
    /// allocation) when it fits in 16 bytes, that is for bodies of up to 10 bytes.
    static func successPayload(body: Payload) -> Payload {
        let size = body.count + 6  // five one-byte fields, a one-byte length while it is < 128
        var writer = PostcardWriter(reservingCapacity: size <= PostcardWriter.inlineCapacity ? 0 : body.count + 16)
        body.withUnsafeBytes { encodeSuccess(body: $0, into: &writer) }
        return writer.payload
    }

    public init(from reader: inout PostcardReader) throws(PostcardError) {
        status = try Status(from: &reader)
        trailers = try reader.readMetadata()
        body = try reader.readOptionalTag() ? try reader.readByteArray() : nil
    }
}
