import Foundation
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `rapace-echo serve --shm` against `Tests/Interop/shm_peer.c`, a plugin written in C from
/// Docs/shm.md and the wire spec alone: the proof that the page is enough to interoperate.
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
        "OK pool after the calls: all 128 slots free",
        "OK pool after close: all 128 slots free",
        "OK goaway with blob(100000) in flight: answered (a run of 2 slots, freed by us after the host closed), then the host closed the connection",
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
        let lines = finished.output.split(separator: "\n").map(String.init)
        let reported = lines.filter { $0.hasPrefix("OK ") || $0.hasPrefix("FAIL") }
        try #require(finished.status == 0, "shm_peer exited with \(finished.status):\n\(finished.output)")
        #expect(reported.count == expectedLines.count, "\(finished.output)")
        for (line, prefix) in zip(reported, expectedLines) {
            #expect(line.hasPrefix(prefix), "got \"\(line)\", want a line starting \"\(prefix)\"")
        }
        return reported
    }

    static func epoch(in lines: [String]) -> UInt32? {
        guard let line = lines.first(where: { $0.hasPrefix("OK bootstrap epoch=") }) else { return nil }
        return UInt32(line.dropFirst("OK bootstrap epoch=".count).prefix { $0.isNumber })
    }

    @Test("a C peer written from Docs/shm.md calls every Echo method over the rings, twice (the host resets the segment and bumps the epoch); the host then exits cleanly")
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
        let epochs = (Self.epoch(in: first), Self.epoch(in: second))
        #expect(epochs.0 != nil && epochs.1 == epochs.0.map { $0 &+ 1 }, "epochs \(String(describing: epochs)): a new plugin's epoch is the previous one plus 1")

        host.process.signal(SIGTERM)
        let stopped = try await host.process.runToExit(timeout: .seconds(15))
        #expect(stopped.status == 0, "rapace-echo serve --shm exited with \(stopped.status)")
        #expect(!host.path.filesExist, "the host removes \(host.path.path) and its socket when it stops")
    }
}
