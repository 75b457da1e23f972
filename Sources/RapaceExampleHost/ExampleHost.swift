#if canImport(Glibc)
import Glibc
#endif
import EchoService
import Logging
import Rapace
import RapacePlugin

/// The example host: launches `rapace-example-plugin` (found next to this executable),
/// calls it once, prints `plugin-pid PID` and the answer, then, with `--wait`, keeps the
/// plugin running until this process is killed (at most 60 s).
@main
struct ExampleHost {
    static func main() async {
        var buffer = [CChar](repeating: 0, count: 4096)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        let exe = count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
        let directory = exe.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        do {
            let reactor = try Reactor.start(name: "example-host")
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(name: "example-plugin", executable: directory + "/rapace-example-plugin", restartPolicy: .always()),
                reactor: reactor)
            let echo = EchoClient(plugin)
            let answer = try await echo.echo("hello, plugin")
            print("plugin-pid \(await plugin.currentPID() ?? 0)")
            print("answer \(answer)")
            fflush(nil)
            if CommandLine.arguments.contains("--wait") {
                try? await Task.sleep(for: .seconds(60))
            }
            await plugin.stop()
            reactor.shutdown()
        } catch {
            var text = Array("error: \(error)\n".utf8)
            _ = write(2, &text, text.count)
            exit(1)
        }
    }
}
