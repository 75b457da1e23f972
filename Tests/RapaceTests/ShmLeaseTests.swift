import CRapaceShim
import EchoService
import RapaceTestSupport
import Testing

@testable import Rapace

/// Slots the host holds stay its own across connections: a buffer it allocated and has not
/// sent survives the reclaim after the plugin leaves and the reset for the next plugin.
@Suite("Shared memory: slots held across connections", .sharesProcess)
struct ShmLeaseTests {
    @Test("an unsent allocated buffer keeps its slots through a plugin's departure and the next plugin's arrival")
    func allocatedBufferSurvivesReconnect() async throws {
        try await Self.withHostAndPlugin("lease") { path, hostReactor, listener, pluginReactor in
            // A pool counter that does not depend on a live connection.
            let freeSlots = { @Sendable in
                await onLoop(hostReactor) { ShmSlotPool(segment: listener.value.segment, side: .host).freeCount }
            }
            let first = try await Session.connect(shm: path.path, reactor: pluginReactor)
            #expect(try await EchoClient(first).add(1, 2) == 3)
            // The host allocates three slots and keeps them, unsent.
            var held = await onLoop(hostReactor) { listener.value.activeTransport?.allocateBuffer(count: 3 * 4096).map(SendableBox.init) }
            #expect(held?.value.slotCount == 3)
            #expect(await freeSlots() == 5)
            await first.closeAndWait()
            // The host notices, reclaims what it sent — and not the buffer it still holds.
            #expect(await waitUntil { await onLoop(hostReactor) { listener.value.activeTransport == nil } })
            #expect(await freeSlots() == 5, "the reclaim freed slots of a buffer the host still holds")
            // The next plugin gets a reset segment, still without those slots.
            let second = try await Session.connect(shm: path.path, reactor: pluginReactor)
            #expect(try await EchoClient(second).checksum([UInt8](repeating: 7, count: 10_000)) == MethodID.fnv1a64([UInt8](repeating: 7, count: 10_000)))
            #expect(await freeSlots() == 5, "the reset for the next plugin freed slots the host still holds")
            // Releasing the buffer gives them back.
            held = nil
            #expect(await waitUntil { await freeSlots() == 8 })
            await second.closeAndWait()
        }
    }

    @Test("a held buffer released after its connection ended wakes the next plugin, which waits for its slots")
    func releaseAfterReconnectWakesTheNextPlugin() async throws {
        try await Self.withHostAndPlugin("lease-wake") { path, hostReactor, listener, pluginReactor in
            let first = try await Session.connect(shm: path.path, reactor: pluginReactor)
            #expect(try await EchoClient(first).add(1, 2) == 3)
            // The host holds seven of the eight slots, unsent, past the first plugin.
            var held = await onLoop(hostReactor) { listener.value.activeTransport?.allocateBuffer(count: 7 * 4096).map(SendableBox.init) }
            #expect(held?.value.slotCount == 7)
            await first.closeAndWait()
            #expect(await waitUntil { await onLoop(hostReactor) { listener.value.activeTransport == nil } })
            let second = try await Session.connect(shm: path.path, reactor: pluginReactor)
            // Two slots' worth: the plugin waits for the host's slots (nothing else rings it).
            let bytes = [UInt8](repeating: 3, count: 6000)
            let call = Task { try await EchoClient(second).checksum(bytes) }
            let waiting = await waitUntil { rapace_load_seq_cst_u32(listener.value.segment.slotWaitersPointer(.plugin)) == 1 }
            #expect(waiting, "the plugin waits for slots")
            held = nil
            // Without the wake the frame is refused after the 10 s stall limit and the call
            // throws RESOURCE_EXHAUSTED; the bound only keeps a hang from lasting.
            let answer = try await value(of: call, within: .seconds(30), "the waiting call")
            #expect(answer == MethodID.fnv1a64(bytes))
            await second.closeAndWait()
        }
    }

    /// An Echo host on a fresh 8-slot segment (4 KiB slots) and a reactor for the plugin side
    /// (``withShmHost(_:config:services:prepare:started:_:)``).
    private static func withHostAndPlugin(
        _ tag: String, _ body: (ShmPath, Reactor, SendableBox<ShmListener>, Reactor) async throws -> Void
    ) async throws {
        try await withShmHost(tag, config: ShmConfig(ringCapacity: 16, slotSize: 4096, slotCount: 8), body)
    }
}
