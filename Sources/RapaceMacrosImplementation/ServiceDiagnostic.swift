import SwiftDiagnostics
import SwiftSyntax

/// A diagnostic of the `@Service`, `@WireName` and `@OneWay` macros.
///
/// Every diagnostic has a stable ID (`RapaceMacros.<id>`) that tests and tools can match
/// on; the message may be reworded, the ID may not change.
struct ServiceDiagnostic: DiagnosticMessage {
    /// The stable IDs.
    enum ID: String {
        /// `@Service` on something other than a protocol.
        case notAProtocol
        /// A property, subscript, initializer, associated type, operator or `#if` block.
        case unsupportedMember
        /// A `static` or `class` method.
        case staticMethod
        /// A `mutating` method.
        case mutatingMethod
        /// A method with generic parameters or a `where` clause.
        case genericMethod
        /// An `inout` parameter.
        case inoutParameter
        /// A variadic parameter (`T...`).
        case variadicParameter
        /// An argument or result type that cannot be `Codable & Sendable` (function,
        /// existential, opaque, metatype, tuple, pointer, `Any`, `Self`, …).
        case unsupportedType
        /// An implicitly unwrapped optional (`T!`).
        case implicitlyUnwrappedOptional
        /// Two methods of one service with the same wire name.
        case duplicateWireName
        /// Two methods of one service whose different wire names hash to the same id.
        case duplicateMethodID
        /// A wire name whose id is 0, which is reserved.
        case zeroMethodID
        /// A stream writer that is not the last parameter, or more than one.
        case misplacedStreamWriter
        /// A server-streaming method that is not `async throws`.
        case streamingMethodEffects
        /// A server-streaming method with a result.
        case streamingMethodResult
        /// A `@OneWay` method with a result.
        case oneWayResult
        /// A `@OneWay` method that also streams.
        case oneWayStreaming
        /// A `@WireName` or `@Service(wireName:)` argument that is not a usable name.
        case invalidWireName
        /// A method named like a member of the generated method table (`all`).
        case reservedMethodName
        /// Two methods with the same base name.
        case overloadedMethod
        /// `@WireName` or `@OneWay` outside a method of a `@Service` protocol.
        case misplacedAttribute
    }

    let id: ID
    let message: String
    let severity: DiagnosticSeverity

    init(_ id: ID, _ message: String, severity: DiagnosticSeverity = .error) {
        self.id = id
        self.message = message
        self.severity = severity
    }

    var diagnosticID: MessageID { MessageID(domain: "RapaceMacros", id: id.rawValue) }
}

/// A note attached to a ``ServiceDiagnostic``.
struct ServiceNote: NoteMessage {
    let message: String
    let id: String
    var noteID: MessageID { MessageID(domain: "RapaceMacros", id: id) }
}

/// A fix-it of a ``ServiceDiagnostic``.
struct ServiceFixIt: FixItMessage {
    let message: String
    let id: String
    var fixItID: MessageID { MessageID(domain: "RapaceMacros", id: id) }
}

/// Collects the diagnostics of one expansion.
struct DiagnosticSink {
    private(set) var diagnostics: [Diagnostic] = []

    var hasErrors: Bool { diagnostics.contains { $0.diagMessage.severity == .error } }

    mutating func error(_ id: ServiceDiagnostic.ID, at node: some SyntaxProtocol, _ message: String, notes: [Note] = [], fixIts: [FixIt] = []) {
        diagnostics.append(Diagnostic(node: Syntax(node), message: ServiceDiagnostic(id, message), notes: notes, fixIts: fixIts))
    }
}
