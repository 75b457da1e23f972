import EchoService
import Foundation
import RapaceTestSupport
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// A structured fuzz of the session state machine: after a valid handshake a hostile peer
/// sends sequences of frames built from valid pieces and mutated (control verbs 0–120 with
/// valid and mutated payloads; channel ids odd, even, zero, reused, skipped and huge; every
/// channel kind, attachments, metadata and deadlines of every length; requests with random
/// flags and credit grants, known and unknown methods, valid and mutated arguments, large
/// ones too; grants that overflow u32; cancels and closes of open, ended and never-opened
/// channels; frames on channels never opened, ended or cancelled; pings and unsolicited
/// pongs; responses the server never asked for; scrambled descriptor fields the transport
/// ignores; writes cut anywhere; pauses that let timers fire), then ends the connection one
/// of several ways (EOF, a protocol error or framing violation, a session close, GoAway
/// from the peer, EOF inside a frame, the server's own graceful shutdown).
///
/// The server is served in-process (Echo and a synchronous service) on a Unix socket, on
/// TCP, and with a limit of four open calls, and is checked against a model of the spec
/// (`SessionFuzzModel`) after every batch: each frame it sends decodes and is one the spec
/// allows (answers only on channels the fuzzer opened, with the request's msg_id and method,
/// never to NO_REPLY, never after a cancel was read or after the terminal; stream items
/// within the credit granted, in order; the right status and body; Pongs in order; the
/// CancelChannel each bad channel id or frame asks for; msg_ids in sequence; payloads
/// within the max the peer advertised); every call it took is answered unless something
/// legitimately holds it up; it closes the connection exactly when the spec says (with
/// GoAway(protocolError) after a protocol error); a well-formed call on the fuzzed
/// connection is still answered; once the connection closes the server's session holds no
/// call and is freed; a healthy connection to the same server is answered throughout; no
/// descriptor or reactor registration leaks.
///
/// Seeds are fixed, so a failure replays: each message names the seed and the frame, and
/// the last frames of a failed seed are printed. Set `RAPACE_FUZZ_SEED` (decimal or 0x-hex)
/// to add one more seed to each setup.
@Suite("Session fuzz: a hostile peer against a served session", .serialized, .sharesProcess)
struct SessionFuzzTests {
    /// Where the fuzzed server listens, and the limit it puts on the peer's open calls.
    struct Setup: Sendable, CustomTestStringConvertible {
        let name: String
        let tcp: Bool
        let maxChannels: UInt32
        /// The fixed seeds of this setup (disjoint across setups).
        let seeds: ClosedRange<UInt64>
        var testDescription: String { name }
    }

    static let setups = [
        // Unix socket: `deadline_ns` counts (the peers share the clock).
        Setup(name: "Unix socket", tcp: false, maxChannels: 8192, seeds: 1...40),
        // TCP: only the metadata deadline counts.
        Setup(name: "TCP", tcp: true, maxChannels: 8192, seeds: 101...120),
        // Four open calls at most: OpenChannel meets the limit (CancelChannel(resourceExhausted)).
        Setup(name: "Unix socket, 4 channels", tcp: false, maxChannels: 4, seeds: 201...220),
    ]

    /// A setup's seeds, and `RAPACE_FUZZ_SEED` (decimal or 0x-hex) if set.
    static func seeds(_ setup: Setup) -> [UInt64] {
        var seeds = Array(setup.seeds)
        if let text = ProcessInfo.processInfo.environment["RAPACE_FUZZ_SEED"] {
            let parsed = text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
            if let parsed { seeds.append(parsed) }
        }
        return seeds
    }

    static let framesPerSeed = 300

    @Test(
        "hostile frame sequences: the server answers by the spec, closes when it must, serves a healthy connection throughout and leaks nothing",
        .ownsProcess("compares this process's descriptors before and after the fuzz"), arguments: setups)
    func hostileSequences(_ setup: Setup) async throws {
        let descriptorsBefore = await DescriptorSnapshot.take()
        let socketPath = temporarySocketPath("fuzz")
        defer { unlink(socketPath) }
        let started = ContinuousClock.now
        var reports: [FuzzSeedReport] = []
        let healthy = HealthyCaller()
        try await withReactor("fuzz-server") { serverReactor in
            try await withReactor("fuzz-healthy") { clientReactor in
                let address: SocketAddress = setup.tcp ? .tcp(host: "127.0.0.1", port: 0) : .unix(path: socketPath)
                let server = try await FuzzServer(reactor: serverReactor, address: address, maxChannels: setup.maxChannels)
                let session = try await Session.connect(to: server.address, reactor: clientReactor)
                let healthyTask = healthy.run(session, on: clientReactor)
                #expect(await waitUntil { healthy.calls.withLock { $0 } > 0 }, "the healthy connection is served before the fuzz")
                let registrations = await server.registrationCount
                let fuzzer = SessionFuzzer(server: server, framesPerSeed: Self.framesPerSeed)
                reports = try await Self.run(fuzzer, seeds: Self.seeds(setup), server: server, healthy: healthy, registrations: registrations, started: started)
                healthy.stop()
                try await value(of: healthyTask, within: .seconds(10), "the healthy caller")
                #expect(healthy.failures.withLock { $0 }.isEmpty, "\(healthy.failures.withLock { $0 })")
                await session.closeAndWait()
                // The healthy connection's server session closes too.
                #expect(await waitUntil { await server.allSessionsClosed })
                await server.close()
            }
        }
        await expectNoDescriptorLeak(since: descriptorsBefore)

        let frames = reports.reduce(0) { $0 + $1.framesSent }
        var endings: [String: Int] = [:]
        var seen: [String: Int] = [:]
        for report in reports {
            endings[report.ending, default: 0] += 1
            seen.merge(report.seen, uniquingKeysWith: +)
        }
        print("session fuzz (\(setup.name)): \(reports.count) seeds, \(frames) frames, \(healthy.calls.withLock { $0 }) healthy calls, endings \(endings.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", ")), \(ContinuousClock.now - started); the server sent \(seen.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value)" }.joined(separator: ", "))")
    }

    /// Runs every seed's connection in turn, recording its failures; after each, checks that
    /// the healthy connection is still answered and that the server's reactor holds as many
    /// registrations as before the fuzz.
    static func run(_ fuzzer: SessionFuzzer, seeds: [UInt64], server: FuzzServer, healthy: HealthyCaller, registrations: Int, started: ContinuousClock.Instant) async throws -> [FuzzSeedReport] {
        var reports: [FuzzSeedReport] = []
        for seed in seeds {
            guard ContinuousClock.now - started < .seconds(120) else {
                Issue.record("the fuzz ran out of time after \(reports.count) of \(seeds.count) seeds")
                break
            }
            let callsBefore = healthy.calls.withLock { $0 }
            let report = await onOwnThread("fuzz-\(seed)") { fuzzer.run(seed: seed) }
            reports.append(report)
            for failure in report.failures.prefix(20) { Issue.record(Comment(rawValue: failure)) }
            if !report.failures.isEmpty {
                print("session fuzz: seed \(seed) failed (\(report.failures.count) failures); its last frames:\n  " + report.trace.suffix(60).joined(separator: "\n  "))
            }
            #expect(
                await waitUntil { healthy.calls.withLock { $0 } > callsBefore } || !healthy.failures.withLock({ $0 }).isEmpty,
                "seed \(seed): the healthy connection got no answer after the fuzz")
            let settled = await waitUntil { await server.registrationCount == registrations }
            let now = await server.registrationCount
            #expect(settled, "seed \(seed): \(now) registrations on the server's reactor, \(registrations) before the connection")
        }
        return reports
    }
}
