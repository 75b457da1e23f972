#if canImport(Glibc)
import Glibc
#endif
import EchoService
import Logging
import Rapace
import RapacePlugin
import RapaceTracing

/// The example host: launches `rapace-example-plugin --traced` (found next to this
/// executable), calls its Echo and converts an image through it, prints `plugin-pid PID`
/// and the answer on stdout, then, with `--wait`, keeps the plugin running until this
/// process is killed (at most 60 s).
///
/// Its log (stderr) shows the plugin's records, forwarded by the tracing bridge,
/// interleaved with its own:
///
/// ```
/// info example-host: [RapaceExampleHost] launching the plugin
/// info example-plugin: file=RapaceExamplePlugin/ExamplePlugin.swift:70 pid=30945 plugin=example-plugin target=example.plugin [plugin] plugin started
/// info example-host: [RapaceExampleHost] converting a 512×512 image
/// info example-plugin: file=… plugin=example-plugin span_id=1 target=RapaceExamplePlugin [plugin] span opened: grayscale
/// info example-plugin: bytes_in=1048579 file=… plugin=example-plugin span=grayscale span_id=1 target=example.image [plugin] converted 262144 pixels to grayscale
/// info example-plugin: file=… pixels=262144 plugin=example-plugin span_id=1 … [plugin] span closed: grayscale
/// info example-host: [RapaceExampleHost] the plugin answered with 262147 bytes
/// ```
@main
struct ExampleHost {
    static func main() async {
        var buffer = [CChar](repeating: 0, count: 4096)
        let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        let exe = count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
        let directory = exe.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        LoggingSystem.bootstrap(StreamLogHandler.standardError)
        let logger = Logger(label: "example-host")
        do {
            let reactor = try Reactor.start(name: "example-host")
            // The plugin's records arrive here and are logged through the host's logging.
            let tracing = TracingHost(logger: Logger(label: "example-plugin"))
            logger.info("launching the plugin")
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(
                    name: "example-plugin", executable: directory + "/rapace-example-plugin", arguments: ["--traced"],
                    services: [tracing.service(pluginName: "example-plugin")], restartPolicy: .always()),
                reactor: reactor)
            let echo = EchoClient(plugin)
            let answer = try await echo.echo("hello, plugin")
            logger.info("converting a 512×512 image")
            let rgba = [UInt8](repeating: 200, count: 512 * 512 * 4)
            let grayscale = MethodDescriptor(service: "Image", method: "grayscale", kind: .unary)
            let reply = try await plugin.call(grayscale, request: .encoding(capacity: rgba.count + 5) { $0.writeByteArray(rgba) }, options: .default)
            logger.info("the plugin answered with \(reply.count) bytes")
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
