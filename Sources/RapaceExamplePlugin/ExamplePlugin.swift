#if canImport(Glibc)
import Glibc
#endif
import CRapaceShim
import EchoService
import Logging
import Rapace
import RapacePlugin
import RapaceTracing
import Tracing

/// `Image.grayscale`: RGBA bytes in, one luma byte per pixel out (ITU-R BT.601 weights).
struct GrayscaleService: RPCService {
    static let grayscale = MethodDescriptor(service: "Image", method: "grayscale", kind: .unary)

    var methods: [MethodDescriptor] { [Self.grayscale] }

    let logger = Logger(label: "example.image")

    nonisolated(nonsending) func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        guard method == Self.grayscale.id else { throw RPCError(.unimplemented, "Image has no method \(method)") }
        // With `--traced` this span and these records appear in the host's log.
        return try withSpan("grayscale") { span in
            let gray = try convert(request)
            span.attributes["pixels"] = gray.count
            logger.info("converted \(gray.count) pixels to grayscale", metadata: ["bytes_in": "\(request.count)"])
            return Payload.encoding(capacity: gray.count + 5) { $0.writeByteArray(gray) }
        }
    }

    private func convert(_ request: Payload) throws -> [UInt8] {
        // Read the pixels where they arrived: a large request is a view into the host's
        // shared-memory slots (ShmBuffer), so this reads them without a copy.
        try request.withUnsafeBytes { (raw: UnsafeRawBufferPointer) throws -> [UInt8] in
            var reader = PostcardReader(raw)
            let length = Int(try reader.readVarint64())
            let start = reader.offset
            guard length <= raw.count - start else { throw RPCError(.invalidArgument, "truncated RGBA data") }
            guard length % 4 == 0 else { throw RPCError(.invalidArgument, "RGBA data must be a multiple of 4 bytes, got \(length)") }
            let source = UnsafeRawBufferPointer(rebasing: raw[start..<(start + length)])
            return [UInt8](unsafeUninitializedCapacity: length / 4) { target, initialized in
                for pixel in 0..<(length / 4) {
                    let r = UInt32(source[pixel * 4]), g = UInt32(source[pixel * 4 + 1]), b = UInt32(source[pixel * 4 + 2])
                    target[pixel] = UInt8((r * 77 + g * 150 + b * 29) >> 8)
                }
                initialized = length / 4
            }
        }
    }
}

/// The example plugin: serves Echo (and with `--multi` also `Image.grayscale`) to the host
/// that started it with `--shm-path=PATH`.
///
/// Options after the path, for the tests: `--multi`, `--slot-count=N` (a segment
/// configuration other than the default), `--call-host` (calls the host's Echo once
/// connected and prints the answer), `--duplicate` (two services with one id), `--traced`
/// (Echo and `Image.grayscale`, with logs and spans forwarded to the host).
@main
struct ExamplePlugin {
    static func main() async {
        // For start-up measurements: the monotonic clock is shared with the host.
        print("plugin-main \(rapace_monotonic_ns())")
        fflush(nil)
        let arguments = CommandLine.arguments
        do throws(PluginError) {
            if arguments.contains("--traced") {
                // One call installs swift-log and swift-distributed-tracing forwarding.
                let tracing = PluginTracing.bootstrap()
                Logger(label: "example.plugin").info("plugin started", metadata: ["pid": "\(getpid())"])
                try await PluginRuntime().serve([EchoServer(DefaultEcho()), GrayscaleService()], tracing: tracing)
            } else if arguments.contains("--duplicate") {
                try await runMulti { builder in builder.addService(EchoServer(DefaultEcho())).addService(EchoServer(DefaultEcho())) }
            } else if let slots = arguments.first(where: { $0.hasPrefix("--slot-count=") }).flatMap({ UInt32($0.dropFirst("--slot-count=".count)) }) {
                try await runWithConfig(EchoServer(DefaultEcho()), ShmConfig(slotCount: slots))
            } else if arguments.contains("--call-host") {
                let runtime = PluginRuntime(onConnected: { session in
                    Task {
                        let answer = try? await EchoClient(session).echo("hello from the plugin")
                        print("host answered: \(answer ?? "<error>")")
                        fflush(nil)
                    }
                })
                try await runtime.serve([EchoServer(DefaultEcho())])
            } else if arguments.contains("--multi") {
                try await runMulti { builder in builder.addService(EchoServer(DefaultEcho())).addService(GrayscaleService()) }
            } else {
                try await run(EchoServer(DefaultEcho()))
            }
        } catch {
            FileDescriptorOutput.stderr("error: \(error.message)\n")
            exit(2)
        }
        print("host closed the connection")
    }
}

enum FileDescriptorOutput {
    static func stderr(_ text: String) {
        var bytes = Array(text.utf8)
        _ = write(2, &bytes, bytes.count)
    }
}
