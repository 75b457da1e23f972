import SwiftDiagnostics
import SwiftSyntax
import SwiftSyntaxMacros

/// `@Service`: generates `XMethods`, `XServer` and `XClient` next to protocol `X`.
///
/// The declaration is validated first; any error stops the expansion (nothing is
/// generated, so that the errors are not buried under follow-on errors in generated code).
public struct ServiceMacro: PeerMacro {
    public static func expansion(
        of node: AttributeSyntax,
        providingPeersOf declaration: some DeclSyntaxProtocol,
        in context: some MacroExpansionContext
    ) throws -> [DeclSyntax] {
        guard let protocolDecl = declaration.as(ProtocolDeclSyntax.self) else {
            context.diagnose(notAProtocol(declaration))
            return []
        }
        var analysis = ServiceAnalysis()
        let model = analysis.analyze(protocolDecl, attribute: node)
        for diagnostic in analysis.diagnostics.diagnostics { context.diagnose(diagnostic) }
        guard let model else { return [] }
        return ServiceGenerator(service: model).declarations()
    }

    /// The error for `@Service` on something else. A type whose members are all methods
    /// without bodies was obviously meant to be a protocol: offer to make it one.
    static func notAProtocol(_ declaration: some DeclSyntaxProtocol) -> Diagnostic {
        let keyword: TokenSyntax?
        let members: MemberBlockSyntax?
        let what: String
        if let decl = declaration.as(StructDeclSyntax.self) {
            (keyword, members, what) = (decl.structKeyword, decl.memberBlock, "a struct")
        } else if let decl = declaration.as(ClassDeclSyntax.self) {
            (keyword, members, what) = (decl.classKeyword, decl.memberBlock, "a class")
        } else if let decl = declaration.as(EnumDeclSyntax.self) {
            (keyword, members, what) = (decl.enumKeyword, decl.memberBlock, "an enum")
        } else if let decl = declaration.as(ActorDeclSyntax.self) {
            (keyword, members, what) = (decl.actorKeyword, decl.memberBlock, "an actor")
        } else if declaration.is(ExtensionDeclSyntax.self) {
            (keyword, members, what) = (nil, nil, "an extension (apply it to the protocol's declaration)")
        } else if declaration.is(FunctionDeclSyntax.self) {
            (keyword, members, what) = (nil, nil, "a function")
        } else {
            (keyword, members, what) = (nil, nil, "this declaration")
        }
        var fixIts: [FixIt] = []
        if let keyword, let members, !members.members.isEmpty,
            members.members.allSatisfy({ $0.decl.as(FunctionDeclSyntax.self).map { $0.body == nil } ?? false })
        {
            fixIts.append(
                FixIt(
                    message: ServiceFixIt(message: "make it a protocol", id: "makeProtocol"),
                    changes: [.replace(oldNode: Syntax(keyword), newNode: Syntax(keyword.with(\.tokenKind, .keyword(.protocol))))]))
        }
        return Diagnostic(
            node: Syntax(keyword ?? declaration.firstToken(viewMode: .sourceAccurate) ?? TokenSyntax.unknown("")),
            message: ServiceDiagnostic(
                .notAProtocol,
                "@Service applies to a protocol that defines a service, not to \(what); implementations conform to the protocol and are served with the generated server"),
            fixIts: fixIts)
    }
}

/// `@WireName("…")`: overrides a method's wire name. Read by `@Service`; expands to nothing.
public struct WireNameMacro: PeerMacro {
    public static func expansion(
        of node: AttributeSyntax,
        providingPeersOf declaration: some DeclSyntaxProtocol,
        in context: some MacroExpansionContext
    ) throws -> [DeclSyntax] {
        if declaration.is(ProtocolDeclSyntax.self) {
            context.diagnose(
                Diagnostic(
                    node: Syntax(node),
                    message: ServiceDiagnostic(.misplacedAttribute, "@WireName names a method; name the service with @Service(wireName:)")))
        } else {
            MarkerPlacement.check(node, on: declaration, in: context, attribute: "@WireName")
        }
        return []
    }
}

/// `@OneWay`: makes a method a notification (`NO_REPLY`). Read by `@Service`; expands to
/// nothing.
public struct OneWayMacro: PeerMacro {
    public static func expansion(
        of node: AttributeSyntax,
        providingPeersOf declaration: some DeclSyntaxProtocol,
        in context: some MacroExpansionContext
    ) throws -> [DeclSyntax] {
        MarkerPlacement.check(node, on: declaration, in: context, attribute: "@OneWay")
        return []
    }
}

/// `@WireName` and `@OneWay` only mean something on a method of a `@Service` protocol.
enum MarkerPlacement {
    static func check(_ node: AttributeSyntax, on declaration: some DeclSyntaxProtocol, in context: some MacroExpansionContext, attribute: String) {
        let inServiceProtocol =
            context.lexicalContext.first?.as(ProtocolDeclSyntax.self)?.attributes.contains { element in
                element.as(AttributeSyntax.self).map { ServiceAnalysis.attributeName($0) == "Service" } ?? false
            } ?? false
        guard !(declaration.is(FunctionDeclSyntax.self) && inServiceProtocol) else { return }
        context.diagnose(
            Diagnostic(
                node: Syntax(node),
                message: ServiceDiagnostic(.misplacedAttribute, "\(attribute) applies to a method of a @Service protocol")))
    }
}
