// Control channel payloads (spec section 4), each a postcard struct with fields in order.
// These are hand-written against PostcardWriter/PostcardReader: they sit on every call's
// path, and the Codable machinery would add allocations for no benefit.

/// Control verbs, carried in `method_id` on channel 0.
public enum ControlVerb: UInt32, Sendable {
    /// 0: ``Hello``, each peer's first frame (spec 5).
    case hello = 0
    /// 1: ``OpenChannel`` (spec 6.1, 6.3).
    case openChannel = 1
    /// 2: ``CloseChannel``.
    case closeChannel = 2
    /// 3: ``CancelChannel`` (spec 6.2).
    case cancelChannel = 3
    /// 4: ``GrantCredits`` (spec 6.3).
    case grantCredits = 4
    /// 5: Ping, 8 raw bytes; answered with a Pong carrying the same bytes.
    case ping = 5
    /// 6: Pong, the 8 bytes of the Ping it answers.
    case pong = 6
    /// 7: ``GoAway`` (spec 6.4).
    case goAway = 7
}

/// One metadata or parameter entry: a string key and raw bytes.
public struct MetadataEntry: Hashable, Sendable {
    /// The key, such as `rapace.deadline_remaining_ms`. Keys need not be unique in a list.
    public var key: String
    /// The value: bytes, encoded as `[u8]` on the wire.
    public var value: [UInt8]
    /// The entry `key` = `value`.
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
    /// Appends the message's postcard encoding to `writer`.
    func encode(into writer: inout PostcardWriter)
    /// Reads one message from `reader`, leaving it just after the message (bytes after it
    /// are not checked; the `init(decoding:)` initializers check them).
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
///
/// Sent in ``Hello`` (spec 4, 5). rapace enforces its own configured values on what the peer
/// opens and sends, and the negotiated values (``negotiated(with:)``) on what it starts.
public struct Limits: Hashable, Sendable, WireMessage {
    /// Largest payload of one frame in bytes (request, result, stream item). rapace's
    /// transports reject a larger incoming payload before allocating it (a framing error),
    /// and a session refuses larger outgoing requests and results (`RESOURCE_EXHAUSTED`).
    public var maxPayloadSize: UInt32
    /// Most channels open at once. rapace refuses a peer's OpenChannel while that many of
    /// the peer's calls are open (CancelChannel(resourceExhausted)), and fails a new call of
    /// its own while that many of its calls are pending (`RESOURCE_EXHAUSTED`).
    public var maxChannels: UInt32
    /// Most calls waiting for their response at once. rapace checks it exactly as
    /// ``maxChannels``, against the same count.
    public var maxPendingCalls: UInt32

    /// Limits with the given values. The defaults: 16 MiB payloads, no channel or
    /// pending-call limit (``Session/Configuration`` defaults to 8192 for both).
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
    /// The method's id (spec 2).
    public var methodID: UInt32
    /// 32-byte signature hash; all zero means "not provided".
    public var signatureHash: [UInt8]
    /// The method's name, or nil when the peer gives none. rapace sends `"Service.method"`.
    public var name: String?

    /// A method entry. `signatureHash` must be 32 bytes (a precondition); it defaults to
    /// all zeros, "not provided", which is what rapace sends.
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
///
/// rapace supports bits 1–3 and requires bit 1; the session's effective features are the
/// intersection of both peers' supported sets (``Session/effectiveFeatures``).
public struct FeatureSet: OptionSet, Hashable, Sendable {
    /// The bits, as `required_features`/`supported_features` carry them (u64).
    public var rawValue: UInt64
    /// The set with bits `rawValue`; bits without a name here are kept.
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Bit 0: stream channels attached to calls (``AttachTo``). rapace does not support it.
    public static let attachedStreams = FeatureSet(rawValue: 1 << 0)
    /// Bit 1: responses and stream terminals carry a ``CallResult``. rapace requires it.
    public static let callEnvelope = FeatureSet(rawValue: 1 << 1)
    /// Bit 2: stream items are limited by the credit the caller grants (OpenChannel
    /// `initial_credits`, ``GrantCredits``; spec 6.3). Without it rapace serves a stream
    /// without a credit limit, and a caller does not treat a credit overrun as an error.
    public static let creditFlowControl = FeatureSet(rawValue: 1 << 2)
    /// Bit 3: keepalive Pings (``Session/Keepalive`` runs only with it). rapace answers a
    /// Ping whether or not it was negotiated.
    public static let ping = FeatureSet(rawValue: 1 << 3)
}

/// The first frame each peer sends (control verb 0).
///
/// Spec 4 (the encoding) and 5 (the handshake): both peers send it first, without waiting,
/// and send nothing else before they have the peer's.
public struct Hello: Hashable, Sendable, WireMessage {
    /// Version 1.0: `major << 16 | minor`.
    public static let currentVersion: UInt32 = 0x0001_0000

    /// `major << 16 | minor`. rapace rejects a peer whose major version is not 1 and
    /// ignores the minor.
    public var protocolVersion: UInt32
    /// The sender's role; the two peers' roles must differ.
    public var role: Role
    /// Features the receiver must support, or it rejects the handshake.
    public var requiredFeatures: FeatureSet
    /// Features the sender supports.
    public var supportedFeatures: FeatureSet
    /// The sender's limits; the effective value of each is the smaller non-zero one.
    public var limits: Limits
    /// The methods the sender serves; a list with a duplicate id is rejected. rapace lists
    /// its methods sorted by id.
    public var methods: [MethodInfo]
    /// Free-form parameters (``Session/Configuration/params``). rapace keeps the peer's in
    /// ``Session/peerHello`` and does not interpret them.
    public var params: [MetadataEntry]

    /// A Hello with rapace's defaults: version 1.0, requiring ``FeatureSet/callEnvelope``,
    /// supporting call envelope, credit flow control and ping, default ``Limits``, no
    /// methods, no parameters.
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
    /// A unary call or a notification: one request, at most one response (spec 6.1).
    case call = 0
    /// A server stream: one request, items, then a terminal (spec 6.3).
    case stream = 1
    /// A tunnel. rapace accepts its OpenChannel but answers any request on it
    /// `INVALID_METHOD`.
    case tunnel = 2
}

/// Direction of an attached port.
public enum Direction: Int, Sendable, CaseIterable {
    /// From the caller to the server.
    case clientToServer = 0
    /// From the server to the caller.
    case serverToClient = 1
    /// Both ways (the spec's `bidir`).
    case bidirectional = 2
}

/// Attaches a stream channel to a call (feature bit 0; decoded, not used by this implementation).
///
/// Spec 4. rapace decodes it in a received ``OpenChannel`` and ignores it.
public struct AttachTo: Hashable, Sendable, WireMessage {
    /// The channel of the call the stream belongs to.
    public var callChannelID: UInt32
    /// Which of the call's ports the stream is.
    public var portID: UInt32
    /// Which way the stream's data flows.
    public var direction: Direction

    /// An attachment of port `portID` of the call on `callChannelID`.
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
///
/// Spec 4 (the encoding), 6.1 and 6.3: the caller sends it before the request of each call,
/// stream and notification.
public struct OpenChannel: Hashable, Sendable, WireMessage {
    /// The new channel: odd from the initiator, even from the acceptor, above every id its
    /// sender opened before (spec 1.3). rapace answers a bad id with
    /// CancelChannel(protocolViolation).
    public var channelID: UInt32
    /// What the channel carries; it must match the kind of the method called on it.
    public var kind: ChannelKind
    /// The call a stream is attached to (feature bit 0). rapace sends nil and ignores it.
    public var attach: AttachTo?
    /// The call's metadata (``CallOptions/metadata``), and over transports that do not
    /// share the clock the `rapace.deadline_remaining_ms` entry (``Session/deadlineMetadataKey``).
    public var metadata: [MetadataEntry]
    /// Bytes of stream item payload the caller accepts before it grants more (spec 6.3).
    /// rapace sends `UInt32.max` on a call channel and ``CallOptions/streamWindow`` on a
    /// stream channel.
    public var initialCredits: UInt32

    /// An OpenChannel; the defaults are no attachment, no metadata and unlimited credit.
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
    /// A normal close. A call of ours whose channel the peer closes this way fails
    /// `CANCELLED`.
    case normal
    /// A close for the reason in the text. On channel 0 it rejects a handshake; a call of
    /// ours whose channel the peer closes this way fails `ABORTED` with the text.
    case error(String)
}

/// Control verb 2. On channel 0 with an error it rejects a handshake.
///
/// Spec 4 and 5. rapace sends it only on channel 0, to reject a handshake.
public struct CloseChannel: Hashable, Sendable, WireMessage {
    /// The channel closed; 0 closes the session (before the handshake completes: rejects it).
    public var channelID: UInt32
    /// Why.
    public var reason: CloseReason

    /// A CloseChannel for `channelID`.
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
    /// The caller cancelled the call (`CANCELLED`).
    case clientCancel = 0
    /// The call's deadline passed on the caller's side (`DEADLINE_EXCEEDED`).
    case deadlineExceeded = 1
    /// The channel was refused (limits, GoAway) or a frame of it could not be sent
    /// (`RESOURCE_EXHAUSTED`).
    case resourceExhausted = 2
    /// A protocol violation on this channel, such as a bad channel id, a request on a
    /// channel never opened, or a stream credit overrun (`PROTOCOL_ERROR`).
    case protocolViolation = 3
    /// The caller is not authenticated (`UNAUTHENTICATED`); rapace never sends it.
    case unauthenticated = 4
    /// The caller may not make this call (`PERMISSION_DENIED`); rapace never sends it.
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
///
/// Spec 4 and 6.2: either side cancels a call. On receipt rapace cancels the handler of
/// the peer's call, or fails its own call with ``CancelReason/statusCode``; for a finished
/// or unknown channel it does nothing.
public struct CancelChannel: Hashable, Sendable, WireMessage {
    /// The channel of the call cancelled.
    public var channelID: UInt32
    /// Why.
    public var reason: CancelReason

    /// A CancelChannel for `channelID`.
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
///
/// Spec 4 and 6.3: the caller of a stream returns credit as it consumes items. rapace
/// ignores one for a channel that is not one of the peer's calls to it.
public struct GrantCredits: Hashable, Sendable, WireMessage {
    /// The stream's channel.
    public var channelID: UInt32
    /// Bytes of item payload added to what the server may still send.
    public var bytes: UInt32

    /// A grant of `bytes` on `channelID`.
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
    /// The sender is shutting down (what rapace sends by default).
    case shutdown = 0
    /// The sender is going down for maintenance.
    case maintenance = 1
    /// The sender is overloaded.
    case overload = 2
    /// The receiver broke the protocol; the sender closes the connection right after.
    /// rapace closes at once when it receives one.
    case protocolError = 3
}

/// Control verb 7.
///
/// Spec 4 and 6.4. On receipt rapace fails its calls above ``lastChannelID`` and new
/// calls with `UNAVAILABLE`, lets the others finish, then closes (at once for
/// ``GoAwayReason/protocolError``).
public struct GoAway: Hashable, Sendable, WireMessage {
    /// Why the sender is going away.
    public var reason: GoAwayReason
    /// The highest channel opened by the receiver that the sender will still finish.
    public var lastChannelID: UInt32
    /// Human-readable text; rapace puts it in the errors of the calls it fails for it.
    public var message: String
    /// Extra entries; rapace sends none and ignores the peer's.
    public var metadata: [MetadataEntry]

    /// A GoAway; no metadata by default.
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
///
/// Spec 6.1: the first field of a ``CallResult``.
public struct Status: Hashable, Sendable, WireMessage {
    /// 0 on success; the frame carries the ERROR flag exactly when it is not 0.
    public var code: StatusCode
    /// A human-readable explanation; empty on success.
    public var message: String
    /// Opaque bytes for the application; empty on success.
    public var details: [UInt8]

    /// A status; empty message and details by default.
    public init(code: StatusCode, message: String = "", details: [UInt8] = []) {
        self.code = code
        self.message = message
        self.details = details
    }

    /// Success: code 0, no message, no details.
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
    /// How the call ended.
    public var status: Status
    /// Metadata sent after the call (``RPCError/trailers``); rapace sends none on success.
    public var trailers: [MetadataEntry]
    /// The postcard-encoded return value on success (empty for Void), nil on error and on a
    /// stream terminal.
    public var body: [UInt8]?

    /// A CallResult; no trailers by default.
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
        encodeSuccessHeader(bodyLength: body.count, into: &writer)
        writer.writeRawBytes(body)
    }

    /// What a successful CallResult puts before its body's bytes.
    @inlinable
    static func encodeSuccessHeader(bodyLength: Int, into writer: inout PostcardWriter) {
        writer.writeByte(0)  // code 0
        writer.writeByte(0)  // message ""
        writer.writeByte(0)  // details []
        writer.writeByte(0)  // trailers []
        writer.writeByte(1)  // Some
        writer.writeVarint(UInt64(bodyLength))  // the body's length
    }

    /// A successful CallResult around `body` as a payload: the writer keeps it inline (no
    /// allocation) when it fits in 16 bytes, that is for bodies of up to 10 bytes.
    static func successPayload(body: Payload) -> Payload {
        // A body that is a shared-memory buffer with its encoding before it (the result of a
        // handler that returned one, ``ServicePayloadWriter``): the fields go before it too.
        if let view = body.externalStorage as? ShmBufferView {
            var header = PostcardWriter()  // inline: no allocation
            encodeSuccessHeader(bodyLength: body.count, into: &header)
            if let whole = header.withUnsafeBytes({ view.prefixed(with: $0) }) { return Payload(borrowing: whole) }
        }
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
