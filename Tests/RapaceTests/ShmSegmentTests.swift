import CRapaceShim
import Foundation
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

@Suite("Shared-memory segment", .sharesProcess)
struct ShmSegmentTests {
    @Test("an opener with another configuration gets an error naming both; without one it adopts the header's")
    func configMismatch() throws {
        let path = ShmPath("mismatch")
        defer { path.cleanUp() }
        let created = try ShmSegment.create(path: path.path, config: ShmConfig(ringCapacity: 64, slotSize: 4096, slotCount: 16))
        #expect(created.config.poolBytes == 65536)
        do {
            _ = try ShmSegment.open(path: path.path, expecting: .default)
            Issue.record("opening with another config succeeded")
        } catch {
            #expect(error.code == .configMismatch)
            #expect(error.message.contains("ring 64 descriptors, 4096-byte slots × 16"))
            #expect(error.message.contains("ring 256 descriptors, 65536-byte slots × 128"))
        }
        let adopted = try ShmSegment.open(path: path.path, expecting: nil)
        #expect(adopted.config == ShmConfig(ringCapacity: 64, slotSize: 4096, slotCount: 16))
        // The layout is the documented one (Docs/shm.md): header, two rings, table, pool.
        #expect(adopted.offsets.rings.0 == 4096)
        #expect(adopted.offsets.pool % 4096 == 0)
        #expect(adopted.size == adopted.offsets.pool + 65536)
    }

    @Test("a file that is not a segment is refused with a clear error, never mapped blindly")
    func garbage() throws {
        let path = ShmPath("garbage")
        defer { path.cleanUp() }
        for contents in [[UInt8](repeating: 0x41, count: 10), [UInt8](repeating: 0x41, count: 8192), Array("RAPACE\0\0".utf8) + [UInt8](repeating: 0xFF, count: 8184)] {
            #expect(FileManager.default.createFile(atPath: path.path, contents: Data(contents)))
            do {
                _ = try ShmSegment.open(path: path.path, expecting: nil)
                Issue.record("garbage of \(contents.count) bytes was accepted")
            } catch {
                #expect(error.code == .badSegment, "\(error)")
                #expect(error.message.contains(path.path))
            }
        }
        #expect(throws: ShmError.self) { _ = try ShmSegment.open(path: path.path + ".missing", expecting: nil) }
    }

    @Test("invalid configurations are refused with the reason")
    func invalidConfigs() {
        for config in [ShmConfig(ringCapacity: 3), ShmConfig(slotSize: 100), ShmConfig(slotCount: 0)] {
            #expect(throws: ShmError.self) { try config.validate() }
        }
        #expect(throws: Never.self) { try ShmConfig.default.validate() }
    }

    @Test("the default layout has the documented offsets (Docs/shm.md)")
    func defaultLayout() {
        let offsets = ShmLayout.offsets(for: .default)
        #expect(offsets.rings.0 == 4096)
        #expect(offsets.rings.1 == 24576)
        #expect(offsets.slotTable == 45056)
        #expect(offsets.slotGenerations == 45056 + 64)
        #expect(offsets.pool == 49152)
        #expect(offsets.size == 8_437_760)
        // 1000 slots: 32 state words (256 bytes), then 4000 bytes of generations.
        let large = ShmLayout.offsets(for: ShmConfig(ringCapacity: 256, slotSize: 4096, slotCount: 1000))
        #expect(large.slotGenerations == large.slotTable + 256)
        #expect(large.pool == ShmLayout.roundUp(large.slotTable + 256 + 4000, 4096))
    }

    @Test("slot states are two-bit fields, a run's generation is on its first slot, and the receiver frees only the sender's fields")
    func slotStateFields() throws {
        let path = ShmPath("fields")
        defer { path.cleanUp() }
        let segment = try ShmSegment.create(path: path.path, config: ShmConfig(ringCapacity: 64, slotSize: 64, slotCount: 100))
        let host = ShmSlotPool(segment: segment, side: .host)
        let plugin = ShmSlotPool(segment: segment, side: .plugin)
        func word(_ index: Int) -> UInt64 { rapace_load_acquire_u64(segment.slotStateWord(index)) }

        // A host run of 40 slots (slots 0..<40) crosses into the second state word.
        let run = try #require(host.allocate(bytes: 40 * 64))
        #expect(run.slot == 0 && run.count == 40 && run.generation == 1)
        #expect(word(0) == 0x5555_5555_5555_5555)
        #expect(word(1) == 0x5555)
        #expect(rapace_load_relaxed_u32(segment.slotGenerationPointer(0)) == 1)
        #expect(rapace_load_relaxed_u32(segment.slotGenerationPointer(1)) == 0, "only the first slot carries the generation")
        // A plugin run lands after it: fields of 2.
        let pluginRun = try #require(plugin.allocate(bytes: 3 * 64))
        #expect(pluginRun.slot == 40)
        #expect(word(1) == 0x5555 | (0b10_1010 << 16))
        #expect(segment.slotState(41) == 2 && segment.slotState(39) == 1 && segment.slotState(43) == 0)
        #expect(host.freeCount == 57)

        // The plugin receives the host's run: checked, then freed on release.
        let descriptor = FrameDescriptor(messageID: 1, channelID: 1, methodID: 1, payloadSlot: 0, payloadGeneration: 1, payloadLength: 40 * 64, flags: .data)
        let received = try plugin.validateIncoming(descriptor)
        #expect(received.slot == 0 && received.count == 40)
        // A descriptor naming the plugin's own slots, or a stale generation, is refused.
        let ownSlots = FrameDescriptor(messageID: 2, channelID: 1, methodID: 1, payloadSlot: 40, payloadGeneration: pluginRun.generation, payloadLength: 100, flags: .data)
        #expect(throws: ShmError.self) { _ = try plugin.validateIncoming(ownSlots) }
        let stale = FrameDescriptor(messageID: 3, channelID: 1, methodID: 1, payloadSlot: 40, payloadGeneration: pluginRun.generation &+ 1, payloadLength: 100, flags: .data)
        #expect(throws: ShmError.self) { _ = try host.validateIncoming(stale) }
        // A run that reaches past the sender's slots into free ones is refused, naming the slot.
        let pastTheRun = FrameDescriptor(messageID: 4, channelID: 1, methodID: 1, payloadSlot: 40, payloadGeneration: pluginRun.generation, payloadLength: 4 * 64, flags: .data)
        do {
            _ = try host.validateIncoming(pastTheRun)
            Issue.record("a run reaching into free slots was accepted")
        } catch {
            #expect(error.message.contains("slot 43 is not allocated by the peer (state 0)"), "\(error)")
        }
        plugin.release(slot: received.slot, count: received.count, generation: 1, allocatedBy: .host)
        #expect(word(0) == 0)
        #expect(word(1) == 0b10_1010 << 16, "the plugin's own fields in the same word are untouched")
        #expect(host.freeCount == 97)

        // The next host run starting at slot 0 gets the next generation (a fresh pool
        // searches from slot 0; this one would resume after its last run).
        let again = try #require(ShmSlotPool(segment: segment, side: .host).allocate(bytes: 64))
        #expect(again.slot == 0 && again.generation == 2)
    }

    @Test("an allocation that finds the pool full claims nothing, so it gives nothing back and rings no doorbell")
    func fullPoolRingsNothing() throws {
        let path = ShmPath("full-pool")
        defer { path.cleanUp() }
        // 40 slots: runs of one state word and runs across two.
        let segment = try ShmSegment.create(path: path.path, config: ShmConfig(ringCapacity: 64, slotSize: 64, slotCount: 40))
        let host = ShmSlotPool(segment: segment, side: .host)
        let plugin = ShmSlotPool(segment: segment, side: .plugin)
        let own = try Sys.eventfd()
        let peer = try Sys.eventfd()
        let bells = ShmDoorbells(own: own, peer: peer)
        defer { bells.close() }
        segment.doorbells.withLock { $0 = bells }
        _ = try #require(plugin.allocate(bytes: 40 * 64))
        // Both sides wait for slots: a free would ring both doorbells.
        plugin.setWaiting()
        host.setWaiting()
        for bytes in [64, 3 * 64, 33 * 64] { #expect(host.allocate(bytes: bytes) == nil) }
        #expect(Sys.eventfdDrain(own) == 0, "the failed allocations rang our own doorbell")
        #expect(Sys.eventfdDrain(peer) == 0, "the failed allocations rang the peer's doorbell")
        #expect(segment.slotState(0) == 2 && plugin.freeCount == 0)
        // A free still rings both.
        plugin.release(slot: 0, count: 40, generation: 1, allocatedBy: .plugin)
        #expect(Sys.eventfdDrain(own) == 1 && Sys.eventfdDrain(peer) == 1)
    }

    @Test("a peer that frees the fields of a run this process still views cannot make an allocation of a held buffer trap")
    func peerFreesAViewedRun() throws {
        try withTwoMappings("freed-view") { hostSegment, pluginSegment, host, plugin in
            // The host views a plugin run [0, 2); the plugin then zeroes its fields, as if freed.
            let sent = try #require(plugin.allocate(bytes: 2 * 64))
            let view = try host.validateIncoming(FrameDescriptor(messageID: 1, channelID: 2, methodID: 1, payloadSlot: UInt32(sent.slot), payloadGeneration: sent.generation, payloadLength: 2 * 64, flags: .data))
            #expect(view.slot == 0 && view.count == 2)
            pluginSegment.clearSlotStates(0..<2)

            // A held buffer finds slots 0 and 1 free but leased here: it leaves them claimed with
            // the host's tag, unused, and takes the next free slot.
            let buffer = try #require(host.allocateHeld(bytes: 64))
            #expect(buffer.slot == 2 && buffer.count == 1)
            #expect(host.leaseConflicts == 2)
            #expect(hostSegment.slotState(0) == 1 && hostSegment.slotState(1) == 1)
            #expect(hostSegment.leases.withLock { $0.bits(ofStateWord: 0) } == 0b111)
            // Later allocations skip them; the view's end frees nothing of the host's.
            let next = try #require(host.allocate(bytes: 64))
            #expect(next.slot == 3)
            host.release(slot: view.slot, count: view.count, generation: sent.generation, allocatedBy: .plugin)
            #expect(hostSegment.slotState(0) == 1 && hostSegment.slotState(1) == 1)
            #expect(host.freeCount == 36)

            // A run wholly held here, tried again and again, ends in nil after a bounded number
            // of attempts, not in a trap or a loop over the pool.
            host.release(slot: buffer.slot, count: buffer.count, generation: buffer.generation, allocatedBy: .host)
            let fresh = ShmSlotPool(segment: hostSegment, side: .host)
            hostSegment.reset()
            let sentAgain = try #require(ShmSlotPool(segment: pluginSegment, side: .plugin).allocate(bytes: 40 * 64))
            _ = try host.validateIncoming(FrameDescriptor(messageID: 2, channelID: 2, methodID: 1, payloadSlot: UInt32(sentAgain.slot), payloadGeneration: sentAgain.generation, payloadLength: 40 * 64, flags: .data))
            pluginSegment.clearSlotStates(0..<40)
            #expect(fresh.allocateHeld(bytes: 64) == nil)
            #expect(fresh.leaseConflicts == ShmSlotPool.heldAllocationAttempts)
            #expect(fresh.freeCount == 40 - ShmSlotPool.heldAllocationAttempts)
        }
    }

    @Test("a view or an unsent buffer released after the host reset the segment frees nothing allocated since")
    func lateReleaseAfterReset() throws {
        try withTwoMappings("late-release") { hostSegment, pluginSegment, host, plugin in
            // The plugin views a host run [5, 15) and holds an allocated, unsent run [20, 23).
            _ = try #require(host.allocate(bytes: 5 * 64))
            let sent = try #require(host.allocate(bytes: 10 * 64))
            #expect(sent.slot == 5)
            let view = try plugin.validateIncoming(FrameDescriptor(messageID: 1, channelID: 1, methodID: 1, payloadSlot: 5, payloadGeneration: sent.generation, payloadLength: 10 * 64, flags: .data))
            _ = try #require(plugin.allocate(bytes: 5 * 64))  // [15, 20)
            let unsent = try #require(plugin.allocateHeld(bytes: 3 * 64))
            #expect(unsent.slot == 20)

            // The host prepares the segment for the next plugin: it holds nothing, so all is freed.
            hostSegment.reset()
            #expect(host.freeCount == 40)
            // New runs cover those slots without starting where the old ones did.
            let nextHost = ShmSlotPool(segment: hostSegment, side: .host)
            _ = try #require(nextHost.allocate(bytes: 6 * 64))   // [0, 6)
            _ = try #require(nextHost.allocate(bytes: 9 * 64))   // [6, 15)
            let nextPlugin = ShmSlotPool(segment: pluginSegment, side: .plugin)
            _ = try #require(nextPlugin.allocate(bytes: 15 * 64))  // [0, 15) is taken: [15, 30)
            #expect(hostSegment.slotState(21) == 2)

            // The old holds end late: neither frees the new runs.
            plugin.release(slot: view.slot, count: view.count, generation: sent.generation, allocatedBy: .host)
            plugin.release(slot: unsent.slot, count: unsent.count, generation: unsent.generation, allocatedBy: .plugin)
            #expect((5..<15).allSatisfy { hostSegment.slotState($0) == 1 }, "the stale view freed the host's new runs")
            #expect((20..<23).allSatisfy { hostSegment.slotState($0) == 2 }, "the stale buffer freed the plugin's new run")
            #expect(host.freeCount == 10)
        }
    }

    /// A 40-slot segment (64-byte slots) mapped twice, as the host and as the plugin (which
    /// maps the file itself: its leases are its own, as in another process), with a slot pool
    /// for each side; the file is removed however `body` ends.
    private func withTwoMappings(
        _ name: String, _ body: (_ hostSegment: ShmSegment, _ pluginSegment: ShmSegment, _ host: ShmSlotPool, _ plugin: ShmSlotPool) throws -> Void
    ) throws {
        let path = ShmPath(name)
        defer { path.cleanUp() }
        let config = ShmConfig(ringCapacity: 64, slotSize: 64, slotCount: 40)
        let hostSegment = try ShmSegment.create(path: path.path, config: config)
        let pluginSegment = try ShmSegment.open(path: path.path, expecting: config)
        try body(hostSegment, pluginSegment, ShmSlotPool(segment: hostSegment, side: .host), ShmSlotPool(segment: pluginSegment, side: .plugin))
    }

    @Test("the lease bitmap claims runs atomically and frees them")
    func leaseBitmap() {
        var bitmap = LeaseBitmap(count: 200)
        let first = bitmap.claim(60..<130)
        let overlapping = bitmap.claim(129..<131)
        let partiallySet = bitmap.contains(130)
        let inside = bitmap.contains(60) && bitmap.contains(64) && bitmap.contains(129)
        bitmap.clear(60..<130)
        let cleared = !bitmap.contains(100)
        let all = bitmap.claim(0..<200)
        #expect(first)
        #expect(!overlapping, "overlapping run refused")
        #expect(!partiallySet, "a refused claim sets nothing")
        #expect(inside)
        #expect(cleared)
        #expect(all)
    }
}
