import Synchronization
#if canImport(Glibc)
import Glibc
#endif
import CRapaceShim

/// Byte offsets of the segment layout (Docs/shm.md is the normative description).
enum ShmLayout {
    static let magic: [UInt8] = Array("RAPACE".utf8) + [0, 0]
    /// 2: slot states packed two bits per slot, one generation per run (1 had an 8-byte entry per slot).
    static let version: UInt32 = 2
    static let headerSize = 4096

    // Header fields.
    static let magicOffset = 0
    static let versionOffset = 8
    static let headerSizeOffset = 12
    static let ringCapacityOffset = 16
    static let slotSizeOffset = 20
    static let slotCountOffset = 24
    static let ringOffsetsOffset = 32      // 2 × u64: ring 0 (initiator → acceptor), ring 1 (acceptor → initiator)
    static let slotTableOffsetOffset = 48  // u64
    static let poolOffsetOffset = 56       // u64
    static let segmentSizeOffset = 64      // u64
    static let slotWaitersOffset = 72      // 2 × u32: [side] wants slots (set by a sender, cleared by it)
    static let epochOffset = 80            // u32: bumped each time the host prepares the segment for a new peer
    static let runningCPUOffset = 84       // 2 × u32: [side] 1 + the CPU its loop last ran on (0 = unknown)
    static let headerFieldsSize = 92       // the bytes of the header that carry fields

    // Ring fields (relative to the ring's offset); each on its own cache line.
    static let ringHead = 0          // u64, written by the consumer
    static let ringTail = 64         // u64, written by the producer
    static let ringConsumerSleeping = 128  // u32, written by the consumer
    static let ringProducerWaiting = 192   // u32, written by the producer
    static let ringDescriptors = 256

    static func ringBytes(_ capacity: UInt32) -> Int { ringDescriptors + Int(capacity) * FrameDescriptor.size }

    /// Slot table: the slot states, two bits per slot (0 free, 1 allocated by the initiator,
    /// 2 by the acceptor), 32 slots per little-endian u64 word, padded to a cache line; then
    /// one u32 generation per slot (stamped on the first slot of each run).
    static func slotStateWords(_ slotCount: UInt32) -> Int { (Int(slotCount) + 31) / 32 }
    static func slotGenerationsOffset(_ slotCount: UInt32) -> Int { roundUp(slotStateWords(slotCount) * 8, 64) }

    static func roundUp(_ value: Int, _ to: Int) -> Int { (value + to - 1) / to * to }

    /// Offsets for a configuration.
    struct Offsets {
        var rings: (Int, Int)
        var slotTable: Int
        /// Where the slot generations start (inside the slot table).
        var slotGenerations: Int
        var pool: Int
        var size: Int
    }

    static func offsets(for config: ShmConfig) -> Offsets {
        let ring = roundUp(ringBytes(config.ringCapacity), 4096)
        let ring0 = headerSize
        let ring1 = ring0 + ring
        let table = ring1 + ring
        let generations = table + slotGenerationsOffset(config.slotCount)
        let pool = roundUp(generations + Int(config.slotCount) * 4, 4096)
        let size = pool + Int(config.poolBytes)
        return Offsets(rings: (ring0, ring1), slotTable: table, slotGenerations: generations, pool: pool, size: size)
    }
}

/// Little-endian fields read out of a copy of bytes (the segment header, the bootstrap message).
struct LittleEndianFields {
    let bytes: [UInt8]
    func u32(_ at: Int) -> UInt32 { bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) } }
    func u64(_ at: Int) -> UInt64 { bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) } }
}

/// Which side of a segment this process is. The host (initiator) created it.
public enum ShmSide: Int, Sendable {
    /// The host: created the segment and listens on its bootstrap socket; the session's
    /// initiator. It produces into ring 0.
    case host = 0
    /// The plugin: opened the segment and connected; the session's acceptor. It produces
    /// into ring 1.
    case plugin = 1

    /// The slot-state tag of slots this side allocated.
    var slotTag: UInt32 { UInt32(rawValue) + 1 }
    /// Ring this side produces into.
    var outgoingRing: Int { rawValue }
    var other: ShmSide { self == .host ? .plugin : .host }
}

/// A mapped rapace segment. Owns the mapping; unmapped when the last reference (the
/// transport, or a buffer leased from it) goes away.
public final class ShmSegment: @unchecked Sendable {
    // @unchecked Sendable: immutable after init; the mapping is shared memory accessed only
    // through the atomic helpers or by the owner of a slot lease.
    /// The segment file's path (where it was created or opened).
    public let path: String
    /// What follows the segment's path, then the creating process's pid, in the name the
    /// segment is built under (`PATH.creating-<pid>`) before ``create(path:config:)``
    /// renames it into place.
    package static let buildingSuffix = ".creating-"
    /// The geometry, as the segment's header records it.
    public let config: ShmConfig
    let base: UnsafeMutableRawPointer
    let size: Int
    let offsets: ShmLayout.Offsets
    /// Slots this process holds and must not be freed by anyone else: runs it received and
    /// still views, and runs it allocated and has not sent yet. Per segment, not per
    /// connection: a view may outlive the connection it came from, and the next connection
    /// over the same segment must not hand its slots out (`reset`, `reclaimOwn`).
    let leases: Mutex<LeaseBitmap>
    /// The doorbells of the connection using this segment in this process now (nil between
    /// connections): a lease that ends after its own connection wakes the next one's senders.
    let doorbells = Mutex<ShmDoorbells?>(nil)
    /// The host's descriptor of the segment file, which holds the host's shared `flock` on
    /// it (Docs/shm.md, "The host's lock"); -1 on the plugin side, and once released
    /// (``releaseHostLock()``, or when the segment is unmapped).
    private let hostLock: Atomic<Int32>

    private init(path: String, config: ShmConfig, base: UnsafeMutableRawPointer, size: Int, hostLock: Int32 = -1) {
        self.path = path
        self.config = config
        self.base = base
        self.size = size
        self.offsets = ShmLayout.offsets(for: config)
        self.leases = Mutex(LeaseBitmap(count: Int(config.slotCount)))
        self.hostLock = Atomic(hostLock)
    }

    deinit {
        releaseHostLock()
        Sys.unmap(base, size: size)
    }

    /// Drops the host's lock on the segment file (closes the descriptor that holds it), once
    /// the file is removed (``ShmListener/close()``); the segment stays mapped. Nothing if it
    /// is released already or this is the plugin's side.
    func releaseHostLock() {
        let fd = hostLock.exchange(-1, ordering: .acquiringAndReleasing)
        if fd >= 0 { Sys.close(fd) }
    }

    /// Creates a new segment file at `path` (mode 0600), sized and initialised for `config`.
    /// An existing file at `path` is replaced.
    ///
    /// The segment holds a shared `flock` on the file from before it appears at `path` until
    /// it is unmapped or ``releaseHostLock()`` is called: a sweep of a dead host's files
    /// removes only a segment on which it can take an exclusive lock, so the lock tells a
    /// live host's segment from a dead one's where the pid in its name cannot (another pid
    /// namespace; Docs/shm.md, "The host's lock").
    ///
    /// The header's `epoch` starts at a random value, different from the epoch of the
    /// segment it replaces (if that one is readable): a plugin that mapped the replaced file
    /// tells it from this one by the epoch of the bootstrap message (Docs/shm.md, "Bootstrap").
    public static func create(path: String, config: ShmConfig) throws(ShmError) -> ShmSegment {
        try config.validate()
        let offsets = ShmLayout.offsets(for: config)
        let epoch = firstEpoch(replacing: path)
        // Built under a temporary name and renamed into place once its header is written:
        // a plugin polling for `path` never opens a segment that is still being made.
        let building = "\(path)\(buildingSuffix)\(Sys.processID)"
        let fd = try createLocked(building, for: path)
        var handedOver = false
        defer { if !handedOver { Sys.close(fd) } }
        do throws(SystemError) {
            try Sys.truncate(fd, to: offsets.size, path: building)
        } catch {
            Sys.unlink(building)
            throw ShmError(.io, "cannot size segment \(path) to \(offsets.size) bytes: \(error.errno)", systemError: error)
        }
        let base: UnsafeMutableRawPointer
        do throws(SystemError) {
            base = try Sys.mapShared(fd, size: offsets.size, path: building)
        } catch {
            Sys.unlink(building)
            throw ShmError(.io, "cannot map segment \(path): \(error.errno)", systemError: error)
        }
        // From here the segment owns `fd`, and with it the lock.
        handedOver = true
        let segment = ShmSegment(path: path, config: config, base: base, size: offsets.size, hostLock: fd)
        segment.initialiseHeader(epoch: epoch)
        do throws(SystemError) {
            try Sys.rename(building, to: path)
        } catch {
            Sys.unlink(building)
            throw ShmError(.io, "cannot move segment into place at \(path): \(error.errno)", systemError: error)  // the segment unmaps itself
        }
        return segment
    }

    /// How many times ``createLocked(_:for:)`` makes the file again when a sweep removed it
    /// before the lock was taken.
    static let lockedCreationAttempts = 4

    /// Creates the file `building` (mode 0600, `O_EXCL`; an older one is removed first) and
    /// takes a shared `flock` on it, before anyone else can know it as a segment: the
    /// descriptor, which holds the lock. A sweep may open the new file and take it for a dead
    /// host's between the `open` and the `flock` (its name carries this pid, which another
    /// pid namespace may see as dead); the sweep's exclusive lock then makes ours fail, or it
    /// has unlinked the file already (no link left once ours is taken): either way the file
    /// is made again, at most ``lockedCreationAttempts`` times. Once our lock is held on a
    /// linked file no sweep removes it.
    private static func createLocked(_ building: String, for path: String) throws(ShmError) -> Int32 {
        for _ in 0..<lockedCreationAttempts {
            Sys.unlink(building)
            let fd: Int32
            do throws(SystemError) {
                fd = try Sys.open(building, O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
            } catch {
                throw ShmError(.io, "cannot create segment \(path): \(error.errno)", systemError: error)
            }
            do throws(SystemError) {
                if try Sys.tryLock(fd, exclusive: false, path: building), try Sys.fileStatus(fd, path: building).st_nlink > 0 {
                    return fd
                }
            } catch {
                Sys.close(fd)
                Sys.unlink(building)
                throw ShmError(.io, "cannot lock segment \(path): \(error.errno)", systemError: error)
            }
            Sys.close(fd)  // a sweep holds or removed this file: make another
        }
        throw ShmError(.io, "cannot create segment \(path): \(building) was removed \(lockedCreationAttempts) times before it could be locked")
    }

    /// The epoch a new segment at `path` starts with: random, and not the current epoch of
    /// the rapace segment it replaces, so a plugin still holding that one cannot mistake it
    /// for the new one (across several replacements the chance of a repeat is 2^-32).
    private static func firstEpoch(replacing path: String) -> UInt32 {
        var epoch = UInt32.random(in: .min ... .max)  // the system generator: getrandom(2)
        if let replaced = epochOfExistingSegment(at: path), replaced == epoch { epoch &+= 1 }
        return epoch
    }

    /// The header epoch of the rapace segment at `path`, or nil if there is none (or it
    /// cannot be read).
    private static func epochOfExistingSegment(at path: String) -> UInt32? {
        // Nonblocking and not through a link: a FIFO or device planted at the path must not
        // block the loop thread, and only a regular file can be an earlier segment.
        guard let fd = try? Sys.open(path, O_RDONLY | O_NONBLOCK | O_NOFOLLOW) else { return nil }
        defer { Sys.close(fd) }
        guard let info = try? Sys.fileStatus(fd, path: path), info.st_mode & S_IFMT == S_IFREG,
            let header = try? readHeader(fd, path: path)
        else { return nil }
        return header.u32(ShmLayout.epochOffset)
    }

    /// The header fields of the segment open as `fd`, after a check of the magic.
    private static func readHeader(_ fd: Int32, path: String) throws(ShmError) -> LittleEndianFields {
        var bytes = [UInt8](repeating: 0, count: ShmLayout.headerFieldsSize)
        let count: Int
        do throws(SystemError) {
            // Array's closure APIs rethrow untyped errors: carry the typed one out in a Result.
            count = try bytes.withUnsafeMutableBytes { raw in
                Result { () throws(SystemError) in try Sys.read(fd, into: raw, at: 0, path: path) }
            }.get()
        } catch {
            throw ShmError(.io, "cannot read the header of \(path): \(error.errno)", systemError: error)
        }
        guard count == bytes.count else {
            throw ShmError(.io, "cannot read the header of \(path): the file ended after \(count) bytes")
        }
        guard Array(bytes[0..<8]) == ShmLayout.magic else {
            throw ShmError(.badSegment, "\(path) is not a rapace segment (no RAPACE magic)")
        }
        return LittleEndianFields(bytes: bytes)
    }

    /// Opens an existing segment. With `expecting`, a different configuration in the header is
    /// an error naming both; without it the header's configuration is adopted.
    public static func open(path: String, expecting: ShmConfig?) throws(ShmError) -> ShmSegment {
        let fd: Int32
        do throws(SystemError) {
            fd = try Sys.open(path, O_RDWR)
        } catch {
            throw ShmError(.io, "cannot open segment \(path): \(error.errno)", systemError: error)
        }
        defer { Sys.close(fd) }
        let info: stat
        do throws(SystemError) {
            info = try Sys.fileStatus(fd, path: path)
        } catch {
            throw ShmError(.io, "cannot stat segment \(path): \(error.errno)", systemError: error)
        }
        let fileSize = Int(info.st_size)
        guard fileSize >= ShmLayout.headerSize else {
            throw ShmError(.badSegment, "\(path) is not a rapace segment: \(fileSize) bytes, smaller than the 4096-byte header")
        }
        let header = try readHeader(fd, path: path)
        let (u32, u64) = (header.u32, header.u64)
        let version = u32(ShmLayout.versionOffset)
        guard version == ShmLayout.version else {
            throw ShmError(.badSegment, "\(path) has segment layout version \(version); this build speaks version \(ShmLayout.version)")
        }
        let found = ShmConfig(ringCapacity: u32(ShmLayout.ringCapacityOffset), slotSize: u32(ShmLayout.slotSizeOffset), slotCount: u32(ShmLayout.slotCountOffset))
        do throws(ShmError) { try found.validate() } catch {
            throw ShmError(.badSegment, "\(path) has an invalid configuration (\(found)): \(error.message)")
        }
        if let expecting, expecting != found {
            throw ShmError(.configMismatch, "segment \(path) was created with \(found), but this side expects \(expecting)")
        }
        let offsets = ShmLayout.offsets(for: found)
        guard u64(ShmLayout.segmentSizeOffset) == UInt64(offsets.size), fileSize >= offsets.size,
            u64(ShmLayout.poolOffsetOffset) == UInt64(offsets.pool),
            u64(ShmLayout.ringOffsetsOffset) == UInt64(offsets.rings.0), u64(ShmLayout.ringOffsetsOffset + 8) == UInt64(offsets.rings.1),
            u64(ShmLayout.slotTableOffsetOffset) == UInt64(offsets.slotTable)
        else {
            throw ShmError(.badSegment, "\(path): header offsets or sizes do not match its configuration (file \(fileSize) bytes, layout needs \(offsets.size))")
        }
        let base: UnsafeMutableRawPointer
        do throws(SystemError) {
            base = try Sys.mapShared(fd, size: offsets.size, path: path)
        } catch {
            throw ShmError(.io, "cannot map segment \(path): \(error.errno)", systemError: error)
        }
        return ShmSegment(path: path, config: found, base: base, size: offsets.size)
    }

    private func initialiseHeader(epoch: UInt32) {
        memset(base, 0, offsets.pool)
        ShmLayout.magic.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: 8) }
        store32(ShmLayout.versionOffset, ShmLayout.version)
        store32(ShmLayout.headerSizeOffset, UInt32(ShmLayout.headerSize))
        store32(ShmLayout.ringCapacityOffset, config.ringCapacity)
        store32(ShmLayout.slotSizeOffset, config.slotSize)
        store32(ShmLayout.slotCountOffset, config.slotCount)
        store64(ShmLayout.ringOffsetsOffset, UInt64(offsets.rings.0))
        store64(ShmLayout.ringOffsetsOffset + 8, UInt64(offsets.rings.1))
        store64(ShmLayout.slotTableOffsetOffset, UInt64(offsets.slotTable))
        store64(ShmLayout.poolOffsetOffset, UInt64(offsets.pool))
        store64(ShmLayout.segmentSizeOffset, UInt64(offsets.size))
        store32(ShmLayout.epochOffset, epoch)
    }

    /// Resets the rings and every slot this process does not hold (``leases``) for a new peer.
    func reset() {
        for ring in [offsets.rings.0, offsets.rings.1] {
            memset(base + ring, 0, ShmLayout.ringDescriptors)
        }
        // Atomic per word: the previous plugin may still be freeing slots on its way out.
        freeUnheldFields { ~SlotStates.fields(of: $0, equalTo: 0) }
        rapace_store_release_u32(base + ShmLayout.slotWaitersOffset, 0)
        rapace_store_release_u32(base + ShmLayout.slotWaitersOffset + 4, 0)
        rapace_store_release_u32(base + ShmLayout.runningCPUOffset, 0)
        rapace_store_release_u32(base + ShmLayout.runningCPUOffset + 4, 0)
        let epoch = rapace_load_acquire_u32(base + ShmLayout.epochOffset)
        rapace_store_release_u32(base + ShmLayout.epochOffset, epoch &+ 1)
    }

    /// The header's epoch now (acquire): the host bumps it before it sends the bootstrap
    /// message that carries it.
    var epoch: UInt32 { rapace_load_acquire_u32(base + ShmLayout.epochOffset) }

    private func store32(_ offset: Int, _ value: UInt32) { (base + offset).storeBytes(of: value.littleEndian, as: UInt32.self) }
    private func store64(_ offset: Int, _ value: UInt64) { (base + offset).storeBytes(of: value.littleEndian, as: UInt64.self) }

    // MARK: Addresses

    func ringBase(_ index: Int) -> UnsafeMutableRawPointer { base + (index == 0 ? offsets.rings.0 : offsets.rings.1) }
    /// The state word holding slots `32 × word ..< 32 × word + 32` (``SlotStates``).
    func slotStateWord(_ word: Int) -> UnsafeMutableRawPointer { base + offsets.slotTable + word * 8 }
    /// The generation of the run starting at `slot`.
    func slotGenerationPointer(_ slot: Int) -> UnsafeMutableRawPointer { base + offsets.slotGenerations + slot * 4 }
    /// Frees `fields` of state word `word` on behalf of no lease (a reset or a reclaim):
    /// bumps each freed slot's generation first, so a view of an older run that ends later
    /// matches nothing, then clears the fields (atomic AND, release). A field cleared
    /// meanwhile by its receiver costs only an extra generation.
    func freeFields(_ fields: UInt64, ofWord word: Int) {
        guard fields != 0 else { return }
        var low = fields & SlotStates.lowBits
        while low != 0 {
            let slot = word * SlotStates.slotsPerWord + low.trailingZeroBitCount / 2
            let generation = slotGenerationPointer(slot)
            rapace_store_relaxed_u32(generation, rapace_load_relaxed_u32(generation) &+ 1)
            low &= low - 1
        }
        rapace_fetch_and_release_u64(slotStateWord(word), ~fields)
    }

    /// Frees (``freeFields(_:ofWord:)``) the fields `select` picks from each state word's
    /// current value, except those of slots this process holds (``leases``) and any past
    /// `slot_count`; under the lease lock, so no release of this process runs meanwhile.
    func freeUnheldFields(_ select: (UInt64) -> UInt64) {
        leases.withLock { leases in
            _ = SlotStates.forEachWord(0..<Int(config.slotCount)) { word, mask in
                let fields = select(rapace_load_acquire_u64(slotStateWord(word))) & mask
                freeFields(fields & ~SlotStates.fieldMask(ofSlotBits: leases.bits(ofStateWord: word)), ofWord: word)
                return true
            }
        }
    }

    func slotWaitersPointer(_ side: ShmSide) -> UnsafeMutableRawPointer { base + ShmLayout.slotWaitersOffset + side.rawValue * 4 }
    func runningCPUPointer(_ side: ShmSide) -> UnsafeMutableRawPointer { base + ShmLayout.runningCPUOffset + side.rawValue * 4 }
    func slotData(_ slot: Int) -> UnsafeMutableRawPointer { base + offsets.pool + slot * Int(config.slotSize) }

    /// Whether `pointer` lies inside this mapping's pool.
    public func poolContains(_ pointer: UnsafeRawPointer) -> Bool {
        let start = UnsafeRawPointer(base + offsets.pool)
        return pointer >= start && pointer < start + Int(config.poolBytes)
    }
}
