import CRapaceShim

/// A one-shot timer on a reactor. Loop-confined: create, fire and cancel on the loop.
public final class ReactorTimer: ReactorRegistration {
    private let reactor: Reactor
    private var event: OpaquePointer?
    private var body: (() -> Void)?
    /// When the timer is due, on the precise CLOCK_MONOTONIC (libevent may use a coarser clock).
    private var due: UInt64 = 0

    fileprivate init(reactor: Reactor, body: @escaping () -> Void) {
        self.reactor = reactor
        self.body = body
    }

    /// Whether the timer is still armed.
    public var isArmed: Bool { event != nil }

    /// Disarms the timer; the body will not run. Safe to call more than once.
    public func cancel() {
        reactor.preconditionInLoop()
        guard let event else { return }
        rapace_event_del(event)
        rapace_event_free(event)
        self.event = nil
        body = nil
        reactor.unregister(self)
        Unmanaged.passUnretained(self).release()  // the reference taken when armed
    }

    func reactorWillShutDown() { cancel() }

    /// Arms the timer for the monotonic time `due`, `nanos` from now.
    fileprivate func arm(due: UInt64, afterNanoseconds nanos: UInt64) {
        let context = Unmanaged.passRetained(self).toOpaque()
        guard let event = rapace_event_new(reactor.base, -1, 0, timerTrampoline, context) else {
            Unmanaged.passUnretained(self).release()
            preconditionFailure("rapace: event_new failed for a timer (out of memory)")
        }
        self.event = event
        reactor.register(self)
        self.due = due
        add(event, afterNanoseconds: nanos)
    }

    private func add(_ event: OpaquePointer, afterNanoseconds nanos: UInt64) {
        let micros = Int64(clamping: nanos.dividedRoundingUp(by: 1000))
        // libevent measures from the time cached at the start of the loop turn; refresh it so
        // a timer armed late in a turn does not fire early by the length of the turn.
        _ = rapace_event_base_update_cache_time(reactor.base)
        _ = rapace_event_add(event, micros)
    }

    fileprivate func fire() {
        guard let event else { return }
        // libevent's clock is the coarse one (a jiffy of resolution): a timer can fire a little
        // early by the precise clock. Never run the body early: wait for the rest.
        let now = Sys.monotonicNanoseconds()
        if now < due {
            add(event, afterNanoseconds: due - now)
            return
        }
        let body = self.body
        rapace_event_free(event)
        self.event = nil
        self.body = nil
        reactor.unregister(self)
        body?()
        Unmanaged.passUnretained(self).release()
    }
}

extension Reactor {
    /// Runs `body` on the loop after `nanoseconds`. Call on the loop thread.
    @discardableResult
    public func schedule(afterNanoseconds nanoseconds: UInt64, _ body: @escaping () -> Void) -> ReactorTimer {
        preconditionInLoop()
        let now = Sys.monotonicNanoseconds()
        return schedule(atMonotonicNanoseconds: now.addingSaturating(nanoseconds), now: now, body)
    }

    /// Runs `body` on the loop at the `CLOCK_MONOTONIC` time `due` (see ``Deadline``), or at
    /// once when it has passed. Call on the loop thread.
    @discardableResult
    public func schedule(atMonotonicNanoseconds due: UInt64, _ body: @escaping () -> Void) -> ReactorTimer {
        preconditionInLoop()
        return schedule(atMonotonicNanoseconds: due, now: Sys.monotonicNanoseconds(), body)
    }

    /// ``schedule(atMonotonicNanoseconds:_:)`` for a caller that has just read the clock
    /// (`now`, from `Sys.monotonicNanoseconds()`): no second read. A `now` read a little
    /// earlier only delays the timer by as much; it never fires before `due`.
    @discardableResult
    func schedule(atMonotonicNanoseconds due: UInt64, now: UInt64, _ body: @escaping () -> Void) -> ReactorTimer {
        assertInLoop()  // the public forms check in release builds too; the session's calls are on the loop
        let timer = ReactorTimer(reactor: self, body: body)
        timer.arm(due: due, afterNanoseconds: due > now ? due - now : 0)
        return timer
    }

    /// Runs `body` on the loop after `delay`. Call on the loop thread.
    @discardableResult
    public func schedule(after delay: Duration, _ body: @escaping () -> Void) -> ReactorTimer {
        schedule(afterNanoseconds: delay.nanoseconds, body)
    }
}

private func timerTrampoline(_ fd: Int32, _ what: Int16, _ context: UnsafeMutableRawPointer?) {
    let timer = Unmanaged<ReactorTimer>.fromOpaque(context!).takeUnretainedValue()
    let reactor = timer.reactorForTrampoline
    let previous = reactor.enterCallback()
    timer.fire()
    reactor.leaveCallback(previous)
}

extension ReactorTimer {
    fileprivate var reactorForTrampoline: Reactor { reactor }
}
