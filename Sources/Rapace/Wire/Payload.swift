/// Memory that holds a payload outside the Swift heap: a received shared-memory slot run,
/// a buffer allocated in a segment to be sent in place (and its views), a slice of either.
/// The memory stays valid while the owner lives, and returns to its pool when the owner is
/// released.
public protocol PayloadStorage: AnyObject, Sendable {
    /// The payload bytes; valid for the owner's lifetime (an allocated ``ShmBuffer``'s
    /// only until it is sent: see there).
    var bytes: UnsafeRawBufferPointer { get }
    /// Number of bytes (by default `bytes.count`). Asking it must not touch the bytes.
    var count: Int { get }
}

extension PayloadStorage {
    public var count: Int { bytes.count }
}

/// The bytes of one frame's payload: up to 16 bytes stored inline (no heap allocation), a
/// Swift array, or borrowed external storage (a shared-memory slot) that is released when
/// the last copy of the payload goes away.
public struct Payload: Sendable {
    @usableFromInline
    enum Storage: Sendable {
        case inline(InlinePayload, count: UInt8)
        /// Array-backed bytes; a slice shares the array instead of copying it.
        case array(ArraySlice<UInt8>)
        case external(any PayloadStorage)
    }

    @usableFromInline var storage: Storage

    /// The empty payload.
    public static let empty = Payload(storage: .inline(InlinePayload(), count: 0))

    @inlinable
    init(storage: Storage) { self.storage = storage }

    /// A payload backed by a Swift array.
    @inlinable
    public init(_ bytes: [UInt8]) { storage = .array(bytes[...]) }

    /// A payload of at most 16 bytes kept inline (copied, no allocation).
    @inlinable
    public init(inline bytes: UnsafeRawBufferPointer) {
        storage = .inline(InlinePayload(bytes), count: UInt8(bytes.count))
    }

    /// A payload borrowed from external storage (no copy).
    @inlinable
    public init(borrowing owner: any PayloadStorage) { storage = .external(owner) }

    /// Number of bytes.
    @inlinable
    public var count: Int {
        switch storage {
        case .inline(_, let count): Int(count)
        case .array(let bytes): bytes.count
        case .external(let owner): owner.count
        }
    }

    /// Whether the payload has no bytes.
    @inlinable
    public var isEmpty: Bool { count == 0 }

    /// Calls `body` with the bytes. The pointer must not escape `body`.
    @inlinable
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        switch storage {
        case .inline(let inline, let count):
            let result: Result<R, E> = inline.withBytes(count: Int(count)) { raw in
                do throws(E) { return .success(try body(raw)) } catch { return .failure(error) }
            }
            return try result.get()
        case .array(let bytes):
            let result: Result<R, E> = bytes.withUnsafeBytes { raw in
                do throws(E) { return .success(try body(raw)) } catch { return .failure(error) }
            }
            return try result.get()
        case .external(let owner):
            return try body(owner.bytes)
        }
    }

    /// The bytes as an array (a copy unless the payload is a whole array).
    @inlinable
    public var bytes: [UInt8] {
        switch storage {
        case .inline(let inline, let count): inline.withBytes(count: Int(count)) { Array($0) }
        case .array(let bytes): Array(bytes)
        case .external(let owner): Array(owner.bytes)
        }
    }

    /// The external owner, when the payload is borrowed.
    public var externalStorage: (any PayloadStorage)? {
        if case .external(let owner) = storage { return owner }
        return nil
    }
}

/// One frame: descriptor plus payload.
public struct Frame: Sendable {
    /// The descriptor. On a frame to send, ``prepareForSending()`` fills its payload fields
    /// from ``payload``.
    public var descriptor: FrameDescriptor
    /// The payload bytes. On a received frame, the transport's: inline, an array, or a
    /// shared-memory slot run that is released when the last copy goes away.
    public var payload: Payload

    /// A frame as given: call ``prepareForSending()`` before handing it to a transport.
    public init(descriptor: FrameDescriptor, payload: Payload) {
        self.descriptor = descriptor
        self.payload = payload
    }

    /// Sets `payload_len` and, for payloads of 16 bytes or fewer, the inline fields.
    /// Larger payloads get `payload_slot = 0` (stream, WebSocket, in-memory); the SHM
    /// transport overwrites slot fields when it places the payload.
    @inlinable
    public mutating func prepareForSending() {
        let length = payload.count
        descriptor.payloadLength = UInt32(truncatingIfNeeded: length)
        descriptor.payloadGeneration = 0
        descriptor.payloadOffset = 0
        if length <= FrameDescriptor.inlineCapacity {
            descriptor.payloadSlot = FrameDescriptor.inlineSlot
            descriptor.inlinePayload = payload.withUnsafeBytes { InlinePayload($0) }
        } else {
            descriptor.payloadSlot = 0
            descriptor.inlinePayload = InlinePayload()
        }
    }
}

extension Payload {
    /// The bytes in `range`, without a copy: array payloads share their array, external
    /// storage stays alive as long as the slice does (inline payloads are 16 bytes at most).
    public func slice(_ range: Range<Int>) -> Payload {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "slice out of bounds")
        if range.count == count { return self }
        switch storage {
        case .inline(let inline, let count):
            return inline.withBytes(count: Int(count)) { Payload(inline: UnsafeRawBufferPointer(rebasing: $0[range])) }
        case .array(let bytes):
            let start = bytes.startIndex
            return Payload(storage: .array(bytes[(start + range.lowerBound)..<(start + range.upperBound)]))
        case .external(let owner):
            // A slice of a slice slices the base: one level, however often it is sliced.
            if let slice = owner as? PayloadSlice {
                let start = slice.range.lowerBound
                return Payload(borrowing: PayloadSlice(base: slice.base, range: (start + range.lowerBound)..<(start + range.upperBound)))
            }
            return Payload(borrowing: PayloadSlice(base: owner, range: range))
        }
    }
}

/// A sub-range of another external payload; keeps the base alive.
final class PayloadSlice: PayloadStorage, @unchecked Sendable {
    // @unchecked Sendable: immutable; `bytes` points into `base`, which it keeps alive.
    let base: any PayloadStorage
    let range: Range<Int>

    init(base: any PayloadStorage, range: Range<Int>) {
        self.base = base
        self.range = range
    }

    /// Asked of the base each time: a base that stops being readable (an ``ShmBuffer``
    /// once sent) stops its slices too.
    var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: base.bytes[range]) }
    var count: Int { range.count }
}
