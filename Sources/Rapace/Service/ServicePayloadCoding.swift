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
        if let value = try ServicePrimitives.read(type, from: &reader) { return value }
        return try reader.decode(type)
    }

    /// Reads a byte buffer (varint length, then the bytes) as a view of the payload being
    /// read: no copy when the payload lives in external storage such as a shared-memory
    /// slot, which then stays alive as long as the returned payload does.
    public mutating func readByteBuffer() throws -> Payload {
        let start = reader.offset
        let length = try reader.readVarint64()
        guard length <= UInt64(reader.remaining) else {
            throw PostcardError.lengthTooLarge(length, at: start, remaining: reader.remaining, what: "byte buffer length")
        }
        let first = reader.offset
        _ = try reader.readRawBytes(count: Int(length))
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
public struct ServicePayloadWriter {
    @usableFromInline
    var writer: PostcardWriter

    @inlinable
    init(capacity: Int) {
        writer = PostcardWriter(reservingCapacity: capacity)
    }

    /// Appends one value.
    @inlinable
    public mutating func write<Value: Codable & Sendable>(_ value: Value) throws {
        if ServicePrimitives.write(value, into: &writer) { return }
        try writer.encode(value)
    }

    /// Appends a byte buffer: varint length, then the bytes.
    @inlinable
    public mutating func writeByteBuffer(_ bytes: Payload) {
        bytes.withUnsafeBytes { writer.writeByteArray($0) }
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
        return writer.writer.payload
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
        return writer.writer.payload
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

/// The primitives' direct postcard paths, inlinable so that generated code specialised for
/// a primitive type compiles down to the one reader or writer call hand-written code makes
/// (the type tests fold away). The encodings are those of `PostcardReader.decode` and
/// `PostcardWriter.encode`, which handle every other type.
@usableFromInline
enum ServicePrimitives {
    @inlinable @inline(__always)
    static func read<T>(_ type: T.Type, from reader: inout PostcardReader) throws(PostcardError) -> T? {
        // Each `unsafeBitCast` is between identical types, checked just before.
        if T.self == String.self { return unsafeBitCast(try reader.readString(), to: T.self) }
        if T.self == UInt32.self { return unsafeBitCast(try reader.readVarint32(), to: T.self) }
        if T.self == UInt64.self { return unsafeBitCast(try reader.readVarint64(), to: T.self) }
        if T.self == Int32.self { return unsafeBitCast(try reader.readZigZag32(), to: T.self) }
        if T.self == Int64.self { return unsafeBitCast(try reader.readZigZag64(), to: T.self) }
        if T.self == Int.self { return unsafeBitCast(try reader.readInt(), to: T.self) }
        if T.self == UInt.self { return unsafeBitCast(try reader.readUInt(), to: T.self) }
        if T.self == Bool.self { return unsafeBitCast(try reader.readBool(), to: T.self) }
        if T.self == UInt8.self { return unsafeBitCast(try reader.readByte(), to: T.self) }
        if T.self == Int8.self { return unsafeBitCast(Int8(bitPattern: try reader.readByte()), to: T.self) }
        if T.self == UInt16.self { return unsafeBitCast(try reader.readVarint16(), to: T.self) }
        if T.self == Int16.self { return unsafeBitCast(try reader.readZigZag16(), to: T.self) }
        if T.self == Double.self { return unsafeBitCast(try reader.readDouble(), to: T.self) }
        if T.self == Float.self { return unsafeBitCast(try reader.readFloat(), to: T.self) }
        if T.self == [UInt8].self { return unsafeBitCast(try reader.readByteArray(), to: T.self) }
        return nil
    }

    @inlinable @inline(__always)
    static func write<T>(_ value: T, into writer: inout PostcardWriter) -> Bool {
        // Each `unsafeBitCast` is between identical types, checked just before.
        if T.self == String.self {
            writer.writeString(unsafeBitCast(value, to: String.self))
        } else if T.self == UInt32.self {
            writer.writeVarint(UInt64(unsafeBitCast(value, to: UInt32.self)))
        } else if T.self == UInt64.self {
            writer.writeVarint(unsafeBitCast(value, to: UInt64.self))
        } else if T.self == Int32.self {
            writer.writeZigZag(Int64(unsafeBitCast(value, to: Int32.self)))
        } else if T.self == Int64.self {
            writer.writeZigZag(unsafeBitCast(value, to: Int64.self))
        } else if T.self == Int.self {
            writer.writeZigZag(Int64(unsafeBitCast(value, to: Int.self)))
        } else if T.self == UInt.self {
            writer.writeVarint(UInt64(unsafeBitCast(value, to: UInt.self)))
        } else if T.self == Bool.self {
            writer.writeBool(unsafeBitCast(value, to: Bool.self))
        } else if T.self == UInt8.self {
            writer.writeByte(unsafeBitCast(value, to: UInt8.self))
        } else if T.self == Int8.self {
            writer.writeByte(UInt8(bitPattern: unsafeBitCast(value, to: Int8.self)))
        } else if T.self == UInt16.self {
            writer.writeVarint(UInt64(unsafeBitCast(value, to: UInt16.self)))
        } else if T.self == Int16.self {
            writer.writeZigZag(Int64(unsafeBitCast(value, to: Int16.self)))
        } else if T.self == Double.self {
            writer.writeDouble(unsafeBitCast(value, to: Double.self))
        } else if T.self == Float.self {
            writer.writeFloat(unsafeBitCast(value, to: Float.self))
        } else if T.self == [UInt8].self {
            writer.writeByteArray(unsafeBitCast(value, to: [UInt8].self))
        } else {
            return false
        }
        return true
    }
}
