import Foundation
import Rapace
import RapaceMacros
import RapaceTestSupport
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Byte buffers of a generated service over shared memory.
@Service
protocol Blobs: Sendable {
    /// FNV-1a-64 of `data`: a byte buffer as the only argument.
    func digest(_ data: Payload) async throws -> UInt64
    /// The same, with another argument after the buffer.
    func digestTagged(_ data: Payload, tag: UInt8) async throws -> UInt64
    /// `size` bytes, byte i = i % 251, written in place in a buffer of the handler's segment.
    func produce(size: UInt32) async throws -> Payload
    /// Sends a buffer to the caller (a notification it does not serve), then returns it.
    func produceSent(size: UInt32) async throws -> Payload
}

/// Serves ``Blobs``; keeps the transport its calls came on, to read its counters.
final class BlobsImplementation: Blobs {
    let transport = Mutex<SendableBox<ShmTransport?>>(SendableBox(nil))

    func digest(_ data: Payload) async throws -> UInt64 { data.withUnsafeBytes { MethodID.fnv1a64($0) } }

    func digestTagged(_ data: Payload, tag: UInt8) async throws -> UInt64 { data.withUnsafeBytes { MethodID.fnv1a64($0) } ^ UInt64(tag) }

    func produce(size: UInt32) async throws -> Payload {
        let shm = try #require(ServerContext.current?.session.frameTransport as? ShmTransport)
        transport.withLock { $0 = SendableBox(shm) }
        let buffer = try #require(shm.allocateByteBuffer(count: Int(size)))
        buffer.withUnsafeMutableBytes { bytes in
            for index in bytes.indices { bytes[index] = UInt8(index % 251) }
        }
        return Payload(borrowing: buffer)
    }

    func produceSent(size: UInt32) async throws -> Payload {
        let session = try #require(ServerContext.current?.session)
        let buffer = try #require((session.frameTransport as? ShmTransport)?.allocateByteBuffer(count: Int(size)))
        _ = buffer.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 1) }
        #expect(session.sendNotification(0x1234_5678, request: Payload(borrowing: buffer)) == nil)
        return Payload(borrowing: buffer)
    }
}

@Suite("@Service: byte buffers sent in place over shared memory", .sharesProcess)
struct ZeroCopyServiceTests {
    @Test func anArgumentAndAResultWrittenInPlaceAreNotCopied() async throws {
        let path = temporaryPath(in: "/dev/shm", "zc-service")
        defer {
            unlink(path)
            unlink(path + ".sock")
        }
        let blobs = BlobsImplementation()
        try await withReactor("host") { reactor in
            let server = RapaceServer(reactor: reactor, services: [BlobsServer(blobs)])
            try await server.listen(shm: path)
            try await withReactor("plugin") { clientReactor in
                let session = try await Session.connect(shm: path, reactor: clientReactor)
                let client = BlobsClient(session)
                let count = 200_000
                func statistics() async throws -> ShmTransport.Statistics {
                    try await clientReactor.run { (session.frameTransport as! ShmTransport).statistics }
                }
                func argument() async throws -> SendableBox<Payload> {
                    try await clientReactor.run {
                        let buffer = try #require((session.frameTransport as! ShmTransport).allocateByteBuffer(count: count))
                        buffer.withUnsafeMutableBytes { bytes in
                            for index in bytes.indices { bytes[index] = UInt8(truncatingIfNeeded: index &* 7) }
                        }
                        return SendableBox(Payload(borrowing: buffer))
                    }
                }
                let expected = MethodID.fnv1a64((0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7) })

                // The only argument: sent in place, its length written before it.
                let before = try await statistics()
                let sent = try await argument()
                #expect(try await client.digest(sent.value) == expected)
                let after = try await statistics()
                #expect(after.zeroCopySends == before.zeroCopySends + 1)
                #expect(after.bytesCopiedIn == before.bytesCopiedIn, "no byte of the argument was copied into the segment")
                // A retry with the same buffer: its slots are the peer's now, so it is refused.
                await #expect {
                    _ = try await client.digest(sent.value)
                } throws: { ($0 as? RPCError)?.code == .failedPrecondition }

                // Followed by another argument: copied, and still right.
                #expect(try await client.digestTagged(argument().value, tag: 9) == expected ^ 9)
                let tagged = try await statistics()
                #expect(tagged.zeroCopySends == after.zeroCopySends)
                #expect(tagged.bytesCopiedIn >= after.bytesCopiedIn + UInt64(count))

                // A result written in place by the handler: the CallResult's fields go before it.
                let produced = try await client.produce(size: UInt32(count))
                #expect(produced.count == count)
                #expect(produced.withUnsafeBytes { bytes in bytes.indices.allSatisfy { bytes[$0] == UInt8($0 % 251) } })
                let serverTransport = blobs.transport.withLock { $0 }
                #expect(serverTransport.value != nil)
                let serverStatistics = try await reactor.run { serverTransport.value?.statistics ?? ShmTransport.Statistics() }
                #expect(serverStatistics.zeroCopySends == 1)
                #expect(serverStatistics.bytesCopiedIn < UInt64(count), "the result was not copied into the segment")
                // A handler answering with a buffer it already sent: refused too, the server serves on.
                await #expect {
                    _ = try await client.produceSent(size: 1000)
                } throws: { ($0 as? RPCError)?.code == .failedPrecondition }
                #expect(try await client.produce(size: 100).count == 100)
                await session.closeAndWait()
            }
            await server.shutdownGracefully()
        }
    }
}
