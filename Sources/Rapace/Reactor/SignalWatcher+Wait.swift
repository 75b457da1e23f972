#if canImport(Glibc)
import Glibc
#endif

extension SignalWatcher {
    /// Waits until one of `signals` arrives (SIGINT and SIGTERM by default), stops watching
    /// all of them, and returns the one that arrived: how a server's `main` waits for its
    /// shutdown request before shutting down gracefully.
    ///
    /// Watches on `reactor`'s loop; only one reactor in a process should watch a signal.
    public static func waitForAny(of signals: [Int32] = [SIGINT, SIGTERM], on reactor: Reactor) async -> Int32 {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Int32, Never>) in
            reactor.executeOrRunNow {
                var watchers: [SignalWatcher] = []
                var fired = false
                for signal in signals {
                    watchers.append(SignalWatcher(reactor: reactor, signal: signal) {
                        guard !fired else { return }
                        fired = true
                        for watcher in watchers { watcher.cancel() }
                        watchers.removeAll()
                        continuation.resume(returning: signal)
                    })
                }
            }
        }
    }
}
