#if canImport(Glibc)
import Glibc
#endif

extension Sys {
    /// Shuts down the sending side of a socket (the peer reads EOF once it has read what was
    /// sent). Errors (ENOTCONN after a reset) are ignored: the caller closes the socket next.
    static func shutdownWrite(_ fd: Int32) {
        _ = Glibc.shutdown(fd, Int32(SHUT_WR))
    }
}
