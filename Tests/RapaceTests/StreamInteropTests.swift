import Foundation
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `Tests/Interop/stream_peer.py`, a peer written from the wire spec and its vectors only
/// (no project code), against a real `rapace-echo serve` over TCP and over a Unix socket.
/// The peer checks every Echo method, HIGH_PRIORITY as a mere hint, credit flow, deadlines,
/// cancellation, Ping, ignored verbs, error statuses, pipelining, GoAway both ways,
/// handshake rejects and the handshake timeout, framing errors, the server's keepalive
/// Pings (on a second server run with `--keepalive`), and every frame the servers send
/// against the spec; it prints `OK …` per check and `FAIL …` (exit 1) at the first mismatch.
@Suite("independent Python peer against rapace-echo over TCP and Unix sockets", .sharesProcess)
struct StreamInteropTests {
    static let interop = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Interop")
    static let peerScript = interop.appendingPathComponent("stream_peer.py").path
    static let vectors = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("Vectors/vectors.json").path

    /// The `OK` lines the peer prints, in order, for `kind` (`tcp` or `unix`); each is a
    /// prefix (the rest of a line carries counts and timings).
    static func expectedLines(_ kind: String) -> [String] {
        let deadline = kind == "unix" ? "deadline via deadline_ns" : "deadline via rapace.deadline_remaining_ms"
        return ["OK vectors: 15 method ids, 17 postcard values, 10 control payloads, 4 call results, 6 frames"]
            + [
                "hello: version 0x00010000, acceptor",
                "add(2,3) answer equals the vector byte for byte",
                "echo",
                "add",
                "fail: codes and messages intact, ERROR flag exactly when code != 0",
                "HIGH_PRIORITY on a request is only a hint: 5 calls answered exactly as without it",
                "countdown(300): items in order",
                "countdown opened with no credit waits for the grant, then sends every item",
                "credit_grant honoured with CREDITS, on the request and in a frame of its own",
                "countdown with a window smaller than one item, never raised -> RESOURCE_EXHAUSTED",
                "checksum of 100000 bytes",
                "blob of 10, 300 and 1 MiB bytes",
                "sleep(20) -> unit",
                "\(deadline) -> DEADLINE_EXCEEDED",
                "ping -> pong with the same 8 bytes",
                "control verbs 100, 4242, 0xFFFFFFFF ignored",
                "cancel of a running sleep: nothing more on its channel",
                "unknown method -> UNIMPLEMENTED",
                "undecodable arguments -> INVALID_ARGUMENT",
                "12 pipelined calls in one write, answers matched by channel",
                "DATA on a channel never opened (also once skipped) -> CancelChannel protocolViolation",
                "goaway: server closed cleanly",
                "unknown control verb 50 -> GoAway protocolError",
                "handshake: Hello sent unprompted; 6 bad Hellos rejected with CloseChannel { 0, error }; minor 5 accepted",
                "framing errors (4 kinds) -> GoAway protocolError, close",
                "keepalive: Pings answered with the same 8 bytes keep the connection",
                "handshake timeout: silent and half a Hello closed after",
                "SIGTERM: GoAway shutdown",
                "all checks passed",
            ].map { "OK \(kind) \($0)" }
    }

    /// Fails clearly (never skips) when python3 is missing.
    static func requirePython() async throws -> String {
        try await RapaceTestSupport.requirePython(
            probe: "import argparse, json, select, socket, struct, threading, time; time.clock_gettime_ns(time.CLOCK_MONOTONIC)",
            missing: "python3 (3.7 or newer, standard library only) is required for the stream interop tests: install it (tools/test does)")
    }

    /// The keepalive of the second server the peer checks Pings against (its
    /// `--keepalive-interval` and `--keepalive-timeout`): a Ping every 0.2 s, and 2 s for a
    /// Pong, which a loaded machine still meets.
    static let keepalive = (interval: "0.2", timeout: "2")

    @Test("the Python peer passes every check against rapace-echo", arguments: ["tcp", "unix"])
    func peerAgainstEcho(kind: String) async throws {
        let python = try await Self.requirePython()
        // Stopped (killed if still running, the socket file removed) however the test ends.
        let server = try await EchoServerProcess(unix: kind == "unix", tag: "stream-peer")
        defer { server.stop() }
        let keepaliveServer = try await EchoServerProcess(
            unix: kind == "unix", extraArguments: ["--keepalive", Self.keepalive.interval, "--keepalive-timeout", Self.keepalive.timeout],
            tag: "stream-peer-keepalive")
        defer { keepaliveServer.stop() }

        // The peer ends by sending the server SIGTERM and checking its GoAway.
        let peer = try ChildProcess("/usr/bin/env", [
            python, Self.peerScript, kind, server.printedAddress, Self.vectors, "--sigterm", "\(server.process.pid)",
            "--keepalive", keepaliveServer.printedAddress,
            "--keepalive-interval", Self.keepalive.interval, "--keepalive-timeout", Self.keepalive.timeout,
        ])
        defer { peer.terminate() }
        var lines: [String] = []
        while lines.count < 100 {
            // Each check is bounded inside the peer (5 s per read); 30 s per line is generous.
            guard let line = try? await peer.nextLine(timeout: .seconds(30)) else { break }
            lines.append(line)
            if line.hasPrefix("FAIL") || line == "OK \(kind) all checks passed" { break }
        }
        let finished = try await peer.runToExit(timeout: .seconds(20))
        lines += finished.output.split(separator: "\n").map(String.init)
        #expect(!lines.contains { $0.hasPrefix("FAIL") }, "\(lines.filter { $0.hasPrefix("FAIL") })")
        #expect(finished.status == 0, "peer exit status \(finished.status); output:\n\(lines.joined(separator: "\n"))")
        let expected = Self.expectedLines(kind)
        #expect(lines.count == expected.count, "\(lines.joined(separator: "\n"))")
        for (line, prefix) in zip(lines, expected) {
            #expect(line.hasPrefix(prefix), "got \(line)")
        }

        // After the peer's SIGTERM the server finishes gracefully and removes its socket;
        // so does the keepalive server after ours.
        keepaliveServer.process.signal(SIGTERM)
        #expect(try await keepaliveServer.process.runToExit(timeout: .seconds(10)).status == 0, "rapace-echo serve --keepalive exit status")
        if let socketPath = keepaliveServer.socketPath { #expect(access(socketPath, F_OK) != 0, "socket file removed by rapace-echo --keepalive") }
        guard finished.status == 0 else { return }
        #expect(try await server.process.runToExit(timeout: .seconds(10)).status == 0)
        if let socketPath = server.socketPath { #expect(access(socketPath, F_OK) != 0, "socket file removed by rapace-echo") }
    }
}
