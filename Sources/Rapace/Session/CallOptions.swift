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

    /// Whether these options set a deadline at all (then the caller reads the clock).
    var hasDeadline: Bool { timeout != nil || deadline != nil }

    /// The absolute deadline these options imply, starting `now`; nil for none, and for the
    /// end of time (a timeout too long for the clock saturates there): no transport sends it
    /// and no timer is armed for it.
    func effectiveDeadline(now: UInt64) -> Deadline? {
        var result = deadline?.monotonicNanoseconds ?? .max
        if let timeout { result = min(result, now.addingSaturating(timeout.nanoseconds)) }
        return result == .max ? nil : Deadline(monotonicNanoseconds: result)
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
        Deadline(monotonicNanoseconds: Sys.monotonicNanoseconds().addingSaturating(duration.nanoseconds))
    }

    /// Nanoseconds left (0 when past).
    public var remainingNanoseconds: UInt64 {
        let now = Sys.monotonicNanoseconds()
        return monotonicNanoseconds > now ? monotonicNanoseconds - now : 0
    }

    public static func < (a: Deadline, b: Deadline) -> Bool { a.monotonicNanoseconds < b.monotonicNanoseconds }
}

