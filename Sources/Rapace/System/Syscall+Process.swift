#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CRapaceShim

// Child processes, for the plugin host (RapacePlugin): package-visible so that module goes
// through this choke point too.
extension Sys {
    /// `pidfd_open(pid, 0)` (Linux 5.3+): a close-on-exec descriptor that polls readable
    /// once `pid` has exited. Throws with `ENOSYS` where the kernel lacks it and `EPERM`
    /// where a seccomp filter forbids it; the caller then has to poll `waitpid`.
    package static func pidfdOpen(_ pid: pid_t) throws(SystemError) -> Int32 {
        try call("pidfd_open(\(pid))") { rapace_pidfd_open(pid) }
    }

    /// Reaps `pid` if it has exited (`waitpid(pid, &status, WNOHANG)`): its wait status, or
    /// nil while it runs. Throws (`ECHILD`) when `pid` is not an unreaped child.
    package static func reapIfExited(_ pid: pid_t) throws(SystemError) -> Int32? {
        var status: Int32 = 0
        let reaped = try call("waitpid(\(pid))") { waitpid(pid, &status, WNOHANG) }
        return reaped == pid ? status : nil
    }
}
