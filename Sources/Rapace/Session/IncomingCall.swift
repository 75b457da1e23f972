/// A call the peer made to this side (loop-confined).
final class IncomingCall: @unchecked Sendable {
    // @unchecked Sendable: fields are touched only on the session's loop thread; the
    // handler task holds a reference but reaches state only through the session on the loop.
    //
    // @exclusivity(unchecked) on the fields the per-call path touches: one thread, and no
    // access stays open while other code runs (reads copy, writes assign; the continuation
    // of `pendingSend` is resumed after the field was cleared), so accesses never overlap
    // and the runtime check (`swift_beginAccess`) could never fire.
    @exclusivity(unchecked) private(set) var channelID: UInt32 = 0
    @exclusivity(unchecked) private(set) var kind = ChannelKind.call
    @exclusivity(unchecked) private(set) var metadata: [MetadataEntry] = []
    /// Deadline from OpenChannel metadata (TCP/WebSocket), relative to its arrival.
    @exclusivity(unchecked) private(set) var metadataDeadline: Deadline?
    /// The method served and the effective deadline, set when the request arrives
    /// (``serve(_:deadline:)``), before any ``ServerContext`` for the call exists.
    @exclusivity(unchecked) private(set) var route: ServiceRouter.Entry?
    @exclusivity(unchecked) private(set) var deadline: Deadline?
    @exclusivity(unchecked) var requestMessageID: UInt64 = 0
    @exclusivity(unchecked) var methodID: UInt32 = 0
    @exclusivity(unchecked) var requestReceived = false
    @exclusivity(unchecked) var noReply = false
    /// Set when the handler's outcome must no longer be sent (cancelled, deadline, closed).
    @exclusivity(unchecked) var finished = false
    @exclusivity(unchecked) var task: Task<Void, Never>?
    @exclusivity(unchecked) var timer: ReactorTimer?
    /// Stream credits the caller has granted and we have not used.
    @exclusivity(unchecked) var credits: UInt32 = 0
    /// The most credit ever available at once: an item larger than this cannot be sent until
    /// the caller grants more than it has so far.
    @exclusivity(unchecked) var creditCeiling: UInt32 = 0
    /// A stream item waiting for credit, and the handler suspended until it is sent.
    @exclusivity(unchecked) var pendingSend: (item: Payload, continuation: UnsafeContinuation<Result<Void, RPCError>, Never>)?
    /// Bounds the wait of a pending item larger than `creditCeiling` (see
    /// `Session.Configuration.creditGrowthTimeout`); nil otherwise.
    @exclusivity(unchecked) var creditTimer: ReactorTimer?

    init(channelID: UInt32, kind: ChannelKind, metadata: [MetadataEntry], metadataDeadline: Deadline?, initialCredits: UInt32) {
        configure(channelID: channelID, kind: kind, metadata: metadata, metadataDeadline: metadataDeadline, initialCredits: initialCredits)
    }

    /// Makes a finished call serve a new channel, as if just created with these values (the
    /// session keeps a few finished calls that nothing else references, so a served call
    /// need not allocate its record).
    func reuse(channelID: UInt32, kind: ChannelKind, metadata: [MetadataEntry], metadataDeadline: Deadline?, initialCredits: UInt32) {
        precondition(finished && task == nil && timer == nil && pendingSend == nil && creditTimer == nil, "rapace: reusing a call that is still active")
        configure(channelID: channelID, kind: kind, metadata: metadata, metadataDeadline: metadataDeadline, initialCredits: initialCredits)
    }

    /// Every per-call field, as a new call has it (one place, so reuse cannot miss one).
    private func configure(channelID: UInt32, kind: ChannelKind, metadata: [MetadataEntry], metadataDeadline: Deadline?, initialCredits: UInt32) {
        self.channelID = channelID
        self.kind = kind
        self.metadata = metadata
        self.metadataDeadline = metadataDeadline
        route = nil
        deadline = nil
        requestMessageID = 0
        methodID = 0
        requestReceived = false
        noReply = false
        finished = false
        credits = initialCredits
        creditCeiling = initialCredits
    }

    /// Records the method the request asked for and the call's effective deadline.
    func serve(_ route: ServiceRouter.Entry, deadline: Deadline?) {
        self.route = route
        self.deadline = deadline
    }

    func grant(_ bytes: UInt32) {
        let (sum, overflow) = credits.addingReportingOverflow(bytes)
        credits = overflow ? .max : sum
        creditCeiling = max(creditCeiling, credits)
    }

    /// Takes the stream item waiting for credit (to send it, if it is at most `credits`
    /// bytes, or to fail it), and cancels its timer.
    func takePendingSend(fitting credits: UInt32 = .max) -> (item: Payload, continuation: UnsafeContinuation<Result<Void, RPCError>, Never>)? {
        guard let pending = pendingSend, pending.item.count <= Int(credits) else { return nil }
        pendingSend = nil
        creditTimer?.cancel()
        creditTimer = nil
        return pending
    }

    /// Fails a send that waits for credit.
    func failPendingSend(_ error: RPCError) {
        takePendingSend()?.continuation.resume(returning: .failure(error))
    }

    /// Stops the call without answering: cancels the handler task and wakes a send that
    /// waits for credit.
    func abandon() {
        finished = true
        timer?.cancel()
        timer = nil
        task?.cancel()
        failPendingSend(RPCError(.cancelled, "call cancelled"))
    }
}
