import RapaceMacrosImplementation
import SwiftDiagnostics
import SwiftSyntax
import SwiftSyntaxMacroExpansion
import SwiftSyntaxMacros
import SwiftSyntaxMacrosGenericTestSupport
import Testing

/// The macros under test, by the names the source uses.
let serviceMacros: [String: MacroSpec] = [
    "Service": MacroSpec(type: ServiceMacro.self),
    "WireName": MacroSpec(type: WireNameMacro.self),
    "OneWay": MacroSpec(type: OneWayMacro.self),
]

/// `assertMacroExpansion` reporting failures as Swift Testing issues.
func assertExpansion(
    _ source: String,
    expandedSource: String,
    diagnostics: [DiagnosticSpec] = [],
    applyFixIts: [String]? = nil,
    fixedSource: String? = nil,
    fileID: StaticString = #fileID,
    filePath: StaticString = #filePath,
    line: UInt = #line,
    column: UInt = #column
) {
    assertMacroExpansion(
        source,
        expandedSource: expandedSource,
        diagnostics: diagnostics,
        macroSpecs: serviceMacros,
        applyFixIts: applyFixIts,
        fixedSource: fixedSource,
        indentationWidth: .spaces(4),
        failureHandler: { failure in
            Issue.record(
                Comment(rawValue: failure.message),
                sourceLocation: SourceLocation(
                    fileID: failure.location.fileID, filePath: failure.location.filePath,
                    line: failure.location.line, column: failure.location.column))
        },
        fileID: fileID, filePath: filePath, line: line, column: column)
}

extension MessageID {
    /// The ID of a rapace macro diagnostic.
    static func rapace(_ id: String) -> MessageID { MessageID(domain: "RapaceMacros", id: id) }
}
