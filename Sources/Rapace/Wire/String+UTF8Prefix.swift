extension String {
    /// The longest prefix of at most `maxBytes` UTF-8 bytes that ends on a Unicode scalar
    /// boundary: what a length-bounded field (an error message, a close reason, a trace
    /// field) keeps of a longer text without producing invalid UTF-8.
    package func prefix(utf8Bytes maxBytes: Int) -> Substring {
        let utf8 = self.utf8
        guard let end = utf8.index(utf8.startIndex, offsetBy: max(maxBytes, 0), limitedBy: utf8.endIndex), end != utf8.endIndex
        else { return self[...] }
        var cut = end
        // `cut` is the first byte left out: back up while it continues the scalar before it.
        while cut > utf8.startIndex && UTF8.isContinuation(utf8[cut]) { cut = utf8.index(before: cut) }
        return self[..<cut]
    }
}
