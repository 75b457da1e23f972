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
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Value: Hashable, Sendable { case invalidConfig, configMismatch, badSegment, io, segmentNotFound, timeout, staleSegment, protocolViolation }
        let value: Value
        /// A configuration is not valid.
        public static let invalidConfig = Code(value: .invalidConfig)
        /// The segment's configuration differs from the one asked for.
        public static let configMismatch = Code(value: .configMismatch)
        /// The file is not a rapace segment (magic, version, sizes).
        public static let badSegment = Code(value: .badSegment)
        /// A system call failed.
        public static let io = Code(value: .io)
        /// No segment appeared at the path within the wait (nobody created it yet).
        public static let segmentNotFound = Code(value: .segmentNotFound)
        /// The segment's host did not answer the bootstrap in time.
        public static let timeout = Code(value: .timeout)
        /// The host's bootstrap message belongs to another segment than the one mapped from
        /// the path (the file was replaced, again and again, while connecting).
        public static let staleSegment = Code(value: .staleSegment)
        /// The peer wrote something invalid into the segment.
        public static let protocolViolation = Code(value: .protocolViolation)
        public var description: String { "\(value)" }
    }

    public var code: Code
    public var message: String
    public var systemError: SystemError?

    public init(_ code: Code, _ message: String, systemError: SystemError? = nil) {
        self.code = code
        self.message = message
        self.systemError = systemError
    }

    public var description: String { message }
}
