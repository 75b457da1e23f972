import Foundation
import RapaceTestSupport
import Testing

/// The rule of ``ProcessGateTrait`` is uniform: every suite of every test target names its
/// access. A suite without a gate trait would run its tests without the gate, alongside a
/// test that needs the process to itself; this check finds one in the sources.
@Suite("ProcessGate usage", .sharesProcess)
struct ProcessGateUsageTests {
    /// `Tests/`, found from this file's path.
    static let testsDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()

    /// Every Swift file of the test targets (the support library itself excepted).
    static func sources() throws -> [(name: String, text: String)] {
        let enumerator = try #require(FileManager.default.enumerator(atPath: testsDirectory.path))
        var files: [(name: String, text: String)] = []
        for case let relative as String in enumerator where relative.hasSuffix(".swift") && !relative.hasPrefix("RapaceTestSupport/") {
            files.append((relative, try String(contentsOf: testsDirectory.appendingPathComponent(relative), encoding: .utf8)))
        }
        return files.sorted { $0.name < $1.name }
    }

    @Test("every @Suite of every test target takes the process gate, and every test is in a suite that does")
    func everySuiteNamesItsAccess() throws {
        let scan = GateUsageScan(try Self.sources())
        for problem in scan.problems { Issue.record("\(problem)") }
        #expect(scan.suites >= 40, "found only \(scan.suites) suites under \(Self.testsDirectory.path)")
        #expect(scan.tests >= 250, "found only \(scan.tests) tests under \(Self.testsDirectory.path)")
    }

    // The scanner on sources made for it: what it must find and what it must not.

    @Test("a one-line @Suite with nested parentheses, tests at any indentation, nested types")
    func scannerAcceptsGatedSuites() {
        let scan = GateUsageScan([
            (
                "a.swift",
                """
                @Suite("a (b) c", .ownsProcess("why (really)")) struct A { @Test func one() {} }
                @Suite(.serialized,
                       .sharesProcess)
                final class B {
                        @Test("x", arguments: [1, 2]) func two(x: Int) {}
                    struct Nested {
                    @Test func three() {}
                    }
                    class func helper() {}
                }
                extension A {
                    @Test func four() {}
                    enum Deeper { @Test func five() {} }
                }
                """
            ),
            ("b.swift", "extension B {\n  @Test func six() {}\n}\n"),
        ])
        #expect(scan.problems == [])
        #expect(scan.suites == 2)
        #expect(scan.tests == 6)
    }

    @Test("what it reports: a @Suite without a gate trait, a type with tests and no @Suite, a test outside any type")
    func scannerReportsUngatedTests() {
        let scan = GateUsageScan([
            (
                "c.swift",
                """
                @Suite("no gate") struct C { @Test func one() {} }
                @Suite struct D {}
                struct E {
                            @Test func two() {}
                }
                extension Unknown { @Test func three() {} }
                @Test func free() {}
                """
            )
        ])
        #expect(
            scan.problems == [
                "c.swift:1: @Suite without .sharesProcess or .ownsProcess(…)",
                "c.swift:2: @Suite without .sharesProcess or .ownsProcess(…)",
                "c.swift:7: a test function outside any type",
                "c.swift:3: struct E has tests but no @Suite with a process gate trait (nor does a type around it)",
                "c.swift:6: extension Unknown has tests but no @Suite with a process gate trait (nor does a type around it)",
            ])
    }

    @Test("comments, strings (raw, multi-line, interpolated) and their braces are not code")
    func scannerSkipsCommentsAndStrings() {
        let scan = GateUsageScan([
            (
                "d.swift",
                ##"""
                // @Suite struct F { @Test func no() {} }
                /* @Test /* nested */ struct G { */
                @Suite(.sharesProcess) struct H {
                    let a = "} @Test struct I {"
                    let b = "\(["}": 1].count) \("(")"
                    let c = #"raw " } \(not interpolation"#
                    let d = """
                        struct J { @Test func no() {} }
                        """
                    let e = #"""
                        "}" """ still inside
                        """#
                    @Test func one() {}
                }
                """##
            )
        ])
        #expect(scan.problems == [])
        #expect(scan.suites == 1)
        #expect(scan.tests == 1)
    }

    @Test("a source it cannot follow is reported, not skipped")
    func scannerReportsWhatItCannotRead() {
        #expect(GateUsageScan([("e.swift", "struct K { let s = \"unterminated\n }")]).problems.first?.hasPrefix("e.swift: cannot scan") == true)
        #expect(GateUsageScan([("f.swift", "@Suite(.sharesProcess) struct L {")]).problems == ["f.swift: unbalanced braces"])
    }
}

/// What the sources say about suites and their gate traits, found by a scan of their code
/// (comments and string literals blanked) that follows braces and parentheses, so that
/// attributes and declarations count wherever they stand: on one line or several, at any
/// indentation, in nested types and extensions.
///
/// Problems found:
/// - an `@Suite` whose arguments name neither `.sharesProcess` nor `.ownsProcess(…)`;
/// - a type with `@Test` functions that has no `@Suite`, unless it is an extension of a
///   type with one, or is nested in such a type (the gate traits are recursive);
/// - an `@Test` outside any type;
/// - a file the scan cannot follow (an unterminated comment or string, unbalanced braces).
///
/// Not understood: regex literals (no test uses one), and macros that generate suites.
struct GateUsageScan {
    private(set) var suites = 0
    private(set) var tests = 0
    private(set) var problems: [String] = []

    private struct TypeScope {
        var file: String
        var line: Int
        var kind: String
        var name: String
        var annotated: Bool
        var hasTests = false
        /// The enclosing types, innermost last (indices into `types`).
        var enclosing: [Int]
    }

    private var types: [TypeScope] = []

    init(_ files: [(name: String, text: String)]) {
        for file in files { scan(file.name, file.text) }
        let annotatedNames = Set(types.filter { $0.annotated && $0.kind != "extension" }.map(\.name))
        func gated(_ scope: TypeScope) -> Bool { scope.annotated || (scope.kind == "extension" && annotatedNames.contains(scope.name)) }
        for scope in types where scope.hasTests && !gated(scope) && !scope.enclosing.contains(where: { gated(types[$0]) }) {
            problems.append("\(scope.file):\(scope.line): \(scope.kind) \(scope.name) has tests but no @Suite with a process gate trait (nor does a type around it)")
        }
    }

    private static let typeKeywords: Set<String> = ["struct", "class", "enum", "actor", "extension", "protocol"]
    /// Words after `class` that make it a modifier, not a declaration.
    private static let notTypeNames: Set<String> = [
        "func", "var", "let", "subscript", "init", "deinit", "override", "final", "static", "public", "package", "internal",
        "private", "fileprivate", "open", "convenience", "required", "mutating", "nonisolated", "dynamic", "lazy",
    ]

    private mutating func scan(_ file: String, _ text: String) {
        guard let code = Self.blankingCommentsAndStrings(Array(text.utf8)) else {
            problems.append("\(file): cannot scan (an unterminated comment or string literal)")
            return
        }
        let tokens = Self.tokens(code)
        /// Open braces: the index in `types` of a type's body, nil for any other block.
        var open: [Int?] = []
        var pendingSuite = false
        var pendingType: TypeScope?
        var index = 0
        while index < tokens.count {
            let token = tokens[index]
            switch token.text {
            case "@Suite", "@Test":
                // The attribute's arguments, to the matching parenthesis.
                var arguments = ""
                if index + 1 < tokens.count, tokens[index + 1].text == "(" {
                    var depth = 0
                    var end = index + 1
                    repeat {
                        if tokens[end].text == "(" { depth += 1 } else if tokens[end].text == ")" { depth -= 1 }
                        end += 1
                    } while depth > 0 && end < tokens.count
                    arguments = tokens[(index + 1)..<end].map(\.text).joined()
                    index = end - 1
                }
                if token.text == "@Suite" {
                    suites += 1
                    pendingSuite = true
                    if !arguments.contains(".sharesProcess") && !arguments.contains(".ownsProcess(") {
                        problems.append("\(file):\(token.line): @Suite without .sharesProcess or .ownsProcess(…)")
                    }
                } else {
                    tests += 1
                    if let innermost = open.last(where: { $0 != nil }) ?? nil {
                        types[innermost].hasTests = true
                    } else {
                        problems.append("\(file):\(token.line): a test function outside any type")
                    }
                }
            case let word where Self.typeKeywords.contains(word):
                let afterDot = index > 0 && tokens[index - 1].text == "."
                guard !afterDot, index + 1 < tokens.count, let first = tokens[index + 1].text.first, first.isLetter || first == "_",
                    !Self.notTypeNames.contains(tokens[index + 1].text)
                else { break }
                // The name; an extension's may be qualified (`Outer.Inner`): its last part.
                var name = tokens[index + 1].text
                index += 1
                while index + 2 < tokens.count, tokens[index + 1].text == "." {
                    name = tokens[index + 2].text
                    index += 2
                }
                pendingType = TypeScope(
                    file: file, line: token.line, kind: word, name: name, annotated: pendingSuite && word != "extension",
                    enclosing: open.compactMap { $0 })
                pendingSuite = false
            case "{":
                if let type = pendingType {
                    types.append(type)
                    open.append(types.count - 1)
                    pendingType = nil
                } else {
                    open.append(nil)
                }
            case "}":
                guard !open.isEmpty else {
                    problems.append("\(file): unbalanced braces")
                    return
                }
                open.removeLast()
            default:
                break
            }
            index += 1
        }
        if !open.isEmpty { problems.append("\(file): unbalanced braces") }
    }

    private struct Token {
        var text: String
        var line: Int
    }

    /// Words (with a leading `@` for attributes) and single punctuation characters.
    private static func tokens(_ code: [UInt8]) -> [Token] {
        func isWordByte(_ byte: UInt8) -> Bool {
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "_") || byte >= 0x80
        }
        var tokens: [Token] = []
        var line = 1
        var index = 0
        while index < code.count {
            let byte = code[index]
            if byte == UInt8(ascii: "\n") {
                line += 1
                index += 1
            } else if byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") || byte == UInt8(ascii: "\r") {
                index += 1
            } else if isWordByte(byte) || (byte == UInt8(ascii: "@") && index + 1 < code.count && isWordByte(code[index + 1])) {
                var end = index + 1
                while end < code.count, isWordByte(code[end]) { end += 1 }
                tokens.append(Token(text: String(decoding: code[index..<end], as: UTF8.self), line: line))
                index = end
            } else {
                tokens.append(Token(text: String(UnicodeScalar(byte)), line: line))
                index += 1
            }
        }
        return tokens
    }

    /// `code` with the text of comments and string literals (interpolations included)
    /// replaced by spaces, line breaks kept; nil if one of them does not end.
    static func blankingCommentsAndStrings(_ code: [UInt8]) -> [UInt8]? {
        var blanker = Blanker(input: code)
        guard blanker.code(blank: false, untilUnmatched: nil) else { return nil }
        return blanker.output
    }

    private struct Blanker {
        let input: [UInt8]
        var output: [UInt8] = []
        var index = 0

        init(input: [UInt8]) {
            self.input = input
            output.reserveCapacity(input.count)
        }

        private func at(_ offset: Int) -> UInt8? { index + offset < input.count ? input[index + offset] : nil }

        private func starts(with text: String) -> Bool {
            let bytes = Array(text.utf8)
            return index + bytes.count <= input.count && Array(input[index..<(index + bytes.count)]) == bytes
        }

        /// Copies (or, `blank`, blanks) `count` bytes.
        private mutating func take(_ count: Int, blank: Bool) {
            for _ in 0..<count where index < input.count {
                let byte = input[index]
                output.append(blank && byte != UInt8(ascii: "\n") ? UInt8(ascii: " ") : byte)
                index += 1
            }
        }

        /// Code, to the end or (`untilUnmatched`) to an unmatched closing character, which
        /// is consumed. False if a comment or string in it does not end.
        mutating func code(blank: Bool, untilUnmatched closer: UInt8?) -> Bool {
            var depth = 0
            while index < input.count {
                let byte = input[index]
                if starts(with: "//") {
                    while index < input.count, input[index] != UInt8(ascii: "\n") { take(1, blank: true) }
                } else if starts(with: "/*") {
                    guard blockComment() else { return false }
                } else if byte == UInt8(ascii: "\"") || (byte == UInt8(ascii: "#") && rawStringAhead()) {
                    guard stringLiteral() else { return false }
                } else if let closer, byte == UInt8(ascii: "("), closer == UInt8(ascii: ")") {
                    depth += 1
                    take(1, blank: blank)
                } else if let closer, byte == closer {
                    if depth == 0 {
                        take(1, blank: blank)
                        return true
                    }
                    depth -= 1
                    take(1, blank: blank)
                } else {
                    take(1, blank: blank)
                }
            }
            return closer == nil
        }

        /// `#…#"`: a raw string starts here.
        private func rawStringAhead() -> Bool {
            var offset = 0
            while at(offset) == UInt8(ascii: "#") { offset += 1 }
            return at(offset) == UInt8(ascii: "\"")
        }

        private mutating func blockComment() -> Bool {
            var depth = 0
            while index < input.count {
                if starts(with: "/*") {
                    depth += 1
                    take(2, blank: true)
                } else if starts(with: "*/") {
                    depth -= 1
                    take(2, blank: true)
                    if depth == 0 { return true }
                } else {
                    take(1, blank: true)
                }
            }
            return false
        }

        /// A string literal (any number of `#`, single- or multi-line), blanked whole; its
        /// interpolations are followed as code, so their strings and parentheses count.
        private mutating func stringLiteral() -> Bool {
            var hashes = 0
            while at(0) == UInt8(ascii: "#") {
                hashes += 1
                take(1, blank: true)
            }
            let multiline = starts(with: "\"\"\"")
            take(multiline ? 3 : 1, blank: true)
            let pounds = String(repeating: "#", count: hashes)
            let terminator = (multiline ? "\"\"\"" : "\"") + pounds
            let escape = "\\" + pounds
            while index < input.count {
                if starts(with: terminator) {
                    take(terminator.utf8.count, blank: true)
                    return true
                }
                if starts(with: escape) {
                    take(escape.utf8.count, blank: true)
                    if at(0) == UInt8(ascii: "(") {
                        take(1, blank: true)
                        guard code(blank: true, untilUnmatched: UInt8(ascii: ")")) else { return false }
                    } else {
                        take(1, blank: true)  // the escaped character
                    }
                    continue
                }
                if !multiline && input[index] == UInt8(ascii: "\n") { return false }
                take(1, blank: true)
            }
            return false
        }
    }
}
