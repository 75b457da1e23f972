import Rapace
import RapacePlugin

extension PluginRuntime {
    /// Serves `services` and `TracingConfig` to the host, forwarding logs and spans through
    /// `tracing` from the moment the handshake is done (what was logged before is sent
    /// then); returns when the host closes the connection.
    ///
    /// ```swift
    /// let tracing = PluginTracing.bootstrap()
    /// try await PluginRuntime().serve([ImagingServer(Imaging())], tracing: tracing)
    /// ```
    public func serve(_ services: [any RPCService], tracing: PluginTracing) async throws(PluginError) {
        var runtime = self
        let connected = onConnected
        runtime.onConnected = { session in
            tracing.attach(to: session)
            connected?(session)
        }
        try await runtime.serve(services + [tracing.configService])
    }
}
