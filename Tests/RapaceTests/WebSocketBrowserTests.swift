import Foundation
import RapaceTestSupport
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// Headless Chromium loads the demo page from a real `rapace-echo serve --ws`: the page
/// (tools/web/index.html with tools/web/rapace.js) runs every Echo call and reports its
/// results with `GET /report?…`, which rapace-echo prints as `browser report:` lines.
/// Fails (never skips) when Chromium is missing: tools/test installs it.
@Suite("WebSocket browser test", .serialized, .sharesProcess) struct WebSocketBrowserTests {
    static func chromiumPath() throws -> String {
        for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"] where access(candidate, X_OK) == 0 {
            return candidate
        }
        throw TestFailure("headless Chromium is required for the WebSocket browser test: run tools/test (it installs Debian's `chromium`) or `apt-get install -y chromium`")
    }

    @Test("the demo page served by rapace-echo calls every Echo method in Chromium")
    func demoPageInChromium() async throws {
        let chromium = try Self.chromiumPath()
        let server = try ChildProcess(productsDirectory + "/rapace-echo", ["serve", "--ws", "127.0.0.1:0"])
        defer {
            server.signal(SIGTERM)
            _ = try? server.wait(timeout: .seconds(10))
        }
        let listening = try await server.nextLine(timeout: .seconds(20))
        #expect(listening.hasPrefix("listening on ws://127.0.0.1:"))
        let hostPort = listening.replacingOccurrences(of: "listening on ws://", with: "").replacingOccurrences(of: "/", with: "")
        let profile = temporaryPath("chromium")
        defer {
            // Chromium's helper processes may still write for a moment after the browser exits.
            for _ in 0..<20 where FileManager.default.fileExists(atPath: profile) {
                try? FileManager.default.removeItem(atPath: profile)
                usleep(100_000)
            }
        }
        // In a session (and process group) of its own, whose id is the browser's pid:
        // setsid(1) does not fork, as a spawned child leads no group, and the shell execs
        // Chromium. Killing the browser alone would leave its helper processes (zygote,
        // renderers) running; the group takes them all.
        let command = "exec \(chromium) --headless --no-sandbox --disable-gpu --no-first-run --user-data-dir=\(profile) 'http://\(hostPort)/?report' >/dev/null 2>&1"
        let browser = try ChildProcess("/usr/bin/setsid", ["/bin/sh", "-c", command])
        let group = browser.pid
        defer {
            // The whole group: SIGTERM, a moment for Chromium to end its helpers, then
            // SIGKILL for whatever is left. The browser is reaped only afterwards, so the
            // group id cannot have been reused meanwhile.
            kill(-group, SIGTERM)
            for _ in 0..<100 where !processIsGone(group) { usleep(50_000) }  // gone or a zombie
            kill(-group, SIGKILL)
            browser.terminate()
            for _ in 0..<100 where !liveProcesses(inGroup: group).isEmpty { usleep(50_000) }
            #expect(liveProcesses(inGroup: group).isEmpty, "processes of Chromium's group outlived the test")
        }
        // Until setsid(1) has run, the child is still in this process's group.
        try #require(await waitUntil(timeout: .seconds(10)) { getpgid(group) == group }, "the browser did not get a process group of its own")
        var lines: [String] = []
        let deadline = ContinuousClock.now + .seconds(60)
        while lines.count < 11 && ContinuousClock.now < deadline {
            let line = try await server.nextLine(timeout: .seconds(60))
            if line.hasPrefix("browser report: ") { lines.append(String(line.dropFirst("browser report: ".count))) }
        }
        #expect(lines.first == "ALL PASSED 10/10", "\(lines)")
        for name in ["wire-names", "connect", "echo", "add", "fail", "countdown", "checksum", "sleep", "sleep-deadline", "blob"] {
            #expect(lines.contains { $0.hasPrefix("ok \(name):") }, "\(name) in \(lines)")
        }
        #expect(lines.contains { $0.hasPrefix("ok fail: error 7 PERMISSION_DENIED") })
        #expect(lines.contains { $0.hasPrefix("ok countdown: 300 items") })
        #expect(lines.contains { $0.hasPrefix("ok sleep-deadline: error 4 DEADLINE_EXCEEDED") })
        // rapace.js derives wire names as the Swift side does (spec 2): every pair it
        // reported ("name=wire") agrees with MethodID.snakeCase.
        let wireNames = try #require(lines.first { $0.hasPrefix("ok wire-names: ") }).dropFirst("ok wire-names: ".count)
        let pairs = wireNames.split(separator: " ").map { $0.split(separator: "=", maxSplits: 1).map(String.init) }
        #expect(pairs.count == 6, "\(wireNames)")
        for pair in pairs {
            #expect(pair.count == 2 && MethodID.snakeCase(pair[0]) == pair[1], "rapace.js: \(pair)")
        }
    }
}
