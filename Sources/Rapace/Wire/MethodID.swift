/// Method ids (spec section 2): `fold(FNV-1a-64("Service.method"))`.
public enum MethodID {
    /// FNV-1a 64-bit offset basis.
    public static let fnvOffsetBasis: UInt64 = 0xcbf2_9ce4_8422_2325
    /// FNV-1a 64-bit prime.
    public static let fnvPrime: UInt64 = 0x0000_0100_0000_01b3

    /// FNV-1a-64 of `bytes`.
    @inlinable
    public static func fnv1a64<S: Sequence>(_ bytes: S) -> UInt64 where S.Element == UInt8 {
        var hash = fnvOffsetBasis
        for byte in bytes {
            hash ^= UInt64(byte)
            hash = hash &* fnvPrime
        }
        return hash
    }

    /// Folds a 64-bit hash to 32 bits: `(h >> 32) ^ h`, truncated.
    @inlinable
    public static func fold(_ hash: UInt64) -> UInt32 {
        UInt32(truncatingIfNeeded: (hash >> 32) ^ hash)
    }

    /// The id of a method given its full wire name, such as `"Echo.add"`.
    @inlinable
    public static func compute(_ wireName: String) -> UInt32 {
        fold(fnv1a64(wireName.utf8))
    }

    /// The id of `method` (a Swift base name, converted to snake_case) of `service`.
    public static func compute(service: String, method: String) -> UInt32 {
        compute(wireName(service: service, method: method))
    }

    /// `Service.snake_case(method)`, the wire name rapace derives from a Swift method.
    public static func wireName(service: String, method: String) -> String {
        service + "." + snakeCase(method)
    }

    /// lowerCamelCase → snake_case (`getStatus` → `get_status`, `newSpan` → `new_span`,
    /// `parseURLQuickly` → `parse_url_quickly`).
    public static func snakeCase(_ name: String) -> String {
        let chars = Array(name)
        var out = ""
        for (index, ch) in chars.enumerated() {
            if ch.isUppercase {
                let previous = index > 0 ? chars[index - 1] : nil
                let next = index + 1 < chars.count ? chars[index + 1] : nil
                let startsWord = previous.map { $0.isLowercase || $0.isNumber } ?? false
                let endsAcronym = (previous?.isUppercase ?? false) && (next?.isLowercase ?? false)
                if index > 0 && (startsWord || endsAcronym) { out.append("_") }
                out.append(contentsOf: ch.lowercased())
            } else {
                out.append(ch)
            }
        }
        return out
    }
}
