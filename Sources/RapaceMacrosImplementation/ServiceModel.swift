import SwiftDiagnostics
import SwiftSyntax

/// A `@Service` protocol as the generator sees it, after validation.
struct ServiceModel {
    /// The protocol's name as written (`Echo`).
    var name: String
    /// The service part of the wire names (the protocol name, or `@Service(wireName:)`).
    var wireName: String
    /// `public `, `package `, `fileprivate `, `private ` or empty: the protocol's access,
    /// given to the generated types.
    var access: String
    /// Whether the protocol refines `Sendable` (then the server need not require it).
    var refinesSendable: Bool
    /// Protocols it inherits besides `Sendable`: their requirements are not part of the
    /// service, so the client cannot conform.
    var otherInheritedTypes: [String]
    var methods: [MethodModel]

    /// `public ` or `package ` for members of the generated types, empty otherwise.
    var memberAccess: String { access == "public " || access == "package " ? access : "" }

    /// Why the generated client cannot conform to the protocol, or nil when it does.
    var clientConformanceObstacle: String? {
        if let inherited = otherInheritedTypes.first {
            return "`\(name)` inherits from `\(inherited)`, whose requirements `@Service` does not see"
        }
        if let method = methods.first(where: { !$0.isAsyncThrows }) {
            return "a call to the peer is `async throws`, and `\(method.signatureName)` is not"
        }
        return nil
    }
}

/// One method of a `@Service` protocol.
struct MethodModel {
    enum Kind {
        /// One request, one response.
        case unary
        /// Items through the writer parameter, then the end of the stream.
        case serverStream(writer: Parameter, item: String)
        /// One request, no response (`@OneWay`).
        case notification
    }

    /// The base name as written (``name``, or `` `default` ``).
    var name: String
    /// `name(_:b:)`, for messages and docs.
    var signatureName: String
    /// The method part of the wire name (`new_span`).
    var wireName: String
    /// The full wire name (`TracingSink.new_span`).
    var fullWireName: String
    var id: UInt32
    var kind: Kind
    /// The arguments, without a stream writer.
    var parameters: [Parameter]
    /// Every parameter in declaration order, stream writer included.
    var allParameters: [Parameter]
    /// The result type as written; nil for `Void`.
    var result: ValueType?
    var isAsync: Bool
    var isThrowing: Bool
    /// `async` and an untyped `throws`: the only effects a call to the peer can honour.
    var isAsyncThrows: Bool
}

/// A parameter of a service method.
struct Parameter {
    /// The argument label as written, `_` for none.
    var label: String
    /// The parameter's name inside the method (a generated one when it has none).
    var name: String
    var type: ValueType

    /// `label name: Type`, or `name: Type` when both agree.
    var declaration: String {
        label == name || name == "`\(label)`" ? "\(label): \(type.declaration)" : "\(label) \(name): \(type.declaration)"
    }
}

/// A type that crosses the wire.
struct ValueType {
    /// The type as written in the protocol (`consuming String`), for signatures.
    var declaration: String
    /// The type itself, without ownership specifiers (`String`), for coding.
    var text: String
    /// How it is coded.
    var coding: Coding

    enum Coding {
        /// `Codable & Sendable`, through `read(_:)` / `write(_:)`.
        case value
        /// `[UInt8]`: a value, but with a size hint for the encoder.
        case byteArray
        /// `Rapace.Payload`: a byte buffer read as a view of the payload, without a copy.
        case byteBuffer
    }

    init(_ type: TypeSyntax) {
        declaration = type.trimmedDescription
        var base = type
        if let attributed = type.as(AttributedTypeSyntax.self), attributed.attributes.isEmpty {
            base = attributed.baseType  // `borrowing`, `consuming`, `sending`, …
        }
        text = base.trimmedDescription
        if ServiceAnalysis.isPayload(base) {
            coding = .byteBuffer
        } else if let array = base.as(ArrayTypeSyntax.self), array.element.trimmedDescription == "UInt8" {
            coding = .byteArray
        } else {
            coding = .value
        }
    }
}

/// Turns a protocol declaration into a ``ServiceModel``, collecting diagnostics.
struct ServiceAnalysis {
    var diagnostics = DiagnosticSink()

    /// Analyses `declaration`; nil when it has errors (see ``diagnostics``).
    mutating func analyze(_ declaration: ProtocolDeclSyntax, attribute: AttributeSyntax) -> ServiceModel? {
        let name = declaration.name.text
        let serviceWireName = wireNameArgument(of: attribute, label: "wireName", allowDots: true) ?? Self.unescaped(name)

        var access = ""
        for modifier in declaration.modifiers {
            switch modifier.name.tokenKind {
            case .keyword(.public), .keyword(.package), .keyword(.fileprivate), .keyword(.private), .keyword(.internal):
                access = modifier.name.text == "internal" ? "" : modifier.name.text + " "
            default:
                break
            }
        }

        var refinesSendable = false
        var otherInherited: [String] = []
        for inherited in declaration.inheritanceClause?.inheritedTypes ?? [] {
            let text = inherited.type.trimmedDescription
            if text == "Sendable" || text == "Swift.Sendable" {
                refinesSendable = true
            } else {
                otherInherited.append(text)
            }
        }

        var methods: [MethodModel] = []
        for member in declaration.memberBlock.members {
            let decl = member.decl
            if let function = decl.as(FunctionDeclSyntax.self) {
                if let method = analyze(function, service: serviceWireName) { methods.append(method) }
            } else if decl.is(TypeAliasDeclSyntax.self) {
                continue  // a convenience of the protocol, not part of the service
            } else {
                unsupportedMember(decl)
            }
        }
        checkNames(methods, in: declaration)

        guard !diagnostics.hasErrors else { return nil }
        return ServiceModel(
            name: name, wireName: serviceWireName, access: access, refinesSendable: refinesSendable,
            otherInheritedTypes: otherInherited, methods: methods)
    }

    // MARK: Members

    private mutating func unsupportedMember(_ decl: DeclSyntax) {
        let what: String
        var node = Syntax(decl)
        if let variable = decl.as(VariableDeclSyntax.self) {
            what = "a property"
            node = variable.bindings.first.map { Syntax($0.pattern) } ?? Syntax(decl)
        } else if let subscriptDecl = decl.as(SubscriptDeclSyntax.self) {
            what = "a subscript"
            node = Syntax(subscriptDecl.subscriptKeyword)
        } else if let initializer = decl.as(InitializerDeclSyntax.self) {
            what = "an initializer"
            node = Syntax(initializer.initKeyword)
        } else if let associated = decl.as(AssociatedTypeDeclSyntax.self) {
            what = "an associated type"
            node = Syntax(associated.name)
        } else if decl.is(IfConfigDeclSyntax.self) {
            what = "an #if block"
        } else {
            what = "this declaration"
        }
        diagnostics.error(
            .unsupportedMember, at: node,
            "a @Service protocol can only declare methods; \(what) cannot be called over rapace (make it a method, or move it to another protocol)")
    }

    private mutating func analyze(_ function: FunctionDeclSyntax, service: String) -> MethodModel? {
        let errorsBefore = diagnostics.diagnostics.count
        let baseName = function.name.text
        guard case .identifier = function.name.tokenKind else {
            diagnostics.error(.unsupportedMember, at: function.name, "a @Service method needs a name; operator '\(baseName)' cannot be called over rapace")
            return nil
        }

        for modifier in function.modifiers {
            switch modifier.name.tokenKind {
            case .keyword(.static), .keyword(.class):
                diagnostics.error(
                    .staticMethod, at: modifier,
                    "'\(modifier.name.text)' method '\(baseName)' cannot be part of a service: calls go to an instance",
                    fixIts: [removing(modifier, from: function, "remove '\(modifier.name.text)'", id: "removeStatic")])
            case .keyword(.mutating):
                diagnostics.error(
                    .mutatingMethod, at: modifier,
                    "'mutating' method '\(baseName)' cannot be part of a service: the server calls a shared implementation",
                    fixIts: [removing(modifier, from: function, "remove 'mutating'", id: "removeMutating")])
            default:
                break
            }
        }
        if let generics = function.genericParameterClause {
            diagnostics.error(.genericMethod, at: generics, "generic method '\(baseName)' cannot be part of a service: its arguments must have one wire encoding")
        } else if let whereClause = function.genericWhereClause {
            diagnostics.error(.genericMethod, at: whereClause, "method '\(baseName)' with a 'where' clause cannot be part of a service")
        }

        // Attributes: @WireName("…") and @OneWay.
        var methodWireName: String?
        var isOneWay = false
        for element in function.attributes {
            guard let attribute = element.as(AttributeSyntax.self) else { continue }
            switch Self.attributeName(attribute) {
            case "WireName":
                methodWireName = wireNameArgument(of: attribute, label: nil, allowDots: false)
            case "OneWay":
                isOneWay = true
            default:
                break
            }
        }

        // Parameters.
        var parameters: [Parameter] = []
        var writers: [(Parameter, String, FunctionParameterSyntax)] = []
        let parameterList = Array(function.signature.parameterClause.parameters)
        for (index, parameter) in parameterList.enumerated() {
            let label = parameter.firstName.text
            var name = (parameter.secondName ?? parameter.firstName).text
            if name == "_" { name = "argument\(index)" }
            var type = parameter.type
            if let attributed = type.as(AttributedTypeSyntax.self), let inoutToken = Self.inoutSpecifier(attributed) {
                diagnostics.error(
                    .inoutParameter, at: inoutToken,
                    "'inout' parameter '\(name)' of '\(baseName)' cannot be part of a service: changes cannot travel back to the caller",
                    fixIts: [removingInout(attributed, inoutToken)])
                type = attributed.baseType
            }
            if let ellipsis = parameter.ellipsis {
                diagnostics.error(
                    .variadicParameter, at: ellipsis,
                    "variadic parameter '\(name)' of '\(baseName)' cannot be part of a service; take an array",
                    fixIts: [
                        FixIt(
                            message: ServiceFixIt(message: "replace '\(type.trimmedDescription)...' with '[\(type.trimmedDescription)]'", id: "variadicToArray"),
                            changes: [
                                .replace(oldNode: Syntax(parameter), newNode: Syntax(
                                    parameter
                                        .with(\.type, TypeSyntax(ArrayTypeSyntax(element: type.trimmed)).with(\.trailingTrivia, type.trailingTrivia))
                                        .with(\.ellipsis, nil)))
                            ])
                    ])
            }
            if let item = Self.streamWriterItem(type) {
                let model = Parameter(label: label, name: Self.escapedIfKeyword(name), type: ValueType(type))
                writers.append((model, item.trimmedDescription, parameter))
                checkValueType(item, role: "stream item", method: baseName)
                continue
            }
            checkValueType(type, role: "argument '\(name)'", method: baseName)
            parameters.append(Parameter(label: label, name: Self.escapedIfKeyword(name), type: ValueType(type)))
        }

        // Result and effects.
        var result: ValueType?
        if let returnType = function.signature.returnClause?.type, !Self.isVoid(returnType) {
            checkValueType(returnType, role: "result", method: baseName)
            result = ValueType(returnType)
        }
        let effects = function.signature.effectSpecifiers
        let isAsync = effects?.asyncSpecifier != nil
        let throwsClause = effects?.throwsClause
        let isThrowing = throwsClause.map { $0.throwsSpecifier.tokenKind == .keyword(.throws) } ?? false
        let untypedThrows = isThrowing && (throwsClause?.type == nil || throwsClause?.type?.trimmedDescription == "any Error")
        if throwsClause?.throwsSpecifier.tokenKind == .keyword(.rethrows) {
            diagnostics.error(.unsupportedType, at: throwsClause!, "'rethrows' method '\(baseName)' cannot be part of a service: it would need a function argument")
        }

        // Kind.
        let kind: MethodModel.Kind
        if let first = writers.first {
            if writers.count > 1 {
                diagnostics.error(.misplacedStreamWriter, at: writers[1].2, "'\(baseName)' takes more than one stream writer; a server stream has one")
            } else if first.2.id != parameterList.last?.id {
                diagnostics.error(.misplacedStreamWriter, at: first.2, "the stream writer must be the last parameter of '\(baseName)'")
            }
            if isOneWay {
                diagnostics.error(.oneWayStreaming, at: first.2, "@OneWay method '\(baseName)' cannot stream: a notification gets no reply")
            }
            if let returnClause = function.signature.returnClause, result != nil {
                diagnostics.error(
                    .streamingMethodResult, at: returnClause,
                    "server-streaming method '\(baseName)' cannot return a value: its items go through '\(first.0.name)'",
                    fixIts: [removingReturnClause(function, returnClause)])
            }
            if !(isAsync && untypedThrows) {
                diagnostics.error(
                    .streamingMethodEffects, at: function.name,
                    "server-streaming method '\(baseName)' must be 'async throws': sending an item waits for credit and fails when the call ends",
                    fixIts: [makingAsyncThrows(function)])
            }
            kind = .serverStream(writer: first.0, item: first.1)
        } else if isOneWay {
            if let returnClause = function.signature.returnClause, result != nil {
                diagnostics.error(
                    .oneWayResult, at: returnClause,
                    "@OneWay method '\(baseName)' cannot return a value: a notification gets no reply",
                    fixIts: [removingReturnClause(function, returnClause)])
            }
            kind = .notification
        } else {
            kind = .unary
        }

        guard diagnostics.diagnostics.count == errorsBefore else { return nil }
        let unescapedName = Self.unescaped(baseName)
        let wireName = methodWireName ?? WireNames.snakeCase(unescapedName)
        let fullWireName = service + "." + wireName
        let labels = parameterList.map { $0.firstName.text + ":" }.joined()
        return MethodModel(
            name: baseName, signatureName: "\(unescapedName)(\(labels))", wireName: wireName, fullWireName: fullWireName,
            id: WireNames.methodID(fullWireName), kind: kind, parameters: parameters,
            allParameters: parameterList.indices.map { index in
                if case .serverStream(let writer, _) = kind, index == parameterList.count - 1 { return writer }
                return parameters[index]
            },
            result: result, isAsync: isAsync, isThrowing: isThrowing, isAsyncThrows: isAsync && untypedThrows)
    }

    // MARK: Names and ids

    private mutating func checkNames(_ methods: [MethodModel], in declaration: ProtocolDeclSyntax) {
        let functions = declaration.memberBlock.members.compactMap { $0.decl.as(FunctionDeclSyntax.self) }
        func node(of method: MethodModel) -> Syntax {
            let function = functions.first { $0.name.text == method.name && Self.signatureName(of: $0) == method.signatureName }
            return function.map { Syntax($0.name) } ?? Syntax(declaration.name)
        }

        var byID: [UInt32: MethodModel] = [:]
        var byName: [String: MethodModel] = [:]
        for method in methods {
            if method.id == 0 {
                diagnostics.error(
                    .zeroMethodID, at: node(of: method),
                    "wire name '\(method.fullWireName)' of '\(method.signatureName)' hashes to method id 0, which is reserved; choose another wire name with @WireName")
            }
            if Self.unescaped(method.name) == "all" {
                diagnostics.error(
                    .reservedMethodName, at: node(of: method),
                    "a method named 'all' would collide with the generated '\(declaration.name.text)Methods.all'; rename it and keep its wire name with @WireName(\"\(method.wireName)\")")
            }
            if let other = byName[method.name] {
                if other.fullWireName != method.fullWireName {
                    diagnostics.error(
                        .overloadedMethod, at: node(of: method),
                        "'\(method.signatureName)' overloads '\(other.signatureName)'; the methods of a service need distinct names",
                        notes: [Note(node: node(of: other), message: ServiceNote(message: "'\(other.signatureName)' declared here", id: "overloadedMethod.other"))])
                }
            } else {
                byName[method.name] = method
            }
            if let other = byID[method.id] {
                if other.fullWireName == method.fullWireName {
                    diagnostics.error(
                        .duplicateWireName, at: node(of: method),
                        "'\(method.signatureName)' has the same wire name '\(method.fullWireName)' as '\(other.signatureName)'; give one of them another name with @WireName",
                        notes: [Note(node: node(of: other), message: ServiceNote(message: "'\(other.signatureName)' declared here", id: "duplicate.other"))])
                } else {
                    diagnostics.error(
                        .duplicateMethodID, at: node(of: method),
                        "'\(method.fullWireName)' and '\(other.fullWireName)' hash to the same method id \(WireNames.display(method.id)); give one of them another name with @WireName",
                        notes: [Note(node: node(of: other), message: ServiceNote(message: "'\(other.signatureName)' declared here", id: "duplicate.other"))])
                }
            } else if method.id != 0 {
                byID[method.id] = method
            }
        }
    }

    /// The string of `@WireName("…")` (unlabelled) or `@Service(wireName: "…")`; nil when
    /// absent or invalid (then diagnosed).
    private mutating func wireNameArgument(of attribute: AttributeSyntax, label: String?, allowDots: Bool) -> String? {
        guard case .argumentList(let arguments) = attribute.arguments,
            let argument = arguments.first(where: { $0.label?.text == label })
        else { return nil }
        guard let literal = argument.expression.as(StringLiteralExprSyntax.self),
            literal.segments.count == 1,
            case .stringSegment(let segment) = literal.segments.first
        else {
            diagnostics.error(.invalidWireName, at: argument.expression, "a wire name must be a string literal")
            return nil
        }
        let value = segment.content.text
        if value.isEmpty {
            diagnostics.error(.invalidWireName, at: argument.expression, "a wire name cannot be empty")
            return nil
        }
        if !allowDots && value.contains(".") {
            diagnostics.error(
                .invalidWireName, at: argument.expression,
                "the wire name of a method cannot contain '.'; rename the service with @Service(wireName:)")
            return nil
        }
        if value.contains(where: \.isWhitespace) {
            diagnostics.error(.invalidWireName, at: argument.expression, "a wire name cannot contain whitespace")
            return nil
        }
        return value
    }

    // MARK: Types

    /// Diagnoses a type that can never be `Codable & Sendable`. What conforms is checked
    /// by the compiler in the generated code; this catches what is visible in the syntax.
    private mutating func checkValueType(_ type: TypeSyntax, role: String, method: String) {
        if let iuo = Self.findImplicitlyUnwrapped(type) {
            diagnostics.error(
                .implicitlyUnwrappedOptional, at: iuo,
                "\(role) of '\(method)' is an implicitly unwrapped optional; use an optional",
                fixIts: [
                    FixIt(
                        message: ServiceFixIt(message: "replace '!' with '?'", id: "iuoToOptional"),
                        changes: [.replace(oldNode: Syntax(iuo), newNode: Syntax(OptionalTypeSyntax(wrappedType: iuo.wrappedType).with(\.trailingTrivia, iuo.trailingTrivia)))])
                ])
            return
        }
        if let (node, what) = Self.nonCodable(type) {
            diagnostics.error(
                .unsupportedType, at: node,
                "\(role) of '\(method)' is \(what), which cannot be Codable & Sendable; every argument, result and stream item of a service crosses the wire")
        }
    }

    /// The part of `type` that makes it impossible to code, and what it is.
    static func nonCodable(_ type: TypeSyntax) -> (Syntax, String)? {
        if type.is(FunctionTypeSyntax.self) { return (Syntax(type), "a function type") }
        if let attributed = type.as(AttributedTypeSyntax.self) {
            if attributed.baseType.is(FunctionTypeSyntax.self) { return (Syntax(type), "a function type") }
            return nonCodable(attributed.baseType)
        }
        if let someOrAny = type.as(SomeOrAnyTypeSyntax.self) {
            return someOrAny.someOrAnySpecifier.tokenKind == .keyword(.some)
                ? (Syntax(type), "an opaque type") : (Syntax(type), "an existential")
        }
        if type.is(MetatypeTypeSyntax.self) { return (Syntax(type), "a metatype") }
        if type.is(CompositionTypeSyntax.self) { return (Syntax(type), "a protocol composition") }
        if type.is(ClassRestrictionTypeSyntax.self) { return (Syntax(type), "'AnyObject'") }
        if type.is(PackExpansionTypeSyntax.self) || type.is(PackElementTypeSyntax.self) {
            return (Syntax(type), "a parameter pack")
        }
        if let tuple = type.as(TupleTypeSyntax.self) {
            if tuple.elements.count == 1, let only = tuple.elements.first, only.firstName == nil {
                return nonCodable(only.type)
            }
            return tuple.elements.isEmpty ? (Syntax(type), "'Void'") : (Syntax(type), "a tuple (use a struct)")
        }
        if let array = type.as(ArrayTypeSyntax.self) { return nonCodable(array.element) }
        if let dictionary = type.as(DictionaryTypeSyntax.self) { return nonCodable(dictionary.key) ?? nonCodable(dictionary.value) }
        if let optional = type.as(OptionalTypeSyntax.self) { return nonCodable(optional.wrappedType) }
        if let identifier = type.as(IdentifierTypeSyntax.self) {
            if let what = nonCodableName(identifier.name.text) { return (Syntax(type), what) }
            return genericArgumentsNonCodable(identifier.genericArgumentClause)
        }
        if let member = type.as(MemberTypeSyntax.self) {
            if member.baseType.trimmedDescription == "Swift", let what = nonCodableName(member.name.text) { return (Syntax(type), what) }
            return genericArgumentsNonCodable(member.genericArgumentClause)
        }
        return nil
    }

    private static func genericArgumentsNonCodable(_ clause: GenericArgumentClauseSyntax?) -> (Syntax, String)? {
        for argument in clause?.arguments ?? [] {
            // A type, or (swift-syntax 602 and later) possibly a value such as an integer.
            if let type = Syntax(argument.argument).as(TypeSyntax.self), let found = nonCodable(type) {
                return found
            }
        }
        return nil
    }

    private static func nonCodableName(_ name: String) -> String? {
        switch name {
        case "Any": "'Any'"
        case "AnyObject": "'AnyObject'"
        case "Self": "'Self'"
        case "Void": "'Void'"
        case "UnsafePointer", "UnsafeMutablePointer", "UnsafeRawPointer", "UnsafeMutableRawPointer",
            "UnsafeBufferPointer", "UnsafeMutableBufferPointer", "UnsafeRawBufferPointer",
            "UnsafeMutableRawBufferPointer", "OpaquePointer", "AutoreleasingUnsafeMutablePointer":
            "a pointer"
        default: nil
        }
    }

    private static func findImplicitlyUnwrapped(_ type: TypeSyntax) -> ImplicitlyUnwrappedOptionalTypeSyntax? {
        if let iuo = type.as(ImplicitlyUnwrappedOptionalTypeSyntax.self) { return iuo }
        if let attributed = type.as(AttributedTypeSyntax.self) { return findImplicitlyUnwrapped(attributed.baseType) }
        return nil
    }

    static func isVoid(_ type: TypeSyntax) -> Bool {
        if let tuple = type.as(TupleTypeSyntax.self), tuple.elements.isEmpty { return true }
        let text = type.trimmedDescription
        return text == "Void" || text == "Swift.Void"
    }

    static func isPayload(_ type: TypeSyntax) -> Bool {
        let text = type.trimmedDescription
        return text == "Payload" || text == "Rapace.Payload"
    }

    /// `X` of `RapaceStreamWriter<X>` or `Rapace.RapaceStreamWriter<X>`.
    static func streamWriterItem(_ type: TypeSyntax) -> TypeSyntax? {
        let clause: GenericArgumentClauseSyntax?
        if let identifier = type.as(IdentifierTypeSyntax.self), identifier.name.text == "RapaceStreamWriter" {
            clause = identifier.genericArgumentClause
        } else if let member = type.as(MemberTypeSyntax.self), member.name.text == "RapaceStreamWriter",
            member.baseType.trimmedDescription == "Rapace"
        {
            clause = member.genericArgumentClause
        } else {
            return nil
        }
        guard let clause, clause.arguments.count == 1, let argument = clause.arguments.first else { return nil }
        return Syntax(argument.argument).as(TypeSyntax.self)
    }

    // MARK: Syntax helpers

    static func attributeName(_ attribute: AttributeSyntax) -> String {
        let name = attribute.attributeName.trimmedDescription
        return name.hasPrefix("RapaceMacros.") ? String(name.dropFirst("RapaceMacros.".count)) : name
    }

    static func signatureName(of function: FunctionDeclSyntax) -> String {
        let labels = function.signature.parameterClause.parameters.map { $0.firstName.text + ":" }.joined()
        return "\(unescaped(function.name.text))(\(labels))"
    }

    static func unescaped(_ name: String) -> String {
        name.hasPrefix("`") && name.hasSuffix("`") && name.count >= 2 ? String(name.dropFirst().dropLast()) : name
    }

    static func escapedIfKeyword(_ name: String) -> String {
        keywords.contains(name) ? "`\(name)`" : name
    }

    /// Words that need backticks to be used as a local name.
    static let keywords: Set<String> = [
        "associatedtype", "class", "deinit", "enum", "extension", "fileprivate", "func", "import", "init",
        "inout", "internal", "let", "open", "operator", "private", "precedencegroup", "protocol", "public",
        "rethrows", "static", "struct", "subscript", "typealias", "var", "break", "case", "catch", "continue",
        "default", "defer", "do", "else", "fallthrough", "for", "guard", "if", "in", "repeat", "return",
        "throw", "switch", "where", "while", "Any", "as", "await", "false", "is", "nil", "self", "Self",
        "super", "throws", "true", "try", "package",
    ]

    private static func inoutSpecifier(_ attributed: AttributedTypeSyntax) -> TokenSyntax? {
        for specifier in attributed.specifiers {
            if case .simpleTypeSpecifier(let simple) = specifier, simple.specifier.tokenKind == .keyword(.inout) {
                return simple.specifier
            }
        }
        return nil
    }

    // MARK: Fix-its

    private func removing(_ modifier: DeclModifierSyntax, from function: FunctionDeclSyntax, _ message: String, id: String) -> FixIt {
        var modifiers = Array(function.modifiers)
        guard let index = modifiers.firstIndex(where: { $0.id == modifier.id }) else {
            return FixIt(message: ServiceFixIt(message: message, id: id), changes: [])
        }
        modifiers.remove(at: index)
        var fixed = function.with(\.modifiers, DeclModifierListSyntax(modifiers))
        if index == 0 && function.attributes.isEmpty {
            // The removed modifier carried the declaration's indentation: hand it on.
            if fixed.modifiers.isEmpty {
                fixed = fixed.with(\.funcKeyword, fixed.funcKeyword.with(\.leadingTrivia, modifier.leadingTrivia))
            } else {
                var rest = Array(fixed.modifiers)
                rest[0] = rest[0].with(\.leadingTrivia, modifier.leadingTrivia)
                fixed = fixed.with(\.modifiers, DeclModifierListSyntax(rest))
            }
        }
        return FixIt(message: ServiceFixIt(message: message, id: id), changes: [.replace(oldNode: Syntax(function), newNode: Syntax(fixed))])
    }

    private func removingInout(_ attributed: AttributedTypeSyntax, _ token: TokenSyntax) -> FixIt {
        let remaining = attributed.specifiers.filter { specifier in
            if case .simpleTypeSpecifier(let simple) = specifier { return simple.specifier.id != token.id }
            return true
        }
        let replacement: TypeSyntax =
            remaining.isEmpty && attributed.attributes.isEmpty
            ? attributed.baseType.with(\.leadingTrivia, attributed.leadingTrivia)
            : TypeSyntax(attributed.with(\.specifiers, TypeSpecifierListSyntax(Array(remaining))))
        return FixIt(
            message: ServiceFixIt(message: "remove 'inout'", id: "removeInout"),
            changes: [.replace(oldNode: Syntax(attributed), newNode: Syntax(replacement))])
    }

    private func removingReturnClause(_ function: FunctionDeclSyntax, _ returnClause: ReturnClauseSyntax) -> FixIt {
        var signature = function.signature.with(\.returnClause, nil)
        if let effects = signature.effectSpecifiers {
            signature = signature.with(\.effectSpecifiers, effects.with(\.trailingTrivia, returnClause.trailingTrivia))
        } else {
            signature = signature.with(\.parameterClause, signature.parameterClause.with(\.trailingTrivia, returnClause.trailingTrivia))
        }
        return FixIt(
            message: ServiceFixIt(message: "remove the result type", id: "removeResult"),
            changes: [.replace(oldNode: Syntax(function.signature), newNode: Syntax(signature))])
    }

    private func makingAsyncThrows(_ function: FunctionDeclSyntax) -> FixIt {
        let old = function.signature
        let trailing = old.effectSpecifiers?.trailingTrivia ?? old.parameterClause.trailingTrivia
        let effects = FunctionEffectSpecifiersSyntax(
            asyncSpecifier: .keyword(.async, leadingTrivia: .space),
            throwsClause: ThrowsClauseSyntax(throwsSpecifier: .keyword(.throws, leadingTrivia: .space))
        ).with(\.trailingTrivia, trailing)
        let signature = old
            .with(\.parameterClause, old.parameterClause.with(\.trailingTrivia, []))
            .with(\.effectSpecifiers, effects)
        return FixIt(
            message: ServiceFixIt(message: "make '\(function.name.text)' 'async throws'", id: "makeAsyncThrows"),
            changes: [.replace(oldNode: Syntax(old), newNode: Syntax(signature))])
    }
}
