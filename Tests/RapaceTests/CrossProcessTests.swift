import EchoService
import Foundation
import RapaceTestSupport
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// Tests against a real `rapace-echo` process, over TCP and a Unix domain socket.
@Suite("rapace-echo across processes", .serialized, .sharesProcess)
struct CrossProcessTests {
    static let transports: [Bool] = [true, false]  // unix, tcp

    @Test("every Echo method; error codes and messages arrive intact", arguments: transports)
    func everyMethod(unix: Bool) async throws {
        let server = try await EchoServerProcess(unix: unix)
        defer { server.stop() }
        try await withReactor { reactor in
            let session = try await Session.connect(to: server.address, reactor: reactor)
            let echo = EchoClient(session)
            #expect(try await echo.echo("héllo wörld") == "héllo wörld")
            #expect(try await echo.add(-7, 3) == -4)
            for (code, message) in [(UInt32(3), "bad argument"), (14, "gone"), (404, "not here"), (13, "")] {
                do {
                    try await echo.fail(code: code, message: message)
                    Issue.record("fail returned normally")
                } catch let error as RPCError {
                    #expect(error.code.rawValue == code)
                    #expect(error.message == message)
                }
            }
            var items: [UInt32] = []
            for try await item in echo.countdown(from: 3) { items.append(item) }
            #expect(items == [3, 2, 1])
            let data = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            #expect(try await echo.checksum(data) == MethodID.fnv1a64(data))
            try await echo.sleep(milliseconds: 20)
            let blob = try await echo.blob(size: 1 << 20)
            #expect(blob.count == 1 << 20)
            #expect(blob.enumerated().allSatisfy { $0.element == UInt8($0.offset % 251) })
            await session.closeAndWait()
        }
    }

    @Test("100 concurrent calls on one connection", arguments: transports)
    func concurrentCalls(unix: Bool) async throws {
        let server = try await EchoServerProcess(unix: unix)
        defer { server.stop() }
        try await withReactor { reactor in
            let session = try await Session.connect(to: server.address, reactor: reactor)
            let echo = EchoClient(session)
            let results = try await withThrowingTaskGroup(of: (Int, Int32).self) { group in
                for i in 0..<100 {
                    group.addTask { (i, try await echo.add(Int32(i), Int32(i))) }
                }
                var results: [Int: Int32] = [:]
                for try await (i, sum) in group { results[i] = sum }
                return results
            }
            #expect(results.count == 100)
            #expect(results.allSatisfy { $0.value == Int32($0.key * 2) })
            await session.closeAndWait()
        }
    }

    @Test("a 10 000-item stream arrives in order; a slow consumer never has more than the granted credits in flight", arguments: transports)
    func longStream(unix: Bool) async throws {
        let server = try await EchoServerProcess(unix: unix)
        defer { server.stop() }
        try await withReactor { reactor in
            let session = try await Session.connect(to: server.address, reactor: reactor)
            let window: UInt32 = 100
            var expected: UInt32 = 10_000
            for try await item in EchoClient(session).countdown(from: 10_000, options: CallOptions(streamWindow: window)) {
                #expect(item == expected)
                expected -= 1
                if expected % 2_000 == 0 { try await Task.sleep(for: .milliseconds(20)) }
            }
            #expect(expected == 0)
            // A credit overrun would have failed the stream; the high-water mark proves the bound.
            let inFlight = await onLoop(reactor) { session.statistics.maxStreamBytesInFlight }
            #expect(inFlight > 0 && inFlight <= window)
            await session.closeAndWait()
        }
    }

    @Test(
        "a deadline shorter than the sleep gives DEADLINE_EXCEEDED (Unix: deadline_ns; TCP: metadata)",
        .ownsProcess("the answer must come within 2 s"), arguments: transports)
    func deadlines(unix: Bool) async throws {
        let server = try await EchoServerProcess(unix: unix, extraArguments: ["--verbose"])
        defer { server.stop() }
        try await withReactor { reactor in
            let session = try await Session.connect(to: server.address, reactor: reactor)
            #expect(await onLoop(reactor) { session.transport.sharesMonotonicClock } == unix)
            let started = ContinuousClock.now
            await #expect {
                try await EchoClient(session).sleep(milliseconds: 10_000, options: .timeout(.milliseconds(200)))
            } throws: { ($0 as? RPCError)?.code == .deadlineExceeded }
            #expect(ContinuousClock.now - started < .seconds(2))
            #expect(try await EchoClient(session).echo("still fine") == "still fine")
            await session.closeAndWait()
        }
    }

    @Test(
        "cancelling the client task of sleep(10000) cancels the server handler",
        .ownsProcess("the server must stop within 2 s"), arguments: transports)
    func cancellation(unix: Bool) async throws {
        // `--verbose` logs every end of a sleep, and whether it was cancelled.
        let server = try await EchoServerProcess(unix: unix, extraArguments: ["--verbose"], output: .merged)
        defer { server.stop() }
        try await withReactor { reactor in
            let session = try await Session.connect(to: server.address, reactor: reactor)
            let echo = EchoClient(session)
            let task = Task { try await echo.sleep(milliseconds: 10_000) }
            // The server has the call once it has answered one sent after it (frames arrive in
            // order): the cancel then reaches a running handler, not a call never sent.
            #expect(await waitUntil(timeout: .seconds(10)) { await onLoop(reactor) { session.outgoing.count } == 1 }, "the call was not sent")
            #expect(try await echo.add(1, 2) == 3)
            task.cancel()
            await #expect {
                try await task.value
            } throws: { ($0 as? RPCError)?.code == .cancelled }
            // The server's handler itself was cancelled: it says so before anything else ends
            // the connection (a server that ignored CancelChannel would log nothing until the
            // shutdown below, or log an uncancelled end after 10 s).
            let ended = try await server.nextLine(containing: "sleep ended after", timeout: .seconds(5))
            #expect(ended.contains("(cancelled: true)"), "\(ended)")
            // The server forgot the call: a graceful shutdown now finishes at once instead of
            // waiting for the 10 s sleep.
            let stopping = ContinuousClock.now
            server.process.signal(SIGTERM)
            let status = try server.process.wait(timeout: .seconds(5))
            #expect(ContinuousClock.now - stopping < .seconds(2))
            #expect(status == 0)
            await session.closed()
        }
    }

    @Test("SIGTERM: GoAway, in-flight calls finish, exit 0", arguments: transports)
    func gracefulExit(unix: Bool) async throws {
        let server = try await EchoServerProcess(unix: unix)
        defer { server.stop() }
        try await withReactor { reactor in
            let session = try await Session.connect(to: server.address, reactor: reactor)
            let echo = EchoClient(session)
            let inFlight = Task { try await echo.sleep(milliseconds: 1000) }
            // The server has the call once it has answered one sent after it on the same
            // connection (frames arrive in order): the SIGTERM then finds it in flight. (A
            // fixed pause could end before the call reached the server, which would then
            // refuse it after its GoAway.)
            #expect(await waitUntil { await onLoop(reactor) { session.outgoing.count } == 1 }, "the call was not sent")
            #expect(try await echo.add(1, 2) == 3)
            server.process.signal(SIGTERM)
            try await inFlight.value
            await session.closed()
            #expect(try server.process.wait() == 0)
            if case .unix(let path) = server.address { #expect(access(path, F_OK) != 0, "socket file removed") }
        }
    }

    @Test(
        "killing the server mid-call fails pending calls with UNAVAILABLE within 1 s; reconnecting works",
        .ownsProcess("a dead peer must be noticed within 1 s"), arguments: transports)
    func serverKilled(unix: Bool) async throws {
        try await withReactor { reactor in
            let server = try await EchoServerProcess(unix: unix)
            let session = try await Session.connect(to: server.address, reactor: reactor)
            let echo = EchoClient(session)
            let pending = (0..<5).map { _ in Task { try await echo.sleep(milliseconds: 10_000) } }
            // All five are pending (sent) before the kill.
            #expect(await waitUntil(timeout: .seconds(10)) { await onLoop(reactor) { session.outgoing.count } == 5 }, "the calls were not sent")
            let killedAt = ContinuousClock.now
            server.process.signal(SIGKILL)
            for call in pending {
                await #expect {
                    try await call.value
                } throws: { ($0 as? RPCError)?.code == .unavailable }
            }
            #expect(ContinuousClock.now - killedAt < .seconds(1))
            server.stop()
            // A new server, a new connection from the same process.
            let again = try await EchoServerProcess(unix: unix)
            defer { again.stop() }
            let second = try await Session.connect(to: again.address, reactor: reactor)
            #expect(try await EchoClient(second).add(20, 22) == 42)
            await second.closeAndWait()
        }
    }

    @Test("the rapace-echo call subcommand is a client for every method")
    func callSubcommand() async throws {
        let server = try await EchoServerProcess(unix: true)
        defer { server.stop() }
        let binary = productsDirectory + "/rapace-echo"
        let cases: [([String], String, Int32)] = [
            (["echo", "hi"], "hi", 0),
            (["add", "2", "3"], "5", 0),
            (["countdown", "3"], "3\n2\n1", 0),
            (["checksum", "abc"], "16654208175385433931", 0),
            (["sleep", "5"], "ok", 0),
            (["blob", "10"], "10 bytes, fnv1a64 \(MethodID.fnv1a64((0..<10).map { UInt8($0) }))", 0),
            (["fail", "404", "nope"], "", 1),
        ]
        for (arguments, expected, expectedStatus) in cases {
            // Waits in a suspended task, bounded; `status` is the exit code, or minus the
            // signal for a child a signal ended, which no expected status matches.
            let finished = try await FinishedProcess.run(binary, ["call", "--unix", "\(server.address)"] + arguments, capturing: .stdout, timeout: .seconds(20))
            #expect(finished.output == (expected.isEmpty ? "" : expected + "\n"), "\(arguments)")
            #expect(finished.status == expectedStatus, "\(arguments): wait status \(finished.waitStatus)")
        }
        // The failure is reported on stderr, with its code and message.
        let failed = try await FinishedProcess.run(binary, ["call", "--unix", "\(server.address)", "fail", "404", "nope"], capturing: .stderr, timeout: .seconds(20))
        #expect(failed.status == 1)
        #expect(failed.output.contains("(404): nope"), "\(failed.output)")
    }
}
