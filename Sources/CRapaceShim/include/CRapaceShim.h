// CRapaceShim: the only C target of rapace (Tests/Interop/shm_peer.c is a test peer, not a target). Every exported symbol carries the `rapace_` prefix.
// libevent's function-like macros, eventfd, getrandom, SCM_RIGHTS and the monotonic clock
// are wrapped here as real functions so Swift can call them.
#ifndef CRAPACE_SHIM_H
#define CRAPACE_SHIM_H

// These must come before any event2/ header (fd_set module conflict otherwise).
#include <sys/types.h>
#include <sys/time.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netdb.h>
#include <stdio.h>
#include <stdint.h>
#include <stddef.h>

#include <event2/event.h>

#ifdef __cplusplus
extern "C" {
#endif

// MARK: libevent

/// Event flags, as libevent defines them (EV_TIMEOUT, EV_READ, EV_WRITE, EV_PERSIST).
static const short RAPACE_EV_TIMEOUT = 0x01;
static const short RAPACE_EV_READ = 0x02;
static const short RAPACE_EV_WRITE = 0x04;
static const short RAPACE_EV_PERSIST = 0x10;
static const short RAPACE_EV_ET = 0x20;

/// Callback signature libevent invokes: fd, what happened, context.
typedef void (*rapace_event_callback)(int fd, short what, void *context);

struct event_base *rapace_event_base_new(void);
void rapace_event_base_free(struct event_base *base);
/// Runs the loop until `rapace_event_base_loopbreak`; keeps running with nothing registered.
int rapace_event_base_loop_forever(struct event_base *base);
int rapace_event_base_loopbreak(struct event_base *base);
const char *rapace_event_base_method(struct event_base *base);
/// Refreshes the base's cached time so a timer added now is measured from now.
int rapace_event_base_update_cache_time(struct event_base *base);

struct event *rapace_event_new(struct event_base *base, int fd, short what,
                               rapace_event_callback callback, void *context);
/// Adds the event; `timeout_us < 0` means no timeout.
int rapace_event_add(struct event *event, int64_t timeout_us);
int rapace_event_del(struct event *event);
void rapace_event_free(struct event *event);
/// A persistent signal event (`evsignal_new` with EV_PERSIST).
struct event *rapace_signal_event_new(struct event_base *base, int signal,
                                      rapace_event_callback callback, void *context);

// MARK: eventfd, randomness, sockets

static const int RAPACE_EFD_NONBLOCK = 04000;
static const int RAPACE_EFD_CLOEXEC = 02000000;

/// `eventfd(initval, EFD_NONBLOCK | EFD_CLOEXEC)`; -1 and errno on failure.
int rapace_eventfd(unsigned int initval);
/// `getrandom(buffer, length, 0)`: bytes from the kernel's CSPRNG; -1 and errno on failure.
long rapace_getrandom(void *buffer, size_t length);
/// `pipe2(fds, O_CLOEXEC)`: both ends close-on-exec atomically.
int rapace_pipe_cloexec(int fds[2]);
/// `open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)`: a handle on the directory
/// `path` for the `*at` calls and `/proc/self/fd/N` (Swift's Glibc does not export O_PATH).
int rapace_open_directory_path(const char *path);
/// A non-blocking, close-on-exec stream socket of the given domain (AF_INET, AF_INET6, AF_UNIX).
int rapace_socket_stream(int domain);
/// `accept4(fd, …, SOCK_NONBLOCK | SOCK_CLOEXEC)`.
int rapace_accept(int fd, struct sockaddr *address, socklen_t *length);
/// Sets TCP_NODELAY on a TCP socket.
int rapace_set_nodelay(int fd);
/// Sets SO_REUSEADDR.
int rapace_set_reuseaddr(int fd);
/// `sendmsg` of `length` bytes plus `count` descriptors as SCM_RIGHTS, MSG_NOSIGNAL.
ssize_t rapace_send_with_fds(int socket, const void *bytes, size_t length, const int *fds, int count);
/// `recvmsg` of up to `length` bytes, collecting up to `capacity` descriptors (MSG_CMSG_CLOEXEC).
/// `*received` is set to the number of descriptors received.
ssize_t rapace_recv_with_fds(int socket, void *bytes, size_t length, int *fds, int capacity, int *received);
/// `send(fd, bytes, length, MSG_NOSIGNAL)`: no SIGPIPE on a closed peer.
ssize_t rapace_send(int socket, const void *bytes, size_t length);
/// `pidfd_open(pid, 0)` (Linux 5.3+): a close-on-exec descriptor that polls readable once
/// the process `pid` has exited. -1 and errno on failure (ENOSYS where the kernel or the C
/// library lacks it, EPERM under some seccomp filters).
int rapace_pidfd_open(pid_t pid);
/// `pidfd_send_signal(pidfd, signal, NULL, 0)` (Linux 5.1+): sends `signal` to the process
/// the pidfd refers to, which cannot be another process even after its pid was reused.
/// -1 and errno on failure (ESRCH once that process is gone, ENOSYS where the kernel or the
/// C library lacks the call).
int rapace_pidfd_send_signal(int pidfd, int signal);
/// Asks the kernel to send `signal` to this process when its parent *thread* dies (Linux
/// ties PR_SET_PDEATHSIG to the thread that created the child, not the whole process:
/// spawn from a thread that lives as long as the parent should).
int rapace_set_parent_death_signal(int signal);

// MARK: atomics on shared memory
// Explicit C11/GCC atomics on words inside a mapping shared with another process. The
// orderings are part of the shared-memory protocol (Docs/shm.md), so they are spelled out here.

static inline uint64_t rapace_load_acquire_u64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE); }
static inline void rapace_store_release_u64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE); }
static inline uint64_t rapace_load_seq_cst_u64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_SEQ_CST); }
static inline uint32_t rapace_load_acquire_u32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline uint32_t rapace_load_relaxed_u32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline void rapace_store_release_u32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }
static inline void rapace_store_relaxed_u32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }
static inline uint32_t rapace_load_seq_cst_u32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_SEQ_CST); }
static inline void rapace_store_seq_cst_u32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_SEQ_CST); }
/// 64-bit compare-and-swap (acquire-release on success, acquire on failure); returns 1 on
/// success, else 0 with the value found stored in `*expected`.
static inline int rapace_cas_u64(void *p, uint64_t *expected, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)p, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
/// Atomic `*p &= mask` with release ordering (frees slot-state fields); returns the old value.
static inline uint64_t rapace_fetch_and_release_u64(void *p, uint64_t mask) { return __atomic_fetch_and((uint64_t *)p, mask, __ATOMIC_RELEASE); }
static inline void rapace_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/// Prefetches the cache line at `p` for reading (a hint; never faults).
static inline void rapace_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
static inline void rapace_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// MARK: time and threads

/// CLOCK_MONOTONIC in nanoseconds (the clock of the wire's `deadline_ns`).
uint64_t rapace_monotonic_ns(void);
/// A per-thread pointer: the reactor whose loop is running on this thread, or NULL.
void *rapace_thread_current_reactor(void);
void rapace_thread_set_current_reactor(void *reactor);
/// Names the calling thread (at most 15 bytes are kept).
void rapace_thread_set_name(const char *name);
/// The CPU the calling thread runs on now (`sched_getcpu`; read from rseq, no system call,
/// with glibc 2.35+); -1 when unknown.
int rapace_current_cpu(void);

#ifdef __cplusplus
}
#endif

#endif
