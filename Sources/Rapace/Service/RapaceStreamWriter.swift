/// The sending end of a server stream: the parameter through which a `@Service` method
/// streams its items.
///
/// A server-streaming method of a service protocol takes a writer as its last parameter
/// and returns when the stream is complete:
///
/// ```swift
/// @Service
/// protocol Calculator {
///     func countdown(from: UInt32, writer: RapaceStreamWriter<UInt32>) async throws
/// }
/// ```
///
/// On the server, the generated `CalculatorServer` hands the implementation a writer bound
/// to the call: ``send(_:)`` suspends while the caller has granted no credit for the next
/// item, and throws once the call is cancelled or its deadline passes. On the client, the
/// generated `CalculatorClient` conforms to the protocol by forwarding each item the peer
/// streams to the writer it is given, and also offers
/// `countdown(from:options:) -> RapaceStream<UInt32>` for iterating the items directly.
///
/// A writer can also be made from a closure (`RapaceStreamWriter { item in … }`), to call an
/// implementation in-process or in a test.
///
/// Send one item at a time: wait for ``send(_:)`` to return before sending the next.
public struct RapaceStreamWriter<Item: Codable & Sendable>: Sendable {
    @usableFromInline
    enum Sink: Sendable {
        /// Items go to the caller of the call the context serves.
        case call(ServerContext)
        /// Items go to a closure.
        case closure(@Sendable (Item) async throws -> Void)
    }

    @usableFromInline
    let sink: Sink

    /// A writer that streams to the caller of the call `context` serves.
    public init(_ context: ServerContext) {
        sink = .call(context)
    }

    /// A writer that hands every item to `body`; an error `body` throws is thrown by
    /// ``send(_:)``.
    public init(_ body: @escaping @Sendable (Item) async throws -> Void) {
        sink = .closure(body)
    }

    /// Sends one item.
    ///
    /// Bound to a call, it suspends while the caller has granted no room for the item and
    /// throws ``RPCError`` when the call was cancelled, its deadline passed or the session
    /// closed; stop streaming then (the error is the call's outcome anyway).
    @inlinable
    public nonisolated(nonsending) func send(_ item: Item) async throws {
        switch sink {
        case .call(let context):
            try await context.send(item)
        case .closure(let body):
            try await body(item)
        }
    }
}
