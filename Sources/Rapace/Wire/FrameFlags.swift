/// Frame flags (spec section 1.2). Unknown bits are kept and ignored.
public struct FrameFlags: OptionSet, Hashable, Sendable, CustomStringConvertible {
    /// The `flags` word of the descriptor, unknown and reserved bits included.
    public var rawValue: UInt32
    /// The flags in `rawValue`; bits without a name here are kept.
    @inlinable public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// The frame carries request, response or item data.
    public static let data = FrameFlags(rawValue: 0x001)
    /// Set on every channel-0 frame, never elsewhere.
    public static let control = FrameFlags(rawValue: 0x002)
    /// The sender's half of the channel is finished.
    public static let endOfStream = FrameFlags(rawValue: 0x004)
    /// Set exactly when the CallResult status code is not 0.
    public static let error = FrameFlags(rawValue: 0x010)
    /// Scheduling hint.
    public static let highPriority = FrameFlags(rawValue: 0x020)
    /// `credit_grant` is valid for this frame's channel.
    public static let credits = FrameFlags(rawValue: 0x040)
    /// The request expects no response (a notification).
    public static let noReply = FrameFlags(rawValue: 0x100)
    /// The frame answers a request.
    public static let response = FrameFlags(rawValue: 0x200)

    public var description: String {
        let names: [(FrameFlags, String)] = [
            (.data, "DATA"), (.control, "CONTROL"), (.endOfStream, "EOS"), (.error, "ERROR"),
            (.highPriority, "HIGH_PRIORITY"), (.credits, "CREDITS"), (.noReply, "NO_REPLY"), (.response, "RESPONSE"),
        ]
        let parts = names.filter { contains($0.0) }.map(\.1)
        return parts.isEmpty ? "[]" : parts.joined(separator: "|")
    }
}
