import CRapaceShim

/// Delivers a POSIX signal (SIGINT, SIGTERM, …) as a callback on the reactor's loop.
///
/// libevent installs the process-wide handler; only one reactor in a process should watch
/// a given signal. Loop-confined.
public final class SignalWatcher: ReactorRegistration {
    /// The reactor whose loop thread runs the handler.
    public let reactor: Reactor
    /// The signal number watched, such as `SIGTERM`.
    public let signal: Int32
    private var event: OpaquePointer?
    private let handler: () -> Void

    /// Starts watching `signal`. Call on the loop thread.
    public init(reactor: Reactor, signal: Int32, handler: @escaping () -> Void) {
        reactor.preconditionInLoop()
        self.reactor = reactor
        self.signal = signal
        self.handler = handler
        let context = Unmanaged.passUnretained(self).toOpaque()
        event = rapace_signal_event_new(reactor.base, signal, signalTrampoline, context)
        precondition(event != nil, "rapace: event_new failed for signal \(signal)")
        _ = rapace_event_add(event, -1)
        reactor.register(self)
    }

    /// Stops watching (the default disposition is restored by libevent). Idempotent.
    public func cancel() {
        guard let event else { return }
        rapace_event_del(event)
        rapace_event_free(event)
        self.event = nil
        reactor.unregister(self)
    }

    func reactorWillShutDown() { cancel() }

    fileprivate func fire() { handler() }
}

private func signalTrampoline(_ fd: Int32, _ what: Int16, _ context: UnsafeMutableRawPointer?) {
    let watcher = Unmanaged<SignalWatcher>.fromOpaque(context!).takeUnretainedValue()
    let reactor = watcher.reactor
    let previous = reactor.enterCallback()
    watcher.fire()
    reactor.leaveCallback(previous)
}
