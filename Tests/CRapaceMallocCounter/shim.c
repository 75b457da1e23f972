// A per-thread allocation counter that interposes glibc's allocation entry points.
//
// The test executable defines `malloc` and friends, so the dynamic linker binds every
// caller in the process (the Swift runtime, Foundation, libevent, glibc itself) to these
// definitions instead of glibc's. Each one counts and forwards to glibc's implementation
// under its exported internal name, so the allocator, `free`, `malloc_usable_size` and
// every result (errno, NULL or a unique pointer for size 0, alignment) stay glibc's.
//
// Rules that keep it safe for every caller in the process:
// - nothing here allocates or calls anything that may (no stdio, no dlsym on the hot path);
// - the state is thread-local in the executable's static TLS block (initial-exec: no
//   `__tls_get_addr`, which may allocate for dynamically loaded modules), valid from the
//   moment a thread exists, before any constructor runs;
// - errno is left as glibc's implementation sets it: the counting touches nothing else.
//
// Not counted: `valloc`, `pvalloc` and `reallocarray`, which glibc serves internally
// without going through these symbols (nothing in rapace or the Swift runtime calls them).

#define _GNU_SOURCE
#include "CRapaceMallocCounter.h"

#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

// Off (nothing interposed, nothing counted; `rapace_malloc_counter_is_available` says so
// and the tests that count skip):
// - without glibc: the forwarding needs its `__libc_*` entry points, and other platforms
//   (macOS's two-level namespace) do not bind other libraries to the executable's malloc;
// - under a sanitizer, whose runtime owns the allocator (its own malloc and free): replacing
//   its malloc would hand it glibc's blocks.
#if !defined(__linux__) || !defined(__GLIBC__)
#define RAPACE_MALLOC_COUNTER_OFF 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define RAPACE_MALLOC_COUNTER_OFF 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define RAPACE_MALLOC_COUNTER_OFF 1
#endif

#define RAPACE_TLS __thread __attribute__((tls_model("initial-exec")))

static RAPACE_TLS bool counting;
static RAPACE_TLS uint64_t allocations;

#ifndef RAPACE_MALLOC_COUNTER_OFF

// glibc's implementations under the names it exports for interposers (GLIBC_2.2.5).
extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

/* Every counted allocation passes here (not inlined: one debugger breakpoint sees them all). */
__attribute__((noinline)) static void count_one(void) {
    if (__builtin_expect(counting, 0)) allocations += 1;
}

static void *counted_malloc(size_t size) {
    count_one();
    return __libc_malloc(size);
}

void *malloc(size_t size) __attribute__((alias("counted_malloc"), visibility("default")));

void *calloc(size_t count, size_t size) {
    count_one();
    return __libc_calloc(count, size);
}

void *realloc(void *pointer, size_t size) {
    // realloc(p, 0) only frees (glibc returns NULL): not an allocation.
    if (pointer == NULL || size != 0) count_one();
    return __libc_realloc(pointer, size);
}

int posix_memalign(void **result, size_t alignment, size_t size) {
    // glibc's checks, in its order: a power of two multiple of sizeof(void *), else EINVAL
    // with *result untouched.
    if (alignment % sizeof(void *) != 0 || (alignment / sizeof(void *)) == 0
        || ((alignment / sizeof(void *)) & ((alignment / sizeof(void *)) - 1)) != 0) {
        return EINVAL;
    }
    count_one();
    void *memory = __libc_memalign(alignment, size);
    if (memory == NULL) return ENOMEM;
    *result = memory;
    return 0;
}

// glibc 2.36 (this machine's) serves aligned_alloc and memalign with the same function:
// any alignment, rounded up to a power of two. (glibc 2.38 made aligned_alloc reject an
// alignment that is not a power of two with EINVAL, as C17 allows; every valid call gets
// the same result either way.)
void *aligned_alloc(size_t alignment, size_t size) {
    count_one();
    return __libc_memalign(alignment, size);
}

void *memalign(size_t alignment, size_t size) {
    count_one();
    return __libc_memalign(alignment, size);
}

bool rapace_malloc_counter_is_available(void) { return true; }

bool rapace_malloc_counter_is_interposed(void) {
    // What every other module's `malloc` resolves to (not called from an allocation path).
    return dlsym(RTLD_DEFAULT, "malloc") == (void *)&counted_malloc;
}

#else

bool rapace_malloc_counter_is_available(void) { return false; }

bool rapace_malloc_counter_is_interposed(void) { return false; }

#endif

void rapace_malloc_counter_enable(void) { counting = true; }

void rapace_malloc_counter_disable(void) { counting = false; }

bool rapace_malloc_counter_is_enabled(void) { return counting; }

uint64_t rapace_malloc_counter_count(void) { return allocations; }
