import Dispatch
import EchoService
import Foundation
import RapaceTestSupport

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

// The session fuzzer's hostile peer: it builds frames from valid pieces, mutates them, sends
// them with stream framing (spec 8.1) over a raw blocking socket (`RawPeer`), and checks
// every frame the server sends back against `SessionFuzzModel`. It runs on a thread of its
// own (it blocks in `poll`), and reports failures as strings for the test to record.

/// One frame the fuzzer sends.
struct FuzzFrame {
    var descriptor: FrameDescriptor
    var payload: [UInt8]
    var summary: String
    /// Scramble the descriptor fields a stream transport ignores (payload slot, generation,
    /// offset, inline bytes; Docs/protocol-notes.md, "Frames").
    var scrambleIgnoredFields = false

    /// The bytes on the wire: length varint, descriptor, payload.
    func wireBytes(_ random: inout FuzzRandom) -> [UInt8] {
        var frame = Frame(descriptor: descriptor, payload: Payload(payload))
        frame.prepareForSending()
        if scrambleIgnoredFields {
            frame.descriptor.payloadSlot = random.pick([0, FrameDescriptor.reservedSlot, FrameDescriptor.inlineSlot, random.u32()])
            frame.descriptor.payloadGeneration = random.u32()
            frame.descriptor.payloadOffset = random.u32()
            frame.descriptor.inlinePayload = random.bytes(16).withUnsafeBytes { InlinePayload($0) }
        }
        var out: [UInt8] = []
        StreamFrameDecoder.encode(frame, into: &out)
        return out
    }
}

/// How a seed's sequence ends, after its body of frames that keep the connection up.
enum FuzzEnding: CustomStringConvertible {
    /// A clean EOF after the final probe call.
    case eof
    /// A connection-level protocol error (GoAway(protocolError), then close).
    case protocolError(ProtocolErrorKind)
    /// CloseChannel(0): the server closes, sending nothing.
    case closeSession
    /// GoAway(protocolError) from the fuzzer: the server closes, sending nothing.
    case goAwayProtocolError
    /// GoAway(shutdown / maintenance / overload): the server closes once nothing is in flight.
    case goAway(GoAwayReason)
    /// EOF inside a frame.
    case truncatedFrame
    /// The server shuts down gracefully (100 ms of grace) while the fuzzer sends more.
    case serverShutdown

    enum ProtocolErrorKind: CaseIterable {
        case channelZeroWithoutControl, controlOnCallChannel, unknownVerb, secondHello, pingLength, pongLength
        case undecodableOpenChannel, undecodableCancel, undecodableClose, undecodableGrant, undecodableGoAway
        case framingShortLength, framingPayloadLengthMismatch, framingOversized, framingLongVarint
    }

    var description: String {
        switch self {
        case .eof: "EOF"
        case .protocolError(let kind): "protocol error (\(kind))"
        case .closeSession: "CloseChannel(0)"
        case .goAwayProtocolError: "GoAway(protocolError) from the fuzzer"
        case .goAway(let reason): "GoAway(\(reason)) from the fuzzer"
        case .truncatedFrame: "EOF inside a frame"
        case .serverShutdown: "the server shuts down gracefully"
        }
    }

    /// A short name for the summary.
    var name: String {
        switch self {
        case .protocolError: "protocolError"
        case .goAway: "goAway"
        default: description
        }
    }

    static func random(_ random: inout FuzzRandom) -> FuzzEnding {
        switch random.weighted([40, 32, 5, 5, 7, 3, 8]) {
        case 0: .eof
        case 1: .protocolError(random.pick(ProtocolErrorKind.allCases))
        case 2: .closeSession
        case 3: .goAwayProtocolError
        case 4: .goAway(random.pick([.shutdown, .maintenance, .overload]))
        case 5: .truncatedFrame
        default: .serverShutdown
        }
    }
}

/// Builds the fuzzer's frames, aiming them with what the model knows.
struct FuzzFrameBuilder {
    var random: FuzzRandom
    let model: SessionFuzzModel
    private var nextMessageID: UInt64 = 2  // 1 is the Hello

    init(random: FuzzRandom, model: SessionFuzzModel) {
        self.random = random
        self.model = model
    }

    mutating func takeMessageID() -> UInt64 {
        defer { nextMessageID += 1 }
        return nextMessageID
    }

    func control(_ verb: UInt32, _ messageID: UInt64) -> FrameDescriptor {
        FrameDescriptor(messageID: messageID, channelID: 0, methodID: verb, flags: .control)
    }

    /// A frame that does not end the connection.
    mutating func bodyFrame() -> FuzzFrame {
        var frame: FuzzFrame
        switch random.weighted([24, 28, 10, 6, 4, 6, 2, 4, 4, 2]) {
        case 0: frame = openChannel()
        case 1: frame = request()
        case 2: frame = grantCredits()
        case 3: frame = cancelChannel()
        case 4: frame = closeChannel()
        case 5: frame = ping()
        case 6: frame = pong()
        case 7: frame = creditsOnly()
        case 8: frame = strayResponse()
        default: frame = highVerb()
        }
        if frame.descriptor.channelID == 0, random.chance(8) {
            // Flags besides CONTROL are ignored on the control channel.
            frame.descriptor.flags.insert(FrameFlags(rawValue: random.pick([0x001, 0x004, 0x010, 0x040, 0x100, 0x200, 0x8000_0000] as [UInt32])))
            frame.summary += " +flags"
        }
        if random.chance(10) {
            frame.scrambleIgnoredFields = true
            frame.summary += " (scrambled slot fields)"
        }
        return frame
    }

    // MARK: Channel ids

    /// A channel id to aim at: mostly one waiting for its request (`preferring`), else
    /// any the server accepted, one above them all, a skipped one, one of the server's own
    /// parity, 0, or anything.
    mutating func target(preferring preferred: [FuzzChannel], allowZero: Bool = false) -> UInt32 {
        let known = model.allChannelIDs
        var roll = random.weighted([80, 8, 4, 3, 2, 1, 2])
        if roll == 0 && preferred.isEmpty { roll = known.isEmpty || random.chance(50) ? 2 : 1 }
        switch roll {
        case 0 where !preferred.isEmpty:
            // Mostly the newest: the fuzzer tends to use a channel soon after opening it.
            let recent = preferred.suffix(4)
            return random.pick(Array(recent)).id
        case 1 where !known.isEmpty:
            return random.pick(known)
        case 2 where model.highest < UInt32.max - 8:
            return model.highest + 2 * UInt32(random.int(1...3)) | 1
        case 3:
            if let gap = model.gapSample { return gap }
            return random.u32() | 1
        case 4:
            let even = random.u32() & ~1
            return even == 0 ? 2 : even
        case 5 where allowZero:
            return 0
        default:
            return random.chance(50) ? max(random.u32(), 1) : UInt32(random.int(1...64))
        }
    }

    /// A key for OpenChannel metadata and Hello parameters.
    mutating func metadataKey() -> String {
        random.pick(["trace-id", "rapace.deadline_remaining", "RAPACE.DEADLINE_REMAINING_MS", "", "x", "k\(random.below(100))", "é✓"])
    }

    // MARK: Control frames

    mutating func openChannel() -> FuzzFrame {
        let next: UInt64 = model.highest == 0 ? 1 : UInt64(model.highest) + 2
        var id: UInt32
        var idKind = "next"
        switch random.weighted([800, 30, 40, 60, 30, 1, 30]) {
        case 0:
            let skip = random.weighted([75, 20, 5])
            let candidate = next + 2 * UInt64(skip == 0 ? 0 : (skip == 1 ? random.int(1...3) : 500))
            if candidate <= UInt64(UInt32.max) {
                id = UInt32(candidate)
                idKind = candidate == next ? "next" : "skipping"
            } else {
                id = random.u32()
                idKind = "random (ids exhausted)"
            }
        case 1: id = 0; idKind = "zero"
        case 2: id = UInt32(truncatingIfNeeded: next &+ 1); idKind = "even"
        case 3: id = model.allChannelIDs.isEmpty ? 1 : random.pick(model.allChannelIDs); idKind = "reused"
        case 4: id = model.gapSample ?? 1; idKind = "below the highest"
        case 5: id = UInt32.max; idKind = "huge"
        default: id = random.u32(); idKind = "random"
        }
        let kind = [ChannelKind.call, .stream, .tunnel][random.weighted([55, 40, 5])]
        var attach: AttachTo?
        if random.chance(10) {
            attach = AttachTo(callChannelID: random.u32(), portID: random.u32(), direction: random.pick(Direction.allCases))
        }
        var metadata: [MetadataEntry] = (0..<random.weighted([60, 30, 10])).map { _ in
            MetadataEntry(metadataKey(), random.bytes(random.below(9)))
        }
        var deadlineNote = ""
        if random.chance(25) {
            var value: [UInt8]
            if random.chance(70) {
                let ms = random.pick([0, 1, 5, 20, 200, 100_000, UInt32.max])
                value = withUnsafeBytes(of: ms.littleEndian) { Array($0) }
                deadlineNote = " deadline \(ms) ms"
            } else {
                value = random.bytes(random.pick([0, 1, 3, 5, 8]))
                deadlineNote = " deadline entry of \(value.count) bytes"
            }
            metadata.insert(MetadataEntry(Session.deadlineMetadataKey, value), at: random.below(metadata.count + 1))
        }
        let credits: UInt32
        if kind == .stream {
            credits = [0, UInt32(random.int(1...8)), UInt32(random.int(9...64)), .max, random.u32()][random.weighted([15, 40, 25, 10, 10])]
        } else {
            credits = random.chance(70) ? .max : random.pick([0, 1, random.u32()])
        }
        let open = OpenChannel(channelID: id, kind: kind, attach: attach, metadata: metadata, initialCredits: credits)
        var payload = open.encoded()
        var summary = "OpenChannel(\(id) \(idKind), \(kind), credits \(credits)\(attach == nil ? "" : ", attach")\(deadlineNote), \(metadata.count) metadata)"
        if random.chance(10) {
            let mutated = random.mutate(payload)
            if let decoded = try? OpenChannel(decoding: mutated) {
                payload = mutated
                summary = "mutated OpenChannel(\(decoded.channelID), \(decoded.kind), credits \(decoded.initialCredits), \(decoded.metadata.count) metadata)"
            }
        }
        return FuzzFrame(descriptor: control(ControlVerb.openChannel.rawValue, takeMessageID()), payload: payload, summary: summary)
    }

    mutating func grantCredits() -> FuzzFrame {
        let id = target(preferring: model.liveChannels.filter { $0.kind == .stream })
        let bytes: UInt32 = [UInt32(random.int(1...16)), .max, .max - UInt32(random.below(16)), 0, random.u32()][random.weighted([60, 15, 10, 5, 10])]
        return FuzzFrame(
            descriptor: control(ControlVerb.grantCredits.rawValue, takeMessageID()),
            payload: GrantCredits(channelID: id, bytes: bytes).encoded(), summary: "GrantCredits(\(id), \(bytes))")
    }

    mutating func cancelChannel() -> FuzzFrame {
        let id = random.chance(5) ? 0 : target(preferring: model.liveChannels)
        let reason = random.pick(CancelReason.allCases)
        return FuzzFrame(
            descriptor: control(ControlVerb.cancelChannel.rawValue, takeMessageID()),
            payload: CancelChannel(channelID: id, reason: reason).encoded(), summary: "CancelChannel(\(id), \(reason))")
    }

    mutating func closeChannel() -> FuzzFrame {
        var id = target(preferring: model.liveChannels)
        if id == 0 { id = 1 }  // CloseChannel(0) closes the session: an ending, not a body frame
        let reason: CloseReason = random.chance(50) ? .normal : .error(FuzzMethod.randomString(&random))
        return FuzzFrame(
            descriptor: control(ControlVerb.closeChannel.rawValue, takeMessageID()),
            payload: CloseChannel(channelID: id, reason: reason).encoded(), summary: "CloseChannel(\(id), \(reason))")
    }

    mutating func ping() -> FuzzFrame {
        var bytes = random.bytes(8)
        if bytes[0] == 0xA5 { bytes[0] = 0xA4 }  // 0xA5 starts the fuzzer's markers
        return FuzzFrame(descriptor: control(ControlVerb.ping.rawValue, takeMessageID()), payload: bytes, summary: "Ping \(bytes)")
    }

    mutating func pong() -> FuzzFrame {
        FuzzFrame(descriptor: control(ControlVerb.pong.rawValue, takeMessageID()), payload: random.bytes(8), summary: "unsolicited Pong")
    }

    mutating func highVerb() -> FuzzFrame {
        let verb = UInt32(random.int(100...120))
        return FuzzFrame(descriptor: control(verb, takeMessageID()), payload: random.bytes(random.below(20)), summary: "control verb \(verb)")
    }

    // MARK: Channel frames

    mutating func request() -> FuzzFrame {
        let id = target(preferring: model.awaitingChannels)
        let kind = model.channels[id]?.kind
        var methodID: UInt32
        var method: FuzzMethod?
        let roll = random.below(100)
        if roll < 8 {
            methodID = random.chance(20) ? 0 : random.u32()
            method = FuzzMethod.byID[methodID]
        } else {
            let candidates: [FuzzMethod]
            switch kind {
            case .stream? where roll < 85: candidates = FuzzMethod.all.filter { $0.descriptor.kind == .serverStream }
            case .call? where roll < 85: candidates = FuzzMethod.all.filter { $0.descriptor.kind != .serverStream }
            default: candidates = FuzzMethod.all
            }
            method = random.pick(candidates)
            methodID = method!.descriptor.id
        }
        var payload = method.map { $0.validArguments(&random) } ?? random.bytes(random.below(8))
        var argumentsNote = ""
        if random.chance(20) {
            let mutated = random.mutate(payload)
            if method?.bounded(mutated) ?? true {
                payload = mutated
                argumentsNote = " mutated"
            }
        }
        var flags: FrameFlags = [.data, .endOfStream]
        var creditGrant: UInt32 = 0
        if random.chance(10) { flags.insert(.noReply) }
        if random.chance(10) { flags.insert(.highPriority) }
        if random.chance(8) {
            flags.insert(.credits)
            creditGrant = random.chance(70) ? UInt32(random.int(0...64)) : random.pick([.max, random.u32()])
        }
        if random.chance(5) { flags.remove(.endOfStream) }
        if random.chance(4) { flags.remove(.data) }
        if random.chance(3) { flags.insert(.error) }
        if random.chance(3) { flags.insert(FrameFlags(rawValue: random.pick([0x008, 0x080, 0x400, 0x8000_0000] as [UInt32]))) }
        var deadline = FrameDescriptor.noDeadline
        if random.chance(20) {
            let now = Sys.monotonicNanoseconds()
            deadline = [1, now - min(now, 1_000_000), now + 2_000_000, now + 20_000_000, now + 3_600_000_000_000, UInt64.max - 1, random.next()][random.below(7)]
        }
        let messageID = random.chance(5) ? random.next() : takeMessageID()
        let descriptor = FrameDescriptor(
            messageID: messageID, channelID: id, methodID: methodID, flags: flags, creditGrant: creditGrant, deadlineNanoseconds: deadline)
        let name = method?.descriptor.fullName ?? "unknown method 0x\(String(methodID, radix: 16))"
        let deadlineNote = deadline == FrameDescriptor.noDeadline ? "" : " deadline_ns \(deadline)"
        let creditNote = flags.contains(.credits) ? " grant \(creditGrant)" : ""
        return FuzzFrame(descriptor: descriptor, payload: payload, summary: "request \(name) on \(id) \(flags)\(creditNote)\(deadlineNote)\(argumentsNote) \(payload.count) bytes")
    }

    mutating func creditsOnly() -> FuzzFrame {
        let id = target(preferring: model.liveChannels.filter { $0.kind == .stream })
        var flags: FrameFlags = .credits
        if random.chance(20) { flags.insert(random.pick([.endOfStream, .noReply, .highPriority])) }
        let grant = random.chance(70) ? UInt32(random.int(0...32)) : random.pick([.max, random.u32()])
        let payload = random.chance(70) ? [] : random.bytes(random.below(20))
        return FuzzFrame(
            descriptor: FrameDescriptor(messageID: takeMessageID(), channelID: id, methodID: random.u32(), flags: flags, creditGrant: grant),
            payload: payload, summary: "credits-only frame on \(id) \(flags) grant \(grant)")
    }

    mutating func strayResponse() -> FuzzFrame {
        let id = target(preferring: model.liveChannels)
        var flags: FrameFlags = .response
        for flag in [FrameFlags.data, .endOfStream, .error, .credits, .noReply] where random.chance(50) { flags.insert(flag) }
        let payload = random.chance(50) ? CallResult(status: .ok, body: random.bytes(random.below(8))).encoded() : random.bytes(random.below(24))
        return FuzzFrame(
            descriptor: FrameDescriptor(messageID: random.next(), channelID: id, methodID: random.pick([EchoMethods.add.id, random.u32()]), flags: flags),
            payload: payload, summary: "response on \(id) \(flags) (the server has no calls)")
    }

    // MARK: Endings

    /// The frame (or raw bytes) that ends the sequence, if the ending has one.
    mutating func ending(_ ending: FuzzEnding) -> (frame: FuzzFrame?, raw: [UInt8]?) {
        switch ending {
        case .eof, .serverShutdown:
            return (nil, nil)
        case .closeSession:
            return (FuzzFrame(descriptor: control(ControlVerb.closeChannel.rawValue, takeMessageID()), payload: CloseChannel(channelID: 0, reason: random.chance(50) ? .normal : .error("fuzz over")).encoded(), summary: "CloseChannel(0)"), nil)
        case .goAwayProtocolError:
            return (goAway(.protocolError), nil)
        case .goAway(let reason):
            return (goAway(reason), nil)
        case .truncatedFrame:
            let whole = openChannel().wireBytes(&random)
            return (nil, Array(whole.prefix(random.int(1...(whole.count - 1)))))
        case .protocolError(let kind):
            return protocolError(kind)
        }
    }

    mutating func goAway(_ reason: GoAwayReason) -> FuzzFrame {
        let message = GoAway(reason: reason, lastChannelID: random.u32(), message: FuzzMethod.randomString(&random), metadata: random.chance(30) ? [MetadataEntry("k", [1])] : [])
        return FuzzFrame(descriptor: control(ControlVerb.goAway.rawValue, takeMessageID()), payload: message.encoded(), summary: "GoAway(\(reason))")
    }

    /// `valid` mutated until it no longer decodes as `M` (bounded; a trailing byte always works).
    mutating func undecodable<M: WireMessage>(_ valid: [UInt8], as type: M.Type) -> [UInt8] {
        for _ in 0..<32 {
            let mutated = random.mutate(valid)
            if (try? M(decoding: mutated)) == nil { return mutated }
        }
        return valid + [0]
    }

    mutating func protocolError(_ kind: FuzzEnding.ProtocolErrorKind) -> (frame: FuzzFrame?, raw: [UInt8]?) {
        let id = takeMessageID()
        func frame(_ verb: ControlVerb, _ payload: [UInt8], _ summary: String) -> FuzzFrame {
            FuzzFrame(descriptor: control(verb.rawValue, id), payload: payload, summary: summary)
        }
        switch kind {
        case .channelZeroWithoutControl:
            let flags = FrameFlags(rawValue: random.pick([0, 0x001, 0x005, 0x200] as [UInt32]))
            return (FuzzFrame(descriptor: FrameDescriptor(messageID: id, channelID: 0, methodID: random.pick([0, 1, 5, 7, 99]), flags: flags), payload: random.bytes(8), summary: "channel 0 frame with flags \(flags)"), nil)
        case .controlOnCallChannel:
            let channel = model.allChannelIDs.isEmpty ? 1 : random.pick(model.allChannelIDs)
            return (FuzzFrame(descriptor: FrameDescriptor(messageID: id, channelID: channel, methodID: EchoMethods.add.id, flags: [.control, .data, .endOfStream]), payload: [4, 6], summary: "CONTROL on channel \(channel)"), nil)
        case .unknownVerb:
            let verb = UInt32(random.int(8...99))
            return (FuzzFrame(descriptor: control(verb, id), payload: random.bytes(random.below(8)), summary: "control verb \(verb)"), nil)
        case .secondHello:
            return (frame(.hello, Hello(role: .initiator).encoded(), "second Hello"), nil)
        case .pingLength:
            return (frame(.ping, random.bytes(random.pick([0, 1, 7, 9, 16])), "Ping of the wrong length"), nil)
        case .pongLength:
            return (frame(.pong, random.bytes(random.pick([0, 4, 9])), "Pong of the wrong length"), nil)
        case .undecodableOpenChannel:
            return (frame(.openChannel, undecodable(OpenChannel(channelID: model.highest | 1, kind: .call).encoded(), as: OpenChannel.self), "undecodable OpenChannel"), nil)
        case .undecodableCancel:
            return (frame(.cancelChannel, undecodable(CancelChannel(channelID: 1, reason: .clientCancel).encoded(), as: CancelChannel.self), "undecodable CancelChannel"), nil)
        case .undecodableClose:
            return (frame(.closeChannel, undecodable(CloseChannel(channelID: 3, reason: .error("x")).encoded(), as: CloseChannel.self), "undecodable CloseChannel"), nil)
        case .undecodableGrant:
            return (frame(.grantCredits, undecodable(GrantCredits(channelID: 1, bytes: 5).encoded(), as: GrantCredits.self), "undecodable GrantCredits"), nil)
        case .undecodableGoAway:
            return (frame(.goAway, undecodable(GoAway(reason: .shutdown, lastChannelID: 0, message: "bye").encoded(), as: GoAway.self), "undecodable GoAway"), nil)
        case .framingShortLength:
            let length = random.int(0...63)
            return (nil, [UInt8(length)] + random.bytes(length))
        case .framingPayloadLengthMismatch:
            var descriptor = control(ControlVerb.ping.rawValue, id)
            descriptor.payloadLength = UInt32(random.pick([0, 3, 9, 1000]))
            return (nil, [64 + 8] + descriptor.encodedBytes + random.bytes(8))
        case .framingOversized:
            var length: UInt64 = 64 + (16 << 20) + UInt64(random.int(1...(1 << 30)))
            var prefix: [UInt8] = []
            while length >= 0x80 {
                prefix.append(UInt8(truncatingIfNeeded: length) | 0x80)
                length >>= 7
            }
            prefix.append(UInt8(length))
            return (nil, prefix + control(ControlVerb.ping.rawValue, id).encodedBytes)
        case .framingLongVarint:
            return (nil, [UInt8](repeating: 0x80, count: random.int(11...14)) + [0x01])
        }
    }
}

// MARK: The driver

/// The accepted server sessions of the fuzz (loop-confined: only the server reactor's loop
/// touches `sessions`).
final class FuzzSessions: @unchecked Sendable {
    var sessions: [Session] = []
}

/// A reference to a session that does not keep it alive (read from any thread).
final class WeakSession: @unchecked Sendable {
    // @unchecked Sendable: a weak reference is safe to load from any thread.
    weak var session: Session?
    init(_ session: Session) { self.session = session }
}

/// Runs `body` on `reactor`'s loop from a thread that may block, and returns its result
/// (nil if the reactor is gone or the loop does not answer within 10 s).
func blockingOnLoop<T: Sendable>(_ reactor: Reactor, _ body: @escaping @Sendable () -> T) -> T? {
    let result = Locked<T?>(nil)
    let done = DispatchSemaphore(value: 0)
    guard reactor.execute({
        let value = body()
        result.withLock { $0 = value }
        done.signal()
    }) else { return nil }
    guard done.wait(timeout: .now() + 10) == .success else { return nil }
    return result.withLock { $0 }
}

/// Polls `condition` (every 2 ms, at most `timeout`) from a thread that may block.
func blockingWait(timeout: Duration = .seconds(5), _ condition: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if condition() { return true }
        usleep(2000)
    }
    return condition()
}

/// Runs `body` on a thread of its own (it may block) and returns its result.
func onOwnThread<T: Sendable>(_ name: String, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: body()) }
        thread.name = name
        thread.start()
    }
}

/// What one seed's hostile connection did, and what went wrong.
struct FuzzSeedReport: Sendable {
    var seed: UInt64
    var framesSent = 0
    var ending = ""
    var failures: [String] = []
    /// What the server sent, by kind (``SessionFuzzModel/seen``).
    var seen: [String: Int] = [:]
    /// The frames sent, one summary each, for a failure report.
    var trace: [String] = []
}

/// One hostile connection per seed against the served sessions of `sessions`, listening at
/// `address` on `reactor`.
struct SessionFuzzer: Sendable {
    let server: FuzzServer
    let framesPerSeed: Int
    var address: SocketAddress { server.address }
    var reactor: Reactor { server.reactor }
    var accepted: FuzzSessions { server.accepted }

    /// The fuzzer's Hello for a seed: roles and version right, limits and features varied.
    static func hello(_ random: inout FuzzRandom) -> (Hello, creditFlowControl: Bool, maxPayload: Int) {
        let ourMax: UInt32 = [0, 16 << 20, 4096, 64][random.weighted([70, 10, 10, 10])]
        let creditFlowControl = !random.chance(20)
        var features: FeatureSet = [.callEnvelope, .ping]
        if creditFlowControl { features.insert(.creditFlowControl) }
        let limits = Limits(maxPayloadSize: ourMax, maxChannels: random.pick([0, 1, 8192]), maxPendingCalls: random.pick([0, 1, 8192]))
        let params = random.chance(20) ? [MetadataEntry("fuzz", random.bytes(4))] : []
        let hello = Hello(role: .initiator, supportedFeatures: features, limits: limits, params: params)
        let serverMax = 16 << 20
        return (hello, creditFlowControl, ourMax == 0 ? serverMax : min(Int(ourMax), serverMax))
    }

    func run(seed: UInt64) -> FuzzSeedReport {
        var report = FuzzSeedReport(seed: seed)
        let hex = "0x" + String(seed, radix: 16)
        var random = FuzzRandom(seed: seed)
        let (hello, creditFlowControl, maxPayload) = Self.hello(&random)
        let limit = server.limits.maxChannels
        let model = SessionFuzzModel(
            creditFlowControl: creditFlowControl, maxPayload: maxPayload, sharesClock: server.sharesClock,
            channelLimit: limit == 0 || limit >= 1000 ? nil : Int(limit))
        model.context = "seed \(hex) handshake"
        let ending = FuzzEnding.random(&random)
        report.ending = ending.name
        var builder = FuzzFrameBuilder(random: random, model: model)
        let started = ContinuousClock.now
        func finish() -> FuzzSeedReport {
            report.failures += model.failures
            report.seen = model.seen
            return report
        }

        guard let before = blockingOnLoop(reactor, { [accepted] in accepted.sessions.count }) else {
            model.fail("the server's loop did not answer")
            return finish()
        }
        let peer: RawPeer
        do {
            peer = try RawPeer(address)
        } catch {
            model.fail("connect failed: \(error)")
            return finish()
        }
        peer.sendHello(hello)
        do {
            let theirs = try peer.expectHello()
            if theirs.role != .acceptor { model.fail("the server's Hello says role \(theirs.role)") }
            if theirs.methods.map(\.methodID).sorted() != FuzzServer.methodIDs.sorted() { model.fail("the server's Hello lists \(theirs.methods.map(\.methodID))") }
        } catch {
            model.fail("no Hello from the server: \(error)")
            return finish()
        }
        // Only a weak reference: the session must go away once its connection has closed.
        guard blockingWait({ blockingOnLoop(reactor, { [accepted] in accepted.sessions.count }) == before + 1 }),
            let weak = blockingOnLoop(reactor, { [accepted] in WeakSession(accepted.sessions[before]) })
        else {
            model.fail("the server did not accept the connection as one session")
            return finish()
        }

        if case .tcp = address { Sys.setNoDelay(peer.fd) }
        /// Frames are written a batch at a time (one write per round trip, as a client's
        /// transport does): many small writes would meet Nagle's algorithm on TCP.
        var unsent: [UInt8] = []
        func push(_ bytes: [UInt8]) { unsent += bytes }
        func flushOut() {
            guard !unsent.isEmpty else { return }
            if builder.random.chance(5) && unsent.count > 1 {
                // In pieces, a little apart: the server reads frames cut anywhere.
                var start = 0
                while start < unsent.count {
                    let end = min(unsent.count, start + builder.random.int(1...max(1, unsent.count / 2)))
                    peer.write(Array(unsent[start..<end]))
                    start = end
                    usleep(UInt32(builder.random.int(0...300)))
                }
            } else {
                peer.write(unsent)
            }
            unsent.removeAll(keepingCapacity: true)
        }

        /// Sends what is pending, then reads and checks frames until `done` holds; false when
        /// the connection closed first (or nothing came for 5 s, which is recorded).
        var closed = false
        func read(until done: () -> Bool, _ what: String) -> Bool {
            flushOut()
            let deadline = ContinuousClock.now + .seconds(5)
            while !done() {
                guard !closed else { return false }
                let remaining = deadline - ContinuousClock.now
                guard remaining > .zero else {
                    model.fail("nothing more from the server within 5 s while waiting for \(what)")
                    return false
                }
                do {
                    switch try peer.next(timeout: remaining) {
                    case .frame(let frame): model.observe(frame)
                    case .closed: closed = true
                    }
                } catch {
                    model.fail("nothing more from the server within 5 s while waiting for \(what)")
                    return false
                }
            }
            return true
        }
        var markers: UInt64 = 0
        func roundTrip(_ what: String) -> Bool {
            markers += 1
            let marker: [UInt8] = [0xA5, 0x5A] + withUnsafeBytes(of: markers.littleEndian) { Array($0.prefix(6)) }
            model.sendMarker(marker)
            let descriptor = builder.control(ControlVerb.ping.rawValue, builder.takeMessageID())
            push(FuzzFrame(descriptor: descriptor, payload: marker, summary: "marker").wireBytes(&builder.random))
            return read(until: { model.pongsSettled }, what)
        }
        func send(_ frame: FuzzFrame, index: Int) -> FuzzOutcome {
            model.context = "seed \(hex) frame #\(index) [\(frame.summary)]"
            report.trace.append("#\(index) \(frame.summary)")
            let outcome = model.apply(frame.descriptor, frame.payload, index: index, now: Sys.monotonicNanoseconds())
            push(frame.wireBytes(&builder.random))
            report.framesSent += 1
            return outcome
        }

        // The body: frames that keep the connection up, in batches, each batch followed by a
        // marker Ping whose Pong proves the server has read (and answered) all of it.
        var index = 0
        body: while index < framesPerSeed {
            guard ContinuousClock.now - started < .seconds(30) else {
                model.fail("the seed ran out of time after \(index) frames")
                break
            }
            for _ in 0..<builder.random.int(1...24) where index < framesPerSeed {
                let frame = builder.bodyFrame()
                let outcome = send(frame, index: index)
                index += 1
                if outcome != .carryOn {
                    model.fail("fuzzer bug: a body frame would end the connection (\(outcome))")
                    break body
                }
                // The server may have refused a channel for its limit: learn which before going on.
                if model.admissionPending { break }
            }
            model.context = "seed \(hex) after frame #\(index - 1)"
            guard roundTrip("the marker after frame #\(index - 1)") else {
                if closed { model.fail("the server closed the connection, though no frame up to #\(index - 1) asks it to") }
                break
            }
            if builder.random.chance(4) {
                // A pause, reading what comes meanwhile: timers get their turn (deadlines, the
                // 50 ms wait of a stream item larger than all credit, sleeping handlers).
                let pause = Duration.milliseconds(builder.random.int(10...80))
                report.trace.append("(pause \(pause))")
                let until = ContinuousClock.now + pause
                while !closed, case let remaining = until - ContinuousClock.now, remaining > .zero {
                    guard case .frame(let frame) = try? peer.next(timeout: remaining) else {
                        if ContinuousClock.now < until { closed = true }  // EOF, not the pause's end
                        break
                    }
                    model.observe(frame)
                }
                if closed {
                    model.fail("the server closed the connection during a pause, though no frame up to #\(index - 1) asks it to")
                    break
                }
            }
        }

        // The ending.
        var expectedProtocolErrors: UInt64 = 0
        var mayBeClosed = false
        var mustClose = false
        var expectGoAway = false
        if !closed && model.failures.isEmpty {
            let (frame, raw) = builder.ending(ending)
            var outcome = FuzzOutcome.carryOn
            if let frame {
                outcome = send(frame, index: index)
            } else if let raw {
                model.context = "seed \(hex) frame #\(index) [\(ending)]"
                report.trace.append("#\(index) raw \(ending): \(raw.count) bytes")
                push(raw)
                report.framesSent += 1
            }
            switch ending {
            case .eof:
                break
            case .protocolError(let kind):
                let framing: [FuzzEnding.ProtocolErrorKind] = [.framingShortLength, .framingPayloadLengthMismatch, .framingOversized, .framingLongVarint]
                if !framing.contains(kind) {
                    if case .protocolError = outcome {} else { model.fail("fuzzer bug: the model does not take \(kind) for a protocol error (\(outcome))") }
                }
                expectedProtocolErrors = 1
                mustClose = true
                expectGoAway = true
            case .closeSession, .goAwayProtocolError:
                if outcome != .quietClose { model.fail("fuzzer bug: the model does not take \(ending) for a close (\(outcome))") }
                mustClose = true
            case .goAway:
                guard case .goAway(let must) = outcome else {
                    model.fail("fuzzer bug: the model does not take \(ending) for a GoAway (\(outcome))")
                    break
                }
                mustClose = must
                mayBeClosed = true
            case .serverShutdown:
                // Every frame sent so far was read (the last batch ended with a round trip).
                let reason = builder.random.pick([GoAwayReason.shutdown, .maintenance, .overload])
                model.serverShutsDown(reason, "fuzz shutdown")
                _ = blockingOnLoop(reactor) { weak.session?.shutdownGracefully(grace: .milliseconds(100), reason: reason, message: "fuzz shutdown") }
                // More frames meanwhile: new channels are refused, calls in flight go on; the
                // session closes once nothing is in flight, or when the grace ends.
                for _ in 0..<builder.random.int(0...3) where !closed {
                    for _ in 0..<builder.random.int(1...12) {
                        index += 1
                        _ = send(builder.bodyFrame(), index: index)
                    }
                    _ = roundTrip("the marker after frame #\(index) (shutting down)")
                }
                _ = read(until: { false }, "the server to close after its grace period")
                if !closed { model.fail("the server did not close the connection after its grace period") }
                if model.shutdownGoAwayReceived == nil { model.fail("no GoAway from the server's shutdown") }
            case .truncatedFrame:
                expectedProtocolErrors = 1
                flushOut()
                shutdown(peer.fd, Int32(SHUT_WR))
                mustClose = true
            }
            if mustClose {
                _ = read(until: { false }, "the server to close the connection after \(ending)")
                if !closed { model.fail("the server did not close the connection after \(ending)") }
                if expectGoAway {
                    if let goAway = model.goAwayReceived {
                        if goAway.reason != .protocolError || goAway.message.isEmpty || goAway.lastChannelID != model.highest {
                            model.fail("GoAway \(goAway) after \(ending): expected reason protocolError, a message, last channel \(model.highest)")
                        }
                    } else {
                        model.fail("no GoAway(protocolError) before the close after \(ending)")
                    }
                } else if let goAway = model.goAwayReceived {
                    model.fail("a GoAway \(goAway) after \(ending), which asks for a close without one")
                }
            }
        } else if closed {
            expectedProtocolErrors = model.goAwayReceived == nil ? 0 : 1
        }

        // A well-formed call on the fuzzed connection is still answered, and every unary call
        // the server took is answered too.
        if !closed && model.failures.isEmpty {
            model.context = "seed \(hex) probe"
            if model.channelLimit != nil && !closed {
                // The probe must not meet the limit: answer the calls owed, then cancel what is open.
                _ = read(until: { model.unansweredCalls.isEmpty }, "the answers to every call taken")
                for channel in model.liveChannels {
                    index += 1
                    _ = send(FuzzFrame(descriptor: builder.control(ControlVerb.cancelChannel.rawValue, builder.takeMessageID()), payload: CancelChannel(channelID: channel.id, reason: .clientCancel).encoded(), summary: "CancelChannel(\(channel.id)) before the probe"), index: index)
                }
                _ = roundTrip("the cancels before the probe")
            }
            if model.highest < UInt32.max - 2 && !closed {
                let probe = model.highest == 0 ? 1 : model.highest + 2
                let open = FuzzFrame(descriptor: builder.control(ControlVerb.openChannel.rawValue, builder.takeMessageID()), payload: OpenChannel(channelID: probe, kind: .call).encoded(), summary: "probe OpenChannel(\(probe))")
                let call = FuzzFrame(
                    descriptor: FrameDescriptor(messageID: builder.takeMessageID(), channelID: probe, methodID: EchoMethods.add.id, flags: [.data, .endOfStream]),
                    payload: FuzzMethod.encoded { $0.writeZigZag(20); $0.writeZigZag(22) }, summary: "probe Echo.add(20, 22)")
                _ = send(open, index: index + 1)
                _ = send(call, index: index + 2)
                let answered = read(until: { model.channels[probe]?.terminalSeen == true }, "the answer to the probe call on channel \(probe)")
                if !answered && !(closed && mayBeClosed) {
                    model.fail("the probe call on channel \(probe) got no answer\(closed ? " (the connection closed)" : "")")
                }
            }
            if !closed {
                let unanswered = read(until: { model.unansweredCalls.isEmpty }, "the answers to every call taken")
                if !unanswered && !closed {
                    model.fail("calls never answered: \(model.unansweredCalls.map { "\($0.id) \($0.request!.methodName) (request #\($0.request!.frameIndex))" })")
                }
            }
            if !closed { _ = roundTrip("the final marker") }
            if closed && !mayBeClosed {
                model.fail("the server closed the connection before the fuzzer's EOF, though nothing asks it to")
            }
            if !closed {
                // A clean EOF: the server closes its side too.
                flushOut()
                shutdown(peer.fd, Int32(SHUT_WR))
                _ = read(until: { false }, "the server to close after EOF")
                if !closed { model.fail("the server did not close the connection after EOF") }
            }
        }

        // Whatever happened, the fuzzer hangs up now (a failure above skipped the clean EOF).
        if !closed { shutdown(peer.fd, Int32(SHUT_RDWR)) }

        // The server's session is closed and released.
        model.context = "seed \(hex) after the connection closed"
        let sessionClosed = blockingWait { blockingOnLoop(reactor, { weak.session?.phase == .closed }) == true }
        if !sessionClosed {
            model.fail("the server's session did not close (phase \(String(describing: blockingOnLoop(reactor, { weak.session?.phase }))))")
        } else if let state = blockingOnLoop(reactor, { [expectedProtocolErrors] () -> String in
            guard let session = weak.session else { return "gone from the accepted list" }
            var leftovers: [String] = []
            if !session.incoming.isEmpty { leftovers.append("\(session.incoming.count) incoming calls") }
            if !session.outgoing.isEmpty { leftovers.append("\(session.outgoing.count) outgoing calls") }
            if !session.spareIncoming.isEmpty { leftovers.append("\(session.spareIncoming.count) spare calls") }
            if !session.queuedUntilReady.isEmpty { leftovers.append("calls queued until ready (\(session.queuedUntilReady.bytes) bytes)") }
            if session.statistics.protocolErrors != expectedProtocolErrors {
                leftovers.append("\(session.statistics.protocolErrors) protocol errors counted, expected \(expectedProtocolErrors)")
            }
            return leftovers.joined(separator: ", ")
        }), !state.isEmpty {
            model.fail("the closed server session keeps: \(state)")
        }
        _ = blockingOnLoop(reactor) { [accepted] in accepted.sessions.removeAll { $0 === weak.session } }
        if !blockingWait({ weak.session == nil }) {
            model.fail("the server's session object outlived its connection by 5 s (a reference cycle or a task that never ends)")
        }
        return finish()
    }
}

// MARK: The fixtures around it

/// The server the fuzz attacks: Echo and ``FuzzSyncService`` served on a Unix socket or
/// TCP, a session per accepted connection, kept in ``accepted`` (so the test can inspect them).
final class FuzzServer: Sendable {
    let reactor: Reactor
    /// The bound address (TCP with its real port).
    let address: SocketAddress
    /// The limits every session enforces on what the peer opens.
    let limits: Limits
    let accepted: FuzzSessions
    private let listener: SendableBox<StreamListener>

    static var methodIDs: [UInt32] { EchoMethods.all.map(\.id) + [FuzzSyncService.add.id, FuzzSyncService.note.id] }

    /// Sessions accept at most `maxChannels` open calls of the peer (the default 8192 is
    /// never reached by the fuzz); stream items larger than all credit wait 50 ms for a grant;
    /// the sessions log nowhere (the fuzz makes hundreds of expected warnings).
    init(reactor: Reactor, address: SocketAddress, maxChannels: UInt32 = 8192) async throws {
        let limits = Limits(maxPayloadSize: 16 << 20, maxChannels: maxChannels, maxPendingCalls: maxChannels)
        let configuration = Session.Configuration(
            limits: limits, creditGrowthTimeout: .milliseconds(50), logger: LogCapture(countOnly: { _ in true }).logger(label: "fuzz"))
        let services: [any RPCService] = [EchoServer(DefaultEcho()), FuzzSyncService()]
        let accepted = FuzzSessions()
        let listener = try await onLoopThrowing(reactor) {
            SendableBox(try StreamListener(reactor: reactor, address: address) { transport in
                do {
                    let session = try Session(transport: transport, role: .acceptor, services: services, configuration: configuration)
                    accepted.sessions.append(session)
                    session.start { _ in }
                } catch {
                    transport.close(error: nil)
                }
            })
        }
        self.reactor = reactor
        self.limits = limits
        self.accepted = accepted
        self.listener = listener
        self.address = listener.value.address
    }

    /// Whether `deadline_ns` counts on this server's connections (Unix sockets share the clock).
    var sharesClock: Bool {
        if case .unix = address { return true }
        return false
    }

    /// Stops listening (removing a socket file) and forgets the sessions.
    func close() async {
        await onLoop(reactor) { [accepted, listener] in
            listener.value.close()
            accepted.sessions.removeAll()
        }
    }

    var allSessionsClosed: Bool {
        get async { await onLoop(reactor) { [accepted] in accepted.sessions.allSatisfy { $0.phase == .closed } } }
    }

    var registrationCount: Int {
        get async { await onLoop(reactor) { [reactor] in reactor.registrationCount } }
    }
}

/// A well-behaved client on a connection of its own, calling the server all along (a call
/// a millisecond): add, echo, and a countdown with a tiny window; any wrong answer or
/// failure is recorded.
final class HealthyCaller: Sendable {
    let calls = Locked(0)
    let failures = Locked<[String]>([])
    private let stopped = Locked(false)

    func run(_ session: Session, on reactor: Reactor) -> Task<Void, Never> {
        Task(executorPreference: reactor) { await self.loop(EchoClient(session)) }
    }

    func stop() { stopped.withLock { $0 = true } }

    private func record(_ failure: String) { failures.withLock { $0.append(failure) } }

    private func loop(_ echo: EchoClient) async {
        var call: Int32 = 0
        while !stopped.withLock({ $0 }) && call < 1_000_000 {
            call += 1
            do {
                let sum = try await echo.add(call, 1)
                if sum != call + 1 { record("healthy add(\(call), 1) = \(sum)") }
                if call % 5 == 0 {
                    let text = "healthy \(call)"
                    let echoed = try await echo.echo(text)
                    if echoed != text { record("healthy echo(\(text)) = \(echoed)") }
                }
                if call % 13 == 0 {
                    var items: [UInt32] = []
                    for try await item in echo.countdown(from: 6, options: CallOptions(streamWindow: 2)) { items.append(item) }
                    if items != [6, 5, 4, 3, 2, 1] { record("healthy countdown(6) = \(items)") }
                }
            } catch {
                record("healthy call #\(call) failed: \(error)")
                return
            }
            calls.withLock { $0 += 1 }
            try? await Task.sleep(for: .milliseconds(1))
        }
    }
}
