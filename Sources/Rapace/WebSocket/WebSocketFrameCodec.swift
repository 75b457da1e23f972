/// RFC 6455 close status codes used by rapace (§7.4.1).
public struct WebSocketCloseCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The two-byte code at the start of a Close frame's body.
    public var rawValue: UInt16
    /// The code `rawValue`; any value is kept, named here or not.
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// 1000: normal closure.
    public static let normal = WebSocketCloseCode(rawValue: 1000)
    /// 1001: the endpoint is going away.
    public static let goingAway = WebSocketCloseCode(rawValue: 1001)
    /// 1002: protocol error (bad framing, unmasked client frame…).
    public static let protocolError = WebSocketCloseCode(rawValue: 1002)
    /// 1003: a data type the endpoint cannot accept (rapace: a text message).
    public static let unsupportedData = WebSocketCloseCode(rawValue: 1003)
    /// 1007: invalid payload data (a close reason that is not UTF-8).
    public static let invalidPayload = WebSocketCloseCode(rawValue: 1007)
    /// 1009: a message too big to process.
    public static let messageTooBig = WebSocketCloseCode(rawValue: 1009)
    public var description: String { "\(rawValue)" }
}

/// WebSocket frame opcodes (RFC 6455 §5.2).
enum WebSocketOpcode: UInt8 {
    case continuation = 0x0
    case text = 0x1
    case binary = 0x2
    case close = 0x8
    case ping = 0x9
    case pong = 0xA

    var isControl: Bool { rawValue & 0x8 != 0 }
}

/// A WebSocket protocol violation and the close code that answers it.
struct WebSocketProtocolError: Error, Hashable, Sendable, CustomStringConvertible {
    var closeCode: WebSocketCloseCode
    var message: String
    init(_ closeCode: WebSocketCloseCode, _ message: String) {
        self.closeCode = closeCode
        self.message = message
    }
    var description: String { "WebSocket close \(closeCode.rawValue): \(message)" }
}

/// One thing a ``WebSocketFrameDecoder`` produced.
enum WebSocketEvent: Equatable {
    /// A complete binary message (fragments joined).
    case binary([UInt8])
    /// A complete text message (its bytes; not validated: rapace rejects text anyway).
    case text([UInt8])
    case ping([UInt8])
    case pong([UInt8])
    /// A Close frame: its code (nil when the body was empty) and reason.
    case close(WebSocketCloseCode?, String)
}

/// Encodes WebSocket frames (RFC 6455 §5.2).
enum WebSocketFrameEncoder {
    /// Appends the frame header for `opcode` and a payload of `length` bytes; the caller
    /// appends the payload and then, if `mask` is given, calls ``applyMask(_:in:range:)``.
    static func appendHeader(opcode: WebSocketOpcode, fin: Bool = true, length: Int, mask: UInt32?, into out: inout [UInt8]) {
        out.append((fin ? 0x80 : 0) | opcode.rawValue)
        let maskBit: UInt8 = mask == nil ? 0 : 0x80
        if length < 126 {
            out.append(maskBit | UInt8(length))
        } else if length <= 0xFFFF {
            out.append(maskBit | 126)
            out.append(UInt8(truncatingIfNeeded: length >> 8))
            out.append(UInt8(truncatingIfNeeded: length))
        } else {
            out.append(maskBit | 127)
            for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: UInt64(length) >> UInt64(shift))) }
        }
        if let mask {
            out.append(UInt8(truncatingIfNeeded: mask >> 24))
            out.append(UInt8(truncatingIfNeeded: mask >> 16))
            out.append(UInt8(truncatingIfNeeded: mask >> 8))
            out.append(UInt8(truncatingIfNeeded: mask))
        }
    }

    /// XORs `range` of `buffer` with the 4-byte masking key (big-endian `key`).
    static func applyMask(_ key: UInt32, in buffer: inout [UInt8], range: Range<Int>) {
        precondition(range.lowerBound >= 0 && range.upperBound <= buffer.count, "mask range outside the buffer")
        // The key's bytes in wire order (big-endian `key`), twice: eight bytes per step.
        let wire = key.bigEndian
        let wide = UInt64(wire) | UInt64(wire) << 32
        buffer.withUnsafeMutableBytes { raw in
            var index = range.lowerBound
            while range.upperBound - index >= 8 {
                let word = raw.loadUnaligned(fromByteOffset: index, as: UInt64.self)
                raw.storeBytes(of: word ^ wide, toByteOffset: index, as: UInt64.self)
                index += 8
            }
            // The tail: byte j of the payload uses key byte j % 4 (every step above was 8).
            withUnsafeBytes(of: wire) { keyBytes in
                while index < range.upperBound {
                    raw[index] ^= keyBytes[(index - range.lowerBound) & 3]
                    index += 1
                }
            }
        }
    }

    /// Appends a whole frame with `payload`, masked with `mask` when one is given (clients:
    /// a fresh key per frame, ``MaskKeySource``).
    static func appendFrame<Bytes: Collection<UInt8>>(opcode: WebSocketOpcode, fin: Bool = true, payload: Bytes, mask: UInt32?, into out: inout [UInt8]) {
        appendHeader(opcode: opcode, fin: fin, length: payload.count, mask: mask, into: &out)
        let start = out.count
        out.append(contentsOf: payload)
        if let mask { applyMask(mask, in: &out, range: start..<out.count) }
    }

    /// The body of a Close frame: the code (big-endian) and a UTF-8 reason (cut to fit 125 bytes).
    static func closeBody(_ code: WebSocketCloseCode, reason: String) -> [UInt8] {
        var body = [UInt8(truncatingIfNeeded: code.rawValue >> 8), UInt8(truncatingIfNeeded: code.rawValue)]
        body.append(contentsOf: reason.prefix(utf8Bytes: 123).utf8)
        return body
    }
}

/// Single-step decoder of RFC 6455 frames: bytes are appended as they arrive; ``next()``
/// returns one event (a complete message or a control frame), nil when more bytes are
/// needed, and throws ``WebSocketProtocolError`` on a violation. Message sizes are checked
/// against ``maxMessageSize`` from the frame headers, before the payload arrives.
struct WebSocketFrameDecoder {
    /// Whether frames must be masked (a server decoding client frames) or must not be (a client).
    let expectMasked: Bool
    /// Largest message (sum of fragments) accepted; larger → close 1009.
    var maxMessageSize: Int
    private var buffer = ReceiveBuffer()
    private var message: [UInt8] = []
    private var messageOpcode: WebSocketOpcode?

    init(expectMasked: Bool, maxMessageSize: Int) {
        self.expectMasked = expectMasked
        self.maxMessageSize = maxMessageSize
    }

    /// Appends received bytes that did not come from ``read(from:)``.
    mutating func append<Bytes: Collection<UInt8>>(_ bytes: Bytes) {
        buffer.append(bytes)
    }

    /// Reads once from `fd` straight into the buffer (``ReceiveBuffer/read(from:minimum:)``).
    mutating func read(from fd: Int32) throws(SystemError) -> (count: Int, drained: Bool)? {
        try buffer.read(from: fd, minimum: 16 * 1024)
    }

    /// Drops every buffered byte (input after a framing error is not decoded).
    mutating func discardBuffered() {
        buffer.consume(buffer.count)
    }

    /// Whether part of a frame or a fragmented message is buffered.
    var hasPartialMessage: Bool { !buffer.isEmpty || messageOpcode != nil }

    /// The next event, nil when more bytes are needed.
    mutating func next() throws(WebSocketProtocolError) -> WebSocketEvent? {
        while true {
            let available = buffer.count
            guard available >= 2 else { return nil }
            let b0 = buffer[0]
            let b1 = buffer[1]
            let fin = b0 & 0x80 != 0
            guard b0 & 0x70 == 0 else { throw WebSocketProtocolError(.protocolError, "reserved bits set without a negotiated extension") }
            guard let opcode = WebSocketOpcode(rawValue: b0 & 0x0F) else {
                throw WebSocketProtocolError(.protocolError, "unknown opcode \(b0 & 0x0F)")
            }
            let masked = b1 & 0x80 != 0
            if masked != expectMasked {
                throw WebSocketProtocolError(.protocolError, expectMasked ? "client frame is not masked" : "server frame is masked")
            }
            var headerLength = 2
            var length = UInt64(b1 & 0x7F)
            if length == 126 {
                guard available >= 4 else { return nil }
                length = UInt64(buffer[2]) << 8 | UInt64(buffer[3])
                headerLength = 4
                if length < 126 { throw WebSocketProtocolError(.protocolError, "non-minimal payload length") }
            } else if length == 127 {
                guard available >= 10 else { return nil }
                length = 0
                for i in 0..<8 { length = length << 8 | UInt64(buffer[2 + i]) }
                headerLength = 10
                if length >> 63 != 0 { throw WebSocketProtocolError(.protocolError, "payload length has its top bit set") }
                if length <= 0xFFFF { throw WebSocketProtocolError(.protocolError, "non-minimal payload length") }
            }
            if opcode.isControl {
                guard fin else { throw WebSocketProtocolError(.protocolError, "fragmented control frame") }
                guard length <= 125 else { throw WebSocketProtocolError(.protocolError, "control frame payload over 125 bytes") }
            } else {
                switch (opcode, messageOpcode) {
                case (.continuation, nil): throw WebSocketProtocolError(.protocolError, "continuation frame without a message to continue")
                case (.text, _?), (.binary, _?): throw WebSocketProtocolError(.protocolError, "new data frame inside a fragmented message")
                default: break
                }
                if UInt64(message.count) + length > UInt64(maxMessageSize) {
                    throw WebSocketProtocolError(.messageTooBig, "message of at least \(UInt64(message.count) + length) bytes exceeds the limit of \(maxMessageSize) bytes")
                }
            }
            var maskKey: UInt32 = 0
            if masked {
                guard available >= headerLength + 4 else { return nil }
                for i in 0..<4 { maskKey = maskKey << 8 | UInt32(buffer[headerLength + i]) }
                headerLength += 4
            }
            let total = headerLength + Int(length)
            guard available >= total else { return nil }
            // Where the payload lies in the buffer's storage; the frame is consumed only
            // after its payload has been taken (consuming may reset the storage).
            let payloadRange = (buffer.start + headerLength)..<(buffer.start + total)
            if masked { WebSocketFrameEncoder.applyMask(maskKey, in: &buffer.storage, range: payloadRange) }
            defer { buffer.consume(total) }
            if opcode.isControl {
                let payload = Array(buffer.storage[payloadRange])
                switch opcode {
                case .ping: return .ping(payload)
                case .pong: return .pong(payload)
                default: return try Self.parseClose(payload)
                }
            }
            if opcode != .continuation {
                messageOpcode = opcode
                if fin {
                    // The common case: an unfragmented message, copied once.
                    messageOpcode = nil
                    let payload = Array(buffer.storage[payloadRange])
                    return opcode == .binary ? .binary(payload) : .text(payload)
                }
            }
            message.append(contentsOf: buffer.storage[payloadRange])
            if fin, let kind = messageOpcode {
                let whole = message
                message = []
                messageOpcode = nil
                return kind == .binary ? .binary(whole) : .text(whole)
            }
        }
    }

    private static func parseClose(_ payload: [UInt8]) throws(WebSocketProtocolError) -> WebSocketEvent {
        if payload.isEmpty { return .close(nil, "") }
        guard payload.count >= 2 else { throw WebSocketProtocolError(.protocolError, "close frame with a 1-byte body") }
        let code = UInt16(payload[0]) << 8 | UInt16(payload[1])
        // RFC 6455 §7.4: 1000–1003, 1007–1011 and 3000–4999 may be sent; the rest may not.
        let valid = (1000...1003).contains(code) || (1007...1014).contains(code) || (3000...4999).contains(code)
        guard valid else { throw WebSocketProtocolError(.protocolError, "invalid close code \(code)") }
        guard let reason = String(validating: payload[2...], as: UTF8.self) else {
            throw WebSocketProtocolError(.invalidPayload, "close reason is not UTF-8")
        }
        return .close(WebSocketCloseCode(rawValue: code), reason)
    }
}

/// Masking keys for one connection's frames, drawn from `getrandom` 64 at a time: one
/// system call per 64 frames instead of one per frame (`UInt32.random` asks the kernel each
/// time). RFC 6455 §5.3 wants unpredictable keys from a strong source: these are.
struct MaskKeySource {
    private var keys = [UInt32](repeating: 0, count: 64)
    private var used = 64

    mutating func next() -> UInt32 {
        if used == keys.count {
            keys.withUnsafeMutableBytes { Sys.fillRandom($0) }
            used = 0
        }
        defer { used += 1 }
        return keys[used]
    }
}
