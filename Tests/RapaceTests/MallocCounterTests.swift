import CRapaceMallocCounter
import Glibc
import RapaceTestSupport
import Synchronization
import Testing

/// The calling thread's allocation counter (CRapaceMallocCounter, `Tests/CRapaceMallocCounter`):
/// the test executable interposes `malloc`, `calloc`, `realloc` and the aligned variants and
/// counts, per thread, the calls a thread makes while it has counting enabled.
///
/// Counting is per thread, so enable it only around code that cannot move to another
/// thread: synchronous code, or a task whose every resumption is on one reactor's loop
/// thread (and check that it was).
enum MallocCounter {
    /// Whether the counter is compiled in: on Linux with glibc, and not under a sanitizer
    /// (whose runtime owns the allocator). Where it is not, nothing counts and the tests that
    /// count are disabled.
    static var isAvailable: Bool { rapace_malloc_counter_is_available() }

    /// Allocations counted on this thread so far.
    static var count: UInt64 { rapace_malloc_counter_count() }

    /// Starts counting on this thread; returns the count to pass to ``stop(since:)``.
    @inline(never)
    static func start() -> UInt64 {
        let before = count
        rapace_malloc_counter_enable()
        return before
    }

    /// Stops counting on this thread; returns what was counted since ``start()`` returned
    /// `before`.
    @inline(never)
    static func stop(since before: UInt64) -> UInt64 {
        rapace_malloc_counter_disable()
        return count - before
    }

    /// The allocations `body` makes on this thread.
    static func counting(_ body: () throws -> Void) rethrows -> UInt64 {
        let before = start()
        defer { _ = stop(since: before) }
        try body()
        return count - before
    }
}

/// Hides `pointer` from the optimizer: in a release build LLVM removes a `malloc` whose
/// result is only freed or compared with nil, so the tests pass every result through here.
@inline(never) @_optimize(none)
private func opaque(_ pointer: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? { pointer }

@Suite(
    "Malloc counter (CRapaceMallocCounter)", .sharesProcess,
    .enabled(if: MallocCounter.isAvailable, "the malloc counter is off: not glibc, or a sanitizer build"))
struct MallocCounterTests {
    /// A class instance the optimizer cannot put on the stack.
    final class Box {
        var value: Int
        init(_ value: Int) { self.value = value }
    }

    @inline(never)
    static func makeBox(_ value: Int) -> Box { Box(value) }

    @Test("the test executable's malloc is the counter's, for Swift's allocations too")
    func interposed() {
        #expect(rapace_malloc_counter_is_interposed())
        // Once uncounted first, so that what a first use sets up (metadata) is not counted.
        UnsafeMutableRawPointer.allocate(byteCount: 100, alignment: 128).deallocate()
        withExtendedLifetime(Self.makeBox(1)) {}
        let raw = MallocCounter.counting {
            let pointer = UnsafeMutableRawPointer.allocate(byteCount: 48, alignment: 8)
            pointer.deallocate()
        }
        #expect(raw == 1)
        let object = MallocCounter.counting {
            withExtendedLifetime(Self.makeBox(3)) {}
        }
        #expect(object == 1)
        var misalignment: UInt = 1
        let overAligned = MallocCounter.counting {
            // swift_slowAlloc serves an alignment above 16 with an aligned allocation.
            let pointer = UnsafeMutableRawPointer.allocate(byteCount: 100, alignment: 128)
            misalignment = UInt(bitPattern: pointer) % 128
            pointer.deallocate()
        }
        #expect(overAligned == 1)
        #expect(misalignment == 0)
    }

    @Test("disabled, nothing counts; each entry point counts once, a realloc to 0 and a refused posix_memalign not at all")
    func entryPoints() {
        #expect(!rapace_malloc_counter_is_enabled())
        let before = MallocCounter.count
        UnsafeMutableRawPointer.allocate(byteCount: 48, alignment: 8).deallocate()
        free(opaque(malloc(16)))
        #expect(MallocCounter.count == before)

        // Only C calls inside the counted region: a first use of generic Swift code there
        // (Optional.map, say) may allocate its runtime metadata and would count.
        var zeroSized: UnsafeMutableRawPointer?
        var shrunk: UnsafeMutableRawPointer? = UnsafeMutableRawPointer(bitPattern: 1)
        var zeroed: UnsafeMutableRawPointer?
        var refused: Int32 = 0
        var accepted: Int32 = -1
        var viaPosix: UnsafeMutableRawPointer?
        var viaAligned: UnsafeMutableRawPointer?
        var viaMemalign: UnsafeMutableRawPointer?
        let counted = MallocCounter.counting {
            zeroSized = opaque(malloc(0))  // 1: glibc returns a unique pointer
            var grown = opaque(realloc(nil, 8))  // 2: realloc of nil allocates
            grown = opaque(realloc(grown, 4096))  // 3
            shrunk = opaque(realloc(grown, 0))  // frees only (glibc returns NULL): not counted
            zeroed = opaque(calloc(4, 8))  // 4
            refused = posix_memalign(&viaPosix, 24, 8)  // EINVAL, not counted
            accepted = posix_memalign(&viaPosix, 256, 8)  // 5
            viaAligned = opaque(aligned_alloc(64, 64))  // 6
            viaMemalign = opaque(memalign(32, 8))  // 7
        }
        #expect(counted == 7)
        #expect(zeroSized != nil)
        #expect(shrunk == nil)
        #expect(zeroed?.load(fromByteOffset: 24, as: UInt64.self) == 0)
        #expect(refused == EINVAL)
        #expect(accepted == 0)
        #expect(viaPosix.map { UInt(bitPattern: $0) % 256 } == 0)
        #expect(viaAligned.map { UInt(bitPattern: $0) % 64 } == 0)
        #expect(viaMemalign.map { UInt(bitPattern: $0) % 32 } == 0)
        for pointer in [zeroSized, zeroed, viaPosix, viaAligned, viaMemalign] { free(pointer) }

        // errno as glibc sets it: ENOMEM for an allocation that cannot succeed.
        errno = 0
        let huge = opaque(malloc(Int.max))
        let hugeErrno = errno
        #expect(huge == nil)
        #expect(hugeErrno == ENOMEM)
    }

    @Test("each thread counts its own allocations only")
    func perThread() {
        // Another thread allocates, counting for itself, while this one counts and allocates
        // nothing: it waits in pthread_join (blocked, not spinning: this is a cooperative
        // thread, and the other one needs the CPU), which allocates nothing.
        let shared = ThreadShared()
        let context = Unmanaged.passRetained(shared).toOpaque()
        var during: UInt64 = 0
        var created: Int32 = -1
        let here = MallocCounter.counting {
            var thread = pthread_t()
            created = pthread_create(&thread, nil, { raw in
                let shared = Unmanaged<ThreadShared>.fromOpaque(raw!).takeRetainedValue()
                // Allocates only once the creator counts again, so that the two overlap.
                while !shared.go.load(ordering: .acquiring) { sched_yield() }
                let counted = MallocCounter.counting {
                    for _ in 0..<1000 { free(opaque(malloc(32))) }
                }
                shared.otherCount.store(counted, ordering: .relaxed)
                return nil
            }, context)
            guard created == 0 else { return }
            let before = MallocCounter.count
            shared.go.store(true, ordering: .releasing)
            pthread_join(thread, nil)
            during = MallocCounter.count - before
        }
        #expect(created == 0)
        #expect(during == 0)
        #expect(shared.otherCount.load(ordering: .relaxed) == 1000)
        // What pthread_create allocates on the creating thread (the new thread's stack and
        // descriptor are mmapped, and reused from glibc's cache): nothing, or a block or two.
        #expect(here <= 2)
    }
}

/// What ``MallocCounterTests/perThread()``'s thread and the test share.
private final class ThreadShared: Sendable {
    /// Set when the other thread may start allocating.
    let go = Atomic<Bool>(false)
    /// What the other thread counted for itself.
    let otherCount = Atomic<UInt64>(0)
}
