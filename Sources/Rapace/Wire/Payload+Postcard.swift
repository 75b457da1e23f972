extension Payload {
    /// Decodes this payload with `body`, then checks nothing is left over (spec 3: trailing
    /// bytes are an error). Errors are ``PostcardError``s, which a server answers with
    /// `INVALID_ARGUMENT`.
    @inlinable
    public func decode<T>(_ body: (inout PostcardReader) throws -> T) throws -> T {
        try withUnsafeBytes { raw in
            var reader = PostcardReader(raw)
            let value = try body(&reader)
            try reader.finish()
            return value
        }
    }

    /// Decodes exactly one postcard value of type `T`.
    @inlinable
    public func decode<T: Decodable>(as type: T.Type) throws -> T {
        try decode { try $0.decode(T.self) }
    }

    /// Builds a payload with a postcard writer.
    @inlinable
    public static func encoding(capacity: Int = 16, _ body: (inout PostcardWriter) throws -> Void) rethrows -> Payload {
        var writer = PostcardWriter(reservingCapacity: capacity)
        try body(&writer)
        return writer.payload
    }

    /// The postcard encoding of `value`.
    @inlinable
    public static func encoding<T: Encodable>(_ value: T) throws -> Payload {
        try encoding { try $0.encode(value) }
    }
}
