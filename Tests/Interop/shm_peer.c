/*
 * shm_peer.c: an independent plugin-side (acceptor) peer for rapace's shared-memory
 * transport, written from Docs/shm.md, the wire protocol (shared/spec/wire-protocol.md)
 * and its vectors only; nothing here comes from the Swift sources.
 *
 *   shm_peer SEGMENT_PATH [--verbose] [--host-goaway]
 *
 * It waits for the segment, maps it, connects to SEGMENT_PATH.sock, checks the bootstrap
 * message, shakes hands over the rings and calls the Echo service that the host serves
 * (`rapace-echo serve --shm SEGMENT_PATH`), fills each ring, and ends with a GoAway of its
 * own. With --host-goaway it instead starts a call, prints `READY …` and waits for the
 * host's GoAway: whoever runs it sends the host SIGTERM on that line. It prints an
 * `OK <what>` line per step; on any mismatch it prints one `FAIL <why>` line and exits 1.
 * Every wait is bounded.
 *
 * Build: cc -O2 -std=c11 -Wall -Werror -o shm_peer shm_peer.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ---- Layout (Docs/shm.md) ------------------------------------------------------------ */

enum {
    HEADER_SIZE = 4096,
    LAYOUT_VERSION = 2,
    /* header fields */
    H_MAGIC = 0,
    H_VERSION = 8,
    H_HEADER_SIZE = 12,
    H_RING_CAPACITY = 16,
    H_SLOT_SIZE = 20,
    H_SLOT_COUNT = 24,
    H_RING0 = 32,
    H_RING1 = 40,
    H_SLOT_TABLE = 48,
    H_POOL = 56,
    H_SEGMENT_SIZE = 64,
    H_HOST_WANTS_SLOTS = 72,
    H_PLUGIN_WANTS_SLOTS = 76,
    H_EPOCH = 80,
    /* ring fields */
    R_HEAD = 0,
    R_TAIL = 64,
    R_CONSUMER_SLEEPING = 128,
    R_PRODUCER_WAITING = 192,
    R_ENTRIES = 256,
    /* slot states */
    TAG_HOST = 1,
    TAG_PLUGIN = 2,
    SLOTS_PER_WORD = 32,
};

#define INLINE_SLOT 0xFFFFFFFFu
#define RESERVED_SLOT 0xFFFFFFFEu
#define NO_DEADLINE UINT64_MAX
#define LOW_BITS 0x5555555555555555ull /* the low bit of every 2-bit field */

/* ---- Wire protocol ------------------------------------------------------------------- */

enum {
    F_DATA = 0x001,
    F_CONTROL = 0x002,
    F_EOS = 0x004,
    F_ERROR = 0x010,
    F_RESPONSE = 0x200,
};

enum { V_HELLO = 0, V_OPEN_CHANNEL = 1, V_CLOSE_CHANNEL = 2, V_CANCEL_CHANNEL = 3, V_GRANT_CREDITS = 4, V_PING = 5, V_PONG = 6, V_GOAWAY = 7 };

enum { KIND_CALL = 0, KIND_STREAM = 1 };

enum { STATUS_OK = 0, STATUS_DEADLINE_EXCEEDED = 4 };

/* ---- Failing and printing ------------------------------------------------------------ */

static bool verbose;

static void fail(const char *format, ...) __attribute__((noreturn, format(printf, 1, 2)));

static void fail(const char *format, ...) {
    va_list arguments;
    va_start(arguments, format);
    fputs("FAIL ", stdout);
    vfprintf(stdout, format, arguments);
    fputc('\n', stdout);
    va_end(arguments);
    fflush(stdout);
    exit(1);
}

static void ok(const char *format, ...) __attribute__((format(printf, 1, 2)));

static void ok(const char *format, ...) {
    va_list arguments;
    va_start(arguments, format);
    fputs("OK ", stdout);
    vfprintf(stdout, format, arguments);
    fputc('\n', stdout);
    va_end(arguments);
    fflush(stdout);
}

static void trace(const char *format, ...) __attribute__((format(printf, 1, 2)));

static void trace(const char *format, ...) {
    if (!verbose) return;
    va_list arguments;
    va_start(arguments, format);
    fputs("# ", stderr);
    vfprintf(stderr, format, arguments);
    fputc('\n', stderr);
    va_end(arguments);
}

static void on_alarm(int signo) {
    (void)signo;
    static const char message[] = "FAIL the peer ran out of its overall time limit\n";
    ssize_t ignored = write(1, message, sizeof message - 1);
    (void)ignored;
    _exit(1);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(int ms) {
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000 };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

/* ---- Little-endian fields (plain, for private copies and our own writes) --------------- */

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }

static void wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void wr64(uint8_t *p, uint64_t v) {
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

/* ---- Postcard ------------------------------------------------------------------------ */

typedef struct {
    uint8_t *bytes;
    size_t count;
    size_t capacity;
} Writer;

static void w_reserve(Writer *w, size_t more) {
    if (w->count + more <= w->capacity) return;
    size_t capacity = w->capacity ? w->capacity : 64;
    while (capacity < w->count + more) capacity *= 2;
    uint8_t *bytes = realloc(w->bytes, capacity);
    if (!bytes) fail("out of memory");
    w->bytes = bytes;
    w->capacity = capacity;
}

static void w_raw(Writer *w, const void *bytes, size_t count) {
    w_reserve(w, count);
    if (count) memcpy(w->bytes + w->count, bytes, count);
    w->count += count;
}

static void w_u8(Writer *w, uint8_t v) { w_raw(w, &v, 1); }

static void w_varint(Writer *w, uint64_t v) {
    while (v >= 0x80) {
        w_u8(w, (uint8_t)(v | 0x80));
        v >>= 7;
    }
    w_u8(w, (uint8_t)v);
}

static void w_i32(Writer *w, int32_t v) { w_varint(w, (uint32_t)((uint32_t)v << 1) ^ (uint32_t)(v >> 31)); }

static void w_bytes(Writer *w, const void *bytes, size_t count) {
    w_varint(w, count);
    w_raw(w, bytes, count);
}

static void w_string(Writer *w, const char *s) { w_bytes(w, s, strlen(s)); }

static void w_free(Writer *w) {
    free(w->bytes);
    *w = (Writer){ 0 };
}

typedef struct {
    const uint8_t *bytes;
    size_t count;
    size_t at;
    const char *what; /* for error messages */
} Reader;

static uint64_t r_varint(Reader *r, unsigned bits) {
    uint64_t v = 0;
    for (unsigned i = 0; i < 10; i++) {
        if (r->at >= r->count) fail("%s: varint runs past the end (%zu bytes)", r->what, r->count);
        uint8_t b = r->bytes[r->at++];
        uint64_t part = (uint64_t)(b & 0x7F);
        if (i == 9 && part > 1) fail("%s: varint overflows 64 bits", r->what);
        v |= part << (7 * i);
        if (!(b & 0x80)) {
            if (bits < 64 && v >> bits) fail("%s: varint %llu too large for u%u", r->what, (unsigned long long)v, bits);
            return v;
        }
    }
    fail("%s: varint longer than 10 bytes", r->what);
}

static uint32_t r_u32(Reader *r) { return (uint32_t)r_varint(r, 32); }

static int32_t r_i32(Reader *r) {
    uint32_t z = r_u32(r);
    return (int32_t)((z >> 1) ^ (0u - (z & 1)));
}

static uint8_t r_u8(Reader *r) {
    if (r->at >= r->count) fail("%s: byte past the end", r->what);
    return r->bytes[r->at++];
}

static const uint8_t *r_raw(Reader *r, size_t count) {
    if (count > r->count - r->at) fail("%s: %zu bytes wanted, %zu left", r->what, count, r->count - r->at);
    const uint8_t *p = r->bytes + r->at;
    r->at += count;
    return p;
}

static const uint8_t *r_bytes(Reader *r, size_t *count) {
    uint64_t n = r_varint(r, 64);
    if (n > r->count - r->at) fail("%s: length %llu exceeds the %zu bytes left", r->what, (unsigned long long)n, r->count - r->at);
    *count = (size_t)n;
    return r_raw(r, (size_t)n);
}

static void r_end(Reader *r) {
    if (r->at != r->count) fail("%s: %zu trailing bytes", r->what, r->count - r->at);
}

/* ---- Method ids (spec 2) ------------------------------------------------------------- */

static uint64_t fnv1a64(const uint8_t *bytes, size_t count) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < count; i++) {
        h ^= bytes[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint32_t method_id(const char *name) {
    uint64_t h = fnv1a64((const uint8_t *)name, strlen(name));
    return (uint32_t)((h >> 32) ^ h);
}

static uint32_t M_ECHO, M_ADD, M_FAIL, M_COUNTDOWN, M_CHECKSUM, M_SLEEP, M_BLOB;

/* ---- The peer's state ---------------------------------------------------------------- */

static struct {
    const char *path;
    int segment_fd;
    uint8_t *base;
    size_t size;
    uint32_t ring_capacity, slot_size, slot_count;
    uint64_t ring0, ring1, slot_table, generations, pool;
    uint32_t epoch;

    int socket;
    int my_bell;   /* the plugin's doorbell: the host rings it, we block on it */
    int host_bell; /* the host's doorbell: we ring it */

    /* ring 0 (host -> plugin): we consume */
    uint64_t head, published_head, known_tail;
    bool sleeping;
    /* ring 1 (plugin -> host): we produce */
    uint64_t tail, published_tail, known_head;

    uint8_t *held; /* per slot: 1 while a received payload we have not freed covers it */
    uint64_t next_message_id;
    uint32_t next_channel;
    uint32_t doorbells_rung, doorbell_wakes;
    uint32_t slot_waits; /* allocations that had to wait for the host to free slots */
    uint32_t room_waits; /* descriptors that found ring 1 full and waited for room */
    bool host_closed;    /* end of file seen on the bootstrap socket */
} P;

static uint8_t *ring_base(int n) { return P.base + (n == 0 ? P.ring0 : P.ring1); }
static uint64_t *ring_u64(int n, int field) { return (uint64_t *)(ring_base(n) + field); }
static uint32_t *ring_u32(int n, int field) { return (uint32_t *)(ring_base(n) + field); }
static uint32_t *header_u32(int field) { return (uint32_t *)(P.base + field); }
static uint64_t *state_word(uint32_t word) { return (uint64_t *)(P.base + P.slot_table) + word; }
static uint32_t *generation(uint32_t slot) { return (uint32_t *)(P.base + P.generations) + slot; }
static uint8_t *slot_bytes(uint32_t slot) { return P.base + P.pool + (uint64_t)slot * P.slot_size; }

static void fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* ---- Segment ------------------------------------------------------------------------- */

static uint64_t round_up(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

/* Maps the segment at P.path (waiting for it until `deadline`) and checks its header. */
static void map_segment(int64_t deadline) {
    if (P.base) {
        munmap(P.base, P.size);
        close(P.segment_fd);
        P.base = NULL;
    }
    int fd;
    for (;;) {
        fd = open(P.path, O_RDWR | O_CLOEXEC);
        if (fd >= 0) break;
        if (errno != ENOENT) fail("open %s: %s", P.path, strerror(errno));
        if (now_ms() > deadline) fail("segment %s did not appear in time", P.path);
        sleep_ms(20);
    }
    struct stat st;
    if (fstat(fd, &st) != 0) fail("fstat %s: %s", P.path, strerror(errno));
    if (st.st_size < HEADER_SIZE) fail("segment %s is %lld bytes, smaller than its header", P.path, (long long)st.st_size);
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) fail("mmap %s: %s", P.path, strerror(errno));
    P.segment_fd = fd;
    P.base = base;
    P.size = (size_t)st.st_size;

    if (memcmp(base + H_MAGIC, "RAPACE\0\0", 8) != 0) fail("bad segment magic");
    uint32_t version = rd32(base + H_VERSION);
    if (version != LAYOUT_VERSION) fail("segment layout version %u, want %u", version, LAYOUT_VERSION);
    if (rd32(base + H_HEADER_SIZE) != HEADER_SIZE) fail("header_size %u, want 4096", rd32(base + H_HEADER_SIZE));
    P.ring_capacity = rd32(base + H_RING_CAPACITY);
    P.slot_size = rd32(base + H_SLOT_SIZE);
    P.slot_count = rd32(base + H_SLOT_COUNT);
    uint32_t c = P.ring_capacity;
    if (c < 2 || c > (1u << 20) || (c & (c - 1))) fail("ring_capacity %u is not a power of two in 2...2^20", c);
    if (P.slot_size < 64 || P.slot_size % 64) fail("slot_size %u is not a multiple of 64", P.slot_size);
    if (P.slot_count < 1 || P.slot_count > (1u << 20)) fail("slot_count %u outside 1...2^20", P.slot_count);
    if ((uint64_t)P.slot_size * P.slot_count > (1ull << 36)) fail("pool larger than 2^36");

    uint64_t ring_bytes = round_up(256 + (uint64_t)c * 64, 4096);
    uint64_t ring0 = 4096, ring1 = ring0 + ring_bytes, table = ring1 + ring_bytes;
    uint64_t words = (P.slot_count + 31) / 32;
    uint64_t generations = table + round_up(words * 8, 64);
    uint64_t pool = round_up(generations + (uint64_t)P.slot_count * 4, 4096);
    uint64_t size = pool + (uint64_t)P.slot_count * P.slot_size;
    struct {
        const char *name;
        int field;
        uint64_t want;
    } checks[] = {
        { "ring0_offset", H_RING0, ring0 }, { "ring1_offset", H_RING1, ring1 }, { "slot_table_offset", H_SLOT_TABLE, table },
        { "pool_offset", H_POOL, pool },    { "segment_size", H_SEGMENT_SIZE, size },
    };
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        uint64_t got = rd64(base + checks[i].field);
        if (got != checks[i].want) fail("header %s = %llu, derived %llu", checks[i].name, (unsigned long long)got, (unsigned long long)checks[i].want);
    }
    if ((uint64_t)st.st_size != size) fail("file is %lld bytes, segment_size %llu", (long long)st.st_size, (unsigned long long)size);
    P.ring0 = ring0;
    P.ring1 = ring1;
    P.slot_table = table;
    P.generations = generations;
    P.pool = pool;
    free(P.held);
    P.held = calloc(P.slot_count, 1);
    if (!P.held) fail("out of memory");
}

static uint32_t slot_state(uint32_t slot);

/* ---- Bootstrap ----------------------------------------------------------------------- */

static int connect_socket(int64_t deadline) {
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    int n = snprintf(address.sun_path, sizeof address.sun_path, "%s.sock", P.path);
    if (n < 0 || (size_t)n >= sizeof address.sun_path) fail("%s.sock is too long for a Unix socket address", P.path);
    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) fail("socket: %s", strerror(errno));
        if (connect(fd, (struct sockaddr *)&address, sizeof address) == 0) return fd;
        int e = errno;
        close(fd);
        if (e != ENOENT && e != ECONNREFUSED) fail("connect %s: %s", address.sun_path, strerror(e));
        if (now_ms() > deadline) fail("could not connect to %s in time: %s", address.sun_path, strerror(e));
        sleep_ms(20);
    }
}

/* Receives the 16-byte bootstrap message with its two descriptors. Returns false when the
 * host closed the socket without a message. */
static bool receive_bootstrap(int fd, int64_t deadline, uint8_t message[16], int fds[2]) {
    size_t got = 0;
    int received = 0;
    while (got < 16) {
        struct pollfd p = { fd, POLLIN, 0 };
        int64_t left = deadline - now_ms();
        if (left <= 0) fail("no bootstrap message within the time limit");
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail("poll: %s", strerror(errno));
        if (r == 0) continue;
        union {
            struct cmsghdr header;
            char space[CMSG_SPACE(sizeof(int) * 4)];
        } control;
        struct iovec iov = { message + got, 16 - got };
        struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space, .msg_controllen = sizeof control.space };
        ssize_t n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) fail("recvmsg: %s", strerror(errno));
        if (n == 0) {
            if (got == 0) return false;
            fail("bootstrap message cut off after %zu bytes", got);
        }
        if (msg.msg_flags & MSG_CTRUNC) fail("bootstrap control message truncated (more than 4 descriptors?)");
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
            size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int *passed = (int *)CMSG_DATA(c);
            for (size_t i = 0; i < count; i++) {
                if (received < 2) fds[received] = passed[i];
                else close(passed[i]);
                received++;
            }
        }
        got += (size_t)n;
    }
    if (received != 2) fail("bootstrap message carried %d descriptors, want 2", received);
    return true;
}

static void require_eventfd(int fd, const char *which) {
    char link[64], target[128];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) fail("readlink %s: %s", link, strerror(errno));
    target[n] = 0;
    if (strcmp(target, "anon_inode:[eventfd]") != 0) fail("the %s doorbell is %s, not an eventfd", which, target);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || !(flags & O_NONBLOCK)) fail("the %s doorbell is not non-blocking", which);
}

/* Docs/shm.md "Doorbells and bootstrap", steps 2-4. */
static void bootstrap(void) {
    int64_t deadline = now_ms() + 15000;
    map_segment(deadline);
    for (int attempt = 1;; attempt++) {
        int fd = connect_socket(deadline);
        uint8_t message[16];
        int fds[2] = { -1, -1 };
        if (!receive_bootstrap(fd, deadline, message, fds)) {
            close(fd);
            if (attempt == 1) fail("the host closed %s.sock without a bootstrap message", P.path);
            if (attempt >= 5) fail("the host kept closing the socket without a message");
            sleep_ms(20);
            map_segment(deadline);
            continue;
        }
        if (memcmp(message, "RPCEBOOT", 8) != 0) fail("bootstrap magic %.8s, want RPCEBOOT", (const char *)message);
        if (rd32(message + 8) != LAYOUT_VERSION) fail("bootstrap layout version %u, want %u", rd32(message + 8), LAYOUT_VERSION);
        uint32_t epoch = rd32(message + 12);
        uint32_t mapped = __atomic_load_n(header_u32(H_EPOCH), __ATOMIC_ACQUIRE);
        if (epoch != mapped) {
            /* PATH may have been replaced between our open and our connect: map it anew and
             * keep this connection if that one matches. */
            map_segment(deadline);
            mapped = __atomic_load_n(header_u32(H_EPOCH), __ATOMIC_ACQUIRE);
        }
        if (epoch != mapped) {
            close(fd);
            close(fds[0]);
            close(fds[1]);
            if (attempt >= 5 || now_ms() > deadline) fail("stale segment: bootstrap epoch %u, segment epoch %u", epoch, mapped);
            sleep_ms(20);
            map_segment(deadline);
            continue;
        }
        P.socket = fd;
        P.my_bell = fds[0];
        P.host_bell = fds[1];
        P.epoch = epoch;
        require_eventfd(P.my_bell, "plugin");
        require_eventfd(P.host_bell, "host");
        break;
    }
    /* Take the rings as the host left them (a fresh segment or one reset for us). */
    P.head = P.published_head = P.known_tail = __atomic_load_n(ring_u64(0, R_HEAD), __ATOMIC_ACQUIRE);
    P.tail = P.published_tail = __atomic_load_n(ring_u64(1, R_TAIL), __ATOMIC_ACQUIRE);
    P.known_head = __atomic_load_n(ring_u64(1, R_HEAD), __ATOMIC_ACQUIRE);
    trace("at connect: ring 0 head %llu tail %llu sleeping %u waiting %u; ring 1 head %llu tail %llu sleeping %u waiting %u",
          (unsigned long long)P.head, (unsigned long long)__atomic_load_n(ring_u64(0, R_TAIL), __ATOMIC_ACQUIRE), *ring_u32(0, R_CONSUMER_SLEEPING),
          *ring_u32(0, R_PRODUCER_WAITING), (unsigned long long)P.known_head, (unsigned long long)P.tail, *ring_u32(1, R_CONSUMER_SLEEPING),
          *ring_u32(1, R_PRODUCER_WAITING));
    if (P.tail != P.known_head) fail("ring 1 is not empty at connect (head %llu, tail %llu)", (unsigned long long)P.known_head, (unsigned long long)P.tail);
    /* The host may have published its Hello (in a slot) already; nothing may be ours. */
    for (uint32_t s = 0; s < P.slot_count; s++)
        if (slot_state(s) >= TAG_PLUGIN) fail("slot %u is in state %u at connect", s, slot_state(s));
    ok("bootstrap epoch=%u ring=%u slot=%u slots=%u", P.epoch, P.ring_capacity, P.slot_size, P.slot_count);
}

/* ---- Doorbells ----------------------------------------------------------------------- */

static void ring_doorbell(int fd) {
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(fd, &one, sizeof one);
        if (n == (ssize_t)sizeof one) break;
        if (n < 0 && errno == EINTR) continue;
        fail("ringing a doorbell: %s", n < 0 ? strerror(errno) : "short write");
    }
    if (fd == P.host_bell) P.doorbells_rung++;
}

/* Whether the host closed its end of the bootstrap socket; fails on bytes or an error there. */
static bool host_closed_socket(void) {
    char byte;
    ssize_t n = recv(P.socket, &byte, 1, MSG_DONTWAIT | MSG_PEEK);
    if (n == 0) return true;
    if (n > 0) fail("unexpected bytes on the bootstrap socket after the bootstrap message");
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) fail("bootstrap socket: %s", strerror(errno));
    return false;
}

/* Blocks on our doorbell until it rings or `deadline` passes; returns whether it rang.
 * Level-triggered: the counter is drained on each wake. End of file on the bootstrap
 * socket wakes it once as a ring would (the caller drains what the host published before
 * it closed, Docs/shm.md "Doorbells and bootstrap" step 6); the next wait fails. */
static bool wait_doorbell(int64_t deadline) {
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) return false;
        struct pollfd p[2] = { { P.my_bell, POLLIN, 0 }, { P.socket, POLLIN, 0 } };
        int r = poll(p, 2, (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) fail("poll: %s", strerror(errno));
        if (p[0].revents & POLLIN) {
            uint64_t count;
            ssize_t n = read(P.my_bell, &count, sizeof count);
            if (n < 0 && errno != EAGAIN && errno != EINTR) fail("reading the doorbell: %s", strerror(errno));
            P.doorbell_wakes++;
            return true;
        }
        if (p[1].revents && host_closed_socket()) {
            if (P.host_closed) fail("the host closed the bootstrap socket (the host process ended?)");
            P.host_closed = true;
            return true;
        }
    }
}

/* ---- Producing (ring 1) -------------------------------------------------------------- */

static void load_known_head(void) {
    uint64_t h = __atomic_load_n(ring_u64(1, R_HEAD), __ATOMIC_ACQUIRE);
    if (h > P.tail || P.tail - h > P.ring_capacity || h < P.known_head)
        fail("ring 1 head %llu is invalid (tail %llu, known head %llu)", (unsigned long long)h, (unsigned long long)P.tail, (unsigned long long)P.known_head);
    P.known_head = h;
}

static void publish_tail(void) {
    if (P.tail == P.published_tail) return;
    __atomic_store_n(ring_u64(1, R_TAIL), P.tail, __ATOMIC_RELEASE);
    P.published_tail = P.tail;
}

/* Publishing step 1-2: waits (bounded) until ring 1 has room.
 *
 * Beyond the page: before blocking, it also does what step 5 does after a batch (ring the
 * host if its consumer sleeps). Docs/shm.md's step 2 only publishes the tail and waits; a
 * batch that fills the ring while the host's consumer sleeps then waits for good, since
 * nobody wakes the host to make room (fill_ring_to_host showed it: "ring 1 stayed full"). */
static void wait_for_room(void) {
    if (P.tail - P.known_head < P.ring_capacity) return;
    load_known_head();
    if (P.tail - P.known_head < P.ring_capacity) return;
    publish_tail();
    P.room_waits++;
    int64_t deadline = now_ms() + 10000;
    for (;;) {
        __atomic_store_n(ring_u32(1, R_PRODUCER_WAITING), 1, __ATOMIC_SEQ_CST);
        fence();
        load_known_head();
        if (P.tail - P.known_head < P.ring_capacity) {
            __atomic_store_n(ring_u32(1, R_PRODUCER_WAITING), 0, __ATOMIC_SEQ_CST);
            return;
        }
        if (__atomic_load_n(ring_u32(1, R_CONSUMER_SLEEPING), __ATOMIC_SEQ_CST) == 1) ring_doorbell(P.host_bell);
        if (!wait_doorbell(deadline)) {
            load_known_head();
            if (P.tail - P.known_head < P.ring_capacity) fail("lost doorbell: the host made room in ring 1 but did not ring while producer_waiting was 1");
            fail("ring 1 stayed full for 10 s");
        }
    }
}

/* Publishing steps 3-4 for one descriptor (its slot fields already filled). */
static void produce(const uint8_t descriptor[64]) {
    wait_for_room();
    memcpy(ring_base(1) + R_ENTRIES + (P.tail % P.ring_capacity) * 64, descriptor, 64);
    P.tail++;
    if (P.tail - P.published_tail >= 32) publish_tail();
}

/* Publishing step 5: after a batch. */
static void flush_sends(void) {
    publish_tail();
    fence();
    if (__atomic_load_n(ring_u32(1, R_CONSUMER_SLEEPING), __ATOMIC_SEQ_CST) == 1) ring_doorbell(P.host_bell);
}

/* ---- Slots --------------------------------------------------------------------------- */

/* The mask of slots [first, first + count) inside state word `word`. */
static uint64_t run_mask(uint32_t word, uint32_t first, uint32_t count) {
    uint64_t lo = (uint64_t)word * SLOTS_PER_WORD, hi = lo + SLOTS_PER_WORD;
    uint64_t from = first > lo ? first : lo, to = (uint64_t)first + count < hi ? (uint64_t)first + count : hi;
    if (from >= to) return 0;
    uint64_t bits = 2 * (to - from);
    uint64_t mask = bits == 64 ? ~0ull : ((1ull << bits) - 1);
    return mask << (2 * (from - lo));
}

static uint32_t slot_state(uint32_t slot) {
    uint64_t word = __atomic_load_n(state_word(slot / SLOTS_PER_WORD), __ATOMIC_ACQUIRE);
    return (uint32_t)(word >> (2 * (slot % SLOTS_PER_WORD))) & 3;
}

/* The fields of `mask` in `w` that hold `tag`, as a 2-bit mask per field. */
static uint64_t fields_holding(uint64_t w, uint64_t mask, uint32_t tag) {
    uint64_t low = w & LOW_BITS, high = (w >> 1) & LOW_BITS;
    uint64_t match = (tag & 1 ? low : ~low) & (tag & 2 ? high : ~high) & LOW_BITS & mask;
    return match | match << 1;
}

static uint64_t pattern(uint32_t tag) { return tag == TAG_HOST ? LOW_BITS : LOW_BITS << 1; }

/* After a free (or an allocation rolled back): full fence, then ring whoever waits for slots. */
static void wake_after_free(void) {
    fence();
    if (__atomic_load_n(header_u32(H_HOST_WANTS_SLOTS), __ATOMIC_SEQ_CST) == 1) ring_doorbell(P.host_bell);
    if (__atomic_load_n(header_u32(H_PLUGIN_WANTS_SLOTS), __ATOMIC_SEQ_CST) == 1) ring_doorbell(P.my_bell);
}

/* One attempt to claim `count` contiguous free slots; returns the first or -1. */
static int64_t try_allocate(uint32_t count) {
    for (uint32_t start = 0; (uint64_t)start + count <= P.slot_count;) {
        uint32_t busy = UINT32_MAX;
        for (uint32_t s = start; s < start + count; s++)
            if (slot_state(s) != 0) busy = s;
        if (busy != UINT32_MAX) {
            start = busy + 1;
            continue;
        }
        uint32_t first_word = start / SLOTS_PER_WORD, last_word = (start + count - 1) / SLOTS_PER_WORD;
        uint32_t claimed = first_word;
        bool taken = false;
        for (uint32_t wd = first_word; wd <= last_word && !taken; wd++) {
            uint64_t m = run_mask(wd, start, count);
            uint64_t w = __atomic_load_n(state_word(wd), __ATOMIC_ACQUIRE);
            for (;;) {
                if (w & m) {
                    taken = true;
                    break;
                }
                if (__atomic_compare_exchange_n(state_word(wd), &w, w | (pattern(TAG_PLUGIN) & m), false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
                    claimed = wd + 1;
                    break;
                }
            }
        }
        if (taken) {
            for (uint32_t wd = first_word; wd < claimed; wd++) __atomic_fetch_and(state_word(wd), ~run_mask(wd, start, count), __ATOMIC_RELEASE);
            wake_after_free();
            start++;
            continue;
        }
        uint32_t g = __atomic_load_n(generation(start), __ATOMIC_RELAXED) + 1;
        __atomic_store_n(generation(start), g, __ATOMIC_RELAXED);
        return start;
    }
    return -1;
}

/* Allocates a run of `count` slots, waiting (bounded) for the host to free some. */
static uint32_t allocate_run(uint32_t count) {
    if (count > P.slot_count) fail("a run of %u slots cannot fit a pool of %u", count, P.slot_count);
    int64_t first = try_allocate(count);
    if (first >= 0) return (uint32_t)first;
    int64_t deadline = now_ms() + 10000;
    P.slot_waits++;
    for (;;) {
        __atomic_store_n(header_u32(H_PLUGIN_WANTS_SLOTS), 1, __ATOMIC_SEQ_CST);
        fence();
        first = try_allocate(count);
        if (first >= 0) {
            __atomic_store_n(header_u32(H_PLUGIN_WANTS_SLOTS), 0, __ATOMIC_RELEASE);
            return (uint32_t)first;
        }
        if (!wait_doorbell(deadline)) fail("no run of %u free slots within 10 s", count);
    }
}

/* ---- Frames -------------------------------------------------------------------------- */

typedef struct {
    uint8_t raw[64];
    uint64_t message_id;
    uint32_t channel, method, slot, generation, offset, length, flags;
    uint64_t deadline;
    const uint8_t *payload; /* inside `raw` (inline) or the pool */
    uint32_t run_first, run_count; /* run_count 0: inline */
} Frame;

static void describe(const Frame *f, char *out, size_t size) {
    snprintf(out, size, "msg %llu channel %u method 0x%08X flags 0x%X len %u slot 0x%X", (unsigned long long)f->message_id, f->channel, f->method, f->flags,
             f->length, f->slot);
}

/* Sends one frame (allocating and filling a run for a payload over 16 bytes); the caller
 * flushes the batch. Returns the first slot of the run, or INLINE_SLOT. */
static uint32_t send_frame(uint64_t message_id, uint32_t channel, uint32_t method, uint32_t flags, uint64_t deadline, const uint8_t *payload, uint32_t length) {
    uint8_t d[64] = { 0 };
    wr64(d + 0, message_id);
    wr32(d + 8, channel);
    wr32(d + 12, method);
    wr32(d + 28, length);
    wr32(d + 32, flags);
    wr64(d + 40, deadline);
    uint32_t slot = INLINE_SLOT;
    if (length <= 16) {
        wr32(d + 16, INLINE_SLOT);
        if (length) memcpy(d + 48, payload, length);
    } else {
        uint32_t count = (uint32_t)(((uint64_t)length + P.slot_size - 1) / P.slot_size);
        slot = allocate_run(count);
        memcpy(slot_bytes(slot), payload, length);
        wr32(d + 16, slot);
        wr32(d + 20, __atomic_load_n(generation(slot), __ATOMIC_RELAXED));
        wr32(d + 24, 0);
        trace("sent %u bytes in a run of %u slots at %u", length, count, slot);
    }
    produce(d);
    return slot;
}

static uint64_t take_message_id(void) { return P.next_message_id++; }

static void send_control(uint32_t verb, const Writer *payload) {
    send_frame(take_message_id(), 0, verb, F_CONTROL, NO_DEADLINE, payload->bytes, (uint32_t)payload->count);
}

/* Validates a received descriptor's payload (Docs/shm.md "Validate") and points f->payload at it. */
static void take_payload(Frame *f) {
    if (f->slot == INLINE_SLOT) {
        if (f->length > 16) fail("inline payload of %u bytes", f->length);
        if (f->generation != 0 || f->offset != 0) fail("inline payload with generation %u and offset %u (spec 1.1: both 0)", f->generation, f->offset);
        for (uint32_t i = f->length; i < 16; i++)
            if (f->raw[48 + i]) fail("inline payload area not zero-filled past payload_len");
        f->payload = f->raw + 48;
        f->run_count = 0;
        return;
    }
    char what[128];
    describe(f, what, sizeof what);
    if (f->slot == RESERVED_SLOT) fail("payload_slot 0xFFFFFFFE is reserved (%s)", what);
    if (f->length <= 16) fail("a payload of %u bytes in a slot, want inline (%s)", f->length, what);
    if (f->slot >= P.slot_count) fail("first slot outside the pool (%s)", what);
    if (f->offset >= P.slot_size) fail("payload_offset %u not inside the first slot (%s)", f->offset, what);
    uint64_t count = ((uint64_t)f->offset + f->length + P.slot_size - 1) / P.slot_size;
    if (count == 0) count = 1;
    if (f->slot + count > P.slot_count) fail("run of %llu slots runs past the pool (%s)", (unsigned long long)count, what);
    uint32_t first_word = f->slot / SLOTS_PER_WORD, last_word = (uint32_t)((f->slot + count - 1) / SLOTS_PER_WORD);
    for (uint32_t wd = first_word; wd <= last_word; wd++) {
        uint64_t m = run_mask(wd, f->slot, (uint32_t)count);
        uint64_t w = __atomic_load_n(state_word(wd), __ATOMIC_ACQUIRE);
        if (fields_holding(w, m, TAG_HOST) != m) fail("a slot of the run is not allocated by the host (word %u = %016llx) (%s)", wd, (unsigned long long)w, what);
    }
    uint32_t g = __atomic_load_n(generation(f->slot), __ATOMIC_RELAXED);
    if (g != f->generation) fail("generation %u on slot %u, descriptor says %u (%s)", g, f->slot, f->generation, what);
    for (uint64_t s = f->slot; s < f->slot + count; s++) {
        if (P.held[s]) fail("slot %llu already held by an earlier payload (%s)", (unsigned long long)s, what);
        P.held[s] = 1;
    }
    f->run_first = f->slot;
    f->run_count = (uint32_t)count;
    f->payload = slot_bytes(f->slot) + f->offset;
}

/* Frees a received payload's run (Docs/shm.md "Free"). */
static void release_payload(Frame *f) {
    if (f->run_count == 0) return;
    for (uint32_t s = f->run_first; s < f->run_first + f->run_count; s++) P.held[s] = 0;
    uint32_t g = __atomic_load_n(generation(f->run_first), __ATOMIC_RELAXED);
    if (g != f->generation) fail("the generation of slot %u changed from %u to %u while we held it", f->run_first, f->generation, g);
    uint32_t first_word = f->run_first / SLOTS_PER_WORD, last_word = (f->run_first + f->run_count - 1) / SLOTS_PER_WORD;
    for (uint32_t wd = first_word; wd <= last_word; wd++) {
        uint64_t m = run_mask(wd, f->run_first, f->run_count);
        uint64_t w = __atomic_load_n(state_word(wd), __ATOMIC_ACQUIRE);
        for (;;) {
            uint64_t ours = fields_holding(w, m, TAG_HOST);
            if (ours != m) fail("slots of a run we held changed owner before we freed them (word %u = %016llx)", wd, (unsigned long long)w);
            if (__atomic_compare_exchange_n(state_word(wd), &w, w & ~ours, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) break;
        }
    }
    f->run_count = 0;
    wake_after_free();
}

/* ---- Consuming (ring 0) -------------------------------------------------------------- */

static void publish_head(void) {
    if (P.head == P.published_head) return;
    __atomic_store_n(ring_u64(0, R_HEAD), P.head, __ATOMIC_RELEASE);
    P.published_head = P.head;
}

/* Consuming step 4: after delivering. */
static void after_delivery(void) {
    publish_head();
    fence();
    if (__atomic_load_n(ring_u32(0, R_PRODUCER_WAITING), __ATOMIC_SEQ_CST) == 1) {
        __atomic_store_n(ring_u32(0, R_PRODUCER_WAITING), 0, __ATOMIC_SEQ_CST);
        ring_doorbell(P.host_bell);
    }
}

static uint64_t load_tail(int order) {
    uint64_t t = __atomic_load_n(ring_u64(0, R_TAIL), order);
    if (t < P.head || t - P.head > P.ring_capacity)
        fail("ring 0 tail %llu is invalid (head %llu, capacity %u)", (unsigned long long)t, (unsigned long long)P.head, P.ring_capacity);
    return t;
}

/* Consuming steps 2-3: copies the next descriptor out; false when the ring is empty. */
static bool consume(Frame *f) {
    if (P.head == P.known_tail) {
        publish_head();
        uint64_t t = load_tail(__ATOMIC_ACQUIRE);
        if (t == P.head) return false;
        P.known_tail = t;
    }
    memset(f, 0, sizeof *f);
    memcpy(f->raw, ring_base(0) + R_ENTRIES + (P.head % P.ring_capacity) * 64, 64);
    P.head++;
    f->message_id = rd64(f->raw);
    f->channel = rd32(f->raw + 8);
    f->method = rd32(f->raw + 12);
    f->slot = rd32(f->raw + 16);
    f->generation = rd32(f->raw + 20);
    f->offset = rd32(f->raw + 24);
    f->length = rd32(f->raw + 28);
    f->flags = rd32(f->raw + 32);
    f->deadline = rd64(f->raw + 40);
    take_payload(f);
    after_delivery();
    if (verbose) {
        char what[128];
        describe(f, what, sizeof what);
        trace("received %s", what);
    }
    return true;
}

/* The next frame from the host, blocking (consuming step 5) at most `timeout_ms`. */
static void next_frame(Frame *f, int timeout_ms, const char *waiting_for) {
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        if (P.sleeping) {
            __atomic_store_n(ring_u32(0, R_CONSUMER_SLEEPING), 0, __ATOMIC_SEQ_CST);
            P.sleeping = false;
        }
        if (consume(f)) return;
        __atomic_store_n(ring_u32(0, R_CONSUMER_SLEEPING), 1, __ATOMIC_SEQ_CST);
        P.sleeping = true;
        fence();
        if (load_tail(__ATOMIC_SEQ_CST) != P.head) continue;
        if (!wait_doorbell(deadline)) {
            if (load_tail(__ATOMIC_SEQ_CST) != P.head)
                fail("lost doorbell: the host published a descriptor but did not ring while consumer_sleeping was 1 (waiting for %s)", waiting_for);
            fail("nothing from the host within %d ms (waiting for %s)", timeout_ms, waiting_for);
        }
    }
}

/* ---- Control messages ---------------------------------------------------------------- */

typedef struct {
    uint32_t version, role;
    uint64_t required, supported;
    uint32_t max_payload, max_channels, max_pending;
    uint32_t method_count;
    uint32_t methods[64];
} Hello;

static void encode_hello(Writer *w, uint32_t role, uint32_t max_payload) {
    w_varint(w, 0x00010000);
    w_varint(w, role);
    w_varint(w, 0x2);        /* required: call envelope */
    w_varint(w, 0xE);        /* supported: call envelope, credit flow control, ping */
    w_varint(w, max_payload);
    w_varint(w, 0);          /* max_channels: unlimited */
    w_varint(w, 0);          /* max_pending_calls: unlimited */
    w_varint(w, 0);          /* methods: we serve none */
    w_varint(w, 0);          /* params */
}

static Hello decode_hello(const uint8_t *bytes, size_t count) {
    Hello h = { 0 };
    Reader r = { bytes, count, 0, "Hello" };
    h.version = r_u32(&r);
    h.role = r_u32(&r);
    h.required = r_varint(&r, 64);
    h.supported = r_varint(&r, 64);
    h.max_payload = r_u32(&r);
    h.max_channels = r_u32(&r);
    h.max_pending = r_u32(&r);
    uint64_t methods = r_varint(&r, 64);
    for (uint64_t i = 0; i < methods; i++) {
        uint32_t id = r_u32(&r);
        r_raw(&r, 32); /* sig_hash */
        uint8_t has_name = r_u8(&r);
        if (has_name > 1) fail("Hello: Option tag %u", has_name);
        if (has_name) {
            size_t n;
            r_bytes(&r, &n);
        }
        if (h.method_count < 64) h.methods[h.method_count++] = id;
    }
    uint64_t params = r_varint(&r, 64);
    for (uint64_t i = 0; i < params; i++) {
        size_t n;
        r_bytes(&r, &n);
        r_bytes(&r, &n);
    }
    r_end(&r);
    return h;
}

static void send_open_channel(uint32_t channel, uint32_t kind, uint32_t initial_credits) {
    Writer w = { 0 };
    w_varint(&w, channel);
    w_varint(&w, kind);
    w_u8(&w, 0);     /* attach: None */
    w_varint(&w, 0); /* metadata: [] */
    w_varint(&w, initial_credits);
    send_control(V_OPEN_CHANNEL, &w);
    w_free(&w);
}

static void send_grant(uint32_t channel, uint32_t bytes) {
    Writer w = { 0 };
    w_varint(&w, channel);
    w_varint(&w, bytes);
    send_control(V_GRANT_CREDITS, &w);
    w_free(&w);
}

static const uint8_t PING_BYTES[8] = { 0xde, 0xad, 0xbe, 0xef, 0xca, 0xfe, 0xba, 0xbe };

/* Handles a control frame that is not the one being waited for (a Ping); anything else fails. */
static void handle_unexpected(Frame *f, const char *waiting_for) {
    char what[128];
    describe(f, what, sizeof what);
    if (f->channel == 0 && (f->flags & F_CONTROL) && f->method == V_PING) {
        if (f->length != 8) fail("Ping with %u bytes", f->length);
        Writer w = { 0 };
        w_raw(&w, f->payload, 8);
        release_payload(f);
        send_control(V_PONG, &w);
        w_free(&w);
        flush_sends();
        return;
    }
    if (f->channel == 0 && f->method == V_GOAWAY) fail("the host sent GoAway while we waited for %s (%s)", waiting_for, what);
    fail("unexpected frame while waiting for %s: %s", waiting_for, what);
}

/* ---- Calls --------------------------------------------------------------------------- */

typedef struct {
    uint32_t code;
    char message[256];
    bool has_body;
    const uint8_t *body;
    size_t body_length;
} CallResult;

static CallResult decode_call_result(const uint8_t *bytes, size_t count) {
    CallResult result = { 0 };
    Reader r = { bytes, count, 0, "CallResult" };
    result.code = r_u32(&r);
    size_t n;
    const uint8_t *message = r_bytes(&r, &n);
    snprintf(result.message, sizeof result.message, "%.*s", (int)n, (const char *)message);
    r_bytes(&r, &n); /* details */
    uint64_t trailers = r_varint(&r, 64);
    for (uint64_t i = 0; i < trailers; i++) {
        r_bytes(&r, &n);
        r_bytes(&r, &n);
    }
    uint8_t tag = r_u8(&r);
    if (tag > 1) fail("CallResult: Option tag %u", tag);
    if (tag) {
        result.has_body = true;
        result.body = r_bytes(&r, &result.body_length);
    }
    r_end(&r);
    return result;
}

typedef struct {
    uint32_t channel, method;
    uint64_t request_id;
    uint32_t request_slot; /* INLINE_SLOT, or the first slot of the run we sent */
    uint32_t request_slots;
} Call;

/* Opens a call channel and sends the request in one batch. */
static Call start_call(uint32_t kind, uint32_t initial_credits, uint32_t method, const Writer *args, uint64_t deadline) {
    Call call = { .channel = P.next_channel, .method = method };
    P.next_channel += 2;
    send_open_channel(call.channel, kind, initial_credits);
    call.request_id = take_message_id();
    call.request_slot = send_frame(call.request_id, call.channel, method, F_DATA | F_EOS, deadline, args->bytes, (uint32_t)args->count);
    call.request_slots = (uint32_t)((args->count + P.slot_size - 1) / P.slot_size);
    flush_sends();
    return call;
}

/* Waits for the next frame on the call's channel (answering Pings meanwhile). */
static void next_on_channel(const Call *call, Frame *f, int timeout_ms, const char *what) {
    int64_t deadline = now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - now_ms();
        next_frame(f, left > 0 ? (int)left : 1, what);
        if (f->channel == call->channel && !(f->flags & F_CONTROL)) break;
        handle_unexpected(f, what);
    }
    char d[128];
    describe(f, d, sizeof d);
    if (!(f->flags & F_RESPONSE) || !(f->flags & F_DATA)) fail("%s: a frame without DATA|RESPONSE (%s)", what, d);
    if (f->message_id != call->request_id) fail("%s: msg_id %llu does not echo the request's %llu", what, (unsigned long long)f->message_id, (unsigned long long)call->request_id);
    if (f->method != call->method) fail("%s: method 0x%08X, want 0x%08X", what, f->method, call->method);
}

/* Waits for the terminal frame of a call; decodes its CallResult. The frame's payload is
 * still held: the caller releases it. */
static CallResult finish_call(const Call *call, Frame *f, int timeout_ms, const char *what) {
    next_on_channel(call, f, timeout_ms, what);
    char d[128];
    describe(f, d, sizeof d);
    if (!(f->flags & F_EOS)) fail("%s: response without EOS (%s)", what, d);
    CallResult result = decode_call_result(f->payload, f->length);
    if (((f->flags & F_ERROR) != 0) != (result.code != 0)) fail("%s: ERROR flag %s but status code %u", what, f->flags & F_ERROR ? "set" : "clear", result.code);
    return result;
}

/* Waits (bounded) until the host has freed the run we sent with a request. */
static void expect_request_run_freed(const Call *call, const char *what) {
    if (call->request_slot == INLINE_SLOT) return;
    int64_t deadline = now_ms() + 5000;
    for (;;) {
        bool held = false;
        for (uint32_t s = call->request_slot; s < call->request_slot + call->request_slots; s++)
            if (slot_state(s) == TAG_PLUGIN) held = true;
        if (!held) return;
        if (now_ms() > deadline) fail("%s: the host did not free the request's run (slots %u+%u) within 5 s", what, call->request_slot, call->request_slots);
        sleep_ms(2);
    }
}

static Writer args_string(const char *s) {
    Writer w = { 0 };
    w_string(&w, s);
    return w;
}

static void expect_ok_body(const CallResult *r, const char *what) {
    if (r->code != STATUS_OK) fail("%s: status %u \"%s\"", what, r->code, r->message);
    if (!r->has_body) fail("%s: status OK without a body", what);
}

/* expect_ok_body, then a reader of the body (`body_what` names it in errors). */
static Reader ok_body(const CallResult *r, const char *what, const char *body_what) {
    expect_ok_body(r, what);
    Reader body = { r->body, r->body_length, 0, body_what };
    return body;
}

static void call_echo(void) {
    const char *text = "h\xc3\xa9llo from C over shared memory";
    Writer args = args_string(text);
    Call call = start_call(KIND_CALL, UINT32_MAX, M_ECHO, &args, NO_DEADLINE);
    Frame f;
    CallResult r = finish_call(&call, &f, 10000, "echo");
    Reader body = ok_body(&r, "echo", "echo result");
    size_t n;
    const uint8_t *s = r_bytes(&body, &n);
    r_end(&body);
    if (n != strlen(text) || memcmp(s, text, n) != 0) fail("echo returned \"%.*s\"", (int)n, (const char *)s);
    release_payload(&f);
    expect_request_run_freed(&call, "echo");
    ok("echo %zu-byte string (request in slot %u)", n, call.request_slot);
    w_free(&args);
}

static void call_add(void) {
    Writer args = { 0 };
    w_i32(&args, -7);
    w_i32(&args, 3);
    Call call = start_call(KIND_CALL, UINT32_MAX, M_ADD, &args, NO_DEADLINE);
    Frame f;
    CallResult r = finish_call(&call, &f, 10000, "add");
    Reader body = ok_body(&r, "add", "add result");
    int32_t sum = r_i32(&body);
    r_end(&body);
    release_payload(&f);
    if (sum != -4) fail("add(-7, 3) = %d", sum);
    ok("add(-7,3) = -4");
    w_free(&args);
}

static void call_fail(uint32_t code, const char *message) {
    Writer args = { 0 };
    w_varint(&args, code);
    w_string(&args, message);
    Call call = start_call(KIND_CALL, UINT32_MAX, M_FAIL, &args, NO_DEADLINE);
    Frame f;
    CallResult r = finish_call(&call, &f, 10000, "fail");
    if (r.code != code || strcmp(r.message, message) != 0) fail("fail(%u, \"%s\") answered %u \"%s\"", code, message, r.code, r.message);
    if (r.has_body) fail("fail: an error result with a body");
    release_payload(&f);
    ok("fail(%u) -> code %u \"%s\"", code, r.code, r.message);
    w_free(&args);
}

static void call_countdown(uint32_t from, uint32_t window) {
    Writer args = { 0 };
    w_varint(&args, from);
    Call call = start_call(KIND_STREAM, window, M_COUNTDOWN, &args, NO_DEADLINE);
    uint64_t granted = window, received = 0, unreported = 0, max_in_flight = 0;
    uint32_t expected = from, grants = 0;
    for (;;) {
        Frame f;
        next_on_channel(&call, &f, 10000, "a countdown item");
        if (f.flags & F_EOS) {
            CallResult r = decode_call_result(f.payload, f.length);
            if (((f.flags & F_ERROR) != 0) != (r.code != 0)) fail("countdown terminal: ERROR flag and status %u disagree", r.code);
            if (r.code != STATUS_OK) fail("countdown ended with status %u \"%s\"", r.code, r.message);
            if (r.has_body) fail("countdown terminal carries a body");
            release_payload(&f);
            break;
        }
        received += f.length;
        if (received > granted) fail("credit overrun: %llu item bytes received, %llu granted", (unsigned long long)received, (unsigned long long)granted);
        uint64_t in_flight = received - (granted - window);
        if (in_flight > max_in_flight) max_in_flight = in_flight;
        Reader item = { f.payload, f.length, 0, "countdown item" };
        uint32_t value = r_u32(&item);
        r_end(&item);
        release_payload(&f);
        if (value != expected) fail("countdown item %u, want %u", value, expected);
        expected--;
        unreported += f.length;
        if (unreported >= (window / 2 ? window / 2 : 1)) {
            send_grant(call.channel, (uint32_t)unreported);
            flush_sends();
            granted += unreported;
            unreported = 0;
            grants++;
        }
    }
    if (expected != 0) fail("countdown ended early: next item would have been %u", expected);
    ok("countdown(%u) in order, window %u bytes, %u grants, at most %llu bytes in flight", from, window, grants, (unsigned long long)max_in_flight);
    w_free(&args);
}

static void call_checksum(uint32_t size) {
    uint8_t *data = malloc(size);
    if (!data) fail("out of memory");
    for (uint32_t i = 0; i < size; i++) data[i] = (uint8_t)(i * 31u + (i >> 8));
    Writer args = { 0 };
    w_bytes(&args, data, size);
    Call call = start_call(KIND_CALL, UINT32_MAX, M_CHECKSUM, &args, NO_DEADLINE);
    Frame f;
    CallResult r = finish_call(&call, &f, 15000, "checksum");
    Reader body = ok_body(&r, "checksum", "checksum result");
    uint64_t sum = r_varint(&body, 64);
    r_end(&body);
    release_payload(&f);
    if (sum != fnv1a64(data, size)) fail("checksum of %u bytes = %016llx, want %016llx", size, (unsigned long long)sum, (unsigned long long)fnv1a64(data, size));
    expect_request_run_freed(&call, "checksum");
    ok("checksum %u bytes in a run of %u slot%s, freed by the host", size, call.request_slots, call.request_slots == 1 ? "" : "s");
    free(data);
    w_free(&args);
}

/* Two requests that each fill the whole pool, back to back: the second allocation finds no
 * run free until the host frees the first (wants_slots, then the host's doorbell). */
static void call_checksum_whole_pool_twice(void) {
    uint64_t pool = (uint64_t)P.slot_size * P.slot_count;
    uint32_t prefix = 1;
    while ((pool - prefix) >> (7 * prefix)) prefix++;
    uint32_t size = (uint32_t)(pool - prefix);
    uint8_t *data = malloc(size);
    if (!data) fail("out of memory");
    for (uint32_t i = 0; i < size; i++) data[i] = (uint8_t)(i ^ (i >> 9));
    uint64_t want = fnv1a64(data, size);
    Writer args = { 0 };
    w_bytes(&args, data, size);
    if (args.count != pool) fail("whole-pool payload is %zu bytes, pool %llu", args.count, (unsigned long long)pool);
    uint32_t waits = P.slot_waits;
    int64_t started = now_ms();
    Call first = start_call(KIND_CALL, UINT32_MAX, M_CHECKSUM, &args, NO_DEADLINE);
    Call second = start_call(KIND_CALL, UINT32_MAX, M_CHECKSUM, &args, NO_DEADLINE);
    int64_t second_sent = now_ms();
    const Call *calls[2] = { &first, &second };
    for (int i = 0; i < 2; i++) {
        Frame f;
        CallResult r = finish_call(calls[i], &f, 20000, "whole-pool checksum");
        Reader body = ok_body(&r, "whole-pool checksum", "checksum result");
        uint64_t sum = r_varint(&body, 64);
        r_end(&body);
        release_payload(&f);
        if (sum != want) fail("whole-pool checksum %d = %016llx, want %016llx", i, (unsigned long long)sum, (unsigned long long)want);
    }
    expect_request_run_freed(&second, "whole-pool checksum");
    if (__atomic_load_n(header_u32(H_PLUGIN_WANTS_SLOTS), __ATOMIC_ACQUIRE) != 0) fail("plugin_wants_slots still 1 after the allocation");
    /* The host frees the first run only after checksumming 8 MiB, long after we try to
       allocate the second: that allocation must have waited (plugin_wants_slots + doorbell). */
    if (P.slot_waits == waits) fail("the second whole-pool allocation did not wait for the host's free");
    ok("checksum of two whole-pool payloads (%u slots each) back to back, the second waiting for the host's free (%lld ms)", P.slot_count, (long long)(second_sent - started));
    free(data);
    w_free(&args);
}

static void call_blob(uint32_t size) {
    Writer args = { 0 };
    w_varint(&args, size);
    Call call = start_call(KIND_CALL, UINT32_MAX, M_BLOB, &args, NO_DEADLINE);
    Frame f;
    CallResult r = finish_call(&call, &f, 15000, "blob");
    Reader body = ok_body(&r, "blob", "blob result");
    size_t n;
    const uint8_t *bytes = r_bytes(&body, &n);
    r_end(&body);
    if (n != size) fail("blob(%u) returned %zu bytes", size, n);
    for (size_t i = 0; i < n; i++)
        if (bytes[i] != (uint8_t)(i % 251)) fail("blob byte %zu is %u, want %u", i, bytes[i], (unsigned)(i % 251));
    uint32_t first = f.run_first, count = f.run_count;
    if (count < 2) fail("blob(%u) came in a run of %u slot, expected several", size, count);
    release_payload(&f);
    for (uint32_t s = first; s < first + count; s++)
        if (slot_state(s) == TAG_HOST) fail("slot %u still allocated by the host after we freed the run", s);
    ok("blob %u bytes in a run of %u slots at slot %u, validated and freed", size, count, first);
    w_free(&args);
}

static void call_sleep_past_deadline(uint32_t sleep_ms_arg, uint32_t deadline_ms) {
    Writer args = { 0 };
    w_varint(&args, sleep_ms_arg);
    uint64_t deadline = now_ns() + (uint64_t)deadline_ms * 1000000u;
    int64_t started = now_ms();
    Call call = start_call(KIND_CALL, UINT32_MAX, M_SLEEP, &args, deadline);
    Frame f;
    CallResult r = finish_call(&call, &f, (int)(sleep_ms_arg / 2), "sleep's DEADLINE_EXCEEDED");
    release_payload(&f);
    if (r.code != STATUS_DEADLINE_EXCEEDED) fail("sleep(%u) with a %u ms deadline answered %u \"%s\"", sleep_ms_arg, deadline_ms, r.code, r.message);
    int64_t elapsed = now_ms() - started;
    /* Not before the deadline: a host that misread deadline_ns (another clock, or relative)
       could answer at once. */
    if (elapsed < (int64_t)deadline_ms - 50) fail("sleep(%u) answered DEADLINE_EXCEEDED after %lld ms, before its %u ms deadline", sleep_ms_arg, (long long)elapsed, deadline_ms);
    ok("sleep(%u) with a %u ms deadline -> DEADLINE_EXCEEDED after %lld ms", sleep_ms_arg, deadline_ms, (long long)elapsed);
    w_free(&args);
}

static void ping(void) {
    Writer w = { 0 };
    w_raw(&w, PING_BYTES, 8);
    send_control(V_PING, &w);
    flush_sends();
    w_free(&w);
    Frame f;
    for (;;) {
        next_frame(&f, 10000, "Pong");
        if (f.channel == 0 && (f.flags & F_CONTROL) && f.method == V_PONG) break;
        handle_unexpected(&f, "Pong");
    }
    if (f.length != 8 || memcmp(f.payload, PING_BYTES, 8) != 0) fail("Pong does not carry the Ping's 8 bytes");
    release_payload(&f);
    ok("ping/pong");
}

/* ---- Full rings (Docs/shm.md "Limits, backpressure, validation") ----------------------- */

/* Waits (bounded) until the host's consumer of ring 1 has gone to sleep (consuming step 5). */
static void wait_host_asleep(const char *why) {
    int64_t deadline = now_ms() + 5000;
    while (__atomic_load_n(ring_u32(1, R_CONSUMER_SLEEPING), __ATOMIC_SEQ_CST) != 1) {
        if (now_ms() > deadline) fail("the host's consumer of ring 1 did not go to sleep within 5 s (%s)", why);
        sleep_ms(1);
    }
}

/* Ring 1 (plugin -> host), we the producer. With the host's consumer asleep, `calls` add
 * calls (two descriptors each: OpenChannel and the request, more than the ring holds) go
 * out in one batch; the first ring's worth is published without a doorbell, so the host
 * cannot drain it and the ring is full. The next descriptor waits for room (publishing
 * steps 1-2) until the host, woken, has consumed. Every call is answered exactly once with
 * its own sum: nothing was lost or duplicated while the ring was full. */
static void fill_ring_to_host(uint32_t calls) {
    if (2 * (uint64_t)calls <= P.ring_capacity) fail("fill_ring_to_host: %u calls do not fill a ring of %u", calls, P.ring_capacity);
    if (calls > P.ring_capacity) fail("fill_ring_to_host: %u answers would fill ring 0 as well", calls);
    wait_host_asleep("before filling ring 1");
    uint64_t head_before = __atomic_load_n(ring_u64(1, R_HEAD), __ATOMIC_ACQUIRE);
    uint32_t waits = P.room_waits, rung = P.doorbells_rung, first_channel = P.next_channel;
    uint64_t *request_ids = calloc(calls, sizeof *request_ids);
    uint8_t *answered = calloc(calls, 1);
    if (!request_ids || !answered) fail("out of memory");
    bool filled_unrung = false;
    for (uint32_t i = 0; i < calls; i++) {
        Writer args = { 0 };
        w_i32(&args, (int32_t)i);
        w_i32(&args, 1000);
        uint32_t channel = P.next_channel;
        P.next_channel += 2;
        send_open_channel(channel, KIND_CALL, UINT32_MAX);
        request_ids[i] = take_message_id();
        send_frame(request_ids[i], channel, M_ADD, F_DATA | F_EOS, NO_DEADLINE, args.bytes, (uint32_t)args.count);
        w_free(&args);
        if (P.tail - head_before == P.ring_capacity && !filled_unrung) {
            /* A whole ring, published without a doorbell: the sleeping host cannot see it. */
            publish_tail();
            sleep_ms(100);
            uint64_t head = __atomic_load_n(ring_u64(1, R_HEAD), __ATOMIC_ACQUIRE);
            if (head != head_before)
                fail("the host consumed ring 1 (head %llu -> %llu) although nobody rang it (this check needs its consumer asleep, as it is without spinning)",
                     (unsigned long long)head_before, (unsigned long long)head);
            if (P.doorbells_rung != rung) fail("we rang the host while filling ring 1");
            filled_unrung = true;
        }
    }
    flush_sends();
    if (!filled_unrung) fail("ring 1 never held a whole ring of descriptors");
    if (P.room_waits == waits) fail("no descriptor waited for room in ring 1");
    for (uint32_t n = 0; n < calls; n++) {
        Frame f;
        for (;;) {
            next_frame(&f, 10000, "the answers to the calls that filled ring 1");
            if (f.channel != 0) break;
            handle_unexpected(&f, "the answers to the calls that filled ring 1");
        }
        char d[128];
        describe(&f, d, sizeof d);
        uint32_t i = (f.channel - first_channel) / 2;
        if (f.channel < first_channel || (f.channel - first_channel) % 2 || i >= calls) fail("an answer on channel %u, not one of the calls that filled ring 1 (%s)", f.channel, d);
        if (answered[i]) fail("a second answer for add(%u, 1000) on channel %u: a frame duplicated (%s)", i, f.channel, d);
        answered[i] = 1;
        if (!(f.flags & F_RESPONSE) || !(f.flags & F_EOS) || f.message_id != request_ids[i] || f.method != M_ADD) fail("add(%u, 1000): not its answer (%s)", i, d);
        CallResult r = decode_call_result(f.payload, f.length);
        Reader body = ok_body(&r, "add while ring 1 was full", "add result");
        int32_t sum = r_i32(&body);
        r_end(&body);
        release_payload(&f);
        if (sum != (int32_t)i + 1000) fail("add(%u, 1000) = %d: an answer for another call (a frame lost or reordered)", i, sum);
    }
    free(request_ids);
    free(answered);
    ok("ring 1 (plugin -> host) full: %u calls (%u descriptors) in one batch, the first %u published without a doorbell while the host slept; %u waits for room; every call answered exactly once",
       calls, 2 * calls, P.ring_capacity, P.room_waits - waits);
}

/* Ring 0 (host -> plugin), the host the producer: a server stream of more items than the
 * ring holds, with credit for all of them, which we leave unconsumed until the host has
 * filled the ring and waits for room (producer_waiting = 1, publishing step 2). Then we
 * drain it (consuming step 4 clears the flag and rings the host): every item arrives
 * once and in order, then the terminal; nothing was lost or duplicated while it was full. */
static void fill_ring_to_plugin(uint32_t from) {
    if (from <= P.ring_capacity) fail("fill_ring_to_plugin: countdown(%u) does not fill a ring of %u", from, P.ring_capacity);
    Writer args = { 0 };
    w_varint(&args, from);
    Call call = start_call(KIND_STREAM, 1u << 20, M_COUNTDOWN, &args, NO_DEADLINE);
    w_free(&args);
    int64_t deadline = now_ms() + 10000;
    uint64_t tail;
    uint32_t waiting;
    for (;;) {
        tail = load_tail(__ATOMIC_ACQUIRE);
        waiting = __atomic_load_n(ring_u32(0, R_PRODUCER_WAITING), __ATOMIC_SEQ_CST);
        if (tail - P.head == P.ring_capacity && waiting == 1) break;
        if (now_ms() > deadline)
            fail("countdown(%u) left unconsumed: after 10 s ring 0 holds %llu of %u descriptors, the host's producer_waiting is %u", from,
                 (unsigned long long)(tail - P.head), P.ring_capacity, waiting);
        sleep_ms(1);
    }
    /* Held a little longer: the host publishes nothing over entries we have not consumed. */
    sleep_ms(100);
    tail = load_tail(__ATOMIC_ACQUIRE);
    if (tail - P.head != P.ring_capacity) fail("ring 0 holds %llu descriptors after the host waited for room, want %u", (unsigned long long)(tail - P.head), P.ring_capacity);
    uint32_t expected = from, rung = P.doorbells_rung;
    for (;;) {
        Frame f;
        next_on_channel(&call, &f, 10000, "a countdown item after ring 0 was full");
        if (f.flags & F_EOS) {
            CallResult r = decode_call_result(f.payload, f.length);
            if (((f.flags & F_ERROR) != 0) != (r.code != 0)) fail("countdown terminal: ERROR flag and status %u disagree", r.code);
            if (r.code != STATUS_OK || r.has_body) fail("countdown(%u) after ring 0 was full ended with status %u \"%s\"%s", from, r.code, r.message, r.has_body ? " and a body" : "");
            release_payload(&f);
            break;
        }
        Reader item = { f.payload, f.length, 0, "countdown item" };
        uint32_t value = r_u32(&item);
        r_end(&item);
        release_payload(&f);
        if (value != expected) fail("countdown(%u) after ring 0 was full: item %u, want %u (%s)", from, value, expected, value > expected ? "a duplicate" : "one lost");
        expected--;
    }
    if (expected != 0) fail("countdown(%u) after ring 0 was full ended before item %u", from, expected);
    if (P.doorbells_rung == rung) fail("draining the full ring 0 never rang the waiting host");
    ok("ring 0 (host -> plugin) full: countdown(%u) left unconsumed until the host filled the ring (%u descriptors) and waited for room; then every item once, in order, and the terminal",
       from, P.ring_capacity);
}

/* ---- Handshake ----------------------------------------------------------------------- */

static void handshake(void) {
    uint64_t pool = (uint64_t)P.slot_size * P.slot_count;
    Writer w = { 0 };
    encode_hello(&w, 1, pool > UINT32_MAX ? UINT32_MAX : (uint32_t)pool);
    P.next_message_id = 1;
    P.next_channel = 2;
    send_control(V_HELLO, &w);
    flush_sends();
    w_free(&w);
    Frame f;
    next_frame(&f, 10000, "the host's Hello");
    char d[128];
    describe(&f, d, sizeof d);
    if (f.channel != 0 || f.method != V_HELLO || !(f.flags & F_CONTROL)) fail("first frame from the host is not a Hello: %s", d);
    if (f.message_id != 1) fail("the host's Hello has msg_id %llu, want 1", (unsigned long long)f.message_id);
    Hello h = decode_hello(f.payload, f.length);
    uint32_t hello_length = f.length, hello_slots = f.run_count;
    release_payload(&f);
    if (h.version >> 16 != 1) fail("host protocol version 0x%08X", h.version);
    if (h.role != 0) fail("host role %u, want initiator (0)", h.role);
    if (h.required & ~0xEull) fail("host requires features 0x%llx we do not support", (unsigned long long)h.required);
    if (!(h.supported & 0x2)) fail("host does not support the call envelope");
    uint32_t wanted[] = { M_ECHO, M_ADD, M_FAIL, M_COUNTDOWN, M_CHECKSUM, M_SLEEP, M_BLOB };
    for (size_t i = 0; i < sizeof wanted / sizeof wanted[0]; i++) {
        bool found = false;
        for (uint32_t j = 0; j < h.method_count; j++) found |= h.methods[j] == wanted[i];
        if (!found) fail("the host's Hello does not list method 0x%08X", wanted[i]);
    }
    if (h.max_payload == 0 || h.max_payload > pool) fail("host max payload %u, want 1...%llu (the pool)", h.max_payload, (unsigned long long)pool);
    ok("hello: host initiator, features 0x%llx, max payload %u, %u methods (%u bytes, %s)", (unsigned long long)h.supported, h.max_payload, h.method_count,
       hello_length, hello_slots ? "in a slot" : "inline");
}

/* ---- Ending -------------------------------------------------------------------------- */

/* Every slot free again: what we sent the host freed, what we received we freed. */
static void check_pool_empty(const char *when) {
    int64_t deadline = now_ms() + 5000;
    for (;;) {
        uint32_t host = 0, ours = 0, first_host = 0, first_ours = 0;
        for (uint32_t s = 0; s < P.slot_count; s++) {
            uint32_t state = slot_state(s);
            if (state == TAG_HOST && host++ == 0) first_host = s;
            if (state == TAG_PLUGIN && ours++ == 0) first_ours = s;
            if (state == 3) fail("slot %u in state 3 (never written)", s);
            if (P.held[s]) fail("slot %u still held by this peer", s);
        }
        uint32_t words = (P.slot_count + 31) / 32;
        uint64_t past = __atomic_load_n(state_word(words - 1), __ATOMIC_ACQUIRE) & ~run_mask(words - 1, (words - 1) * 32, P.slot_count - (words - 1) * 32);
        if (past) fail("state bits past slot_count are set: %016llx", (unsigned long long)past);
        if (host == 0 && ours == 0) break;
        if (now_ms() > deadline) fail("after the calls %u slots stay allocated by the host (first %u) and %u by us (first %u)", host, first_host, ours, first_ours);
        sleep_ms(2);
    }
    uint32_t host_wants = __atomic_load_n(header_u32(H_HOST_WANTS_SLOTS), __ATOMIC_ACQUIRE);
    uint32_t plugin_wants = __atomic_load_n(header_u32(H_PLUGIN_WANTS_SLOTS), __ATOMIC_ACQUIRE);
    if (host_wants || plugin_wants) fail("wants_slots flags left set: host %u, plugin %u", host_wants, plugin_wants);
    ok("pool %s: all %u slots free (ours freed by the host, the host's freed by us)", when, P.slot_count);
}

/* Waits (bounded) for end of file on the bootstrap socket: the host closed its end. */
static long long wait_host_closed(const char *after) {
    int64_t started = now_ms(), deadline = started + 10000;
    for (;;) {
        struct pollfd p = { P.socket, POLLIN, 0 };
        int64_t left = deadline - now_ms();
        if (left <= 0) fail("the host did not close the connection within 10 s of %s", after);
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno != EINTR) fail("poll: %s", strerror(errno));
        if (r <= 0) continue;
        char byte;
        ssize_t n = recv(P.socket, &byte, 1, MSG_DONTWAIT);
        if (n == 0) return (long long)(now_ms() - started);
        if (n > 0) fail("unexpected bytes on the bootstrap socket after %s", after);
        if (errno != EAGAIN && errno != EINTR) fail("bootstrap socket: %s", strerror(errno));
    }
}

/* GoAway { shutdown } (spec 6.4) with one call of ours still in flight: the host finishes
 * it, then its session ends and it closes its end of the bootstrap socket. We take what it
 * published before that from ring 0 (Docs/shm.md, "Ending a connection": the plugin frees
 * what it reads on its way out), check the pool once more and close our end. */
static void go_away(uint32_t blob_size) {
    Writer args = { 0 };
    w_varint(&args, blob_size);
    Call call = start_call(KIND_CALL, UINT32_MAX, M_BLOB, &args, NO_DEADLINE);
    w_free(&args);
    Writer w = { 0 };
    w_varint(&w, 0);       /* shutdown */
    w_varint(&w, 0);       /* last_channel_id: the host opened no channel to us */
    w_string(&w, "done");
    w_varint(&w, 0);       /* metadata */
    send_control(V_GOAWAY, &w);
    flush_sends();
    w_free(&w);
    long long took = wait_host_closed("our GoAway");
    /* (ring 1's head need not show the GoAway consumed: the host publishes its head in
     * batches, and a session that has ended publishes nothing more.) */
    bool answered = false;
    uint32_t late = 0, run = 0;
    Frame f;
    while (consume(&f)) {
        late++;
        if (f.channel == call.channel && (f.flags & F_RESPONSE)) {
            CallResult r = decode_call_result(f.payload, f.length);
            Reader body = ok_body(&r, "blob in flight at GoAway", "blob result");
            size_t n;
            const uint8_t *bytes = r_bytes(&body, &n);
            r_end(&body);
            if (n != blob_size) fail("blob in flight at GoAway returned %zu bytes", n);
            for (size_t i = 0; i < n; i++)
                if (bytes[i] != (uint8_t)(i % 251)) fail("blob in flight at GoAway: byte %zu is %u", i, bytes[i]);
            run = f.run_count;
            answered = true;
        } else if (!(f.channel == 0 && (f.flags & F_CONTROL))) {
            char d[128];
            describe(&f, d, sizeof d);
            fail("unexpected frame after our GoAway: %s", d);
        }
        release_payload(&f);
    }
    if (!answered) fail("the host closed without answering the call in flight at our GoAway");
    check_pool_empty("after close");
    close(P.socket);
    close(P.my_bell);
    close(P.host_bell);
    munmap(P.base, P.size);
    close(P.segment_fd);
    ok("goaway with blob(%u) in flight: answered (a run of %u slots, freed by us after the host closed), then the host closed the connection", blob_size, run);
    printf("# closed after %lld ms, %u frames read after the close (doorbells: rang the host %u times, woken %u times)\n", took, late, P.doorbells_rung,
           P.doorbell_wakes);
}

/* GoAway from the host (spec 6.4; `rapace-echo serve` sends it on SIGTERM). With a call of
 * ours in flight (Echo.sleep, taken by the host: ring 1's head shows its request consumed)
 * we print `READY …` and the test sends the host SIGTERM. Then: GoAway { shutdown,
 * last_channel_id = the sleep's channel, the highest we opened }; a channel we open after
 * it is refused with CancelChannel { C, resourceExhausted }; the sleep is still answered
 * (OK, unit); and the host's session ends: it closes its end of the bootstrap socket
 * (Docs/shm.md, "Ending a connection"). We drain ring 0 and free what we read (the host
 * frees nothing when its session ends), check the pool and close our end. */
static void host_goaway(uint32_t sleep_ms_arg) {
    Writer args = { 0 };
    w_varint(&args, sleep_ms_arg);
    Call sleeping = start_call(KIND_CALL, UINT32_MAX, M_SLEEP, &args, NO_DEADLINE);
    w_free(&args);
    int64_t deadline = now_ms() + 5000;
    while (__atomic_load_n(ring_u64(1, R_HEAD), __ATOMIC_ACQUIRE) != P.tail) {
        if (now_ms() > deadline) fail("the host did not consume the sleep's request within 5 s");
        sleep_ms(1);
    }
    printf("READY sleep(%u) in flight on channel %u: send the host SIGTERM\n", sleep_ms_arg, sleeping.channel);
    fflush(stdout);

    Frame f;
    char d[128];
    for (;;) {
        next_frame(&f, 10000, "the host's GoAway after SIGTERM");
        if (f.channel == 0 && (f.flags & F_CONTROL) && f.method == V_GOAWAY) break;
        describe(&f, d, sizeof d);
        if (f.channel == sleeping.channel) fail("the sleep in flight was answered before the host's GoAway (%s)", d);
        handle_unexpected(&f, "the host's GoAway after SIGTERM");
    }
    Reader r = { f.payload, f.length, 0, "GoAway" };
    uint32_t reason = r_u32(&r), last = r_u32(&r);
    size_t n;
    const uint8_t *message = r_bytes(&r, &n);
    char text[128];
    snprintf(text, sizeof text, "%.*s", (int)n, (const char *)message);
    uint64_t entries = r_varint(&r, 64);
    for (uint64_t i = 0; i < entries; i++) {
        r_bytes(&r, &n);
        r_bytes(&r, &n);
    }
    r_end(&r);
    release_payload(&f);
    if (reason != 0) fail("the host's GoAway after SIGTERM has reason %u, want shutdown (0)", reason);
    if (last != sleeping.channel) fail("the host's GoAway has last_channel_id %u, want %u (the sleep in flight, the highest channel we opened)", last, sleeping.channel);

    Writer echo_args = args_string("after the host's GoAway");
    Call late = start_call(KIND_CALL, UINT32_MAX, M_ECHO, &echo_args, NO_DEADLINE);
    w_free(&echo_args);
    bool refused = false, answered = false;
    while (!refused || !answered) {
        next_frame(&f, 10000, refused ? "the answer to the sleep in flight at the host's GoAway" : "CancelChannel for a channel opened after the host's GoAway");
        describe(&f, d, sizeof d);
        if (f.channel == 0 && (f.flags & F_CONTROL) && f.method == V_CANCEL_CHANNEL) {
            Reader c = { f.payload, f.length, 0, "CancelChannel" };
            uint32_t channel = r_u32(&c), why = r_u32(&c);
            r_end(&c);
            release_payload(&f);
            if (channel != late.channel || why != 2) fail("CancelChannel { %u, reason %u } after the host's GoAway, want { %u, resourceExhausted (2) }", channel, why, late.channel);
            if (refused) fail("a second CancelChannel for channel %u", channel);
            refused = true;
        } else if (f.channel == sleeping.channel && !(f.flags & F_CONTROL)) {
            if (answered) fail("a second answer to the sleep in flight (%s)", d);
            if (!(f.flags & F_RESPONSE) || !(f.flags & F_EOS) || f.message_id != sleeping.request_id || f.method != M_SLEEP) fail("the sleep in flight: not its answer (%s)", d);
            CallResult result = decode_call_result(f.payload, f.length);
            expect_ok_body(&result, "the sleep in flight at the host's GoAway");
            if (result.body_length != 0) fail("the sleep in flight answered a body of %zu bytes, want the unit (empty)", result.body_length);
            release_payload(&f);
            answered = true;
        } else if (f.channel == late.channel) {
            fail("the host answered a channel opened after its GoAway (%s)", d);
        } else {
            handle_unexpected(&f, "the end of the sleep in flight at the host's GoAway");
        }
    }

    long long took = wait_host_closed("answering the last call in flight after its GoAway");
    uint32_t late_frames = 0;
    while (consume(&f)) {
        describe(&f, d, sizeof d);
        if (!(f.channel == 0 && (f.flags & F_CONTROL) && f.method == V_PING)) fail("a frame after the last call in flight at the host's GoAway: %s", d);
        late_frames++;
        release_payload(&f);
    }
    check_pool_empty("after the host's GoAway");
    close(P.socket);
    close(P.my_bell);
    close(P.host_bell);
    munmap(P.base, P.size);
    close(P.segment_fd);
    ok("host goaway (SIGTERM) with sleep(%u) in flight: GoAway shutdown, last_channel_id %u (\"%s\"), a later channel refused resourceExhausted, the sleep answered, then the host closed the connection",
       sleep_ms_arg, last, text);
    printf("# closed %lld ms after the last answer, %u frames read after the close\n", took, late_frames);
}

/* ---- Self-checks against vectors.json ------------------------------------------------ */

static void expect_hex(const char *what, const uint8_t *bytes, size_t count, const char *hex) {
    char got[512] = { 0 };
    for (size_t i = 0; i < count && 2 * i + 2 < sizeof got; i++) snprintf(got + 2 * i, 3, "%02x", bytes[i]);
    if (strcmp(got, hex) != 0) fail("self-check %s: %s, vector %s", what, got, hex);
}

static void self_check(void) {
    struct {
        const char *name;
        uint32_t id;
    } ids[] = { { "Echo.echo", 0x3E895C50 }, { "Echo.add", 0x2651F994 }, { "Echo.fail", 0x9143774C }, { "Echo.countdown", 0xDC8DCF41 },
                { "Echo.checksum", 0x1C64629A }, { "Echo.sleep", 0x6A2F5E89 }, { "Echo.blob", 0xE2E68E33 } };
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++)
        if (method_id(ids[i].name) != ids[i].id) fail("self-check: method id of %s", ids[i].name);
    M_ECHO = method_id("Echo.echo");
    M_ADD = method_id("Echo.add");
    M_FAIL = method_id("Echo.fail");
    M_COUNTDOWN = method_id("Echo.countdown");
    M_CHECKSUM = method_id("Echo.checksum");
    M_SLEEP = method_id("Echo.sleep");
    M_BLOB = method_id("Echo.blob");

    Writer w = { 0 };
    encode_hello(&w, 0, 16u << 20);
    expect_hex("initiator Hello", w.bytes, w.count, "80800400020e8080800800000000");
    w_free(&w);
    static const uint8_t acceptor[] = { 0x80, 0x80, 0x04, 0x01, 0x02, 0x0e, 0x80, 0x80, 0x80, 0x08, 0x00, 0x00, 0x01, 0xd0, 0xb8, 0xa5, 0xf4, 0x03, [50] = 0x01, 0x09,
                                        'E',  'c',  'h',  'o',  '.',  'e',  'c',  'h',  'o',  0x00 };
    Hello h = decode_hello(acceptor, sizeof acceptor);
    if (h.role != 1 || h.method_count != 1 || h.methods[0] != 0x3E895C50 || h.max_payload != 16u << 20) fail("self-check: decoding the acceptor Hello vector");
    w_varint(&w, 1);
    w_varint(&w, KIND_CALL);
    w_u8(&w, 0);
    w_varint(&w, 0);
    w_varint(&w, UINT32_MAX);
    expect_hex("OpenChannel(1, Call)", w.bytes, w.count, "01000000ffffffff0f");
    w_free(&w);
    w_varint(&w, 3);
    w_varint(&w, 4096);
    expect_hex("GrantCredits(3, 4096)", w.bytes, w.count, "038020");
    w_free(&w);
    w_varint(&w, 0);
    w_varint(&w, 9);
    w_string(&w, "bye");
    w_varint(&w, 0);
    expect_hex("GoAway", w.bytes, w.count, "00090362796500");
    w_free(&w);
    w_i32(&w, 2);
    w_i32(&w, 3);
    expect_hex("add(2, 3) args", w.bytes, w.count, "0406");
    w_free(&w);
    static const uint8_t ok5[] = { 0x00, 0x00, 0x00, 0x00, 0x01, 0x01, 0x0a };
    CallResult r = decode_call_result(ok5, sizeof ok5);
    if (r.code != 0 || !r.has_body || r.body_length != 1 || r.body[0] != 0x0a) fail("self-check: CallResult OK vector");
    static const uint8_t internal[] = { 0x0d, 0x04, 'o', 'o', 'p', 's', 0x00, 0x01, 0x01, 'k', 0x01, 0x01, 0x00 };
    r = decode_call_result(internal, sizeof internal);
    if (r.code != 13 || strcmp(r.message, "oops") != 0 || r.has_body) fail("self-check: CallResult INTERNAL vector");
    uint8_t d[64] = { 0 };
    wr64(d, 3);
    wr32(d + 8, 1);
    wr32(d + 12, M_ADD);
    wr32(d + 16, INLINE_SLOT);
    wr32(d + 28, 2);
    wr32(d + 32, F_DATA | F_EOS);
    wr64(d + 40, NO_DEADLINE);
    d[48] = 0x04;
    d[49] = 0x06;
    expect_hex("add request descriptor", d, 64,
               "03000000000000000100000094f95126ffffffff0000000000000000020000000500000000000000ffffffffffffffff04060000000000000000000000000000");
}

/* ---- Main ---------------------------------------------------------------------------- */

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    bool host_goes_away = false, usage = argc < 2;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--verbose") == 0) verbose = true;
        else if (strcmp(argv[i], "--host-goaway") == 0) host_goes_away = true;
        else usage = true;
    }
    if (usage) {
        fprintf(stderr, "usage: shm_peer SEGMENT_PATH [--verbose] [--host-goaway]\n");
        return 2;
    }
    P.path = argv[1];
    signal(SIGALRM, on_alarm);
    alarm(90);
    signal(SIGPIPE, SIG_IGN);

    self_check();
    bootstrap();
    handshake();
    call_echo();
    if (host_goes_away) {
        /* Long enough that the GoAway comes first on a loaded machine, well inside the
           host's 5 s grace for calls in flight. */
        host_goaway(2500);
        return 0;
    }
    call_add();
    call_fail(404, "not here");
    call_fail(3, "bad argument");
    call_countdown(300, 8);
    call_checksum(100);
    call_checksum(200000);
    call_checksum_whole_pool_twice();
    call_blob(150000);
    call_sleep_past_deadline(20000, 300);
    ping();
    fill_ring_to_host(200);
    fill_ring_to_plugin(600);
    check_pool_empty("after the calls");
    go_away(100000);
    return 0;
}
