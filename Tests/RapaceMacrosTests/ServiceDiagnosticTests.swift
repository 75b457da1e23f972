import RapaceTestSupport
import SwiftDiagnostics
import SwiftSyntaxMacrosGenericTestSupport
import Testing

/// Each diagnostic of the macros, with its stable ID, position, notes and fix-its, and
/// what the source becomes when the fix-its are applied. An expansion with errors adds
/// nothing.
@Suite("@Service: diagnostics and fix-its", .sharesProcess)
struct ServiceDiagnosticTests {
    @Test("not a protocol: a struct of body-less methods gets a fix-it")
    func notAProtocolWithFixIt() {
        assertExpansion(
            #"""
            @Service
            struct Calculator {
                func add(_ a: Int32, _ b: Int32) async throws -> Int32
            }
            """#,
            expandedSource: #"""
            struct Calculator {
                func add(_ a: Int32, _ b: Int32) async throws -> Int32
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("notAProtocol"),
                    message: "@Service applies to a protocol that defines a service, not to a struct; implementations conform to the protocol and are served with the generated server",
                    line: 2,
                    column: 1,
                    fixIts: [FixItSpec(message: "make it a protocol")]),
            ],
            fixedSource: #"""
            @Service
            protocol Calculator {
                func add(_ a: Int32, _ b: Int32) async throws -> Int32
            }
            """#
        )
    }

    @Test("not a protocol: a class with implementations")
    func notAProtocol() {
        assertExpansion(
            #"""
            @Service
            final class Calculator {
                func add(_ a: Int32, _ b: Int32) async throws -> Int32 { a + b }
            }
            """#,
            expandedSource: #"""
            final class Calculator {
                func add(_ a: Int32, _ b: Int32) async throws -> Int32 { a + b }
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("notAProtocol"),
                    message: "@Service applies to a protocol that defines a service, not to a class; implementations conform to the protocol and are served with the generated server",
                    line: 2,
                    column: 7),
            ]
        )
    }

    @Test("associated types, properties, subscripts and initializers")
    func unsupportedMembers() {
        assertExpansion(
            #"""
            @Service
            protocol Store {
                associatedtype Key
                var count: Int { get }
                subscript(index: Int) -> String { get }
                init(name: String)
                func get(_ key: String) async throws -> String
            }
            """#,
            expandedSource: #"""
            protocol Store {
                associatedtype Key
                var count: Int { get }
                subscript(index: Int) -> String { get }
                init(name: String)
                func get(_ key: String) async throws -> String
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("unsupportedMember"),
                    message: "a @Service protocol can only declare methods; an associated type cannot be called over rapace (make it a method, or move it to another protocol)",
                    line: 3,
                    column: 20),
                DiagnosticSpec(
                    id: .rapace("unsupportedMember"),
                    message: "a @Service protocol can only declare methods; a property cannot be called over rapace (make it a method, or move it to another protocol)",
                    line: 4,
                    column: 9),
                DiagnosticSpec(
                    id: .rapace("unsupportedMember"),
                    message: "a @Service protocol can only declare methods; a subscript cannot be called over rapace (make it a method, or move it to another protocol)",
                    line: 5,
                    column: 5),
                DiagnosticSpec(
                    id: .rapace("unsupportedMember"),
                    message: "a @Service protocol can only declare methods; an initializer cannot be called over rapace (make it a method, or move it to another protocol)",
                    line: 6,
                    column: 5),
            ]
        )
    }

    @Test("static and mutating methods, with fix-its")
    func staticAndMutating() {
        assertExpansion(
            #"""
            @Service
            protocol Store {
                static func make() async throws -> String
                mutating func reset() async throws
            }
            """#,
            expandedSource: #"""
            protocol Store {
                static func make() async throws -> String
                mutating func reset() async throws
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("staticMethod"),
                    message: "'static' method 'make' cannot be part of a service: calls go to an instance",
                    line: 3,
                    column: 5,
                    fixIts: [FixItSpec(message: "remove 'static'")]),
                DiagnosticSpec(
                    id: .rapace("mutatingMethod"),
                    message: "'mutating' method 'reset' cannot be part of a service: the server calls a shared implementation",
                    line: 4,
                    column: 5,
                    fixIts: [FixItSpec(message: "remove 'mutating'")]),
            ],
            fixedSource: #"""
            @Service
            protocol Store {
                func make() async throws -> String
                func reset() async throws
            }
            """#
        )
    }

    @Test("generic methods and where clauses")
    func genericMethods() {
        assertExpansion(
            #"""
            @Service
            protocol Store {
                func get<Value: Codable>(_ key: String) async throws -> Value
                func put(_ value: Int32) async throws where Self: Sendable
            }
            """#,
            expandedSource: #"""
            protocol Store {
                func get<Value: Codable>(_ key: String) async throws -> Value
                func put(_ value: Int32) async throws where Self: Sendable
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("genericMethod"),
                    message: "generic method 'get' cannot be part of a service: its arguments must have one wire encoding",
                    line: 3,
                    column: 13),
                DiagnosticSpec(
                    id: .rapace("genericMethod"),
                    message: "method 'put' with a 'where' clause cannot be part of a service",
                    line: 4,
                    column: 43),
            ]
        )
    }

    @Test("an inout parameter, with a fix-it")
    func inoutParameter() {
        assertExpansion(
            #"""
            @Service
            protocol Counter {
                func bump(_ value: inout Int32) async throws
            }
            """#,
            expandedSource: #"""
            protocol Counter {
                func bump(_ value: inout Int32) async throws
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("inoutParameter"),
                    message: "'inout' parameter 'value' of 'bump' cannot be part of a service: changes cannot travel back to the caller",
                    line: 3,
                    column: 24,
                    fixIts: [FixItSpec(message: "remove 'inout'")]),
            ],
            fixedSource: #"""
            @Service
            protocol Counter {
                func bump(_ value: Int32) async throws
            }
            """#
        )
    }

    @Test("a variadic parameter, with a fix-it")
    func variadicParameter() {
        assertExpansion(
            #"""
            @Service
            protocol Math {
                func sum(_ values: Int64...) async throws -> Int64
            }
            """#,
            expandedSource: #"""
            protocol Math {
                func sum(_ values: Int64...) async throws -> Int64
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("variadicParameter"),
                    message: "variadic parameter 'values' of 'sum' cannot be part of a service; take an array",
                    line: 3,
                    column: 29,
                    fixIts: [FixItSpec(message: "replace 'Int64...' with '[Int64]'")]),
            ],
            fixedSource: #"""
            @Service
            protocol Math {
                func sum(_ values: [Int64]) async throws -> Int64
            }
            """#
        )
    }

    @Test("types that can never be Codable & Sendable")
    func unsupportedTypes() {
        assertExpansion(
            #"""
            @Service
            protocol Bad {
                func run(_ callback: @escaping @Sendable (Int) -> Void) async throws
                func make() async throws -> any Error
                func pair() async throws -> (Int, String)
                func kind(_ type: Int.Type) async throws
                func list(_ items: [UnsafeRawPointer]) async throws
                func clone() async throws -> Self
            }
            """#,
            expandedSource: #"""
            protocol Bad {
                func run(_ callback: @escaping @Sendable (Int) -> Void) async throws
                func make() async throws -> any Error
                func pair() async throws -> (Int, String)
                func kind(_ type: Int.Type) async throws
                func list(_ items: [UnsafeRawPointer]) async throws
                func clone() async throws -> Self
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("unsupportedType"),
                    message: "argument 'callback' of 'run' is a function type, which cannot be Codable & Sendable; every argument, result and stream item of a service crosses the wire",
                    line: 3,
                    column: 26),
                DiagnosticSpec(
                    id: .rapace("unsupportedType"),
                    message: "result of 'make' is an existential, which cannot be Codable & Sendable; every argument, result and stream item of a service crosses the wire",
                    line: 4,
                    column: 33),
                DiagnosticSpec(
                    id: .rapace("unsupportedType"),
                    message: "result of 'pair' is a tuple (use a struct), which cannot be Codable & Sendable; every argument, result and stream item of a service crosses the wire",
                    line: 5,
                    column: 33),
                DiagnosticSpec(
                    id: .rapace("unsupportedType"),
                    message: "argument 'type' of 'kind' is a metatype, which cannot be Codable & Sendable; every argument, result and stream item of a service crosses the wire",
                    line: 6,
                    column: 23),
                DiagnosticSpec(
                    id: .rapace("unsupportedType"),
                    message: "argument 'items' of 'list' is a pointer, which cannot be Codable & Sendable; every argument, result and stream item of a service crosses the wire",
                    line: 7,
                    column: 25),
                DiagnosticSpec(
                    id: .rapace("unsupportedType"),
                    message: "result of 'clone' is 'Self', which cannot be Codable & Sendable; every argument, result and stream item of a service crosses the wire",
                    line: 8,
                    column: 34),
            ]
        )
    }

    @Test("an implicitly unwrapped optional, with a fix-it")
    func implicitlyUnwrappedOptional() {
        assertExpansion(
            #"""
            @Service
            protocol Bad {
                func name(_ id: Int32) async throws -> String!
            }
            """#,
            expandedSource: #"""
            protocol Bad {
                func name(_ id: Int32) async throws -> String!
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("implicitlyUnwrappedOptional"),
                    message: "result of 'name' is an implicitly unwrapped optional; use an optional",
                    line: 3,
                    column: 44,
                    fixIts: [FixItSpec(message: "replace '!' with '?'")]),
            ],
            fixedSource: #"""
            @Service
            protocol Bad {
                func name(_ id: Int32) async throws -> String?
            }
            """#
        )
    }

    @Test("two methods with one wire name: overloads and a @WireName clash")
    func duplicateWireNames() {
        assertExpansion(
            #"""
            @Service
            protocol Store {
                func get(key: String) async throws -> String
                func get(index: Int32) async throws -> String
                @WireName("get") func fetch(_ id: Int32) async throws -> String
            }
            """#,
            expandedSource: #"""
            protocol Store {
                func get(key: String) async throws -> String
                func get(index: Int32) async throws -> String
                func fetch(_ id: Int32) async throws -> String
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("duplicateWireName"),
                    message: "'get(index:)' has the same wire name 'Store.get' as 'get(key:)'; give one of them another name with @WireName",
                    line: 4,
                    column: 10,
                    notes: [NoteSpec(message: "'get(key:)' declared here", line: 3, column: 10)]),
                DiagnosticSpec(
                    id: .rapace("duplicateWireName"),
                    message: "'fetch(_:)' has the same wire name 'Store.get' as 'get(key:)'; give one of them another name with @WireName",
                    line: 5,
                    column: 27,
                    notes: [NoteSpec(message: "'get(key:)' declared here", line: 3, column: 10)]),
            ]
        )
    }

    @Test("two wire names that hash to one id")
    func duplicateMethodIDs() {
        assertExpansion(
            #"""
            @Service
            protocol Dup {
                func m71762() async throws
                func m133491() async throws
            }
            """#,
            expandedSource: #"""
            protocol Dup {
                func m71762() async throws
                func m133491() async throws
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("duplicateMethodID"),
                    message: "'Dup.m133491' and 'Dup.m71762' hash to the same method id 0x75DF593F; give one of them another name with @WireName",
                    line: 4,
                    column: 10,
                    notes: [NoteSpec(message: "'m71762()' declared here", line: 3, column: 10)]),
            ]
        )
    }

    @Test("a wire name whose id is 0")
    func zeroMethodID() {
        assertExpansion(
            #"""
            @Service
            protocol Zero {
                func m2976258814() async throws
            }
            """#,
            expandedSource: #"""
            protocol Zero {
                func m2976258814() async throws
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("zeroMethodID"),
                    message: "wire name 'Zero.m2976258814' of 'm2976258814()' hashes to method id 0, which is reserved; choose another wire name with @WireName",
                    line: 3,
                    column: 10),
            ]
        )
    }

    @Test("stream writer placement, effects and result")
    func streamingMistakes() {
        assertExpansion(
            #"""
            @Service
            protocol Feed {
                func items(writer: RapaceStreamWriter<UInt32>, limit: UInt32) async throws
                func pages(_ first: RapaceStreamWriter<UInt32>, _ second: RapaceStreamWriter<UInt32>) async throws
                func ticks(writer: RapaceStreamWriter<UInt64>) async
                func total(writer: RapaceStreamWriter<UInt64>) async throws -> UInt64
            }
            """#,
            expandedSource: #"""
            protocol Feed {
                func items(writer: RapaceStreamWriter<UInt32>, limit: UInt32) async throws
                func pages(_ first: RapaceStreamWriter<UInt32>, _ second: RapaceStreamWriter<UInt32>) async throws
                func ticks(writer: RapaceStreamWriter<UInt64>) async
                func total(writer: RapaceStreamWriter<UInt64>) async throws -> UInt64
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("misplacedStreamWriter"),
                    message: "the stream writer must be the last parameter of 'items'",
                    line: 3,
                    column: 16),
                DiagnosticSpec(
                    id: .rapace("misplacedStreamWriter"),
                    message: "'pages' takes more than one stream writer; a server stream has one",
                    line: 4,
                    column: 53),
                DiagnosticSpec(
                    id: .rapace("streamingMethodEffects"),
                    message: "server-streaming method 'ticks' must be 'async throws': sending an item waits for credit and fails when the call ends",
                    line: 5,
                    column: 10,
                    fixIts: [FixItSpec(message: "make 'ticks' 'async throws'")]),
                DiagnosticSpec(
                    id: .rapace("streamingMethodResult"),
                    message: "server-streaming method 'total' cannot return a value: its items go through 'writer'",
                    line: 6,
                    column: 65,
                    fixIts: [FixItSpec(message: "remove the result type")]),
            ],
            fixedSource: #"""
            @Service
            protocol Feed {
                func items(writer: RapaceStreamWriter<UInt32>, limit: UInt32) async throws
                func pages(_ first: RapaceStreamWriter<UInt32>, _ second: RapaceStreamWriter<UInt32>) async throws
                func ticks(writer: RapaceStreamWriter<UInt64>) async throws
                func total(writer: RapaceStreamWriter<UInt64>) async throws
            }
            """#
        )
    }

    @Test("a one-way method with a result or a stream")
    func oneWayMistakes() {
        assertExpansion(
            #"""
            @Service
            protocol Log {
                @OneWay func write(_ line: String) async throws -> Bool
                @OneWay func follow(writer: RapaceStreamWriter<String>) async throws
            }
            """#,
            expandedSource: #"""
            protocol Log {
                func write(_ line: String) async throws -> Bool
                func follow(writer: RapaceStreamWriter<String>) async throws
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("oneWayResult"),
                    message: "@OneWay method 'write' cannot return a value: a notification gets no reply",
                    line: 3,
                    column: 53,
                    fixIts: [FixItSpec(message: "remove the result type")]),
                DiagnosticSpec(
                    id: .rapace("oneWayStreaming"),
                    message: "@OneWay method 'follow' cannot stream: a notification gets no reply",
                    line: 4,
                    column: 25),
            ],
            fixedSource: #"""
            @Service
            protocol Log {
                @OneWay func write(_ line: String) async throws
                @OneWay func follow(writer: RapaceStreamWriter<String>) async throws
            }
            """#
        )
    }

    @Test("invalid wire names")
    func invalidWireNames() {
        assertExpansion(
            #"""
            @Service(wireName: "")
            protocol Log {
                @WireName("log.write") func write(_ line: String) async throws
                @WireName("\(prefix)flush") func flush() async throws
                @WireName("has space") func close() async throws
            }
            """#,
            expandedSource: #"""
            protocol Log {
                func write(_ line: String) async throws
                func flush() async throws
                func close() async throws
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("invalidWireName"),
                    message: "a wire name cannot be empty",
                    line: 1,
                    column: 20),
                DiagnosticSpec(
                    id: .rapace("invalidWireName"),
                    message: "the wire name of a method cannot contain '.'; rename the service with @Service(wireName:)",
                    line: 3,
                    column: 15),
                DiagnosticSpec(
                    id: .rapace("invalidWireName"),
                    message: "a wire name must be a string literal",
                    line: 4,
                    column: 15),
                DiagnosticSpec(
                    id: .rapace("invalidWireName"),
                    message: "a wire name cannot contain whitespace",
                    line: 5,
                    column: 15),
            ]
        )
    }

    @Test("a method named 'all'")
    func reservedMethodName() {
        assertExpansion(
            #"""
            @Service
            protocol Store {
                func all() async throws -> [String]
            }
            """#,
            expandedSource: #"""
            protocol Store {
                func all() async throws -> [String]
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("reservedMethodName"),
                    message: "a method named 'all' would collide with the generated 'StoreMethods.all'; rename it and keep its wire name with @WireName(\"all\")",
                    line: 3,
                    column: 10),
            ]
        )
    }

    @Test("two methods with one base name and different wire names")
    func overloadedMethods() {
        assertExpansion(
            #"""
            @Service
            protocol Store {
                func get(key: String) async throws -> String
                @WireName("get_by_index") func get(index: Int32) async throws -> String
            }
            """#,
            expandedSource: #"""
            protocol Store {
                func get(key: String) async throws -> String
                func get(index: Int32) async throws -> String
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("overloadedMethod"),
                    message: "'get(index:)' overloads 'get(key:)'; the methods of a service need distinct names",
                    line: 4,
                    column: 36,
                    notes: [NoteSpec(message: "'get(key:)' declared here", line: 3, column: 10)]),
            ]
        )
    }

    @Test("@WireName and @OneWay outside a method of a @Service protocol")
    func misplacedAttributes() {
        assertExpansion(
            #"""
            @WireName("calc")
            @Service
            protocol Calculator {
                func add(_ a: Int32, _ b: Int32) async throws -> Int32
            }

            protocol Plain {
                @OneWay func ping() async throws
            }
            """#,
            expandedSource: #"""
            protocol Calculator {
                func add(_ a: Int32, _ b: Int32) async throws -> Int32
            }

            /// The methods of the ``Calculator`` service: wire names, ids and kinds, for
            /// registration, the Hello `methods` list and introspection.
            ///
            /// Generated by `@Service` from `Calculator`.
            enum CalculatorMethods {
                /// `Calculator.add`, id `0x193FA158`: unary.
                static let add = Rapace.MethodDescriptor(service: "Calculator", method: "add", id: 0x193F_A158, kind: .unary)

                /// Every method of ``Calculator``, in declaration order.
                static let all: [Rapace.MethodDescriptor] = [add]
            }

            /// Serves an implementation of ``Calculator``: decodes each call's arguments, calls the
            /// implementation and encodes its result.
            ///
            /// Serve it from a `Rapace.Session` or `Rapace.RapaceServer`, alone or next to other
            /// services (calls are routed by method id). While a method runs,
            /// `Rapace.ServerContext.current` holds the call's metadata, deadline and session.
            ///
            /// Generated by `@Service` from `Calculator`.
            struct CalculatorServer<Implementation: Calculator & Sendable>: Rapace.RPCService {
                /// The implementation calls are dispatched to.
                let implementation: Implementation

                /// A server dispatching calls to `implementation`.
                init(_ implementation: Implementation) {
                    self.implementation = implementation
                }

                /// ``CalculatorMethods/all``.
                var methods: [Rapace.MethodDescriptor] {
                    CalculatorMethods.all
                }

                /// Serves one call: binds `Rapace.ServerContext.current`, then dispatches by method id.
                nonisolated(nonsending) func handle(method: UInt32, request: Rapace.Payload, context: Rapace.ServerContext) async throws -> Rapace.Payload {
                    try await Rapace.ServerContext.$current.withValue(context) {
                        try await dispatch(method: method, request: request, context: context)
                    }
                }

                private nonisolated(nonsending) func dispatch(method: UInt32, request: Rapace.Payload, context: Rapace.ServerContext) async throws -> Rapace.Payload {
                    switch method {
                    case 0x193F_A158:  // Calculator.add
                        let (a, b) = try request.decodeArguments {
                            (try $0.read(Int32.self), try $0.read(Int32.self))
                        }
                        let result = try await implementation.add(a, b)
                        return try Rapace.Payload.encodingResult {
                            try $0.write(result)
                        }
                    default:
                        throw Rapace.RPCError(.unimplemented, "Calculator has no method 0x\(String(method, radix: 16, uppercase: true))")
                    }
                }
            }

            /// A client of the ``Calculator`` service: each method calls the peer through `caller` (a
            /// `Rapace.Session`, or anything that forwards to one).
            ///
            /// Methods without an `options:` argument use ``options``. Failures are thrown as
            /// `Rapace.RPCError`: the handler's status, or the runtime's (`UNAVAILABLE`,
            /// `DEADLINE_EXCEEDED`, `CANCELLED`, …).
            ///
            /// Generated by `@Service` from `Calculator`.
            struct CalculatorClient: Calculator, Sendable {
                /// Where calls go.
                let caller: any Rapace.RPCCaller
                /// The options of calls made without an `options:` argument.
                var options: Rapace.CallOptions

                /// A client calling through `caller`, by default with `options`.
                init(_ caller: any Rapace.RPCCaller, options: Rapace.CallOptions = .default) {
                    self.caller = caller
                    self.options = options
                }

                /// Calls `Calculator.add` with ``options``.
                nonisolated(nonsending) func add(_ a: Int32, _ b: Int32) async throws -> Int32 {
                    try await add(a, b, options: options)
                }

                /// Calls `Calculator.add`.
                nonisolated(nonsending) func add(_ a: Int32, _ b: Int32, options: Rapace.CallOptions) async throws(Rapace.RPCError) -> Int32 {
                    let request = try Rapace.Payload.encodingArguments {
                        try $0.write(a)
                        try $0.write(b)
                    }
                    let reply = try await caller.call(CalculatorMethods.add, request: request, options: options)
                    return try reply.decodeResult {
                        try $0.read(Int32.self)
                    }
                }
            }

            protocol Plain {
                func ping() async throws
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("misplacedAttribute"),
                    message: "@WireName names a method; name the service with @Service(wireName:)",
                    line: 1,
                    column: 1),
                DiagnosticSpec(
                    id: .rapace("misplacedAttribute"),
                    message: "@OneWay applies to a method of a @Service protocol",
                    line: 8,
                    column: 5),
            ]
        )
    }

    @Test("removing static keeps the doc comment and indentation")
    func staticWithDocComment() {
        assertExpansion(
            #"""
            @Service
            protocol Store {
                /// Makes one.
                static func make() async throws -> String
            }
            """#,
            expandedSource: #"""
            protocol Store {
                /// Makes one.
                static func make() async throws -> String
            }
            """#,
            diagnostics: [
                DiagnosticSpec(
                    id: .rapace("staticMethod"),
                    message: "'static' method 'make' cannot be part of a service: calls go to an instance",
                    line: 4,
                    column: 5,
                    fixIts: [FixItSpec(message: "remove 'static'")]),
            ],
            fixedSource: #"""
            @Service
            protocol Store {
                /// Makes one.
                func make() async throws -> String
            }
            """#
        )
    }
}
