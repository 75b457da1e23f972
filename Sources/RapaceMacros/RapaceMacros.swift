// The macros that define rapace services. `Docs/defining-a-service.md` shows every
// method shape and what each generates.

// Generated code names the runtime as `Rapace.…`: importing the macros imports it too.
@_exported import Rapace

/// Defines a rapace service from a protocol: adds a method table `XMethods`, a server
/// `XServer<Implementation: X>` and a client `XClient` next to protocol `X`.
///
/// ```swift
/// @Service
/// public protocol Calculator: Sendable {
///     func add(_ a: Int32, _ b: Int32) async throws -> Int32
///     func countdown(from: UInt32, writer: RapaceStreamWriter<UInt32>) async throws
///     @OneWay func reset() async throws
/// }
///
/// let session = try Session(transport: transport, role: .acceptor, services: [CalculatorServer(MyCalculator())])
/// let calculator = CalculatorClient(otherSession)
/// print(try await calculator.add(2, 3))
/// ```
///
/// Each method's wire name is the protocol name, a dot and the method's base name in
/// snake_case (`TracingSink.new_span`); its id is the folded FNV-1a hash of that name,
/// computed at compile time. Arguments are encoded in order as a postcard tuple, the result
/// as one postcard value; every argument, result and stream item must be
/// `Codable & Sendable` (`Rapace.Payload` is also accepted, as a byte buffer that is not
/// copied when the transport lends its memory).
///
/// Method shapes:
/// - a method with a result or `Void`, `async`, `throws`, both or neither: a unary call;
/// - a method whose last parameter is a ``RapaceStreamWriter``: a server stream (must be
///   `async throws` and return `Void`);
/// - a method marked ``OneWay()``: a notification, sent with `NO_REPLY`.
///
/// The client conforms to the protocol when every method is `async throws` (the effects of
/// a remote call) and the protocol inherits nothing but `Sendable`.
@attached(peer, names: suffixed(Methods), suffixed(Server), suffixed(Client))
public macro Service() = #externalMacro(module: "RapaceMacrosImplementation", type: "ServiceMacro")

/// ``Service()`` with a service wire name other than the protocol's name, for peers that
/// already use it: `@Service(wireName: "Echo") protocol LegacyEcho { … }` hashes
/// `Echo.<method>`.
@attached(peer, names: suffixed(Methods), suffixed(Server), suffixed(Client))
public macro Service(wireName: String) = #externalMacro(module: "RapaceMacrosImplementation", type: "ServiceMacro")

/// Overrides the method part of a method's wire name (default: its base name in
/// snake_case), for compatibility with existing peers:
/// `@WireName("newSpanV2") func newSpan(_ meta: SpanMeta) -> UInt64` hashes
/// `TracingSink.newSpanV2`. Only on methods of a ``Service()`` protocol.
@attached(peer)
public macro WireName(_ name: String) = #externalMacro(module: "RapaceMacrosImplementation", type: "WireNameMacro")

/// Makes a method of a ``Service()`` protocol a one-way notification: the client sends
/// it with `NO_REPLY` and returns once it is queued; the server runs the method and sends
/// nothing back, not even an error. The method must return `Void`.
@attached(peer)
public macro OneWay() = #externalMacro(module: "RapaceMacrosImplementation", type: "OneWayMacro")
