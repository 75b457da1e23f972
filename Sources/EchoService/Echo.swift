import Rapace

/// The `Echo` service: rapace's example and conformance subject.
///
/// Wire names are `Echo.<snake_case method>`; the ids are in the protocol's vectors.
/// Server-streaming methods take a writer on the server side and return a
/// ``RapaceStream`` on the client side.
public protocol Echo: Sendable {
    /// Returns `message`.
    func echo(_ message: String) async throws -> String
    /// Returns `a + b` (wrapping).
    func add(_ a: Int32, _ b: Int32) async throws -> Int32
    /// Always fails with status `code` and `message`.
    func fail(code: UInt32, message: String) async throws
    /// Streams `from`, `from − 1`, …, `1`.
    func countdown(from: UInt32, writer: RapaceStreamWriter<UInt32>) async throws
    /// FNV-1a-64 of `data`.
    func checksum(_ data: [UInt8]) async throws -> UInt64
    /// Returns after `milliseconds`; honours cancellation and deadlines.
    func sleep(milliseconds: UInt32) async throws
    /// `size` bytes, byte i = i % 251.
    func blob(size: UInt32) async throws -> [UInt8]
}

/// Method descriptors of ``Echo``.
public enum EchoMethods {
    /// `Echo.echo` (unary): ``Echo/echo(_:)``.
    public static let echo = MethodDescriptor(service: "Echo", method: "echo", id: 0x3E89_5C50, kind: .unary)
    /// `Echo.add` (unary): ``Echo/add(_:_:)``.
    public static let add = MethodDescriptor(service: "Echo", method: "add", id: 0x2651_F994, kind: .unary)
    /// `Echo.fail` (unary): ``Echo/fail(code:message:)``.
    public static let fail = MethodDescriptor(service: "Echo", method: "fail", id: 0x9143_774C, kind: .unary)
    /// `Echo.countdown` (server stream): ``Echo/countdown(from:writer:)``.
    public static let countdown = MethodDescriptor(service: "Echo", method: "countdown", id: 0xDC8D_CF41, kind: .serverStream)
    /// `Echo.checksum` (unary): ``Echo/checksum(_:)``.
    public static let checksum = MethodDescriptor(service: "Echo", method: "checksum", id: 0x1C64_629A, kind: .unary)
    /// `Echo.sleep` (unary): ``Echo/sleep(milliseconds:)``.
    public static let sleep = MethodDescriptor(service: "Echo", method: "sleep", id: 0x6A2F_5E89, kind: .unary)
    /// `Echo.blob` (unary): ``Echo/blob(size:)``.
    public static let blob = MethodDescriptor(service: "Echo", method: "blob", id: 0xE2E6_8E33, kind: .unary)

    /// Every method, in declaration order.
    public static let all = [echo, add, fail, countdown, checksum, sleep, blob]
}

/// Serves an ``Echo`` implementation through rapace's dispatch protocol.
public struct EchoServer<Implementation: Echo>: RPCService {
    /// The implementation the calls go to.
    public let implementation: Implementation
    /// A server for `implementation`.
    public init(_ implementation: Implementation) { self.implementation = implementation }

    /// The seven `Echo` methods (``EchoMethods/all``).
    public var methods: [MethodDescriptor] { EchoMethods.all }

    /// Decodes the arguments (`PostcardError`, so `INVALID_ARGUMENT`, when they do not
    /// decode), calls the implementation and encodes its result; `countdown` streams
    /// through a ``RapaceStreamWriter`` on `context`. Another method id throws `UNIMPLEMENTED`.
    public nonisolated(nonsending) func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload {
        switch method {
        case EchoMethods.echo.id:
            let message = try request.decode { try $0.readString() }
            let result = try await implementation.echo(message)
            return Payload.encoding { $0.writeString(result) }
        case EchoMethods.add.id:
            let (a, b) = try request.decode { (try $0.decode(Int32.self), try $0.decode(Int32.self)) }
            let result = try await implementation.add(a, b)
            return Payload.encoding { $0.writeZigZag(Int64(result)) }
        case EchoMethods.fail.id:
            let (code, message) = try request.decode { (try $0.readVarint32(), try $0.readString()) }
            try await implementation.fail(code: code, message: message)
            return .empty
        case EchoMethods.countdown.id:
            let from = try request.decode { try $0.readVarint32() }
            try await implementation.countdown(from: from, writer: RapaceStreamWriter(context))
            return .empty
        case EchoMethods.checksum.id:
            let data = try request.decode { try $0.readByteArray() }
            let result = try await implementation.checksum(data)
            return Payload.encoding { $0.writeVarint(result) }
        case EchoMethods.sleep.id:
            let milliseconds = try request.decode { try $0.readVarint32() }
            try await implementation.sleep(milliseconds: milliseconds)
            return .empty
        case EchoMethods.blob.id:
            let size = try request.decode { try $0.readVarint32() }
            // Refused before anything is allocated: one request must not make the server
            // build up to 4 GiB that the session would then refuse to send anyway.
            let limit = context.session.configuration.limits.maxPayloadSize
            if limit != 0 && size > limit {
                throw RPCError(.resourceExhausted, "blob of \(size) bytes exceeds the max payload size of \(limit) bytes")
            }
            let result = try await implementation.blob(size: size)
            return Payload.encoding(capacity: result.count + 5) { $0.writeByteArray(result) }
        default:
            throw RPCError(.unimplemented, "Echo has no method 0x\(String(method, radix: 16, uppercase: true))")
        }
    }
}

/// A typed client for ``Echo`` over any session.
///
/// Each method takes `options` for that call, else uses ``options``, and throws the call's
/// ``RPCError``, or `PostcardError` when the reply does not decode.
public struct EchoClient: Sendable {
    /// What the calls go through: a session, or a handle that forwards to one.
    public let caller: any RPCCaller
    /// The options of calls that pass none.
    public var options: CallOptions

    /// A client calling through `caller`.
    public init(_ caller: any RPCCaller, options: CallOptions = .default) {
        self.caller = caller
        self.options = options
    }

    /// Calls `Echo.echo`: returns what the server echoed.
    public nonisolated(nonsending) func echo(_ message: String, options: CallOptions? = nil) async throws -> String {
        let reply = try await caller.call(EchoMethods.echo, request: .encoding { $0.writeString(message) }, options: options ?? self.options)
        return try reply.decode { try $0.readString() }
    }

    /// Calls `Echo.add`: returns the server's `a + b`.
    public nonisolated(nonsending) func add(_ a: Int32, _ b: Int32, options: CallOptions? = nil) async throws -> Int32 {
        let request = Payload.encoding { $0.writeZigZag(Int64(a)); $0.writeZigZag(Int64(b)) }
        let reply = try await caller.call(EchoMethods.add, request: request, options: options ?? self.options)
        return try reply.decode { try $0.decode(Int32.self) }
    }

    /// Calls `Echo.fail`: throws the error the server answers (it returns only if the
    /// server answers success).
    public nonisolated(nonsending) func fail(code: UInt32, message: String, options: CallOptions? = nil) async throws {
        let request = Payload.encoding { $0.writeVarint(UInt64(code)); $0.writeString(message) }
        _ = try await caller.call(EchoMethods.fail, request: request, options: options ?? self.options)
    }

    /// Starts `Echo.countdown`: the stream of `from`, `from − 1`, …, `1`; the call's
    /// ``CallOptions/streamWindow`` bounds the item bytes in flight.
    public func countdown(from: UInt32, options: CallOptions? = nil) -> RapaceStream<UInt32> {
        RapaceStream(caller.serverStream(EchoMethods.countdown, request: .encoding { $0.writeVarint(UInt64(from)) }, options: options ?? self.options))
    }

    /// Calls `Echo.checksum`: returns the server's FNV-1a-64 of `data`.
    public nonisolated(nonsending) func checksum(_ data: [UInt8], options: CallOptions? = nil) async throws -> UInt64 {
        let reply = try await caller.call(EchoMethods.checksum, request: .encoding(capacity: data.count + 5) { $0.writeByteArray(data) }, options: options ?? self.options)
        return try reply.decode { try $0.readVarint64() }
    }

    /// Calls `Echo.sleep`: returns when the server has slept `milliseconds`.
    public nonisolated(nonsending) func sleep(milliseconds: UInt32, options: CallOptions? = nil) async throws {
        _ = try await caller.call(EchoMethods.sleep, request: .encoding { $0.writeVarint(UInt64(milliseconds)) }, options: options ?? self.options)
    }

    /// Calls `Echo.blob`: returns the `size` bytes the server made.
    public nonisolated(nonsending) func blob(size: UInt32, options: CallOptions? = nil) async throws -> [UInt8] {
        let reply = try await caller.call(EchoMethods.blob, request: .encoding { $0.writeVarint(UInt64(size)) }, options: options ?? self.options)
        return try reply.decode { try $0.readByteArray() }
    }
}

/// The reference ``Echo`` implementation.
public struct DefaultEcho: Echo {
    /// Called when a `sleep` ends: whether it was cancelled, and how long it slept.
    public var onSleepEnd: (@Sendable (_ cancelled: Bool, _ slept: Duration) -> Void)?

    /// An echo service; `onSleepEnd`, when given, hears how each `sleep` ended.
    public init(onSleepEnd: (@Sendable (_ cancelled: Bool, _ slept: Duration) -> Void)? = nil) {
        self.onSleepEnd = onSleepEnd
    }

    /// Returns `message` unchanged.
    public func echo(_ message: String) async throws -> String { message }

    /// Returns `a &+ b`: overflow wraps.
    public func add(_ a: Int32, _ b: Int32) async throws -> Int32 { a &+ b }

    /// Throws `RPCError(code, message)`. Code 0 reaches the caller as `UNKNOWN` (a
    /// handler cannot fail with OK).
    public func fail(code: UInt32, message: String) async throws {
        throw RPCError(StatusCode(rawValue: code), message)
    }

    /// Sends `from`, `from − 1`, …, `1` through `writer`, each `send` waiting for the
    /// caller's credit; `from` = 0 sends nothing.
    public func countdown(from: UInt32, writer: RapaceStreamWriter<UInt32>) async throws {
        var value = from
        while value > 0 {
            try await writer.send(value)
            value -= 1
        }
    }

    /// Returns the FNV-1a-64 hash of `data` (``MethodID/fnv1a64(_:)``).
    public func checksum(_ data: [UInt8]) async throws -> UInt64 { MethodID.fnv1a64(data) }

    /// Sleeps `milliseconds` with `Task.sleep`: cancellation (the caller's, or the handler's
    /// deadline) ends it early with `CancellationError`. Either way ``onSleepEnd`` hears
    /// whether it was cancelled and how long it slept.
    public func sleep(milliseconds: UInt32) async throws {
        let clock = ContinuousClock()
        let start = clock.now
        do {
            try await Task.sleep(for: .milliseconds(Int64(milliseconds)))
            onSleepEnd?(false, clock.now - start)
        } catch {
            onSleepEnd?(true, clock.now - start)
            throw error
        }
    }

    /// Returns `size` bytes, byte i = i % 251, built in one allocation of `size` bytes.
    public func blob(size: UInt32) async throws -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: Int(size)) { buffer, count in
            var value: UInt8 = 0
            for index in 0..<Int(size) {
                buffer[index] = value
                value = value == 250 ? 0 : value + 1
            }
            count = Int(size)
        }
    }
}
