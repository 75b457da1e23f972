// The postcard coding of service calls as the `@Service` macro generates it: arguments
// concatenated as a tuple, the result as one value (spec section 3), byte buffers without
// a copy where the payload allows it, and every failure mapped to the status the other
// side should see.

/// Reads the arguments or the result of a service call from a payload.
///
/// Every value a service passes must be `Codable & Sendable`: ``read(_:)`` requires it, so
/// a service method whose argument or result is not fails to compile in the code
/// `@Service` generates, naming the type.
public struct ServicePayloadReader {
    @usableFromInline
    var reader: PostcardReader
    @usableFromInline
    let payload: Payload

    @inlinable
    init(_ reader: PostcardReader, payload: Payload) {
        self.reader = reader
        self.payload = payload
    }

    /// Reads the next value.
    @inlinable
    public mutating func read<Value: Codable & Sendable>(_ type: Value.Type) throws -> Value {
        if let value = try _postcardDecodePrimitive(type, from: &reader) { return value }
        return try reader.decode(type)
    }

    /// Reads a byte buffer (varint length, then the bytes) as a view of the payload being
    /// read: no copy when the payload lives in external storage such as a shared-memory
    /// slot, which then stays alive as long as the returned payload does.
    public mutating func readByteBuffer() throws -> Payload {
        let length = try reader.readLength("byte buffer length")
        let first = reader.offset
        _ = try reader.readRawBytes(count: length)
        return payload.slice(first..<reader.offset)
    }

    /// Fails unless every byte was read (spec section 3: trailing bytes are an error).
    @inlinable
    mutating func finish() throws {
        try reader.finish()
    }
}

/// Writes the arguments or the result of a service call.
///
/// Every value a service passes must be `Codable & Sendable`: ``write(_:)`` requires it.
///
/// A byte buffer that is the whole content (the only argument, or the result) and lives in
/// a shared-memory buffer from ``ShmTransport/allocateByteBuffer(count:)`` is not copied:
/// its length goes into the room the buffer keeps before its bytes, and the payload is the
/// buffer (``finish()``).
public struct ServicePayloadWriter {
    @usableFromInline
    var writer: PostcardWriter
    /// A byte buffer written first that can go without a copy, held back until something
    /// follows it (then it is copied after all).
    @usableFromInline
    var heldBuffer: ShmBuffer?
    /// A byte buffer written was a shared-memory buffer already sent: its bytes are the
    /// peer's, so nothing is read from it and the encoding fails (``finish()``).
    @usableFromInline
    var sentBuffer = false
    /// The capacity asked for, reserved at the first byte written (0 once it is): a byte
    /// buffer sent in place writes none, and must not cost an allocation of its size.
    @usableFromInline
    var pendingCapacity: Int

    @inlinable
    init(capacity: Int) {
        writer = PostcardWriter()
        pendingCapacity = capacity
    }

    /// Before bytes go into `writer`: the held buffer first, then the capacity asked for.
    @inlinable
    mutating func prepareToWrite() {
        if heldBuffer != nil { copyHeldBuffer() }  // checked here: inlined, no call per value
        reserveCapacity()
    }

    /// Reserves the capacity asked for, once, while `writer` is still empty.
    @inlinable
    mutating func reserveCapacity() {
        guard pendingCapacity != 0 else { return }
        writer = PostcardWriter(reservingCapacity: pendingCapacity)
        pendingCapacity = 0
    }

    /// Appends one value.
    @inlinable
    public mutating func write<Value: Codable & Sendable>(_ value: Value) throws {
        prepareToWrite()
        if _postcardEncodePrimitive(value, into: &writer) { return }
        try writer.encode(value)
    }

    /// Appends a byte buffer: varint length, then the bytes.
    @inlinable
    public mutating func writeByteBuffer(_ bytes: Payload) {
        if heldBuffer != nil { copyHeldBuffer() }
        if case .external = bytes.storage, writeExternal(bytes) { return }
        reserveCapacity()
        bytes.withUnsafeBytes { writer.writeByteArray($0) }
    }

    /// Borrowed bytes: holds back a whole buffer from ``ShmTransport/allocateByteBuffer(count:)``
    /// written first (sent in place unless something follows), and notes a buffer already
    /// sent instead of reading it. True when `bytes` need nothing more.
    @usableFromInline
    mutating func writeExternal(_ bytes: Payload) -> Bool {
        guard let origin = bytes.shmOrigin else { return false }
        if origin.buffer.wasSent {
            sentBuffer = true
            return true
        }
        guard writer.count == 0, origin.whole, origin.lead == 0, origin.buffer.headroom > 0 else { return false }
        heldBuffer = origin.buffer
        return true
    }

    /// Something follows the held buffer: it is written as any byte buffer.
    @usableFromInline
    mutating func copyHeldBuffer() {
        guard let buffer = heldBuffer else { return }
        heldBuffer = nil
        reserveCapacity()
        buffer.withUnsafeBytes { writer.writeByteArray($0) }
    }

    /// What was written: the held buffer with its length before it, or the bytes written.
    /// Throws `FAILED_PRECONDITION` when a byte buffer was a shared-memory buffer already sent.
    @usableFromInline
    mutating func finish() throws(RPCError) -> Payload {
        if sentBuffer { throw Session.sentBufferRefusal }
        if let buffer = heldBuffer {
            var length = PostcardWriter()  // inline: no allocation
            length.writeVarint(UInt64(buffer.count))
            if let view = length.withUnsafeBytes({ buffer.prefixed(with: $0) }) { return Payload(borrowing: view) }
            copyHeldBuffer()
        }
        return writer.payload
    }
}

extension Payload {
    /// The request of a call: its arguments, written by `body` in declaration order.
    ///
    /// - Throws: ``RPCError`` `ENCODE_ERROR` when an argument cannot be encoded.
    @inlinable
    public static func encodingArguments(capacity: Int = 16, _ body: (inout ServicePayloadWriter) throws -> Void) throws(RPCError) -> Payload {
        var writer = ServicePayloadWriter(capacity: capacity)
        do {
            try body(&writer)
        } catch {
            throw RPCError.serviceCoding(.encodeError, "could not encode the arguments", error)
        }
        return try writer.finish()
    }

    /// The reply of a call: its result, written by `body`.
    ///
    /// - Throws: ``RPCError`` `ENCODE_ERROR` when the result cannot be encoded; the
    ///   caller receives that status.
    @inlinable
    public static func encodingResult(capacity: Int = 16, _ body: (inout ServicePayloadWriter) throws -> Void) throws(RPCError) -> Payload {
        var writer = ServicePayloadWriter(capacity: capacity)
        do {
            try body(&writer)
        } catch {
            throw RPCError.serviceCoding(.encodeError, "could not encode the result", error)
        }
        return try writer.finish()
    }

    /// Decodes the arguments of a call with `body`, then checks that nothing is left over.
    ///
    /// - Throws: ``RPCError`` `INVALID_ARGUMENT` when the request is malformed, so the
    ///   caller receives that status (spec 6.1).
    @inlinable
    public func decodeArguments<T>(_ body: (inout ServicePayloadReader) throws -> T) throws(RPCError) -> T {
        do {
            return try decodeService(body)
        } catch {
            throw RPCError.serviceCoding(.invalidArgument, "could not decode the arguments", error)
        }
    }

    /// Decodes the result of a call with `body`, then checks that nothing is left over.
    ///
    /// - Throws: ``RPCError`` `DECODE_ERROR` when the reply is malformed.
    @inlinable
    public func decodeResult<T>(_ body: (inout ServicePayloadReader) throws -> T) throws(RPCError) -> T {
        do {
            return try decodeService(body)
        } catch {
            throw RPCError.serviceCoding(.decodeError, "could not decode the result", error)
        }
    }

    /// Checks that the request of a call without arguments is empty.
    ///
    /// - Throws: ``RPCError`` `INVALID_ARGUMENT` otherwise.
    @inlinable
    public func decodeNoArguments() throws(RPCError) {
        try decodeArguments { _ in }
    }

    /// Checks that the result of a `Void` method is empty.
    ///
    /// - Throws: ``RPCError`` `DECODE_ERROR` otherwise.
    @inlinable
    public func decodeEmptyResult() throws(RPCError) {
        try decodeResult { _ in }
    }

    @inlinable
    func decodeService<T>(_ body: (inout ServicePayloadReader) throws -> T) throws -> T {
        try withUnsafeBytes { raw in
            var reader = ServicePayloadReader(PostcardReader(raw), payload: self)
            let value = try body(&reader)
            try reader.finish()
            return value
        }
    }
}

extension RPCError {
    /// An error of the generated coding: `what` failed because of `error`.
    @usableFromInline
    static func serviceCoding(_ code: StatusCode, _ what: String, _ error: any Error) -> RPCError {
        if let rpc = error as? RPCError { return rpc }
        let reason = (error as? PostcardError)?.message ?? String(describing: error)
        return RPCError(code, "\(what): \(reason)")
    }
}
