import RapaceTestSupport
import Testing

@testable import Rapace

@Suite("WebSocket masking", .sharesProcess)
struct WebSocketMaskTests {
    /// RFC 6455 §5.3 byte by byte: payload byte j is XORed with key byte j % 4.
    private func reference(_ key: UInt32, _ bytes: [UInt8], _ range: Range<Int>) -> [UInt8] {
        let k = [UInt8(key >> 24), UInt8(key >> 16 & 0xFF), UInt8(key >> 8 & 0xFF), UInt8(key & 0xFF)]
        var out = bytes
        for (j, i) in range.enumerated() { out[i] ^= k[j % 4] }
        return out
    }

    @Test("eight bytes at a time gives the bytes of the byte-by-byte rule, at every offset and length")
    func matchesReference() {
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<200).map { _ in UInt8.random(in: 0...255, using: &generator) }
        for key: UInt32 in [0x3747_7A1C, 0xFFFF_FFFF, 0x0000_0001, 0x8000_0000] {
            for start in 0..<9 {
                for length in [0, 1, 3, 4, 7, 8, 9, 15, 16, 17, 63, 64, 65, 150] {
                    var masked = bytes
                    WebSocketFrameEncoder.applyMask(key, in: &masked, range: start..<(start + length))
                    #expect(masked == reference(key, bytes, start..<(start + length)), "key \(key) start \(start) length \(length)")
                }
            }
        }
    }

    @Test("masking twice restores the payload")
    func involution() {
        var bytes = Array(0..<255 as Range<UInt8>)
        WebSocketFrameEncoder.applyMask(0xDEAD_BEEF, in: &bytes, range: 3..<250)
        #expect(bytes != Array(0..<255 as Range<UInt8>))
        WebSocketFrameEncoder.applyMask(0xDEAD_BEEF, in: &bytes, range: 3..<250)
        #expect(bytes == Array(0..<255 as Range<UInt8>))
    }

    @Test("keys come from the kernel in batches and do not repeat in practice")
    func keys() {
        var source = MaskKeySource()
        let keys = (0..<1000).map { _ in source.next() }
        // 1000 draws from 2^32: a repeat has probability ~1e-4; more than one is a broken source.
        #expect(Set(keys).count >= 999)
        #expect(keys.contains { $0 != 0 })
    }
}
