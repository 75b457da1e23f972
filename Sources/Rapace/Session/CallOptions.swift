/// Per-call options.
public struct CallOptions: Sendable {
    /// Fails the call with `DEADLINE_EXCEEDED` after this long (measured from the call's start).
    public var timeout: Duration?
    /// An absolute CLOCK_MONOTONIC deadline in nanoseconds (see ``Deadline``); the earlier of
    /// this and ``timeout`` wins.
    public var deadline: Deadline?
    /// Metadata sent in OpenChannel.
    public var metadata: [MetadataEntry]
    /// For server streams: bytes of item payload the caller accepts before granting more.
    /// An item larger than the window cannot be delivered and fails the stream.
    public var streamWindow: UInt32
    /// Sets the frame's HIGH_PRIORITY hint.
    public var highPriority: Bool

    /// Options with the given values. The defaults: no timeout, no deadline, no metadata, a
    /// 256 KiB stream window, normal priority.
    public init(timeout: Duration? = nil, deadline: Deadline? = nil, metadata: [MetadataEntry] = [], streamWindow: UInt32 = 256 * 1024, highPriority: Bool = false) {
        self.timeout = timeout
        self.deadline = deadline
        self.metadata = metadata
        self.streamWindow = streamWindow
        self.highPriority = highPriority
    }

    /// Default options: no deadline, no metadata, 256 KiB stream window.
    public static let `default` = CallOptions()

    /// Options with only a timeout.
    public static func timeout(_ duration: Duration) -> CallOptions { CallOptions(timeout: duration) }

    /// The absolute deadline these options imply, starting now.
    func effectiveDeadline(now: UInt64) -> Deadline? {
        var result = deadline
        if let timeout {
            let candidate = Deadline(now: now, plus: timeout.nanoseconds)
            if result == nil || candidate < result! { result = candidate }
        }
        return result
    }
}

/// An absolute point on CLOCK_MONOTONIC, the clock of the wire's `deadline_ns`.
public struct Deadline: Hashable, Comparable, Sendable {
    /// Nanoseconds on CLOCK_MONOTONIC (``FrameDescriptor/noDeadline``, `UInt64.max`, is the
    /// end of time).
    public var monotonicNanoseconds: UInt64
    /// The deadline at `monotonicNanoseconds` on CLOCK_MONOTONIC (as ``now`` reads it).
    public init(monotonicNanoseconds: UInt64) { self.monotonicNanoseconds = monotonicNanoseconds }

    /// The current time.
    public static var now: Deadline { Deadline(monotonicNanoseconds: Sys.monotonicNanoseconds()) }

    /// `duration` from now.
    public static func after(_ duration: Duration) -> Deadline {
        Deadline(now: Sys.monotonicNanoseconds(), plus: duration.nanoseconds)
    }

    /// `nanoseconds` after `now`, saturating: a duration too long for the clock is the end of
    /// time (which the wire calls "no deadline"), never a time that has already passed.
    init(now: UInt64, plus nanoseconds: UInt64) {
        let (sum, overflow) = now.addingReportingOverflow(nanoseconds)
        monotonicNanoseconds = overflow ? .max : sum
    }

    /// Nanoseconds left (0 when past).
    public var remainingNanoseconds: UInt64 {
        let now = Sys.monotonicNanoseconds()
        return monotonicNanoseconds > now ? monotonicNanoseconds - now : 0
    }

    public static func < (a: Deadline, b: Deadline) -> Bool { a.monotonicNanoseconds < b.monotonicNanoseconds }
}

extension Duration {
    /// The duration in whole nanoseconds, clamped to 0...UInt64.max.
    var nanoseconds: UInt64 {
        let (seconds, attoseconds) = components
        if seconds < 0 { return 0 }
        let (high, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return .max }
        let (sum, carry) = high.addingReportingOverflow(UInt64(max(attoseconds, 0) / 1_000_000_000))
        return carry ? .max : sum
    }
}
