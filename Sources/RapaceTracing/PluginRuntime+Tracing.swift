import Rapace
import RapacePlugin

extension PluginRuntime {
    /// Serves `services` and `TracingConfig` to the host, forwarding logs and spans through
    /// `tracing` from the start of the connection (what was logged before is sent once the
    /// handshake is done, ahead of the reply to the host's first call); returns when the
    /// host closes the connection.
    ///
    /// ```swift
    /// let tracing = PluginTracing.bootstrap()
    /// try await PluginRuntime().serve([ImagingServer(Imaging())], tracing: tracing)
    /// ```
    public func serve(_ services: [any RPCService], tracing: PluginTracing) async throws(PluginError) {
        var runtime = self
        let prepare = beforeHandshake
        runtime.beforeHandshake = { session in
            prepare?(session)
            // Before the handshake, so the reply barrier is in place before the host's first
            // call; the records wait for the session to be ready, then go out.
            tracing.attach(to: session)
        }
        try await runtime.serve(services + [tracing.configService])
    }
}
