/// The peer's channel ids that it skipped: never opened, though below one it did open.
///
/// Channel ids only grow within a connection, so an id at or below the highest one the peer
/// opened is either a channel that has ended (a late frame on it is dropped) or one the peer
/// skipped (spec 6.1: DATA on it is answered `CancelChannel { C, protocolViolation }`). The
/// session tells them apart with this record: the skipped ids as ranges, at most
/// ``limit`` of them. A peer that skips more often than that loses the oldest ranges: a
/// frame on one of those ids is then taken for a late frame and dropped, so a hostile peer
/// cannot make the record grow without bound.
struct SkippedChannels {
    /// Ranges kept at most (the oldest, lowest ranges go first).
    static let limit = 64

    /// Disjoint, ascending ranges of skipped ids (of the peer's parity only).
    private var ranges: [ClosedRange<UInt32>] = []

    /// Records the ids of the peer's parity (that of `opened`) strictly between `previous`
    /// (the highest id it had opened, 0 for none) and `opened`, the id it opens now
    /// (`opened > previous`).
    mutating func noteOpened(_ opened: UInt32, after previous: UInt32) {
        let first = previous == 0 ? 2 - opened % 2 : previous + 2
        guard opened >= 2, first <= opened - 2 else { return }
        if ranges.count == Self.limit { ranges.removeFirst() }
        ranges.append(first...(opened - 2))
    }

    /// True when `id` is one the peer skipped.
    func contains(_ id: UInt32) -> Bool {
        // Newer ranges are at the end and are the likelier ones to be asked about.
        ranges.reversed().contains { $0.contains(id) }
    }
}
