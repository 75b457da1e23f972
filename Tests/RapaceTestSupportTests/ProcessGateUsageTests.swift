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

    /// Every Swift file of the test targets (the support library itself excepted), with its
    /// lines; comments are blanked.
    static func sources() throws -> [(name: String, lines: [String])] {
        let enumerator = try #require(FileManager.default.enumerator(atPath: testsDirectory.path))
        var files: [(String, [String])] = []
        for case let relative as String in enumerator where relative.hasSuffix(".swift") && !relative.hasPrefix("RapaceTestSupport/") {
            let text = try String(contentsOf: testsDirectory.appendingPathComponent(relative), encoding: .utf8)
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { line in
                line.trimmingCharacters(in: .whitespaces).hasPrefix("//") ? "" : String(line)
            }
            files.append((relative, lines))
        }
        return files.sorted { $0.0 < $1.0 }
    }

    @Test("every @Suite of every test target takes the process gate, shared or exclusive")
    func everySuiteNamesItsAccess() throws {
        let files = try Self.sources()
        var suites = 0
        for (name, lines) in files {
            for (index, line) in lines.enumerated() where line.trimmingCharacters(in: .whitespaces).hasPrefix("@Suite") {
                suites += 1
                // The attribute, to its closing parenthesis (it may span lines).
                var attribute = line
                var depth = line.filter { $0 == "(" }.count - line.filter { $0 == ")" }.count
                var next = index + 1
                while depth > 0, next < lines.count {
                    attribute += lines[next]
                    depth += lines[next].filter { $0 == "(" }.count - lines[next].filter { $0 == ")" }.count
                    next += 1
                }
                #expect(
                    attribute.contains(".sharesProcess") || attribute.contains(".ownsProcess("),
                    "\(name):\(index + 1): a suite without .sharesProcess or .ownsProcess(…): \(line.trimmingCharacters(in: .whitespaces))")
            }
        }
        #expect(suites >= 40, "found only \(suites) suites under \(Self.testsDirectory.path)")
    }

    @Test("every test function is inside a @Suite type (or an extension of one)")
    func everyTestIsInASuite() throws {
        let files = try Self.sources()
        let declaration = /^(?:public |package |private |fileprivate |final )*(struct|class|enum|extension|actor) ([A-Za-z0-9_]+)/
        var suiteTypes: Set<String> = []
        var blocks: [(file: String, line: Int, kind: String, type: String, annotated: Bool, hasTests: Bool)] = []
        for (name, lines) in files {
            // An @Suite attribute seen since the last declaration (it may span lines).
            var suitePending = false
            for (index, line) in lines.enumerated() {
                if line.hasPrefix("@Test") {
                    Issue.record("\(name):\(index + 1): a test function outside any suite")
                }
                if line.hasPrefix("@Suite") { suitePending = true }
                let code = line.replacing(/^@Suite(\([^)]*\))? */, with: "")
                if let match = code.firstMatch(of: declaration) {
                    let annotated = suitePending
                    suitePending = false
                    if annotated { suiteTypes.insert(String(match.2)) }
                    blocks.append((name, index + 1, String(match.1), String(match.2), annotated, false))
                } else if line.hasPrefix("    @Test"), !blocks.isEmpty {
                    blocks[blocks.count - 1].hasTests = true
                }
            }
        }
        for block in blocks where block.hasTests && !block.annotated {
            #expect(
                block.kind == "extension" && suiteTypes.contains(block.type),
                "\(block.file):\(block.line): \(block.kind) \(block.type) has tests but no @Suite with a process gate trait")
        }
    }
}
