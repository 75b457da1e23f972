import RapaceTestSupport
import Testing

@testable import Rapace

@Suite("IDTable", .sharesProcess)
struct IDTableTests {
    final class Box {
        let value: Int
        init(_ value: Int) { self.value = value }
    }

    private func expectSame(_ table: IDTable<Box>, _ model: [UInt32: Int], _ probes: some Sequence<UInt32>) {
        #expect(table.count == model.count)
        #expect(table.isEmpty == model.isEmpty)
        for key in probes { #expect(table[key]?.value == model[key], "key \(key)") }
        let entries = table.entries.map { ($0.key, $0.value.value) }.sorted { $0.0 < $1.0 }
        let expected = model.map { ($0.key, $0.value) }.sorted { $0.0 < $1.0 }
        #expect(entries.map(\.0) == expected.map(\.0))
        #expect(entries.map(\.1) == expected.map(\.1))
    }

    @Test("random inserts, replacements and removals agree with Dictionary", arguments: [1, 2, 3])
    func randomAgainstDictionary(seed: UInt64) {
        var rng = SplitMix64(seed: seed)  // deterministic: a failure can be replayed
        var table = IDTable<Box>()
        var model: [UInt32: Int] = [:]
        // A small key space forces long probe runs, collisions and wrap-around at the end.
        for step in 0..<20_000 {
            let key = UInt32.random(in: 1...300, using: &rng)
            switch Int.random(in: 0..<3, using: &rng) {
            case 0, 1:
                table[key] = Box(step)
                model[key] = step
            default:
                #expect(table.removeValue(forKey: key)?.value == model.removeValue(forKey: key))
            }
            if step % 997 == 0 { expectSame(table, model, 1...301) }
        }
        expectSame(table, model, 1...301)
        for key in model.keys { table[key] = nil }
        #expect(table.isEmpty)
        #expect(table[0] == nil)
    }

    @Test("channel ids as a session uses them: a sliding window of odd ids")
    func slidingWindowOfChannels() {
        var table = IDTable<Box>()
        var model: [UInt32: Int] = [:]
        var next: UInt32 = 1
        var oldest: UInt32 = 1
        for step in 0..<50_000 {
            table[next] = Box(step)
            model[next] = step
            next += 2
            if model.count > 64 {
                #expect(table.removeValue(forKey: oldest)?.value == model.removeValue(forKey: oldest))
                oldest += 2
            }
        }
        expectSame(table, model, stride(from: oldest - 200, to: next + 10, by: 1))
        table.removeAll()
        #expect(table.isEmpty && table.entries.isEmpty && table[next - 2] == nil)
    }
}
