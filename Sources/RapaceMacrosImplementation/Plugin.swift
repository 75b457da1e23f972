import SwiftCompilerPlugin
import SwiftSyntaxMacros

/// The compiler plugin that carries rapace's macros.
@main
struct RapaceMacrosPlugin: CompilerPlugin {
    let providingMacros: [any Macro.Type] = [
        ServiceMacro.self,
        WireNameMacro.self,
        OneWayMacro.self,
    ]
}
