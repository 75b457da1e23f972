// Clock arithmetic shared by deadlines and timers: CLOCK_MONOTONIC nanoseconds in a
// UInt64, where UInt64.max is "the end of time" (the wire's "no deadline").

extension UInt64 {
    /// `self + other`, or `UInt64.max` when the sum does not fit (a time too far ahead is the
    /// end of time, never one that has already passed).
    @inline(__always)
    func addingSaturating(_ other: UInt64) -> UInt64 {
        let (sum, overflow) = addingReportingOverflow(other)
        return overflow ? .max : sum
    }

    /// `self / divisor`, rounded up (a wait is never cut short by the rounding).
    @inline(__always)
    func dividedRoundingUp(by divisor: UInt64) -> UInt64 {
        self / divisor + (self % divisor == 0 ? 0 : 1)
    }
}

extension Duration {
    /// The duration in whole nanoseconds, clamped to 0...UInt64.max.
    var nanoseconds: UInt64 {
        let (seconds, attoseconds) = components
        if seconds < 0 { return 0 }
        let (high, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return .max }
        return high.addingSaturating(UInt64(max(attoseconds, 0) / 1_000_000_000))
    }
}
