import Foundation
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `rapace-echo serve --shm` against `Tests/Interop/shm_peer.c`, a plugin written in C from
/// Docs/shm.md and the wire spec alone: the proof that the page is enough to interoperate.
/// Two full runs (every Echo method, both rings driven full, the peer's own GoAway), then a
/// third that ends with the host's GoAway: the test sends the host SIGTERM once the peer
/// says it has a call in flight.
@Suite("shared-memory interop with an independent C peer", .serialized, .sharesProcess)
struct ShmInteropTests {
    static let peerSource = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Interop/shm_peer.c").path

    /// The `OK` lines one run of the peer prints, in order (each a prefix of the line).
    static let expectedLines = [
        "OK bootstrap epoch=",
        "OK hello: host initiator, features 0xe, max payload 8388608, 7 methods",
        "OK echo 32-byte string",
        "OK add(-7,3) = -4",
        "OK fail(404) -> code 404 \"not here\"",
        "OK fail(3) -> code 3 \"bad argument\"",
        "OK countdown(300) in order, window 8 bytes",
        "OK checksum 100 bytes in a run of 1 slot, freed by the host",
        "OK checksum 200000 bytes in a run of 4 slots, freed by the host",
        "OK checksum of two whole-pool payloads (128 slots each) back to back",
        "OK blob 150000 bytes in a run of 3 slots",
        "OK sleep(20000) with a 300 ms deadline -> DEADLINE_EXCEEDED",
        "OK ping/pong",
        "OK ring 1 (plugin -> host) full: 200 calls (400 descriptors) in one batch, the first 256 published without a doorbell while the host slept",
        "OK ring 0 (host -> plugin) full: countdown(600) left unconsumed until the host filled the ring (256 descriptors) and waited for room; then every item once, in order, and the terminal",
        "OK pool after the calls: all 128 slots free",
        "OK pool after close: all 128 slots free",
        "OK goaway with blob(100000) in flight: answered (a run of 2 slots, freed by us after the host closed), then the host closed the connection",
    ]

    /// The `OK` lines of the run with `--host-goaway`, which the host's GoAway ends.
    static let hostGoAwayLines = [
        "OK bootstrap epoch=",
        "OK hello: host initiator, features 0xe, max payload 8388608, 7 methods",
        "OK echo 32-byte string",
        "OK pool after the host's GoAway: all 128 slots free",
        "OK host goaway (SIGTERM) with sleep(2500) in flight: GoAway shutdown, last_channel_id 4",
    ]

    /// The first C compiler on `PATH` (then the usual places); fails, never skips, without one.
    static func cCompiler() throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let directories = path.split(separator: ":").map(String.init) + ["/usr/bin", "/usr/local/bin"]
        for name in ["cc", "gcc", "clang"] {
            for directory in directories where !directory.isEmpty {
                let candidate = directory + "/" + name
                if access(candidate, X_OK) == 0 { return candidate }
            }
        }
        throw TestFailure("no C compiler (cc, gcc or clang) on PATH (\(path)): the shared-memory interop test needs one to build Tests/Interop/shm_peer.c")
    }

    /// Compiles the peer into `directory`; returns the executable's path.
    static func buildPeer(in directory: String) async throws -> String {
        let executable = directory + "/shm_peer"
        let compiler = try cCompiler()
        let build = try await FinishedProcess.run(
            compiler, ["-O2", "-std=c11", "-Wall", "-Werror", "-o", executable, peerSource], capturing: .stderr, timeout: .seconds(120))
        guard build.status == 0 else {
            throw TestFailure("\(compiler) failed to build \(peerSource) (status \(build.status)):\n\(build.output)")
        }
        return executable
    }

    /// Runs the peer against the segment at `path` to its end; returns its `OK` lines after
    /// checking its exit status and that they are the expected ones.
    static func runPeer(_ executable: String, path: String) async throws -> [String] {
        let peer = try ChildProcess(executable, [path])
        defer { peer.terminate() }
        let finished = try await peer.runToExit(timeout: .seconds(120))
        return try checkReport(finished.output, status: finished.status, expected: expectedLines)
    }

    /// Runs the peer with `--host-goaway` against `host`: sends the host SIGTERM when the
    /// peer prints its `READY` line (a call in flight), then lets the peer run to its end;
    /// returns its `OK` lines after checking them.
    static func runPeerUntilHostGoAway(_ executable: String, host: ShmHostProcess) async throws -> [String] {
        let peer = try ChildProcess(executable, [host.path.path, "--host-goaway"])
        defer { peer.terminate() }
        var before: [String] = []
        while true {
            // The peer bounds each of its waits (10 s at most); 30 s per line is generous.
            let line = try await peer.nextLine(timeout: .seconds(30))
            before.append(line)
            if line.hasPrefix("READY ") { break }
            if line.hasPrefix("FAIL") { break }
        }
        if before.last?.hasPrefix("READY ") == true { host.process.signal(SIGTERM) }
        let finished = try await peer.runToExit(timeout: .seconds(60))
        return try checkReport((before + [finished.output]).joined(separator: "\n"), status: finished.status, expected: hostGoAwayLines)
    }

    /// The `OK` and `FAIL` lines of a peer's `output`, after checking its exit status and
    /// that they start with the `expected` prefixes, in order.
    static func checkReport(_ output: String, status: Int32, expected: [String]) throws -> [String] {
        let reported = output.split(separator: "\n").map(String.init).filter { $0.hasPrefix("OK ") || $0.hasPrefix("FAIL") }
        try #require(status == 0, "shm_peer exited with \(status):\n\(output)")
        #expect(reported.count == expected.count, "\(output)")
        for (line, prefix) in zip(reported, expected) {
            #expect(line.hasPrefix(prefix), "got \"\(line)\", want a line starting \"\(prefix)\"")
        }
        return reported
    }

    static func epoch(in lines: [String]) -> UInt32? {
        guard let line = lines.first(where: { $0.hasPrefix("OK bootstrap epoch=") }) else { return nil }
        return UInt32(line.dropFirst("OK bootstrap epoch=".count).prefix { $0.isNumber })
    }

    @Test("a C peer written from Docs/shm.md calls every Echo method over the rings and fills both, twice (the host resets the segment and bumps the epoch); a third run ends with the host's GoAway on SIGTERM, and the host exits cleanly")
    func cPeerAgainstTheHost() async throws {
        let directory = temporaryPath("shm-interop")
        guard mkdir(directory, 0o700) == 0 else { throw TestFailure("mkdir \(directory): errno \(errno)") }
        defer {
            unlink(directory + "/shm_peer")
            rmdir(directory)
        }
        let executable = try await Self.buildPeer(in: directory)

        let host = try ShmHostProcess("shm-interop")
        defer { host.stop() }
        let first = try await Self.runPeer(executable, path: host.path.path)
        let second = try await Self.runPeer(executable, path: host.path.path)
        let third = try await Self.runPeerUntilHostGoAway(executable, host: host)
        let epochs = [first, second, third].map { Self.epoch(in: $0) }
        #expect(
            epochs[0] != nil && epochs[1] == epochs[0].map { $0 &+ 1 } && epochs[2] == epochs[1].map { $0 &+ 1 },
            "epochs \(epochs): a new plugin's epoch is the previous one plus 1")

        // SIGTERM went to the host during the third run; it exits once that session ended.
        let stopped = try await host.process.runToExit(timeout: .seconds(15))
        #expect(stopped.status == 0, "rapace-echo serve --shm exited with \(stopped.status)")
        #expect(!host.path.filesExist, "the host removes \(host.path.path) and its socket when it stops")
    }
}
