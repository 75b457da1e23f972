import EchoService
import RapaceTestSupport

@testable import Rapace

// The session fuzzer's pieces that know nothing about sockets: a replayable random source,
// the methods it calls (Echo, and a synchronous service for the inline path), the frames it
// builds, and the model of what a spec-abiding acceptor must answer to them.

// MARK: Random source

/// SplitMix64: the whole state is the seed, so a seed replays the same sequence of choices
/// (only the `deadline_ns` values read the clock).
struct FuzzRandom {
    private var generator: SplitMix64

    init(seed: UInt64) { generator = SplitMix64(seed: seed) }

    mutating func next() -> UInt64 { generator.next() }

    /// 0..<n (n > 0).
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    mutating func int(_ range: ClosedRange<Int>) -> Int { range.lowerBound + below(range.count) }
    mutating func u32() -> UInt32 { UInt32(truncatingIfNeeded: next()) }
    /// True `percent` times in 100.
    mutating func chance(_ percent: Int) -> Bool { below(100) < percent }
    mutating func pick<T>(_ choices: [T]) -> T { choices[below(choices.count)] }
    mutating func bytes(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8(truncatingIfNeeded: next()) } }

    /// Picks an index by weight.
    mutating func weighted(_ weights: [Int]) -> Int {
        var roll = below(weights.reduce(0, +))
        for (index, weight) in weights.enumerated() {
            if roll < weight { return index }
            roll -= weight
        }
        return weights.count - 1
    }

    /// `bytes` changed the way a broken or hostile encoder would: a bit flipped, a byte
    /// replaced, cut short, extended, or replaced entirely.
    mutating func mutate(_ bytes: [UInt8]) -> [UInt8] {
        var out = bytes
        switch below(6) {
        case 0 where !out.isEmpty:
            let index = below(out.count)
            out[index] ^= UInt8(1) << UInt8(below(8))
        case 1 where !out.isEmpty:
            out[below(out.count)] = UInt8(truncatingIfNeeded: next())
        case 2 where !out.isEmpty:
            out.removeLast(int(1...out.count))
        case 3:
            out += self.bytes(int(1...4))
        case 4 where !out.isEmpty:
            out.insert(UInt8(truncatingIfNeeded: next()), at: below(out.count + 1))
        default:
            out = self.bytes(below(12))
        }
        return out
    }
}

// MARK: A synchronous service

/// Served next to Echo so the fuzz reaches the inline path (`handleImmediately`, answered
/// without a task, and the recycling of answered calls): `FuzzSync.add` (Echo.add's bytes)
/// and the notification `FuzzSync.note` (a varint), both synchronous.
struct FuzzSyncService: RPCService {
    static let add = MethodDescriptor(service: "FuzzSync", method: "add", kind: .unary)
    static let note = MethodDescriptor(service: "FuzzSync", method: "note", kind: .notification)

    var methods: [MethodDescriptor] { [Self.add, Self.note] }

    func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
        switch method {
        case Self.add.id:
            let (a, b) = try request.decode { (try $0.decode(Int32.self), try $0.decode(Int32.self)) }
            return Payload.encoding { $0.writeZigZag(Int64(a &+ b)) }
        case Self.note.id:
            _ = try request.decode { try $0.readVarint64() }
            return .empty
        default:
            return nil
        }
    }

    func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        throw RPCError(.internal, "FuzzSync serves every method synchronously")
    }
}

// MARK: Methods

/// What the fuzzer knows about a method it calls: how to build valid arguments, which
/// arguments keep the work bounded, and what the server must answer.
struct FuzzMethod: Sendable {
    let descriptor: MethodDescriptor
    /// Served by `handleImmediately`: answered while the request is processed.
    let synchronous: Bool
    let validArguments: @Sendable (inout FuzzRandom) -> [UInt8]
    /// Whether a call with these arguments does bounded work (mutated arguments can ask
    /// Echo for a 4-billion-item countdown or a 49-day sleep; such calls are not sent).
    let bounded: @Sendable ([UInt8]) -> Bool
    /// The answer to these arguments when the handler runs.
    let answer: @Sendable ([UInt8]) -> Answer

    /// What a handler answers.
    struct Answer: Sendable {
        var code: StatusCode
        /// The body of an OK unary answer.
        var body: [UInt8] = []
        /// The message an error carries (Echo.fail's own message).
        var message: String?
        /// A countdown's first item (`n`, then `n − 1`, … `1`).
        var countdownFrom: UInt32?
    }

    static func decoded<T>(_ bytes: [UInt8], _ body: (inout PostcardReader) throws -> T) -> T? {
        try? Payload(bytes).decode(body)
    }

    static func encoded(_ body: (inout PostcardWriter) -> Void) -> [UInt8] { Payload.encoding(body).bytes }

    static func randomString(_ random: inout FuzzRandom) -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz0123456789 -é✓")
        return String((0..<random.below(40)).map { _ in random.pick(alphabet) })
    }

    static func randomInt32(_ random: inout FuzzRandom) -> Int32 {
        random.chance(20) ? random.pick([Int32.min, Int32.max, 0, -1, 1]) : Int32(truncatingIfNeeded: random.next() % 2000) - 1000
    }

    static func addArguments(_ random: inout FuzzRandom) -> [UInt8] {
        let (a, b) = (randomInt32(&random), randomInt32(&random))
        return encoded { $0.writeZigZag(Int64(a)); $0.writeZigZag(Int64(b)) }
    }

    static func addAnswer(_ bytes: [UInt8]) -> Answer {
        guard let (a, b) = decoded(bytes, { (try $0.decode(Int32.self), try $0.decode(Int32.self)) }) else { return Answer(code: .invalidArgument) }
        return Answer(code: .ok, body: encoded { $0.writeZigZag(Int64(a &+ b)) })
    }

    static func varint32(_ bytes: [UInt8]) -> UInt32? { decoded(bytes) { try $0.readVarint32() } }

    static let all: [FuzzMethod] = [
        FuzzMethod(
            descriptor: EchoMethods.echo, synchronous: false,
            validArguments: { random in let text = randomString(&random); return encoded { $0.writeString(text) } },
            bounded: { _ in true },
            answer: { bytes in
                guard let text = decoded(bytes, { try $0.readString() }) else { return Answer(code: .invalidArgument) }
                return Answer(code: .ok, body: encoded { $0.writeString(text) })
            }),
        FuzzMethod(descriptor: EchoMethods.add, synchronous: false, validArguments: addArguments, bounded: { _ in true }, answer: addAnswer),
        FuzzMethod(
            descriptor: EchoMethods.fail, synchronous: false,
            validArguments: { random in
                let code = random.chance(70) ? random.pick([0, 1, 3, 9, 13, 50, 404, 999]) : random.u32()
                let message = randomString(&random)
                return encoded { $0.writeVarint(UInt64(code)); $0.writeString(message) }
            },
            bounded: { _ in true },
            answer: { bytes in
                guard let (code, message) = decoded(bytes, { (try $0.readVarint32(), try $0.readString()) }) else { return Answer(code: .invalidArgument) }
                // A handler cannot fail with OK: the session answers UNKNOWN.
                return code == 0 ? Answer(code: .unknown) : Answer(code: StatusCode(rawValue: code), message: message)
            }),
        FuzzMethod(
            descriptor: EchoMethods.countdown, synchronous: false,
            validArguments: { random in let from = UInt64(random.int(0...20)); return encoded { $0.writeVarint(from) } },
            bounded: { bytes in (varint32(bytes) ?? 0) <= 300 },
            answer: { bytes in
                guard let from = varint32(bytes) else { return Answer(code: .invalidArgument) }
                return Answer(code: .ok, countdownFrom: from)
            }),
        FuzzMethod(
            descriptor: EchoMethods.checksum, synchronous: false,
            validArguments: { random in
                // Now and then a large one: payloads past the inline 16 bytes, frames that
                // arrive in pieces, and the server's receive buffer growing and shrinking back.
                let size = random.chance(4) ? random.int(1000...300_000) : random.below(40)
                let data = random.bytes(size)
                return encoded { $0.writeByteArray(data) }
            },
            bounded: { _ in true },
            answer: { bytes in
                guard let data = decoded(bytes, { try $0.readByteArray() }) else { return Answer(code: .invalidArgument) }
                return Answer(code: .ok, body: encoded { $0.writeVarint(MethodID.fnv1a64(data)) })
            }),
        FuzzMethod(
            descriptor: EchoMethods.sleep, synchronous: false,
            validArguments: { random in let ms = UInt64(random.int(0...30)); return encoded { $0.writeVarint(ms) } },
            bounded: { bytes in (varint32(bytes) ?? 0) <= 200 },
            answer: { bytes in varint32(bytes) == nil ? Answer(code: .invalidArgument) : Answer(code: .ok) }),
        FuzzMethod(
            descriptor: EchoMethods.blob, synchronous: false,
            validArguments: { random in let size = UInt64(random.int(0...64)); return encoded { $0.writeVarint(size) } },
            bounded: { bytes in (varint32(bytes) ?? 0) <= 4096 },
            answer: { bytes in
                guard let size = varint32(bytes) else { return Answer(code: .invalidArgument) }
                let blob = (0..<Int(size)).map { UInt8($0 % 251) }
                return Answer(code: .ok, body: encoded { $0.writeByteArray(blob) })
            }),
        FuzzMethod(descriptor: FuzzSyncService.add, synchronous: true, validArguments: addArguments, bounded: { _ in true }, answer: addAnswer),
        FuzzMethod(
            descriptor: FuzzSyncService.note, synchronous: true,
            validArguments: { random in let value = random.next() >> random.below(64); return encoded { $0.writeVarint(value) } },
            bounded: { _ in true },
            answer: { bytes in decoded(bytes, { try $0.readVarint64() }) == nil ? Answer(code: .invalidArgument) : Answer(code: .ok) }),
    ]

    static let byID: [UInt32: FuzzMethod] = Dictionary(uniqueKeysWithValues: all.map { ($0.descriptor.id, $0) })
}

// MARK: The model

/// How soon a call's deadline comes, as far as the fuzzer can tell when it sends it.
enum FuzzDeadline: Int, Comparable {
    /// No deadline.
    case none
    /// Later than the test can run (a minute and more): it never fires here.
    case never
    /// Soon: the call may or may not see it pass.
    case maybe
    /// Already passed when the request is read.
    case past

    static func < (a: FuzzDeadline, b: FuzzDeadline) -> Bool { a.rawValue < b.rawValue }

    /// A metadata budget (`rapace.deadline_remaining_ms`), counted from the OpenChannel.
    init(remainingMilliseconds ms: UInt32) {
        self = ms == 0 ? .past : (ms > 60_000 ? .never : .maybe)
    }

    /// A `deadline_ns` sent when the clock read `now` (the server reads it later).
    init(deadlineNanoseconds deadline: UInt64, sentAt now: UInt64) {
        if deadline == FrameDescriptor.noDeadline {
            self = .none
        } else if deadline <= now {
            self = .past
        } else {
            self = deadline - now > 60_000_000_000 ? .never : .maybe
        }
    }
}

/// A channel the fuzzer opened and the server accepted.
final class FuzzChannel {
    enum State {
        /// Open, no request yet: certainly in the server's table.
        case awaitingRequest
        /// The request was taken and a handler runs, or has finished without the fuzzer
        /// seeing it yet (a notification's never shows).
        case running
        /// Certainly gone from the server's table.
        case ended
    }

    /// The request the server took on the channel, and what it must answer.
    struct Request {
        let frameIndex: Int
        let messageID: UInt64
        let methodID: UInt32
        let noReply: Bool
        /// Status codes the terminal may carry.
        var codes: Set<StatusCode>
        /// The body an OK unary answer carries.
        var body: [UInt8]?
        var message: String?
        var countdownFrom: UInt32?
        /// The terminal is sent while the request is processed (before the next Pong).
        var synchronous: Bool
        let methodName: String
    }

    let id: UInt32
    let kind: ChannelKind
    let openedAt: Int
    /// The deadline from the OpenChannel's metadata.
    let metadataDeadline: FuzzDeadline
    var state = State.awaitingRequest
    /// An upper bound of the credit the server may have received for the channel: its
    /// initial credits and every grant sent while it could be open (nil: no flow control).
    var creditBound: UInt64?
    var request: Request?
    /// The server has read a frame that ends its interest in the channel (a cancel, a
    /// close, a second request) and answered a Ping sent after it: nothing may come after.
    var sealed = false
    var terminalSeen = false
    var itemBytes: UInt64 = 0
    var itemsSeen: UInt32 = 0

    init(id: UInt32, kind: ChannelKind, openedAt: Int, metadataDeadline: FuzzDeadline, creditBound: UInt64?) {
        self.id = id
        self.kind = kind
        self.openedAt = openedAt
        self.metadataDeadline = metadataDeadline
        self.creditBound = creditBound
    }

    /// Whether the server may still hold the channel (and honour grants on it).
    var mayBeOpen: Bool { state != .ended }
}

/// What the server must do after reading a frame, for the connection as a whole.
enum FuzzOutcome: Equatable {
    /// Carry on.
    case carryOn
    /// A connection-level protocol error: GoAway(protocolError), then close.
    case protocolError(String)
    /// The peer ended the session (CloseChannel 0, GoAway protocolError): close, sending nothing.
    case quietClose
    /// The peer sent GoAway: close once nothing is in flight; `mustClose` when nothing is.
    case goAway(mustClose: Bool)
}

/// The fuzzer's model of the acceptor it attacks, written from the spec and
/// Docs/protocol-notes.md: which channels are open, which answers the server owes, may
/// send, or must never send. ``apply(_:_:index:now:)`` feeds it each frame sent; the
/// ``observe`` methods check each frame received. Violations go to ``failures``.
final class SessionFuzzModel {
    /// Channels the server accepted, by id.
    private(set) var channels: [UInt32: FuzzChannel] = [:]
    /// The highest channel id the server accepted.
    private(set) var highest: UInt32 = 0
    /// The gaps between accepted ids, in order (ids never opened, below `highest`).
    private var gaps: [ClosedRange<UInt32>] = []
    /// Whether the server enforces credit (the fuzzer's Hello supports flow control).
    let creditFlowControl: Bool
    /// The largest payload the server may send (the effective max payload).
    let maxPayload: Int

    /// CancelChannel frames the server must send before the next Pong, and may send.
    private var mustCancels: [CancelChannel] = []
    private var mayCancels: [CancelChannel] = []
    /// Pong payloads owed, in order (the fuzzer's Pings and its markers).
    private var pongsOwed: [[UInt8]] = []
    /// Channels whose terminal is owed before the next Pong.
    private var terminalsOwed: Set<UInt32> = []
    /// Channels ended by frames since the last marker; sealed once its Pong comes back.
    private var endedSinceMarker: [UInt32] = []
    private var sealsByMarker: [[UInt8]: [UInt32]] = [:]
    /// The server's last msg_id on a frame that is not a response (its Hello's is 1).
    private var serverMessageID: UInt64 = 1
    /// The GoAway(protocolError) the server sent, if it did.
    private(set) var goAwayReceived: GoAway?
    /// Set when the server begins a graceful shutdown (the driver asks it to): the GoAway it
    /// owes, whose last channel is the highest the fuzzer had opened.
    private(set) var serverShutdown: GoAway?
    /// The server's shutdown GoAway, once received.
    private(set) var shutdownGoAwayReceived: GoAway?

    /// The server begins a graceful shutdown now, having read every frame sent so far: it
    /// sends GoAway(`reason`, highest, `message`) and refuses every channel opened after it.
    func serverShutsDown(_ reason: GoAwayReason, _ message: String) {
        serverShutdown = GoAway(reason: reason, lastChannelID: highest, message: message)
    }
    /// What went wrong, each naming the seed and the frame.
    private(set) var failures: [String] = []
    /// Set by the driver: the seed and the index of the frame last sent, for messages.
    var context = ""
    /// What the server sent, by kind (terminals by status), for the run's summary: shows
    /// which paths the fuzz reached.
    private(set) var seen: [String: Int] = [:]

    /// Whether `deadline_ns` counts (the server's transport shares the clock: Unix sockets).
    let sharesClock: Bool
    /// The server's limit on the peer's open calls, when the fuzz can reach it.
    let channelLimit: Int?
    /// Channels accepted by id whose admission under ``channelLimit`` the server decided
    /// without the fuzzer knowing: refused (CancelChannel(resourceExhausted)) if enough of the
    /// calls it counts as open were still running. Settled at the next marker's Pong.
    private var admissions: [UInt32] = []
    /// An admission waits to be settled: the driver ends the batch (a frame aimed at that
    /// channel would have two answers).
    var admissionPending: Bool { !admissions.isEmpty }

    init(creditFlowControl: Bool, maxPayload: Int, sharesClock: Bool = true, channelLimit: Int? = nil) {
        self.creditFlowControl = creditFlowControl
        self.maxPayload = maxPayload
        self.sharesClock = sharesClock
        self.channelLimit = channelLimit
    }

    func fail(_ message: String) {
        failures.append("\(context): \(message)")
    }

    // MARK: What the fuzzer can aim at

    var liveChannels: [FuzzChannel] { channels.values.filter(\.mayBeOpen).sorted { $0.id < $1.id } }
    var awaitingChannels: [FuzzChannel] { channels.values.filter { $0.state == .awaitingRequest }.sorted { $0.id < $1.id } }
    var allChannelIDs: [UInt32] { channels.keys.sorted() }
    var gapSample: UInt32? { gaps.last.map { $0.lowerBound } }
    /// Calls the server owes an answer: a handler runs (not cancelled, not a notification),
    /// unary, or a countdown granted all the credit its items need (nothing can hold it up).
    var unansweredCalls: [FuzzChannel] {
        channels.values.filter { channel in
            guard channel.state == .running, !channel.terminalSeen, let request = channel.request, !request.noReply else { return false }
            if channel.kind == .call { return true }
            guard let from = request.countdownFrom else { return false }
            let needed = (1...max(from, 1)).reduce(UInt64(0)) { $0 + UInt64(PostcardWriter.varintSize(UInt64($1))) }
            return channel.creditBound.map { $0 >= needed } ?? true
        }.sorted { $0.id < $1.id }
    }

    // MARK: Frames sent

    /// Feeds the model one frame as the server will read it, returning what the server must
    /// do with the connection. `now` is the clock when the frame was built.
    func apply(_ descriptor: FrameDescriptor, _ payload: [UInt8], index: Int, now: UInt64) -> FuzzOutcome {
        if descriptor.channelID == 0 {
            guard descriptor.flags.contains(.control) else { return .protocolError("frame on channel 0 without CONTROL") }
            return applyControl(descriptor.methodID, payload, index: index)
        }
        if descriptor.flags.contains(.control) { return .protocolError("CONTROL on channel \(descriptor.channelID)") }
        // The server makes no calls of its own: any response is for an unknown channel, dropped.
        if descriptor.flags.contains(.response) { return .carryOn }
        applyRequest(descriptor, payload, index: index, now: now)
        return .carryOn
    }

    private func applyControl(_ verb: UInt32, _ payload: [UInt8], index: Int) -> FuzzOutcome {
        switch verb {
        case ControlVerb.hello.rawValue:
            return .protocolError("second Hello")
        case ControlVerb.openChannel.rawValue:
            guard let open = try? OpenChannel(decoding: payload) else { return .protocolError("undecodable OpenChannel") }
            applyOpen(open, index: index)
        case ControlVerb.closeChannel.rawValue:
            guard let close = try? CloseChannel(decoding: payload) else { return .protocolError("undecodable CloseChannel") }
            if close.channelID == 0 { return .quietClose }
            endByPeer(close.channelID)
        case ControlVerb.cancelChannel.rawValue:
            guard let cancel = try? CancelChannel(decoding: payload) else { return .protocolError("undecodable CancelChannel") }
            endByPeer(cancel.channelID)
        case ControlVerb.grantCredits.rawValue:
            guard let grant = try? GrantCredits(decoding: payload) else { return .protocolError("undecodable GrantCredits") }
            if let channel = channels[grant.channelID], channel.mayBeOpen { addCredit(UInt64(grant.bytes), to: channel) }
        case ControlVerb.ping.rawValue:
            guard payload.count == 8 else { return .protocolError("Ping of \(payload.count) bytes") }
            pongsOwed.append(payload)
        case ControlVerb.pong.rawValue:
            guard payload.count == 8 else { return .protocolError("Pong of \(payload.count) bytes") }
        case ControlVerb.goAway.rawValue:
            guard let goAway = try? GoAway(decoding: payload) else { return .protocolError("undecodable GoAway") }
            if goAway.reason == .protocolError { return .quietClose }
            return .goAway(mustClose: channels.values.allSatisfy { $0.state == .ended })
        case 8..<100:
            return .protocolError("unknown control verb \(verb)")
        default:
            break  // 100 and up: ignored
        }
        return .carryOn
    }

    private func applyOpen(_ open: OpenChannel, index: Int) {
        let id = open.channelID
        // The fuzzer is the initiator: odd ids, strictly increasing.
        guard id != 0, id % 2 == 1, id > highest else {
            seen["(sent) OpenChannel refused", default: 0] += 1
            mustCancels.append(CancelChannel(channelID: id, reason: .protocolViolation))
            return
        }
        let first: UInt32 = highest == 0 ? 1 : highest + 2
        if first < id { gaps.append(first...(id - 2)) }
        highest = id
        if let last = serverShutdown?.lastChannelID, id > last {
            // Spec 6.4: a channel above the GoAway's last channel is refused.
            mustCancels.append(CancelChannel(channelID: id, reason: .resourceExhausted))
            return
        }
        var deadline = FuzzDeadline.none
        if let entry = open.metadata.first(where: { $0.key == Session.deadlineMetadataKey }), entry.value.count == 4 {
            let ms = UInt32(entry.value[0]) | UInt32(entry.value[1]) << 8 | UInt32(entry.value[2]) << 16 | UInt32(entry.value[3]) << 24
            deadline = FuzzDeadline(remainingMilliseconds: ms)
        }
        // The server counts the calls still in its table; the model, those that may be.
        if let limit = channelLimit, channels.values.filter(\.mayBeOpen).count >= limit {
            mayCancels.append(CancelChannel(channelID: id, reason: .resourceExhausted))
            admissions.append(id)
        }
        channels[id] = FuzzChannel(
            id: id, kind: open.kind, openedAt: index, metadataDeadline: deadline,
            creditBound: creditFlowControl ? UInt64(open.initialCredits) : nil)
    }

    /// The server keeps at most 64 gaps (Docs/protocol-notes.md): a frame on an id in an
    /// older one is taken for a late frame. Nil when the id is in no gap.
    private func gapIsRemembered(_ id: UInt32) -> Bool? {
        guard let index = gaps.lastIndex(where: { $0.contains(id) }) else { return nil }
        return index >= gaps.count - SkippedChannels.limit
    }

    private func endByPeer(_ id: UInt32) {
        guard let channel = channels[id], channel.mayBeOpen else { return }
        channel.state = .ended
        endedSinceMarker.append(id)
    }

    private func addCredit(_ bytes: UInt64, to channel: FuzzChannel) {
        if let bound = channel.creditBound { channel.creditBound = bound + bytes }
    }

    private func applyRequest(_ descriptor: FrameDescriptor, _ payload: [UInt8], index: Int, now: UInt64) {
        let id = descriptor.channelID
        let flags = descriptor.flags
        guard let channel = channels[id], channel.mayBeOpen else {
            // Not (or no longer) in the server's table.
            if id % 2 == 1, id <= highest {
                switch gapIsRemembered(id) {
                case nil, false?: return  // a late frame on an ended channel: dropped
                case true?: break
                }
            }
            seen["(sent) frame on a channel never opened", default: 0] += 1
            mustCancels.append(CancelChannel(channelID: id, reason: .protocolViolation))
            return
        }
        if flags.contains(.credits) {
            addCredit(UInt64(descriptor.creditGrant), to: channel)
            if !flags.contains(.data) { return }  // a grant only
        }
        if channel.state == .running {
            // A second request: abandoned if still running (CancelChannel), dropped if finished.
            seen["(sent) second request", default: 0] += 1
            mayCancels.append(CancelChannel(channelID: id, reason: .protocolViolation))
            channel.state = .ended
            endedSinceMarker.append(id)
            return
        }
        let noReply = flags.contains(.noReply)
        let method = FuzzMethod.byID[descriptor.methodID]
        let name = method?.descriptor.fullName ?? "0x\(String(descriptor.methodID, radix: 16))"
        func settle(_ codes: Set<StatusCode>, body: [UInt8]? = nil, message: String? = nil, countdownFrom: UInt32? = nil, synchronous: Bool) {
            channel.request = FuzzChannel.Request(
                frameIndex: index, messageID: descriptor.messageID, methodID: descriptor.methodID, noReply: noReply,
                codes: codes, body: body, message: message, countdownFrom: countdownFrom, synchronous: synchronous, methodName: name)
            channel.state = synchronous ? .ended : .running
            if synchronous && !noReply { terminalsOwed.insert(id) }
        }
        guard let method else {
            settle([.unimplemented], synchronous: true)
            return
        }
        let kindMatches: Bool
        switch (method.descriptor.kind, channel.kind) {
        case (.serverStream, .stream), (.unary, .call), (.notification, .call): kindMatches = true
        default: kindMatches = false
        }
        guard kindMatches else {
            settle([.invalidMethod], synchronous: true)
            return
        }
        // `deadline_ns` counts where the transport shares the clock; the earlier deadline wins.
        let wire = sharesClock ? FuzzDeadline(deadlineNanoseconds: descriptor.deadlineNanoseconds, sentAt: now) : .none
        let deadline = max(channel.metadataDeadline, wire)
        if deadline == .past {
            settle([.deadlineExceeded], synchronous: true)
            return
        }
        let answer = method.answer(payload)
        var codes: Set<StatusCode> = [answer.code]
        if deadline == .maybe { codes.insert(.deadlineExceeded) }
        if answer.code == .ok, method.descriptor.kind == .unary, answer.body.count + 16 > maxPayload {
            codes.insert(.resourceExhausted)  // a result the peer could not take is refused
        }
        if answer.countdownFrom != nil {
            // An item larger than all credit granted so far waits creditGrowthTimeout, then fails.
            codes.insert(.resourceExhausted)
        }
        settle(
            codes, body: method.descriptor.kind == .unary ? answer.body : nil, message: answer.message,
            countdownFrom: answer.countdownFrom, synchronous: method.synchronous)
    }

    /// Records a marker Ping (sent after a batch): its Pong proves the server read the batch.
    func sendMarker(_ payload: [UInt8]) {
        pongsOwed.append(payload)
        sealsByMarker[payload] = endedSinceMarker
        endedSinceMarker.removeAll()
    }

    /// Whether every Pong owed has come back.
    var pongsSettled: Bool { pongsOwed.isEmpty }

    // MARK: Frames received

    /// Checks one frame from the server.
    func observe(_ frame: Frame) {
        let descriptor = frame.descriptor
        let payload = frame.payload.bytes
        if payload.count > maxPayload {
            fail("the server sent a payload of \(payload.count) bytes, above the max payload \(maxPayload) the fuzzer advertised (channel \(descriptor.channelID), method 0x\(String(descriptor.methodID, radix: 16)))")
        }
        if goAwayReceived != nil {
            fail("the server sent a frame after its GoAway: channel \(descriptor.channelID) flags \(descriptor.flags)")
        }
        if !descriptor.flags.contains(.response) {
            // Spec 1.3: every frame that is not a response takes the sender's next msg_id.
            if descriptor.messageID != serverMessageID + 1 {
                fail("server msg_id \(descriptor.messageID) after \(serverMessageID) (channel \(descriptor.channelID), method \(descriptor.methodID))")
            }
            serverMessageID = descriptor.messageID
        }
        if descriptor.channelID == 0 {
            observeControl(descriptor, payload)
        } else {
            observeResponse(descriptor, payload)
        }
    }

    private func observeControl(_ descriptor: FrameDescriptor, _ payload: [UInt8]) {
        guard descriptor.flags == .control else {
            fail("control frame with flags \(descriptor.flags) (expected exactly CONTROL)")
            return
        }
        switch descriptor.methodID {
        case ControlVerb.cancelChannel.rawValue:
            guard let cancel = try? CancelChannel(decoding: payload) else {
                fail("undecodable CancelChannel from the server: \(payload)")
                return
            }
            seen["CancelChannel(\(cancel.reason))", default: 0] += 1
            if let index = mustCancels.firstIndex(of: cancel) {
                mustCancels.remove(at: index)
            } else if let index = mayCancels.firstIndex(of: cancel) {
                mayCancels.remove(at: index)
            } else {
                fail("unexpected CancelChannel(\(cancel.channelID), \(cancel.reason))")
            }
        case ControlVerb.pong.rawValue:
            guard let owed = pongsOwed.first else {
                fail("Pong \(payload) for no Ping")
                return
            }
            guard owed == payload else {
                fail("Pong \(payload), expected \(owed) (Pongs out of order or altered)")
                return
            }
            pongsOwed.removeFirst()
            seen["Pong", default: 0] += 1
            if let sealed = sealsByMarker.removeValue(forKey: payload) {
                markerReturned(sealing: sealed)
            }
        case ControlVerb.goAway.rawValue:
            guard let goAway = try? GoAway(decoding: payload) else {
                fail("undecodable GoAway from the server: \(payload)")
                return
            }
            seen["GoAway(\(goAway.reason))", default: 0] += 1
            if goAway.reason == .protocolError {
                goAwayReceived = goAway
            } else if let owed = serverShutdown, shutdownGoAwayReceived == nil {
                shutdownGoAwayReceived = goAway
                if goAway != owed { fail("shutdown GoAway \(goAway), expected \(owed)") }
            } else {
                fail("unexpected GoAway \(goAway)")
            }
        default:
            fail("unexpected control verb \(descriptor.methodID) from the server (payload \(payload.count) bytes)")
        }
    }

    /// Everything the server read before a marker has been answered by now.
    private func markerReturned(sealing ended: [UInt32]) {
        for id in admissions {
            // The refusal is sent while the OpenChannel is read: by now it came, or never will.
            let refused = !mayCancels.contains(CancelChannel(channelID: id, reason: .resourceExhausted))
            if refused, let channel = channels[id] {
                channel.state = .ended
                channel.sealed = true
            }
            seen[refused ? "(sent) OpenChannel refused for the limit" : "(sent) OpenChannel admitted at the limit", default: 0] += 1
        }
        admissions.removeAll()
        for cancel in mustCancels {
            fail("no CancelChannel(\(cancel.channelID), \(cancel.reason)) before the Pong of the next marker")
        }
        mustCancels.removeAll()
        mayCancels.removeAll()
        for id in terminalsOwed.sorted() {
            let request = channels[id]?.request
            fail("no answer on channel \(id) (\(request?.methodName ?? "?"), request frame #\(request?.frameIndex ?? -1)) before the next Pong, though it is answered while the request is read")
        }
        terminalsOwed.removeAll()
        for id in ended { channels[id]?.sealed = true }
    }

    private func observeResponse(_ descriptor: FrameDescriptor, _ payload: [UInt8]) {
        let id = descriptor.channelID
        let what = "channel \(id) flags \(descriptor.flags)"
        guard descriptor.flags.isSuperset(of: [.data, .response]), !descriptor.flags.contains(.control) else {
            fail("\(what): a frame on a call channel must be DATA|RESPONSE")
            return
        }
        guard let channel = channels[id] else {
            fail("\(what): a response on a channel the server never accepted")
            return
        }
        guard let request = channel.request else {
            fail("\(what): a response on channel \(id), which carried no request")
            return
        }
        let context = "\(what) (\(request.methodName), request frame #\(request.frameIndex))"
        if request.noReply { fail("\(context): a response to a NO_REPLY request") }
        if channel.sealed { fail("\(context): a frame after the server read a cancel, close or second request for the channel") }
        if channel.terminalSeen { fail("\(context): a frame after the channel's terminal") }
        if descriptor.messageID != request.messageID || descriptor.methodID != request.methodID {
            fail("\(context): msg_id \(descriptor.messageID) / method 0x\(String(descriptor.methodID, radix: 16)), expected the request's \(request.messageID) / 0x\(String(request.methodID, radix: 16))")
        }
        if descriptor.flags.contains(.endOfStream) {
            observeTerminal(channel, request, descriptor, payload, context)
        } else {
            observeItem(channel, request, payload, context)
        }
    }

    private func observeTerminal(_ channel: FuzzChannel, _ request: FuzzChannel.Request, _ descriptor: FrameDescriptor, _ payload: [UInt8], _ context: String) {
        channel.terminalSeen = true
        channel.state = .ended
        terminalsOwed.remove(channel.id)
        guard let result = try? CallResult(decoding: payload) else {
            fail("\(context): undecodable CallResult \(payload)")
            return
        }
        let code = result.status.code
        seen["\(channel.kind == .stream ? "stream end" : "answer") \(code)", default: 0] += 1
        if descriptor.flags.contains(.error) != (code != .ok) {
            fail("\(context): ERROR flag \(descriptor.flags.contains(.error)) with status \(code)")
        }
        guard request.codes.contains(code) else {
            fail("\(context): status \(code) \"\(result.status.message)\", expected one of \(request.codes.map(\.description).sorted())")
            return
        }
        if code == .ok {
            if channel.kind == .stream {
                if result.body != nil { fail("\(context): a stream terminal with a body") }
                if let from = request.countdownFrom, channel.itemsSeen != from {
                    fail("\(context): the countdown from \(from) ended OK after \(channel.itemsSeen) items")
                }
            } else if let body = request.body, result.body != body {
                fail("\(context): body \(result.body.map { "\($0)" } ?? "nil"), expected \(body)")
            }
        } else {
            if result.body != nil { fail("\(context): an error (\(code)) with a body") }
            if let message = request.message, code != .deadlineExceeded, !result.status.message.hasSuffix("(truncated)"), result.status.message != message {
                fail("\(context): message \"\(result.status.message)\", expected \"\(message)\"")
            }
        }
    }

    private func observeItem(_ channel: FuzzChannel, _ request: FuzzChannel.Request, _ payload: [UInt8], _ context: String) {
        guard channel.kind == .stream, let from = request.countdownFrom else {
            fail("\(context): a stream item on a channel that serves no stream")
            return
        }
        seen["stream item", default: 0] += 1
        channel.itemBytes += UInt64(payload.count)
        if let bound = channel.creditBound, channel.itemBytes > bound {
            fail("\(context): \(channel.itemBytes) bytes of items, above the \(bound) bytes of credit granted at most")
        }
        let expected = from - min(channel.itemsSeen, from)
        channel.itemsSeen += 1
        let value = FuzzMethod.varint32(payload)
        if expected == 0 || value != expected {
            fail("\(context): item \(value.map(String.init) ?? "undecodable \(payload)"), expected \(expected == 0 ? "no more items" : String(expected))")
        }
    }
}
