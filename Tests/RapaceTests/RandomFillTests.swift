import RapaceTestSupport
import Testing

@testable import Rapace

/// `Sys.fillRandom`'s fallback where the kernel refuses `getrandom`: eight bytes per draw
/// of the standard library's generator, not one.
@Suite(.sharesProcess) struct RandomFillTests {
    /// Counts its draws; draw n (from 1) is n × 0x0101_0101_0101_0101, so every byte of it is n.
    struct CountingGenerator: RandomNumberGenerator {
        var draws: UInt64 = 0
        mutating func next() -> UInt64 {
            draws += 1
            return draws &* 0x0101_0101_0101_0101
        }
    }

    @Test(arguments: [(0, 0), (0, 1), (0, 8), (0, 9), (3, 16), (5, 29), (16, 16)])
    func eachDrawFillsEightBytes(start: Int, count: Int) {
        var bytes = [UInt8](repeating: 0xEE, count: count)
        var generator = CountingGenerator()
        bytes.withUnsafeMutableBytes { Sys.fill($0, from: start, using: &generator) }
        let filled = max(count - start, 0)
        #expect(generator.draws == UInt64((filled + 7) / 8), "\(generator.draws) draws for \(filled) bytes")
        // Untouched before `start`; then the bytes of draw 1, draw 2, …, eight each.
        let expected = [UInt8](repeating: 0xEE, count: min(start, count)) + (0..<filled).map { UInt8($0 / 8 + 1) }
        #expect(bytes == expected)
    }

    @Test func fillRandomFillsTheWholeBuffer() {
        // Every 8-byte word is written: one left zero (as a fill that stopped short leaves it)
        // fails, and a random word is zero with a chance of 2^-64 (eight words: 2^-61).
        var bytes = [UInt8](repeating: 0, count: 64)
        bytes.withUnsafeMutableBytes { Sys.fillRandom($0) }
        let zeroWords = stride(from: 0, to: bytes.count, by: 8).filter { bytes[$0..<($0 + 8)].allSatisfy { $0 == 0 } }
        #expect(zeroWords.isEmpty, "the words at offsets \(zeroWords) were left zero")
    }
}
