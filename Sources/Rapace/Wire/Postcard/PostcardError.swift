/// An error thrown by the postcard codec (``PostcardWriter``, ``PostcardReader`` and the
/// ``Postcard`` Codable entry points).
///
/// The kind of failure is carried by ``code``, an extensible struct rather than an enum, so
/// new codes can be added without breaking exhaustive switches in client code. ``message``
/// is a human-readable explanation that names the byte offset where decoding failed and,
/// when the failure happened inside a Codable value, the coding path of the field.
public struct PostcardError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The kind of a ``PostcardError``. Compare against the static members, e.g.
    /// `error.code == .unexpectedEnd`.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        @usableFromInline
        internal let name: String

        @usableFromInline
        internal init(_ name: String) {
            self.name = name
        }

        /// The input ended before the value was complete.
        public static let unexpectedEnd = Code("unexpectedEnd")
        /// A varint used more than the 10 bytes a 64-bit value can need.
        public static let varintTooLong = Code("varintTooLong")
        /// A decoded number does not fit in the requested type.
        public static let valueOutOfRange = Code("valueOutOfRange")
        /// A Bool byte was neither `0x00` nor `0x01`.
        public static let invalidBool = Code("invalidBool")
        /// A string's bytes are not valid UTF-8.
        public static let invalidUTF8 = Code("invalidUTF8")
        /// Bytes were left over after the top-level value.
        public static let trailingBytes = Code("trailingBytes")
        /// An Optional tag byte was neither `0x00` (nil) nor `0x01` (some).
        public static let invalidOptionalTag = Code("invalidOptionalTag")
        /// The Swift type cannot be mapped onto postcard (for example an enum whose
        /// `CodingKeys` have no integer values).
        public static let unsupportedType = Code("unsupportedType")
        /// An enum case index read from the wire names no case of the Swift enum, or is
        /// not the case the decoding code asked for.
        public static let invalidEnumIndex = Code("invalidEnumIndex")
        /// A length or count prefix is larger than the bytes that remain in the input.
        public static let lengthTooLarge = Code("lengthTooLarge")
        /// A `Codable` implementation rejected a value (an `EncodingError` or
        /// `DecodingError` thrown by the type's own `encode(to:)` / `init(from:)`,
        /// for example a raw-value enum meeting an unknown raw value).
        public static let invalidValue = Code("invalidValue")

        /// The code's name, e.g. `unexpectedEnd`.
        public var description: String { name }
    }

    /// What kind of failure this is.
    public var code: Code
    /// What was wrong, including the byte offset where it was detected.
    public var message: String
    /// The byte offset in the input (decoding) or output (encoding) where the failure was
    /// detected, when known.
    public var offset: Int?

    /// Set once the message carries a coding path, so outer Codable layers do not append
    /// another one. Not part of equality.
    internal var hasCodingPath: Bool = false

    /// Creates an error.
    /// - Parameters:
    ///   - code: the kind of failure.
    ///   - message: an explanation; include the byte offset when there is one.
    ///   - offset: the byte offset where the failure was detected, if known.
    public init(code: Code, message: String, offset: Int? = nil) {
        self.code = code
        self.message = message
        self.offset = offset
    }

    /// `PostcardError.<code>: <message>`.
    public var description: String { "PostcardError.\(code.name): \(message)" }

    /// Equality compares ``code``, ``message`` and ``offset``.
    public static func == (lhs: PostcardError, rhs: PostcardError) -> Bool {
        lhs.code == rhs.code && lhs.message == rhs.message && lhs.offset == rhs.offset
    }

    /// Hashes ``code``, ``message`` and ``offset``.
    public func hash(into hasher: inout Hasher) {
        hasher.combine(code)
        hasher.combine(message)
        hasher.combine(offset)
    }
}

// MARK: - Constructors used by the codec (cold paths, kept out of line)

extension PostcardError {
    @usableFromInline
    @inline(never)
    internal static func unexpectedEnd(at offset: Int, needed: Int, remaining: Int) -> PostcardError {
        PostcardError(
            code: .unexpectedEnd,
            message: "unexpected end of input at offset \(offset): needed \(needed) byte(s), \(remaining) remaining",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func varintTooLong(at offset: Int) -> PostcardError {
        PostcardError(
            code: .varintTooLong,
            message: "varint at offset \(offset) is longer than 10 bytes",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func varintOverflow(at offset: Int) -> PostcardError {
        PostcardError(
            code: .valueOutOfRange,
            message: "varint at offset \(offset) encodes a value larger than UInt64.max",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func outOfRange(_ value: UInt64, at offset: Int, type: String) -> PostcardError {
        PostcardError(
            code: .valueOutOfRange,
            message: "varint value \(value) at offset \(offset) does not fit in \(type)",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func outOfRange(signed value: Int64, at offset: Int, type: String) -> PostcardError {
        PostcardError(
            code: .valueOutOfRange,
            message: "zigzag value \(value) at offset \(offset) does not fit in \(type)",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func invalidBool(_ byte: UInt8, at offset: Int) -> PostcardError {
        PostcardError(
            code: .invalidBool,
            message: "invalid Bool byte 0x\(hexByte(byte)) at offset \(offset) (expected 0x00 or 0x01)",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func invalidOptionalTag(_ byte: UInt8, at offset: Int) -> PostcardError {
        PostcardError(
            code: .invalidOptionalTag,
            message: "invalid Optional tag 0x\(hexByte(byte)) at offset \(offset) (expected 0x00 for nil or 0x01 for a value)",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func lengthTooLarge(_ length: UInt64, at offset: Int, remaining: Int, what: String) -> PostcardError {
        PostcardError(
            code: .lengthTooLarge,
            message: "\(what) prefix \(length) at offset \(offset) exceeds the \(remaining) byte(s) remaining",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func invalidUTF8(stringAt offset: Int, length: Int, badByteAt bad: Int) -> PostcardError {
        PostcardError(
            code: .invalidUTF8,
            message: "string of \(length) byte(s) at offset \(offset) is not valid UTF-8 (first bad byte at offset \(bad))",
            offset: bad)
    }

    @usableFromInline
    @inline(never)
    internal static func trailingBytes(_ count: Int, at offset: Int) -> PostcardError {
        PostcardError(
            code: .trailingBytes,
            message: "\(count) trailing byte(s) after the top-level value, starting at offset \(offset)",
            offset: offset)
    }

    @usableFromInline
    @inline(never)
    internal static func negativeCount(_ count: Int, at offset: Int) -> PostcardError {
        PostcardError(
            code: .valueOutOfRange,
            message: "cannot read a negative number of bytes (\(count)) at offset \(offset)",
            offset: offset)
    }

    /// Two lowercase hex digits.
    internal static func hexByte(_ byte: UInt8) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int(byte >> 4)], digits[Int(byte & 0x0f)]])
    }

    /// Renders a coding path as `a.b[3].c`.
    internal static func describe(codingPath: [any CodingKey]) -> String {
        var result = ""
        for key in codingPath {
            if key.stringValue.isEmpty || key is _PostcardIndexKey, let index = key.intValue {
                result += "[\(index)]"
            } else {
                if !result.isEmpty { result += "." }
                result += key.stringValue
            }
        }
        return result
    }

    /// Returns a copy whose message ends with the coding path, unless it already has one
    /// or the path is empty.
    internal func addingCodingPath(_ codingPath: [any CodingKey]) -> PostcardError {
        guard !hasCodingPath, !codingPath.isEmpty else { return self }
        var copy = self
        copy.message += " (coding path: \(PostcardError.describe(codingPath: codingPath)))"
        copy.hasCodingPath = true
        return copy
    }
}

/// The coding key used for positions in sequences (array indices, dictionary entries,
/// unkeyed-container elements) and for enum case indices.
internal struct _PostcardIndexKey: CodingKey {
    let intValue: Int?
    var stringValue: String { intValue.map { "Index \($0)" } ?? "" }

    init(_ index: Int) { self.intValue = index }
    init?(intValue: Int) { self.intValue = intValue }
    init?(stringValue: String) { return nil }
}
