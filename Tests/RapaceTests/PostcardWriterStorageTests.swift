import RapaceTestSupport
import Testing

@testable import Rapace

/// The writer keeps its first 16 bytes inline and moves to a heap array past them; the bytes
/// are the same either way.
@Suite(.sharesProcess) struct PostcardWriterStorageTests {
    @Test func smallEncodesStayInline() {
        var writer = PostcardWriter()
        writer.writeVarint(300)
        writer.writeString("hi")
        #expect(!writer.isSpilled)
        #expect(writer.count == 5)
        #expect(writer.bytes == [0xAC, 0x02, 0x02, 0x68, 0x69])
        guard case .inline(_, let count) = writer.payload.storage else {
            Issue.record("a 5-byte payload should be inline")
            return
        }
        #expect(count == 5)
        #expect(writer.payload.bytes == writer.bytes)
    }

    @Test func growingPastSixteenBytesKeepsEveryByte() {
        var writer = PostcardWriter()
        var expected: [UInt8] = []
        for value in 0..<40 as Range<UInt8> {
            writer.writeByte(value)
            expected.append(value)
            #expect(writer.isSpilled == (expected.count > PostcardWriter.inlineCapacity))
        }
        writer.writeRawBytes([1, 2, 3] as [UInt8])
        expected += [1, 2, 3]
        #expect(writer.bytes == expected)
        #expect(writer.payload.bytes == expected)
        writer.withUnsafeBytes { #expect(Array($0) == expected) }
    }

    @Test func oneWriteThatDoesNotFitSpills() {
        var writer = PostcardWriter()
        writer.writeByte(7)
        writer.writeString(String(repeating: "x", count: 20))
        #expect(writer.isSpilled)
        #expect(writer.bytes == [7, 20] + Array(repeating: UInt8(ascii: "x"), count: 20))
    }

    @Test func reservingMoreThanInlineStartsOnTheHeap() {
        let writer = PostcardWriter(reservingCapacity: 64)
        #expect(writer.isSpilled)
        #expect(writer.count == 0)
        #expect(PostcardWriter(reservingCapacity: 16).isSpilled == false)
    }

    @Test func truncateAndInPlaceMutation() {
        var writer = PostcardWriter()
        writer.writeRawBytes([1, 2, 3, 4] as [UInt8])
        writer.truncate(to: 2)
        #expect(writer.bytes == [1, 2])
        writer.bytes[0] = 9  // in place: moves the bytes to the heap first
        #expect(writer.isSpilled)
        #expect(writer.bytes == [9, 2])
        writer.writeByte(5)
        writer.truncate(to: 1)
        #expect(writer.bytes == [9])
    }

    @Test func failedEncodeRestoresInlineBytes() {
        struct Unsupported: Encodable {
            func encode(to encoder: any Encoder) throws {
                throw EncodingError.invalidValue(0, .init(codingPath: [], debugDescription: "no"))
            }
        }
        var writer = PostcardWriter()
        writer.writeByte(1)
        #expect(throws: (any Error).self) { try writer.encode([Unsupported()]) }
        #expect(writer.bytes == [1])
    }
}
