import CRapaceShim
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

/// A batch of frames that the transport stops writing part-way because the connection
/// fails: the runs of the descriptors it wrote and never published are nobody's but its own,
/// and go back to the pool at once, not at the next reset or reclaim.
@Suite("Shared memory: a batch cut short", .sharesProcess)
struct ShmBatchFailureTests {
    static let config = ShmConfig(ringCapacity: 8, slotSize: 4096, slotCount: 16)

    /// A data frame of `payload`, prepared for sending.
    private static func frame(_ index: Int, _ payload: Payload) -> Frame {
        var frame = Frame(descriptor: FrameDescriptor(messageID: UInt64(1000 + index), channelID: 1, methodID: 1, flags: .data), payload: payload)
        frame.prepareForSending()
        return frame
    }

    @Test("a batch that finds the ring's head index corrupt frees the runs it wrote and did not publish, copied and zero-copy")
    func corruptHeadMidBatch() async throws {
        let transportBox = Locked<SendableBox<ShmTransport>?>(nil)
        let ready = Locked<Bool>(false)
        try await withShmHost(
            "batch-cut", config: Self.config, services: [],
            prepare: { transport in transportBox.withLock { $0 = SendableBox(transport) } },
            started: { _, result in if case .success = result { ready.withLock { $0 = true } } }
        ) { path, hostReactor, listener, _ in
            // The raw peer blocks while it waits for the host: on a thread of its own, not
            // one of the few that every test's tasks share (Docs/testing.md).
            let peer = try await onOwnThread("batch-cut-peer") {
                Result { () throws -> SendableBox<RawShmPeer> in
                    let peer = try RawShmPeer(path: path.path)
                    try peer.handshake()  // reads the host's Hello and frees its run
                    return SendableBox(peer)
                }
            }.get()
            #expect(await waitUntil { ready.withLock { $0 } }, "the host's session is ready")
            let transport = try #require(transportBox.withLock { $0 })
            let segment = listener.value.segment
            let outcome = await onLoop(hostReactor) { () -> (before: Int, after: Int, publishedBefore: UInt64, publishedAfter: UInt64, statistics: ShmTransport.Statistics, closed: Bool, bufferSent: Bool) in
                let transport = transport.value
                let ring = segment.ringBase(ShmSide.host.outgoingRing)
                let before = transport.freeSlotCount
                let publishedBefore = rapace_load_acquire_u64(ring + ShmLayout.ringTail)
                // The peer's head index: past everything the host ever published. The host
                // reads it only when the ring looks full, part-way through the batch below.
                rapace_store_release_u64(ring + ShmLayout.ringHead, 1 << 40)
                // Eight frames of one slot each for a ring of eight entries, the host's Hello
                // among them: the ring looks full (the host has not read the head since its
                // Hello) after at most seven, which are written, not published. The second is
                // a buffer written in place (zero-copy: handed over when placed).
                let buffer = transport.allocateBuffer(count: 1000)!
                for index in 0..<8 {
                    let payload = index == 1 ? Payload(borrowing: buffer) : Payload([UInt8](repeating: UInt8(index), count: 1000))
                    transport.send(Self.frame(index, payload))
                }
                transport.flush()  // the session answers the failure by closing the connection
                return (
                    before, transport.freeSlotCount, publishedBefore, rapace_load_acquire_u64(ring + ShmLayout.ringTail),
                    transport.statistics, transport.isClosed, buffer.wasSent
                )
            }
            #expect(outcome.before == Int(Self.config.slotCount))
            // The batch did write frames before it failed: the buffer's and copies.
            #expect(outcome.statistics.zeroCopySends == 1)
            #expect(outcome.statistics.bytesCopiedIn >= 1000)
            #expect(outcome.closed, "the corrupt head index closes the connection")
            #expect(outcome.bufferSent)
            #expect(outcome.publishedAfter == outcome.publishedBefore, "the peer was shown descriptors of the failed batch")
            #expect(outcome.after == Int(Self.config.slotCount), "runs of descriptors written and never published stay taken")
            #expect(await onOwnThread("batch-cut-peer") { peer.value.hostClosed(within: .seconds(10)) }, "the host drops the connection")
        }
    }

    @Test("taking back an unpublished descriptor's run frees nothing that this process holds or that lies outside the pool")
    func takeBackLeavesHeldRunsAlone() async throws {
        try await withShmHost("batch-take-back", config: Self.config) { path, _, _, pluginReactor in
            let session = try await Session.connect(shm: path.path, reactor: pluginReactor)
            let transport = await onLoop(pluginReactor) { SendableBox(session.frameTransport as! ShmTransport) }
            let free = await onLoop(pluginReactor) { () -> (before: Int, afterHeld: Int, afterOutside: Int, afterRelease: Int) in
                let transport = transport.value
                let before = transport.freeSlotCount
                // An allocated buffer not sent: its run is held (leased) by this process.
                var buffer: ShmBuffer? = transport.allocateBuffer(count: 5000)!
                let held = FrameDescriptor(
                    channelID: 1, payloadSlot: UInt32(buffer!.slot), payloadGeneration: buffer!.generation,
                    payloadLength: UInt32(buffer!.count), flags: .data)
                transport.pool.takeBack(held)
                let afterHeld = transport.freeSlotCount
                // A run past the end of the pool (a descriptor a broken peer wrote over).
                transport.pool.takeBack(FrameDescriptor(channelID: 1, payloadSlot: Self.config.slotCount - 1, payloadLength: 3 * 4096, flags: .data))
                transport.pool.takeBack(FrameDescriptor(channelID: 1, payloadSlot: 0xFFFF_FFF0, payloadLength: 100, flags: .data))
                let afterOutside = transport.freeSlotCount
                buffer = nil
                return (before, afterHeld, afterOutside, transport.freeSlotCount)
            }
            #expect(free.afterHeld == free.before - 2, "the take-back freed a run that an unsent buffer holds")
            #expect(free.afterOutside == free.afterHeld)
            #expect(free.afterRelease == free.before)
            await session.closeAndWait()
        }
    }

    @Test("taking back a descriptor that names a run the peer allocated frees nothing")
    func takeBackLeavesThePeersRunsAlone() async throws {
        let hostTransport = Mutex<SendableBox<ShmTransport>?>(nil)
        let heldByHost = Mutex<SendableBox<ShmBuffer>?>(nil)
        try await withShmHost("batch-take-back-peer", config: Self.config, prepare: { transport in hostTransport.withLock { $0 = SendableBox(transport) } }) { path, hostReactor, _, pluginReactor in
            let session = try await Session.connect(shm: path.path, reactor: pluginReactor)
            let host = try #require(hostTransport.withLock { $0 })
            let plugin = await onLoop(pluginReactor) { SendableBox(session.frameTransport as! ShmTransport) }
            // The host allocates (its tag in the slot states) and keeps the buffer unsent; the
            // plugin's own lease map knows nothing of it, so only the tag can save the run.
            let run = await onLoop(hostReactor) { () -> (slot: Int, generation: UInt32, count: Int, free: Int) in
                let buffer = host.value.allocateBuffer(count: 5000)!
                let run = (buffer.slot, buffer.generation, buffer.count, host.value.freeSlotCount)
                heldByHost.withLock { $0 = SendableBox(buffer) }
                return run
            }
            let free = await onLoop(pluginReactor) { () -> (before: Int, after: Int) in
                let before = plugin.value.freeSlotCount
                plugin.value.pool.takeBack(FrameDescriptor(
                    channelID: 1, payloadSlot: UInt32(run.slot), payloadGeneration: run.generation, payloadLength: UInt32(run.count), flags: .data))
                return (before, plugin.value.freeSlotCount)
            }
            #expect(free.before == run.free)
            #expect(free.after == free.before, "the plugin freed a run the host allocated")
            await onLoop(hostReactor) { heldByHost.withLock { $0 = nil } }
            await session.closeAndWait()
        }
    }
}
