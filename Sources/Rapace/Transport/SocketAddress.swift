#if canImport(Glibc)
import Glibc
#endif

/// Where a stream transport listens or connects.
public enum SocketAddress: Hashable, Sendable, CustomStringConvertible {
    /// TCP: a host name or numeric address, and a port (0 = any, when listening).
    case tcp(host: String, port: UInt16)
    /// A Unix domain socket path.
    case unix(path: String)

    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case .unix(let path): path
        }
    }

    /// Parses `HOST:PORT` or `[IPv6]:PORT`.
    public static func parseTCP(_ text: String) throws(TransportError) -> SocketAddress {
        var host: Substring
        var portText: Substring
        if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw TransportError(.connectFailed, "expected [HOST]:PORT, got \"\(text)\"") }
            portText = rest.dropFirst()
        } else if let colon = text.lastIndex(of: ":") {
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
        } else {
            throw TransportError(.connectFailed, "expected HOST:PORT, got \"\(text)\"")
        }
        guard let port = UInt16(portText) else { throw TransportError(.connectFailed, "invalid port \"\(portText)\" in \"\(text)\"") }
        if host.isEmpty { host = "127.0.0.1" }
        return .tcp(host: String(host), port: port)
    }

    /// Resolves to a kernel socket address (blocking name lookup for non-numeric hosts).
    func resolve() throws(TransportError) -> ResolvedAddress {
        switch self {
        case .unix(let path):
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            let capacity = MemoryLayout.size(ofValue: address.sun_path)
            guard bytes.count < capacity else {
                throw TransportError(.connectFailed, "Unix socket path of \(bytes.count) bytes exceeds the limit of \(capacity - 1): \(path)")
            }
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            var storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { dest in
                withUnsafeBytes(of: address) { dest.copyMemory(from: $0) }
            }
            return ResolvedAddress(storage: storage, length: socklen_t(MemoryLayout<sockaddr_un>.size), domain: AF_UNIX)
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = AI_NUMERICSERV | AI_ADDRCONFIG
            hints.ai_family = AF_UNSPEC
            var result: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &result)
            guard rc == 0, let first = result else {
                let text = rc == 0 ? "no address" : String(cString: gai_strerror(rc))
                throw TransportError(.connectFailed, "cannot resolve \(host): \(text)")
            }
            defer { freeaddrinfo(result) }
            var storage = sockaddr_storage()
            withUnsafeMutableBytes(of: &storage) { dest in
                dest.baseAddress!.copyMemory(from: first.pointee.ai_addr, byteCount: Int(first.pointee.ai_addrlen))
            }
            return ResolvedAddress(storage: storage, length: first.pointee.ai_addrlen, domain: first.pointee.ai_family)
        }
    }
}

/// A resolved kernel address.
struct ResolvedAddress {
    var storage: sockaddr_storage
    var length: socklen_t
    var domain: Int32

    func withSockaddr<R, E: Error>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(E) -> R) throws(E) -> R {
        var copy = storage
        let result: Result<R, E> = withUnsafePointer(to: &copy) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                do throws(E) { return .success(try body(address, length)) } catch { return .failure(error) }
            }
        }
        return try result.get()
    }

    /// The port of a bound TCP socket.
    static func boundPort(of fd: Int32) -> UInt16? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.load(as: sockaddr_in.self).sin_port) }
        case AF_INET6:
            return withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.load(as: sockaddr_in6.self).sin6_port) }
        default:
            return nil
        }
    }
}
