#if canImport(Glibc)
import Glibc
#endif

extension SignalWatcher {
    /// Waits until one of `signals` arrives (SIGINT and SIGTERM by default), stops watching
    /// all of them, and returns the one that arrived: how a server's `main` waits for its
    /// shutdown request before shutting down gracefully. Returns nil when the reactor shuts
    /// down first (then nothing is left to wait on).
    ///
    /// Watches on `reactor`'s loop; only one reactor in a process should watch a signal.
    @discardableResult
    public static func waitForAny(of signals: [Int32] = [SIGINT, SIGTERM], on reactor: Reactor) async -> Int32? {
        await reactor.suspendOnLoop(orIfShutDown: nil) { continuation in
            var watchers: [SignalWatcher] = []
            var hook: Int?
            var done = false
            let finish = { (signal: Int32?) in
                guard !done else { return }
                done = true
                for watcher in watchers { watcher.cancel() }
                watchers.removeAll()
                if let hook, signal != nil { reactor.removeShutdownHook(hook) }
                continuation.resume(returning: signal)
            }
            hook = reactor.addShutdownHook { finish(nil) }
            for signal in signals {
                watchers.append(SignalWatcher(reactor: reactor, signal: signal) { finish(signal) })
            }
        }
    }
}
