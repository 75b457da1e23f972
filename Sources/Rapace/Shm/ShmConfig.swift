/// The geometry of a shared-memory segment: ring capacity, slot size and slot count.
public struct ShmConfig: Hashable, Sendable, CustomStringConvertible {
    /// Descriptors per ring (one ring per direction); a power of two, at least 2.
    public var ringCapacity: UInt32
    /// Bytes per payload slot; a multiple of 64, at least 64.
    public var slotSize: UInt32
    /// Slots in the pool shared by both directions.
    public var slotCount: UInt32

    /// Ring 256 descriptors, 64 KiB slots, 128 slots (an 8 MiB pool).
    public static let `default` = ShmConfig(ringCapacity: 256, slotSize: 64 * 1024, slotCount: 128)

    /// A geometry; the defaults are those of ``default``. It is checked (``validate()``)
    /// when a segment is created with it, not here.
    public init(ringCapacity: UInt32 = 256, slotSize: UInt32 = 64 * 1024, slotCount: UInt32 = 128) {
        self.ringCapacity = ringCapacity
        self.slotSize = slotSize
        self.slotCount = slotCount
    }

    /// Bytes of the whole pool: the largest payload one frame can carry.
    public var poolBytes: UInt64 { UInt64(slotSize) * UInt64(slotCount) }

    public var description: String { "ring \(ringCapacity) descriptors, \(slotSize)-byte slots × \(slotCount)" }

    /// Checks the geometry; the error names what is wrong.
    public func validate() throws(ShmError) {
        guard ringCapacity >= 2, ringCapacity.nonzeroBitCount == 1, ringCapacity <= 1 << 20 else {
            throw ShmError(.invalidConfig, "ring capacity \(ringCapacity) must be a power of two between 2 and 2^20")
        }
        guard slotSize >= 64, slotSize % 64 == 0 else {
            throw ShmError(.invalidConfig, "slot size \(slotSize) must be a multiple of 64, at least 64")
        }
        guard slotCount >= 1, slotCount <= 1 << 20 else {
            throw ShmError(.invalidConfig, "slot count \(slotCount) must be between 1 and 2^20")
        }
        guard poolBytes <= 1 << 36 else {
            throw ShmError(.invalidConfig, "pool of \(poolBytes) bytes is too large")
        }
    }
}

/// A shared-memory failure.
public struct ShmError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure. Most arise while connecting (Docs/shm.md, "Doorbells and
    /// bootstrap").
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Value: Hashable, Sendable {
            case invalidConfig, configMismatch, badSegment, io, segmentNotFound, timeout, staleSegment, protocolViolation, sizeOutOfRange, poolExhausted
        }
        let value: Value
        /// A configuration is not valid (``ShmConfig/validate()``; creating a segment checks
        /// its configuration first).
        public static let invalidConfig = Code(value: .invalidConfig)
        /// The segment's configuration differs from the one asked for (opening a segment
        /// with an expected configuration, such as `connect(path:reactor:config:timeout:)`
        /// given one). The plugin fails at once; it does not wait for another file.
        public static let configMismatch = Code(value: .configMismatch)
        /// The file is not a rapace segment (magic, version, sizes).
        /// Also an invalid bootstrap message from the host, or one of another layout
        /// version. The plugin fails at once; it does not wait for another file.
        public static let badSegment = Code(value: .badSegment)
        /// A system call failed (creating, sizing, mapping or opening the segment, the
        /// bootstrap socket); ``ShmError/systemError`` holds it. Also: the host closed the
        /// bootstrap socket without a message (another plugin is connected), or the reactor
        /// shut down while connecting.
        public static let io = Code(value: .io)
        /// No segment appeared at the path within the wait (nobody created it yet).
        public static let segmentNotFound = Code(value: .segmentNotFound)
        /// The segment's host did not answer the bootstrap in time: it did not accept on
        /// `PATH.sock`, or sent no bootstrap message, within the connect timeout.
        public static let timeout = Code(value: .timeout)
        /// The host's bootstrap message belongs to another segment than the one mapped from
        /// the path (the file was replaced, again and again, while connecting). Thrown after
        /// five attempts, or at the connect timeout; the message names both epochs.
        public static let staleSegment = Code(value: .staleSegment)
        /// The peer wrote something invalid into the segment (a descriptor naming slots it
        /// does not hold, a stale generation, a payload outside the pool). The transport
        /// reports it as a framing error (``TransportError/Code/protocolViolation``).
        public static let protocolViolation = Code(value: .protocolViolation)
        /// A buffer of that size can never be allocated in this pool: the count is not
        /// positive, or it is larger than the pool minus the buffer's headroom
        /// (``ShmTransport/allocateBufferNow(count:)`` and the other allocations). Permanent:
        /// waiting does not help; send the payload another way, or raise the pool.
        public static let sizeOutOfRange = Code(value: .sizeOutOfRange)
        /// No run of free slots long enough for the buffer: payloads not yet released (the
        /// peer's views of what this side sent, or this side's own) hold the pool, or earlier
        /// requests for slots wait first. Transient: once slots are released the allocation
        /// may succeed (``ShmTransport/allocateBuffer(count:timeout:)`` waits for that).
        public static let poolExhausted = Code(value: .poolExhausted)
        public var description: String { "\(value)" }
    }

    /// What kind of failure.
    public var code: Code
    /// What happened, naming the path; a configuration or epoch mismatch names both values.
    public var message: String
    /// The failed system call's error, for ``Code/io`` failures that come from one.
    public var systemError: SystemError?

    /// An error of kind `code`, with the system error underneath it if there is one.
    public init(_ code: Code, _ message: String, systemError: SystemError? = nil) {
        self.code = code
        self.message = message
        self.systemError = systemError
    }

    public var description: String { message }
}
