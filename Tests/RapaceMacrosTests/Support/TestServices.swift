import RapaceMacros
import RapaceTestSupport
import Synchronization

// Services the behaviour tests compile with the real macro, and their implementations.

/// A `Codable & Sendable` argument and result.
struct Point: Codable, Sendable, Hashable {
    var x: Int32
    var y: Int32
}

/// Every method shape a client can call and conform to (all `async throws`).
@Service
protocol Shapes: Sendable {
    /// No arguments, `Void` result.
    func ping() async throws
    /// No arguments, a result.
    func version() async throws -> String
    /// Labelled arguments, a struct among them.
    func describe(point: Point, label: String) async throws -> String
    /// One unlabelled argument.
    func sum(_ values: [Int64]) async throws -> Int64
    /// Unlabelled and labelled, with an argument label that differs from the name.
    func scale(_ point: Point, by factor: Int32) async throws -> Point
    /// Optional values and a dictionary.
    func lookup(_ table: [String: Int32], key: String?) async throws -> Int32?
    /// A byte buffer as `[UInt8]`.
    func reverse(_ bytes: [UInt8]) async throws -> [UInt8]
    /// Byte buffers as `Payload`, next to other arguments.
    func slice(_ data: Payload, from start: UInt32, count: UInt32) async throws -> Payload
    /// Fails with `code` and `message`.
    func fail(code: UInt32, message: String) async throws
    /// Streams `1 … limit`.
    func count(to limit: UInt32, writer: RapaceStreamWriter<UInt32>) async throws
    /// Streams structs, then fails with `failCode` if it is not 0.
    func points(_ count: UInt32, failCode: UInt32, into writer: RapaceStreamWriter<Point>) async throws
    /// One-way: records `event`, or fails when `event` is "fail" (nobody hears of it).
    @OneWay func record(_ event: String) async throws
    /// Sleeps; ends early when cancelled.
    func wait(milliseconds: UInt32) async throws
    /// The value of OpenChannel metadata `key`, through `ServerContext.current`.
    func metadata(key: String) async throws -> [UInt8]?
}

/// Records what the ``Shapes`` implementation saw.
final class ShapesLog: Sendable {
    struct State {
        var events: [String] = []
        var streamed = 0
        var streamEnded: String?
        /// `wait` calls whose handler has started.
        var waitsStarted = 0
        var waitEnded: String?
    }

    let state = Mutex(State())

    func update(_ body: (inout State) -> Void) { state.withLock { body(&$0) } }
    var snapshot: State { state.withLock { $0 } }

    /// Waits (bounded) until `condition` holds.
    func wait(until condition: (State) -> Bool, timeout: Duration = .seconds(5)) async throws {
        guard await waitUntil(timeout: timeout, { condition(snapshot) }) else {
            throw TestFailure("condition not met within \(timeout): \(snapshot)")
        }
    }
}

struct ShapesImplementation: Shapes {
    let log: ShapesLog

    func ping() async throws {}

    func version() async throws -> String { "1.0" }

    func describe(point: Point, label: String) async throws -> String { "\(label)(\(point.x), \(point.y))" }

    func sum(_ values: [Int64]) async throws -> Int64 { values.reduce(0, &+) }

    func scale(_ point: Point, by factor: Int32) async throws -> Point { Point(x: point.x &* factor, y: point.y &* factor) }

    func lookup(_ table: [String: Int32], key: String?) async throws -> Int32? { key.flatMap { table[$0] } }

    func reverse(_ bytes: [UInt8]) async throws -> [UInt8] { bytes.reversed() }

    func slice(_ data: Payload, from start: UInt32, count: UInt32) async throws -> Payload {
        guard Int(start) + Int(count) <= data.count else { throw RPCError(.outOfRange, "slice past the end") }
        return data.slice(Int(start)..<Int(start + count))
    }

    func fail(code: UInt32, message: String) async throws { throw RPCError(StatusCode(rawValue: code), message) }

    func count(to limit: UInt32, writer: RapaceStreamWriter<UInt32>) async throws {
        do {
            var value: UInt32 = 1
            while value <= limit {
                try await writer.send(value)
                log.update { $0.streamed += 1 }
                value += 1
            }
            log.update { $0.streamEnded = "finished" }
        } catch {
            log.update { $0.streamEnded = "\(error)" }
            throw error
        }
    }

    func points(_ count: UInt32, failCode: UInt32, into writer: RapaceStreamWriter<Point>) async throws {
        for index in 0..<Int32(count) { try await writer.send(Point(x: index, y: -index)) }
        if failCode != 0 { throw RPCError(StatusCode(rawValue: failCode), "failed after \(count) points") }
    }

    func record(_ event: String) async throws {
        if event == "fail" { throw RPCError(.internal, "nobody hears of this") }
        log.update { $0.events.append(event) }
    }

    func wait(milliseconds: UInt32) async throws {
        log.update { $0.waitsStarted += 1 }
        do {
            try await Task.sleep(for: .milliseconds(Int64(milliseconds)))
            log.update { $0.waitEnded = "slept" }
        } catch {
            log.update { $0.waitEnded = "cancelled" }
            throw error
        }
    }

    func metadata(key: String) async throws -> [UInt8]? {
        guard let context = ServerContext.current else { throw RPCError(.internal, "no ServerContext.current") }
        return context.metadata.first { $0.key == key }?.value
    }
}

/// Handler effects the server must call correctly: none, `throws`, `async`, both. The
/// client cannot conform (a remote call is always `async throws`) but offers every method.
@Service
protocol Effects {
    func plain(_ x: Int32) -> Int32
    func throwing(_ x: Int32) throws -> Int32
    func asynchronous(_ x: Int32) async -> Int32
    func both(_ x: Int32) async throws -> Int32
    func nothing()
    func consume(_ text: consuming String, suffix: borrowing String) -> sending String
    /// Synchronous, so served at once: what `ServerContext.current` holds there.
    func tenant() -> [UInt8]?
    /// Whether the synchronous handler runs inside a task (it should not: no task is made).
    func inTask() -> Bool
}

struct EffectsImplementation: Effects, Sendable {
    func plain(_ x: Int32) -> Int32 { x + 1 }
    func throwing(_ x: Int32) throws -> Int32 {
        if x < 0 { throw RPCError(StatusCode(rawValue: 400), "negative") }
        return x + 2
    }
    func asynchronous(_ x: Int32) async -> Int32 { x + 3 }
    func both(_ x: Int32) async throws -> Int32 { x + 4 }
    func nothing() {}
    func consume(_ text: consuming String, suffix: borrowing String) -> sending String { text + suffix }
    func tenant() -> [UInt8]? { ServerContext.current?.metadata.first { $0.key == "tenant" }?.value }
    func inTask() -> Bool { withUnsafeCurrentTask { $0 != nil } }
}

/// What a span is, for ``TracingSink``.
struct SpanMeta: Codable, Sendable {
    var name: String
    var target: String
    var level: UInt8
}

/// The Rust tracing plugin's sink, as in the protocol's vectors (synchronous, like its
/// Rust twin: the client offers `async throws` methods and does not conform).
@Service
protocol TracingSink {
    func newSpan(_ meta: SpanMeta) -> UInt64
    func record(spanID: UInt64, fields: [String: String])
    func event(_ meta: SpanMeta, fields: [String: String])
    func enter(spanID: UInt64)
    func exit(spanID: UInt64)
    func dropSpan(spanID: UInt64)
}

final class TracingRecorder: TracingSink, Sendable {
    let spans = Mutex<[String]>([])
    func newSpan(_ meta: SpanMeta) -> UInt64 {
        spans.withLock { $0.append(meta.name); return UInt64($0.count) }
    }
    func record(spanID: UInt64, fields: [String: String]) {}
    func event(_ meta: SpanMeta, fields: [String: String]) {}
    func enter(spanID: UInt64) {}
    func exit(spanID: UInt64) {}
    func dropSpan(spanID: UInt64) {}
}

@Service
protocol TracingConfig {
    func setFilter(_ filter: String)
}

@Service
protocol Calculator: Sendable {
    func add(_ a: Int32, _ b: Int32) async throws -> Int32
}

/// `Echo` under another Swift name, with every wire name overridden to match: its ids are
/// the vectors' `Echo.*`, so it interoperates with both Echo implementations.
@Service(wireName: "Echo")
protocol LegacyEcho: Sendable {
    @WireName("echo") func say(_ message: String) async throws -> String
    @WireName("add") func plus(_ a: Int32, _ b: Int32) async throws -> Int32
    @WireName("countdown") func countDown(from: UInt32, writer: RapaceStreamWriter<UInt32>) async throws
}

/// A service that reuses one of ``Calculator``'s ids, for the router's duplicate check.
@Service(wireName: "Calculator")
protocol CalculatorTwin: Sendable {
    func add(_ a: Int32, _ b: Int32) async throws -> Int32
}

struct Adder: Calculator, CalculatorTwin {
    func add(_ a: Int32, _ b: Int32) async throws -> Int32 { a &+ b }
}
