import ArgumentParser
import CRapaceShim
import Histogram

#if canImport(Glibc)
import Glibc
#endif

/// Hidden: the far side of the raw baselines of `rapace-bench shm`.
/// - `--eventfd IN,OUT`: blocking eventfd ping-pong (reads IN, writes OUT), descriptors
///   inherited from the bench;
/// - `--spin FILE`: busy-poll ping-pong on two 64-bit words of a shared file.
/// Exits when the bench writes the stop value, or when the bench dies.
struct RawShmPeer: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "raw-shm-peer",
        abstract: "Far side of the raw eventfd and busy-poll baselines (started by `rapace-bench shm`).",
        shouldDisplay: false)

    @Option(name: .long, help: "IN,OUT eventfd descriptor numbers.")
    var eventfd: String?

    @Option(name: .long, help: "Shared file for the busy-poll ping-pong.")
    var spin: String?

    func run() throws {
        _ = rapace_set_parent_death_signal(SIGTERM)
        if getppid() == 1 { throw BenchError("raw-shm-peer: the bench is already gone") }
        print("ready")
        fflush(nil)
        if let eventfd {
            let parts = eventfd.split(separator: ",").compactMap { Int32($0) }
            guard parts.count == 2 else { throw ValidationError("--eventfd takes IN,OUT") }
            var value: UInt64 = 0
            while read(parts[0], &value, 8) == 8 {
                if value >= RawShm.stop { return }
                var one: UInt64 = 1
                guard write(parts[1], &one, 8) == 8 else { return }
            }
        } else if let spin {
            let words = try RawShm.map(spin)
            var expected: UInt64 = 1
            while true {
                var spins = 0
                var seen = rapace_load_acquire_u64(words)
                while seen < expected {
                    rapace_cpu_relax()
                    spins += 1
                    if spins & 0xFFFFF == 0 && getppid() == 1 { return }
                    seen = rapace_load_acquire_u64(words)
                }
                if seen >= RawShm.stop { return }
                rapace_store_release_u64(words + 64, seen)
                expected = seen + 1
            }
        } else {
            throw ValidationError("pass --eventfd IN,OUT or --spin FILE")
        }
    }
}

enum RawShm {
    static let stop: UInt64 = 1 << 62

    /// Maps the 128-byte ping-pong file (two words on separate cache lines).
    static func map(_ path: String) throws -> UnsafeMutableRawPointer {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BenchError.system("open \(path)") }
        defer { close(fd) }
        guard ftruncate(fd, 4096) == 0 else { throw BenchError.system("ftruncate \(path)") }
        guard let base = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), base != MAP_FAILED else {
            throw BenchError.system("mmap \(path)")
        }
        return base
    }

    /// Client side of the busy-poll ping-pong: write the sequence number, spin for the echo.
    static func spinRoundTrips(_ words: UnsafeMutableRawPointer, warmup: Int, iterations: Int) -> Histogram<UInt64> {
        var histogram = Samples.newHistogram()
        for index in 0..<(warmup + iterations) {
            let sequence = UInt64(index + 1)
            let start = monotonicNanoseconds()
            rapace_store_release_u64(words, sequence)
            while rapace_load_acquire_u64(words + 64) != sequence { rapace_cpu_relax() }
            let elapsed = monotonicNanoseconds() - start
            if index >= warmup { histogram.record(elapsed) }
        }
        rapace_store_release_u64(words, stop)
        return histogram
    }

    /// Client side of the eventfd ping-pong (blocking descriptors).
    static func eventfdRoundTrips(out: Int32, in input: Int32, warmup: Int, iterations: Int) throws -> Histogram<UInt64> {
        var histogram = Samples.newHistogram()
        for index in 0..<(warmup + iterations) {
            var one: UInt64 = 1
            var value: UInt64 = 0
            let start = monotonicNanoseconds()
            guard write(out, &one, 8) == 8, read(input, &value, 8) == 8 else { throw BenchError.system("eventfd ping-pong") }
            let elapsed = monotonicNanoseconds() - start
            if index >= warmup { histogram.record(elapsed) }
        }
        var stop = RawShm.stop
        _ = write(out, &stop, 8)
        return histogram
    }
}
