#if canImport(Glibc)
import Glibc
#endif
import Rapace
import Synchronization

/// A child process the spawner's watcher thread reaps, and the pidfd it was given: the one
/// way to signal the child from any thread, which never reaches another process that got
/// its pid after the reap.
///
/// The pidfd's lifetime is guarded by a lock that the signaller and the reaper share: the
/// watcher reaps (`waitpid`) and closes the pidfd in one step under the lock, and `signal`
/// looks at the state and sends under the same lock. So a signal either runs before the reap,
/// while the pidfd is open and still names this child, or after it, and then sends nothing;
/// it never uses a closed descriptor number that another open may have reused. (Keeping the
/// pidfd open until this object is released would need no lock, but would tie a descriptor
/// to however long the host keeps the object.) The calls made under the lock do not block
/// (`waitpid(WNOHANG)`, `pidfd_send_signal`, `kill`, `close`).
///
/// The watcher also polls the pidfd for the exit, without the lock: only its own reap
/// closes it, and it stops polling when it reaps.
final class PluginChild: Sendable {
    /// The child's pid: for events and logs. Signals go through ``signal(_:)``.
    let pid: pid_t
    private let state: Mutex<State>

    private enum State {
        /// Not reaped by the watcher: `pid` is still this child (perhaps a zombie). The
        /// pidfd, where one could be opened, is open and owned here.
        case running(pidfd: Int32?)
        /// Reaped (or found not to be our child any more); the pidfd is closed. `pid` may
        /// name another process now.
        case gone
    }

    /// Takes ownership of `pidfd` (a pidfd of `pid`, opened before `pid` was reaped).
    init(pid: pid_t, pidfd: Int32?) {
        self.pid = pid
        self.state = Mutex(.running(pidfd: pidfd))
    }

    deinit {
        // The watcher lets go of a child only after reaping it through ``reapIfExited()``,
        // which closed the pidfd.
        assert(!hasOpenPidfd, "plugin child \(pid) released before its reap closed its pidfd")
    }

    /// Whether the pidfd is open: the child had one and has not been reaped through this object.
    var hasOpenPidfd: Bool {
        state.withLock { state in
            if case .running(_?) = state { return true }
            return false
        }
    }

    /// Sends `signal` to the child, from any thread. Returns whether it was sent: false once
    /// the child has been reaped (nothing is sent then, to no pid); throws for anything else
    /// (`EPERM`: not ours to signal).
    @discardableResult
    func signal(_ signal: Int32) throws(SystemError) -> Bool {
        try state.withLock { state throws(SystemError) -> Bool in
            switch state {
            case .gone:
                return false
            case .running(let pidfd?):
                do throws(SystemError) {
                    return try Sys.pidfdSendSignal(pidfd, signal)
                } catch where error.errno.rawValue == ENOSYS || error.errno.rawValue == EPERM {
                    // pidfd_open worked but this call is refused: by a kernel without it
                    // (ENOSYS) or a seccomp filter (ENOSYS, often EPERM). By pid then, as
                    // below. A real permission problem makes kill(2) fail with EPERM too.
                    return try Sys.signal(pid, signal)
                }
            case .running(nil):
                // No pidfd (pidfd_open refused): by pid. Our own reap takes this lock, so
                // the pid is still this child here. The window left is a reap by other code
                // in the host (`waitpid(-1)`, SIGCHLD ignored): that frees the pid behind our
                // back, and a process that reused it at once would get the signal. The pidfd
                // path above has no such window.
                return try Sys.signal(pid, signal)
            }
        }
    }

    /// Reaps the child if it has exited (`waitpid(WNOHANG)`): its wait status, or nil while
    /// it runs. A reaped child's pidfd is closed in the same step, under the lock
    /// ``signal(_:)`` takes. Throws (`ECHILD`) when it is not an unreaped child of ours; it
    /// then counts as gone too. For the watcher thread only.
    func reapIfExited() throws(SystemError) -> Int32? {
        try state.withLock { state throws(SystemError) -> Int32? in
            guard case .running(let pidfd) = state else { return nil }
            let reaped = Result { () throws(SystemError) -> Int32? in try Sys.reapIfExited(pid) }
            if case .success(nil) = reaped { return nil }
            // Reaped, or not our child any more: gone either way.
            if let pidfd { Sys.close(pidfd) }
            state = .gone
            return try reaped.get()
        }
    }
}
