/// Method wire names and ids (spec section 2), computed while the macro expands so that
/// generated code carries its ids as literals.
///
/// These mirror `Rapace.MethodID` (the macro cannot depend on the runtime); a test checks
/// that both agree.
enum WireNames {
    /// `fold(FNV-1a-64(name))`: the method id of a full wire name such as `"Echo.add"`.
    static func methodID(_ fullName: String) -> UInt32 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in fullName.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x0000_0100_0000_01b3
        }
        return UInt32(truncatingIfNeeded: (hash >> 32) ^ hash)
    }

    /// lowerCamelCase → snake_case (`getStatus` → `get_status`, `newSpan` → `new_span`,
    /// `parseURLQuickly` → `parse_url_quickly`), exactly as `MethodID.snakeCase`.
    static func snakeCase(_ name: String) -> String {
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

    /// `0x3E89_5C50`: an id as a Swift literal, in groups of four hex digits.
    static func literal(_ id: UInt32) -> String {
        let hex = String(id, radix: 16, uppercase: true)
        let padded = String(repeating: "0", count: 8 - hex.count) + hex
        return "0x" + padded.prefix(4) + "_" + padded.suffix(4)
    }

    /// `0x3E895C50`: an id as people read it in messages and docs.
    static func display(_ id: UInt32) -> String {
        let hex = String(id, radix: 16, uppercase: true)
        return "0x" + String(repeating: "0", count: 8 - hex.count) + hex
    }
}
