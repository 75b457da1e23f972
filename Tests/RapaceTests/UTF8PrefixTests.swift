import RapaceTestSupport
import Testing

@testable import Rapace

@Suite("String.prefix(utf8Bytes:)", .sharesProcess)
struct UTF8PrefixTests {
    @Test("keeps whole scalars only, within the byte bound")
    func scalarBoundaries() {
        let text = "aé€😀b"  // 1 + 2 + 3 + 4 + 1 bytes
        let expected: [(Int, String)] = [
            (-1, ""), (0, ""), (1, "a"), (2, "a"), (3, "aé"), (4, "aé"), (5, "aé"), (6, "aé€"),
            (9, "aé€"), (10, "aé€😀"), (11, "aé€😀b"), (12, "aé€😀b"), (1000, "aé€😀b"),
        ]
        for (bytes, prefix) in expected {
            #expect(String(text.prefix(utf8Bytes: bytes)) == prefix, "\(bytes) bytes")
        }
        #expect(String("".prefix(utf8Bytes: 5)) == "")
    }

    @Test("a combining mark is a scalar of its own: the base character can be kept without it")
    func combining() {
        let text = "e\u{301}x"  // "é" as e + U+0301 (2 bytes)
        #expect(Array(text.prefix(utf8Bytes: 2).unicodeScalars) == ["e"])
        #expect(String(text.prefix(utf8Bytes: 3)) == "e\u{301}")
    }
}
