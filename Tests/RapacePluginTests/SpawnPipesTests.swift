import Foundation
import Rapace
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `Sys.spawn(_:arguments:environment:pipingOutputs:)`, the one pipe-and-spawn sequence the
/// plugin spawner, the test support's `ChildProcess` and the bench share: each output on its
/// own close-on-exec pipe (or sharing one, `duplicating`), and nothing left open when the
/// spawn fails.
@Suite(.sharesProcess) struct SpawnPipesTests {
    @Test func eachOutputArrivesOnItsOwnPipeInTheOrderAsked() async throws {
        let spawned = try Sys.spawn("/bin/sh", arguments: ["-c", "echo out; echo err >&2"], environment: [], pipingOutputs: [1, 2])
        #expect(try await outputs(of: spawned) == ["out\n", "err\n"])
    }

    @Test func aDuplicatedDescriptorSharesThePipe() async throws {
        let spawned = try Sys.spawn(
            "/bin/sh", arguments: ["-c", "echo out; echo err >&2; echo out2"], environment: [], pipingOutputs: [1], duplicating: [(from: 1, to: 2)])
        #expect(try await outputs(of: spawned) == ["out\nerr\nout2\n"])
    }

    /// Waits for the child to exit and returns what each pipe carried (in `outputs` order);
    /// closes the pipes. However the test ends, the child does not outlive it: one that has
    /// not been reaped (it did not exit, or a requirement failed first) is killed and reaped.
    private func outputs(of spawned: (pid: pid_t, outputs: [Int32])) async throws -> [String] {
        defer { for fd in spawned.outputs { Sys.close(fd) } }
        var status: Int32?
        defer {
            if status == nil, (try? Sys.signal(spawned.pid, SIGKILL)) == true { waitpid(spawned.pid, nil, 0) }
        }
        for fd in spawned.outputs {
            #expect(fcntl(fd, F_GETFD) & FD_CLOEXEC != 0, "read end \(fd) is inherited by later children")
        }
        _ = await waitUntil(timeout: .seconds(10)) {
            status = try? Sys.reapIfExited(spawned.pid)
            return status != nil
        }
        try #require(status != nil, "the child did not exit")
        // The child is gone and the write ends are closed here: each read end gives what the
        // child wrote, then end of file, without blocking.
        return spawned.outputs.map(readToEnd)
    }

    @Test(.ownsProcess("compares this process's descriptors before and after"))
    func aFailedSpawnLeavesNoDescriptorOpen() async throws {
        let baseline = await DescriptorSnapshot.take()
        #expect(throws: SystemError.self) {
            try Sys.spawn("/nonexistent/rapace-no-such-program", arguments: [], environment: [], pipingOutputs: [1, 2])
        }
        await expectNoDescriptorLeak(since: baseline, timeout: .zero)
    }

    private func readToEnd(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 256)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            bytes.append(contentsOf: chunk[0..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
