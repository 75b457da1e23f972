import CRapaceShim

/// Watches one file descriptor for readability and writability on a reactor.
///
/// Loop-confined. The owner must call ``close()`` before dropping it (shutdown of the
/// reactor calls the owner's `reactorWillShutDown`, which should do so). Closing the
/// watcher does not close the descriptor.
final class IOWatcher {
    let reactor: Reactor
    let fd: Int32
    // `@exclusivity(unchecked)`: loop-confined, and no access stays open while other code
    // runs (the callbacks are copied out before they are called), so the runtime check
    // (`swift_beginAccess`, on every readiness event) could never fire.
    @exclusivity(unchecked) private var readEvent: OpaquePointer?
    @exclusivity(unchecked) private var writeEvent: OpaquePointer?
    @exclusivity(unchecked) private var readArmed = false
    @exclusivity(unchecked) private var writeArmed = false
    @exclusivity(unchecked) var onReadable: () -> Void
    @exclusivity(unchecked) var onWritable: () -> Void

    /// - Parameter edgeTriggered: report readability once per change (EV_ET) instead of while
    ///   it lasts; for eventfd doorbells, every write is a new edge, so they need no read.
    init(reactor: Reactor, fd: Int32, edgeTriggered: Bool = false, onReadable: @escaping () -> Void, onWritable: @escaping () -> Void = {}) {
        reactor.assertInLoop()
        self.reactor = reactor
        self.fd = fd
        self.onReadable = onReadable
        self.onWritable = onWritable
        let context = Unmanaged.passUnretained(self).toOpaque()
        readEvent = rapace_event_new(reactor.base, fd, RAPACE_EV_READ | RAPACE_EV_PERSIST | (edgeTriggered ? RAPACE_EV_ET : 0), ioReadTrampoline, context)
        writeEvent = rapace_event_new(reactor.base, fd, RAPACE_EV_WRITE | RAPACE_EV_PERSIST, ioWriteTrampoline, context)
        precondition(readEvent != nil && writeEvent != nil, "rapace: event_new failed (out of memory)")
    }

    var isClosed: Bool { readEvent == nil }

    func setReadEnabled(_ enabled: Bool) {
        guard let readEvent, enabled != readArmed else { return }
        readArmed = enabled
        if enabled { _ = rapace_event_add(readEvent, -1) } else { _ = rapace_event_del(readEvent) }
    }

    func setWriteEnabled(_ enabled: Bool) {
        guard let writeEvent, enabled != writeArmed else { return }
        writeArmed = enabled
        if enabled { _ = rapace_event_add(writeEvent, -1) } else { _ = rapace_event_del(writeEvent) }
    }

    /// Unregisters and frees both events. Idempotent.
    func close() {
        if let readEvent { rapace_event_del(readEvent); rapace_event_free(readEvent) }
        if let writeEvent { rapace_event_del(writeEvent); rapace_event_free(writeEvent) }
        readEvent = nil
        writeEvent = nil
        readArmed = false
        writeArmed = false
        onReadable = {}
        onWritable = {}
    }

    deinit {
        assert(readEvent == nil, "rapace: IOWatcher for fd \(fd) dropped without close()")
    }

    fileprivate func fireRead() { onReadable() }
    fileprivate func fireWrite() { onWritable() }
}

private func ioReadTrampoline(_ fd: Int32, _ what: Int16, _ context: UnsafeMutableRawPointer?) {
    let watcher = Unmanaged<IOWatcher>.fromOpaque(context!).takeUnretainedValue()
    let reactor = watcher.reactor
    let previous = reactor.enterCallback()
    watcher.fireRead()
    reactor.leaveCallback(previous)
}

private func ioWriteTrampoline(_ fd: Int32, _ what: Int16, _ context: UnsafeMutableRawPointer?) {
    let watcher = Unmanaged<IOWatcher>.fromOpaque(context!).takeUnretainedValue()
    let reactor = watcher.reactor
    let previous = reactor.enterCallback()
    watcher.fireWrite()
    reactor.leaveCallback(previous)
}
