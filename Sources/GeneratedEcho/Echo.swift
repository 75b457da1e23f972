import RapaceMacros

/// The `Echo` service: rapace's example and conformance subject, defined with `@Service`.
///
/// Wire names are `Echo.<snake_case method>`; the ids `@Service` computes equal the
/// protocol's vectors. The macro adds `EchoMethods` (the method table), `EchoServer`
/// (serves an implementation) and `EchoClient` (calls a peer, and conforms to `Echo`).
/// `EchoService` holds the same service written by hand, the baseline the generated code
/// is measured against.
@Service
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
        // The generated server binds the call's context: refused before anything is allocated
        // when the session could not send it (a request must not make it build up to 4 GiB).
        if let limit = ServerContext.current?.session.configuration.limits.maxPayloadSize, limit != 0, size > limit {
            throw RPCError(.resourceExhausted, "blob of \(size) bytes exceeds the max payload size of \(limit) bytes")
        }
        return [UInt8](unsafeUninitializedCapacity: Int(size)) { buffer, count in
            var value: UInt8 = 0
            for index in 0..<Int(size) {
                buffer[index] = value
                value = value == 250 ? 0 : value + 1
            }
            count = Int(size)
        }
    }
}
