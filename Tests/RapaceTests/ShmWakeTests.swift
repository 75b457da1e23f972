import Foundation
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

/// When a consumer wakes a producer that waits for room in the ring (Docs/shm.md, "Consuming"
/// and the `*_cpu` fields): every 32 descriptors when the producer runs on another CPU, only
/// when its batch ends when they share one. Host (consumer) and plugin (producer) in this
/// process, each on its own reactor thread pinned to a chosen CPU; the host serves a slow
/// notification, so the plugin fills the ring and waits for room again and again.
@Suite("Shared memory: waking a waiting producer", .serialized, .sharesProcess)
struct ShmWakeTests {
    /// Notifications sent in one go: 6000 descriptors, the ring (256) refilled many times.
    static let count = 3000

    /// Counts `take` notifications, each served synchronously after `work` of busy time, so
    /// the consumer is slower than the producer even in a debug build.
    final class SlowSink: RPCService {
        static let take = MethodDescriptor(service: "SlowSink", method: "take", kind: .notification)
        static let work: UInt64 = 40_000  // ns
        let taken = Atomic<Int>(0)

        var methods: [MethodDescriptor] { [Self.take] }

        func handleImmediately(method: UInt32, request: Payload, context: ServerContext) throws -> Payload? {
            let end = Sys.monotonicNanoseconds() + Self.work
            while Sys.monotonicNanoseconds() < end {}
            taken.add(1, ordering: .relaxed)
            return .empty
        }

        func handle(method: UInt32, request: Payload, context: ServerContext) async throws -> Payload { .empty }
    }

    /// Sends ``count`` notifications from the plugin with the host on `hostCPU` and the plugin
    /// on `pluginCPU`; returns how often the host rang the plugin's doorbell meanwhile (the
    /// plugin receives nothing after the handshake, so each ring woke the waiting producer),
    /// and the plugin's statistics.
    private func doorbellsWhileFlooding(
        _ tag: String, hostCPU: Int, pluginCPU: Int, producerSpin: ShmSpinPolicy = .disabled
    ) async throws -> (rung: UInt64, producer: ShmTransport.Statistics) {
        let sink = SlowSink()
        let hostTransport = Mutex<SendableBox<ShmTransport>?>(nil)
        return try await withShmHost(tag, services: [sink], prepare: { transport in hostTransport.withLock { $0 = SendableBox(transport) } }) { path, hostReactor, _, pluginReactor in
            #expect(await onLoop(hostReactor) { pinCurrentThread(to: hostCPU) })
            #expect(await onLoop(pluginReactor) { pinCurrentThread(to: pluginCPU) })
            let session = try await Session.connect(shm: path.path, reactor: pluginReactor)
            let producer = try #require(
                await onLoop(pluginReactor) { () -> SendableBox<ShmTransport>? in
                    guard let transport = session.frameTransport as? ShmTransport else { return nil }
                    transport.spinPolicy = producerSpin
                    return SendableBox(transport)
                })
            let transport = try #require(hostTransport.withLock { $0 })
            let before = await onLoop(hostReactor) { transport.value.statistics.doorbellsRung }
            let refused = await onLoop(pluginReactor) {
                (0..<Self.count).compactMap { _ in session.sendNotification(SlowSink.take.id, request: .empty) }.count
            }
            #expect(refused == 0)
            let all = await waitUntil(timeout: .seconds(60)) { sink.taken.load(ordering: .relaxed) == Self.count }
            #expect(all, "the host took \(sink.taken.load(ordering: .relaxed)) of \(Self.count) notifications")
            let rung = await onLoop(hostReactor) { transport.value.statistics.doorbellsRung } - before
            let statistics = await onLoop(pluginReactor) { producer.value.statistics }
            await session.closeAndWait()
            return (rung, statistics)
        }
    }

    @Test(
        "on one CPU the producer is woken once per drained ring, not every 32 descriptors",
        .ownsProcess("both loop threads pinned to one CPU"))
    func sameCPU() async throws {
        let rung = try await doorbellsWhileFlooding("wake-same", hostCPU: 0, pluginCPU: 0).rung
        // Every 32 descriptors would be about count / 16 (187); once per ring about count / 128.
        #expect(rung >= 1, "the waiting producer was never woken, yet every notification arrived")
        #expect(rung <= UInt64(Self.count / 40), "\(rung) doorbells for \(Self.count) notifications (\(2 * Self.count) descriptors)")
    }

    @Test(
        "across CPUs the producer is woken every 32 descriptors, so it refills while the consumer works",
        .enabled(if: Sys.onlineCPUCount >= 2, "needs two CPUs"),
        .ownsProcess("loop threads pinned to two CPUs"))
    func acrossCPUs() async throws {
        let rung = try await doorbellsWhileFlooding("wake-across", hostCPU: 0, pluginCPU: 1).rung
        #expect(rung > UInt64(Self.count / 40), "\(rung) doorbells for \(Self.count) notifications (\(2 * Self.count) descriptors)")
    }

    @Test(
        "across CPUs a spinning producer watches for room itself, so the consumer need not ring",
        .enabled(if: Sys.onlineCPUCount >= 2, "needs two CPUs"),
        .ownsProcess("loop threads pinned to two CPUs"))
    func spinningProducerAcrossCPUs() async throws {
        // 32 descriptors take the consumer 16 × 40 µs: well within a 10 ms spin.
        let (rung, producer) = try await doorbellsWhileFlooding("wake-spin", hostCPU: 0, pluginCPU: 1, producerSpin: .adaptive(maximum: .milliseconds(10)))
        let found = "\(rung) doorbells for \(Self.count) notifications (\(2 * Self.count) descriptors); the producer stalled \(producer.stalls) times, spun \(producer.spins), found room or input \(producer.spinHits) times"
        #expect(producer.spinHits > 0, "\(found)")
        // A wait whose spin found room costs the consumer no doorbell; the others (a spin
        // that ran out, or a turn the back-off skipped) cost one each. How many spins run
        // out is the machine's business: a consumer descheduled for more than the 10 ms
        // budget (another process on its CPU, a VM's stolen time) makes the spin give up.
        // Unloaded, nearly every spin finds room (about 180 stalls, as many hits, 0 to 2
        // doorbells). Woken every 32 descriptors it would be about one doorbell per stall
        // (count / 16, 187, as in `acrossCPUs`). The 15 allow for a consumer that makes
        // room just before the producer starts to spin, after the stall raised its flag.
        let missed = producer.stalls - min(producer.stalls, producer.spinHits)
        #expect(rung <= missed + UInt64(Self.count / 200), "\(found)")
    }
}
