/// Single-step decoder for the stream framing of spec 8.1:
/// `varint(64 + payload_len) ‖ descriptor ‖ payload`.
///
/// Bytes are appended as they arrive; ``next()`` returns one frame when one is complete,
/// nil when more bytes are needed, and throws on a framing violation. Lengths are checked
/// before anything is allocated for the payload.
struct StreamFrameDecoder {
    /// Largest payload accepted.
    var maxPayload: UInt32
    private var buffer: ReceiveBuffer

    init(maxPayload: UInt32, capacity: Int = 64 * 1024) {
        self.maxPayload = maxPayload
        self.buffer = ReceiveBuffer(capacity: capacity)
    }

    /// Whether a partial frame is buffered (EOF now would be an error).
    var hasPartialFrame: Bool { !buffer.isEmpty }

    /// Reads once from `fd` into the buffer, room for at least the rest of the partial frame
    /// made first (``ReceiveBuffer/read(from:minimum:)``).
    mutating func read(from fd: Int32) throws(SystemError) -> (count: Int, drained: Bool)? {
        try buffer.read(from: fd, minimum: max(4096, wantedBytes))
    }

    /// Calls `body` with free space at the end of the buffer to read into; `body` returns
    /// how many bytes it wrote. Grows the buffer when a large frame is being assembled.
    /// The transport reads with ``read(from:)``; this is how bytes that arrive some other way
    /// get in: the tests' raw peer (`recv` with `MSG_DONTWAIT`) and the wire-vector tests.
    mutating func withWritableSpace<E: Error>(minimum: Int = 4096, _ body: (UnsafeMutableRawBufferPointer) throws(E) -> Int) throws(E) -> Int {
        try buffer.withWritableSpace(minimum: minimum, body)
    }

    /// Bytes the current partial frame still needs, when known (to size the next read).
    private(set) var wantedBytes = 0

    /// The next complete frame, nil when more bytes are needed.
    mutating func next() throws(TransportError) -> Frame? {
        let available = buffer.count
        if available == 0 {
            wantedBytes = 0
            return nil
        }
        // 1. The length varint.
        var length: UInt64 = 0
        var shift: UInt64 = 0
        var index = 0
        var complete = false
        while index < available {
            let byte = buffer[index]
            index += 1
            if index > 10 {
                throw TransportError(.protocolViolation, "frame length varint longer than 10 bytes")
            }
            if shift < 64 { length |= UInt64(byte & 0x7F) << shift }
            if byte & 0x80 == 0 {
                complete = true
                break
            }
            shift += 7
        }
        guard complete else {
            if available >= 10 { throw TransportError(.protocolViolation, "frame length varint longer than 10 bytes") }
            return nil
        }
        if index == 10 && length >> 63 != 0 {
            throw TransportError(.protocolViolation, "frame length varint overflows 64 bits")
        }
        guard length >= UInt64(FrameDescriptor.size) else {
            throw TransportError(.protocolViolation, "frame length \(length) is below the 64-byte descriptor")
        }
        let payloadLength = length - UInt64(FrameDescriptor.size)
        guard payloadLength <= UInt64(maxPayload) else {
            throw TransportError(.protocolViolation, "frame payload of \(payloadLength) bytes exceeds the max payload size of \(maxPayload) bytes")
        }
        let total = index + Int(length)
        guard available >= total else {
            wantedBytes = total - available
            // Validate the descriptor as soon as it is here, before waiting for a big payload.
            if available >= index + FrameDescriptor.size {
                let declared = buffer.withUnconsumedBytes { raw in
                    FrameDescriptor(decoding: raw.baseAddress! + index).payloadLength
                }
                if UInt64(declared) != payloadLength {
                    throw TransportError(.protocolViolation, "descriptor payload_len \(declared) differs from frame length − 64 = \(payloadLength)")
                }
            }
            return nil
        }
        let frameStart = index
        let frame: Frame = buffer.withUnconsumedBytes { raw in
            let descriptor = FrameDescriptor(decoding: raw.baseAddress! + frameStart)
            let payloadStart = frameStart + FrameDescriptor.size
            let bytes = UnsafeRawBufferPointer(rebasing: raw[payloadStart..<(payloadStart + Int(payloadLength))])
            let payload = bytes.count <= FrameDescriptor.inlineCapacity ? Payload(inline: bytes) : Payload(Array(bytes))
            return Frame(descriptor: descriptor, payload: payload)
        }
        if UInt64(frame.descriptor.payloadLength) != payloadLength {
            throw TransportError(.protocolViolation, "descriptor payload_len \(frame.descriptor.payloadLength) differs from frame length − 64 = \(payloadLength)")
        }
        buffer.consume(total)
        wantedBytes = 0
        return frame
    }

    /// Encodes `frame` (already prepared) with stream framing, appending to `out`.
    static func encode(_ frame: Frame, into out: inout [UInt8]) {
        let payloadLength = frame.payload.count
        var length = UInt64(FrameDescriptor.size + payloadLength)
        while length >= 0x80 {
            out.append(UInt8(truncatingIfNeeded: length) | 0x80)
            length >>= 7
        }
        out.append(UInt8(length))
        frame.appendDescriptorAndPayload(to: &out)
    }
}

extension Frame {
    /// Appends the 64-byte descriptor, then the payload bytes (the body of a stream frame
    /// after its length, and the whole of a WebSocket message).
    func appendDescriptorAndPayload(to out: inout [UInt8]) {
        let descriptorStart = out.count
        out.append(contentsOf: repeatElement(0, count: FrameDescriptor.size))
        out.withUnsafeMutableBytes { raw in
            descriptor.encode(into: raw.baseAddress! + descriptorStart)
        }
        payload.withUnsafeBytes { out.append(contentsOf: $0) }
    }
}
