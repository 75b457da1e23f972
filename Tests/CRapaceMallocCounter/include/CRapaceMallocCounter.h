// CRapaceMallocCounter: a per-thread allocation counter for tests. Test code only: it is
// linked into the test executable and into nothing that ships (Package.swift).
//
// shim.c defines `malloc`, `calloc`, `realloc`, `posix_memalign`, `aligned_alloc` and
// `memalign` (the only unprefixed symbols, as interposing requires) and forwards each to
// glibc's own implementation (`__libc_malloc`, …), so the whole process keeps glibc's
// allocator and `free`. Each call counts on the calling thread while that thread has
// counting enabled; other threads pay one thread-local read. The counter never allocates.
#ifndef CRAPACE_MALLOC_COUNTER_H
#define CRAPACE_MALLOC_COUNTER_H

#if defined(__linux__)
#include <malloc.h>  // memalign, for the tests that check it is counted
#endif
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Starts counting this thread's allocations (the count keeps its value).
void rapace_malloc_counter_enable(void);
/// Stops counting this thread's allocations (the count keeps its value).
void rapace_malloc_counter_disable(void);
/// Whether this thread counts its allocations.
bool rapace_malloc_counter_is_enabled(void);
/// The allocations counted on this thread so far: calls of `malloc`, `calloc`,
/// `posix_memalign`, `aligned_alloc`, `memalign`, and `realloc` except those that only
/// free (a non-null pointer and size 0). Compare two readings; it never resets.
uint64_t rapace_malloc_counter_count(void);
/// Whether the counter is compiled in: false in a sanitizer build (the sanitizer's runtime
/// owns the allocator), where nothing is interposed and nothing counts.
bool rapace_malloc_counter_is_available(void);
/// Whether this process's `malloc` is the counter's (the symbol the dynamic linker bound
/// for everyone), as opposed to glibc's.
bool rapace_malloc_counter_is_interposed(void);

#ifdef __cplusplus
}
#endif

#endif
