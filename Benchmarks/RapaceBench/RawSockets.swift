import CRapaceShim

#if canImport(Glibc)
import Glibc
#endif

/// An address for the raw baseline: a Unix socket path or a numeric IPv4 `HOST:PORT`.
enum RawAddress: CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: UInt16)

    var description: String {
        switch self {
        case .unix(let path): path
        case .tcp(let host, let port): "\(host):\(port)"
        }
    }

    var isTCP: Bool {
        if case .tcp = self { return true }
        return false
    }

    /// Parses numeric IPv4 `HOST:PORT` (an empty host means 127.0.0.1).
    static func parseTCP(_ text: String) throws -> RawAddress {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
            throw BenchError("expected HOST:PORT (numeric IPv4), got \"\(text)\"")
        }
        let host = text[..<colon].isEmpty ? "127.0.0.1" : String(text[..<colon])
        return .tcp(host: host, port: port)
    }
}

/// Blocking stream sockets for the raw ping-pong baseline (TCP_NODELAY on TCP).
enum RawSocket {
    /// Calls `body` with the kernel form of `address`.
    private static func withSockaddr<R>(_ address: RawAddress, _ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) throws -> R {
        switch address {
        case .unix(let path):
            var storage = sockaddr_un()
            storage.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            let capacity = MemoryLayout.size(ofValue: storage.sun_path)
            guard bytes.count < capacity else {
                throw BenchError("Unix socket path of \(bytes.count) bytes exceeds the limit of \(capacity - 1): \(path)")
            }
            withUnsafeMutableBytes(of: &storage.sun_path) { raw in
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            return try withUnsafePointer(to: &storage) { pointer in
                try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try body($0, socklen_t(MemoryLayout<sockaddr_un>.size))
                }
            }
        case .tcp(let host, let port):
            var storage = sockaddr_in()
            storage.sin_family = sa_family_t(AF_INET)
            storage.sin_port = port.bigEndian
            guard inet_pton(AF_INET, host, &storage.sin_addr) == 1 else {
                throw BenchError("the raw baseline takes a numeric IPv4 host, got \"\(host)\"")
            }
            return try withUnsafePointer(to: &storage) { pointer in
                try pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    try body($0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
    }

    private static func newSocket(for address: RawAddress) throws -> Int32 {
        let domain = address.isTCP ? AF_INET : AF_UNIX
        let fd = socket(domain, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BenchError.system("socket") }
        return fd
    }

    /// A blocking listening socket; returns it and the bound address (real port for port 0).
    static func listen(on address: RawAddress) throws -> (fd: Int32, bound: RawAddress) {
        let fd = try newSocket(for: address)
        do {
            if address.isTCP { _ = rapace_set_reuseaddr(fd) }
            try withSockaddr(address) { pointer, length in
                guard bind(fd, pointer, length) == 0 else { throw BenchError.system("bind \(address)") }
            }
            guard Glibc.listen(fd, 4) == 0 else { throw BenchError.system("listen \(address)") }
            guard case .tcp(let host, _) = address else { return (fd, address) }
            var bound = sockaddr_in()
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let rc = withUnsafeMutablePointer(to: &bound) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            guard rc == 0 else { throw BenchError.system("getsockname") }
            return (fd, .tcp(host: host, port: UInt16(bigEndian: bound.sin_port)))
        } catch {
            close(fd)
            throw error
        }
    }

    /// Accepts one connection (blocking); TCP_NODELAY on TCP. Gives up when `keepWaiting`
    /// (asked twice a second) returns false.
    static func acceptOne(_ listener: Int32, tcp: Bool, keepWaiting: () -> Bool) throws -> Int32 {
        while true {
            var poller = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, 500)
            if ready < 0 && errno != EINTR { throw BenchError.system("poll on the listening socket") }
            if ready <= 0 {
                guard keepWaiting() else { throw BenchError("no client connected and the bench is gone") }
                continue
            }
            let fd = accept(listener, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                if tcp { _ = rapace_set_nodelay(fd) }
                return fd
            }
            if errno != EINTR && errno != EAGAIN && errno != ECONNABORTED { throw BenchError.system("accept") }
        }
    }

    /// Connects a blocking socket to `address`; TCP_NODELAY on TCP.
    static func connect(to address: RawAddress) throws -> Int32 {
        let fd = try newSocket(for: address)
        do {
            try withSockaddr(address) { pointer, length in
                guard Glibc.connect(fd, pointer, length) == 0 else { throw BenchError.system("connect \(address)") }
            }
            if address.isTCP {
                guard rapace_set_nodelay(fd) == 0 else { throw BenchError.system("TCP_NODELAY") }
            }
            return fd
        } catch {
            close(fd)
            throw error
        }
    }

    /// Reads exactly `count` bytes into `buffer`; false on EOF before the first byte.
    static func readExactly(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ count: Int) throws -> Bool {
        var done = 0
        while done < count {
            let result = read(fd, buffer + done, count - done)
            if result > 0 {
                done += result
            } else if result == 0 {
                if done == 0 { return false }
                throw BenchError("peer closed the connection in the middle of a message (\(done) of \(count) bytes)")
            } else if errno != EINTR {
                throw BenchError.system("read")
            }
        }
        return true
    }

    /// Writes all `count` bytes of `buffer` (MSG_NOSIGNAL).
    static func writeAll(_ fd: Int32, _ buffer: UnsafeRawPointer, _ count: Int) throws {
        var done = 0
        while done < count {
            let result = rapace_send(fd, buffer + done, count - done)
            if result > 0 {
                done += result
            } else if result < 0 && errno != EINTR {
                throw BenchError.system("send")
            }
        }
    }
}
