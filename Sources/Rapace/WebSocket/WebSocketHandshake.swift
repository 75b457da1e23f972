/// The HTTP/1.1 pieces of the WebSocket opening handshake (RFC 6455 §4).
enum WebSocketHandshake {
    /// The GUID appended to `Sec-WebSocket-Key` (RFC 6455 §1.3).
    static let guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    /// `base64(SHA-1(key ‖ GUID))`.
    static func acceptValue(forKey key: String) -> String {
        Base64.encode(SHA1.hash(Array((key + guid).utf8)))
    }

    /// A fresh random 16-byte key, base64-encoded.
    static func randomKey() -> String {
        var key = [UInt8](repeating: 0, count: 16)
        key.withUnsafeMutableBytes { Sys.fillRandom($0) }
        return Base64.encode(key)
    }

    /// The index just past the `\r\n\r\n` ending an HTTP head in `bytes`, or nil.
    static func headEnd(in bytes: [UInt8]) -> Int? {
        guard bytes.count >= 4 else { return nil }
        for i in 0...(bytes.count - 4) where bytes[i] == 13 && bytes[i + 1] == 10 && bytes[i + 2] == 13 && bytes[i + 3] == 10 {
            return i + 4
        }
        return nil
    }

    /// A parsed HTTP head: the start line's three parts and the headers (names lowercased).
    struct Head {
        var startLine: [Substring]
        var headers: [(name: String, value: String)]

        /// The value of the first header named `name` (case-insensitive).
        func header(_ name: String) -> String? {
            let lower = name.lowercased()
            return headers.first { $0.name == lower }?.value
        }

        /// Whether a comma-separated header contains `token` (case-insensitive).
        func headerContainsToken(_ name: String, _ token: String) -> Bool {
            let lower = name.lowercased()
            let wanted = token.lowercased()
            return headers.contains { header in
                header.name == lower && header.value.split(separator: ",").contains { $0.trimmingSpaces().lowercased() == wanted }
            }
        }
    }

    /// Parses an HTTP head (without the final blank line); nil when malformed.
    static func parseHead(_ bytes: ArraySlice<UInt8>) -> Head? {
        guard let text = String(validating: bytes, as: UTF8.self) else { return nil }
        var lines = text.split(separator: "\r\n", omittingEmptySubsequences: false)
        while lines.last == "" { lines.removeLast() }
        guard let first = lines.first else { return nil }
        let parts = first.split(separator: " ", maxSplits: 2, omittingEmptySubsequences: true)
        guard parts.count == 3 else { return nil }
        var headers: [(String, String)] = []
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":"), colon != line.startIndex else { return nil }
            let name = line[..<colon]
            guard !name.contains(" "), !name.contains("\t") else { return nil }
            headers.append((name.lowercased(), line[line.index(after: colon)...].trimmingSpaces()))
        }
        return Head(startLine: parts, headers: headers)
    }

    /// A complete HTTP/1.1 response head and body.
    static func response(status: Int, reason: String, headers: [(String, String)], body: [UInt8] = []) -> [UInt8] {
        var text = "HTTP/1.1 \(status) \(reason)\r\n"
        for (name, value) in headers { text += "\(name): \(value)\r\n" }
        text += "\r\n"
        return Array(text.utf8) + body
    }

    static func reasonPhrase(_ status: Int) -> String {
        switch status {
        case 101: "Switching Protocols"
        case 200: "OK"
        case 400: "Bad Request"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 408: "Request Timeout"
        case 426: "Upgrade Required"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        default: "Status"
        }
    }
}

extension StringProtocol {
    /// The text without leading and trailing spaces and tabs.
    func trimmingSpaces() -> String {
        var scalars = Substring(self)
        while let first = scalars.first, first == " " || first == "\t" { scalars.removeFirst() }
        while let last = scalars.last, last == " " || last == "\t" { scalars.removeLast() }
        return String(scalars)
    }
}
