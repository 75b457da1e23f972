/// Whether a shared-memory connection spins on its incoming ring before its reactor blocks.
///
/// A wakeup through an eventfd costs the woken side a trip through the scheduler — about
/// 20 µs when the two processes run on different vCPUs of this kind of VM. A consumer that
/// polls its ring for a short while after it runs out of work sees the peer's next
/// descriptor without that wakeup, and the peer skips the doorbell `write` because the
/// consumer never said it was going to sleep (Docs/shm.md, "Spinning").
///
/// Spinning is **adaptive** and **bounded**:
/// - never when the peer's loop last ran on the CPU this loop runs on (spinning would only
///   steal the time the peer needs to answer), nor on a machine with one CPU online;
/// - at most ``maximum`` per idle turn; while it spins, nothing else on that reactor runs
///   (work submitted from other threads ends the spin at once);
/// - after a spin that saw nothing, the next 1, 3, 7, … up to 1023 idle turns do not spin;
///   a spin that sees work resets that. An idle connection therefore burns at most one
///   budget per message it receives, and far less when messages stop arriving quickly.
///
/// The default is ``disabled``: the reactor sleeps as soon as it runs out of work.
public struct ShmSpinPolicy: Hashable, Sendable, CustomStringConvertible {
    /// Nanoseconds to spin at most per idle turn; 0 = never.
    let maximumNanoseconds: UInt64

    /// Never spin: block as soon as there is no work (the default).
    public static let disabled = ShmSpinPolicy(maximumNanoseconds: 0)

    /// Spin up to `maximum` before blocking, subject to the adaptive rules above. The
    /// default of 50 µs outlasts a cross-vCPU wakeup (about 20 µs) with some room.
    public static func adaptive(maximum: Duration = .microseconds(50)) -> ShmSpinPolicy {
        ShmSpinPolicy(maximumNanoseconds: min(maximum.nanoseconds, 10_000_000))  // saturating; negative is 0
    }

    /// The most one idle turn spins (10 ms at most, whatever was asked).
    public var maximum: Duration { .nanoseconds(Int64(maximumNanoseconds)) }

    /// Whether this policy ever spins.
    public var isEnabled: Bool { maximumNanoseconds > 0 }

    public var description: String { isEnabled ? "adaptive spin up to \(maximum)" : "no spin" }
}
