import Foundation
import RapaceTestSupport
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
