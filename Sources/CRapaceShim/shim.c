#define _GNU_SOURCE 1
#include "CRapaceShim.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/syscall.h>

_Static_assert(RAPACE_EV_TIMEOUT == EV_TIMEOUT, "EV_TIMEOUT mismatch");
_Static_assert(RAPACE_EV_READ == EV_READ, "EV_READ mismatch");
_Static_assert(RAPACE_EV_WRITE == EV_WRITE, "EV_WRITE mismatch");
_Static_assert(RAPACE_EV_PERSIST == EV_PERSIST, "EV_PERSIST mismatch");
_Static_assert(RAPACE_EV_ET == EV_ET, "EV_ET mismatch");
_Static_assert(RAPACE_EFD_NONBLOCK == EFD_NONBLOCK, "EFD_NONBLOCK mismatch");
_Static_assert(RAPACE_EFD_CLOEXEC == EFD_CLOEXEC, "EFD_CLOEXEC mismatch");

struct event_base *rapace_event_base_new(void) {
    // Not EVENT_BASE_FLAG_PRECISE_TIMER: on epoll it arms a timerfd with timerfd_settime
    // before *every* epoll_wait (even with no timer pending), one extra system call per loop
    // turn. The coarse clock can fire a timer up to a jiffy early; ReactorTimer checks the
    // precise clock when it fires and re-arms for the rest, so deadlines are never early.
    return event_base_new();
}
void rapace_event_base_free(struct event_base *base) { event_base_free(base); }

int rapace_event_base_loop_forever(struct event_base *base) {
    return event_base_loop(base, EVLOOP_NO_EXIT_ON_EMPTY);
}

int rapace_event_base_loopbreak(struct event_base *base) { return event_base_loopbreak(base); }
const char *rapace_event_base_method(struct event_base *base) { return event_base_get_method(base); }
int rapace_event_base_update_cache_time(struct event_base *base) { return event_base_update_cache_time(base); }

struct event *rapace_event_new(struct event_base *base, int fd, short what,
                               rapace_event_callback callback, void *context) {
    return event_new(base, fd, what, callback, context);
}

int rapace_event_add(struct event *event, int64_t timeout_us) {
    if (timeout_us < 0) return event_add(event, NULL);
    struct timeval tv;
    tv.tv_sec = (time_t)(timeout_us / 1000000);
    tv.tv_usec = (suseconds_t)(timeout_us % 1000000);
    return event_add(event, &tv);
}

int rapace_event_del(struct event *event) { return event_del(event); }
void rapace_event_free(struct event *event) { event_free(event); }

struct event *rapace_signal_event_new(struct event_base *base, int signal,
                                      rapace_event_callback callback, void *context) {
    return event_new(base, signal, EV_SIGNAL | EV_PERSIST, callback, context);
}

int rapace_eventfd(unsigned int initval) { return eventfd(initval, EFD_NONBLOCK | EFD_CLOEXEC); }

long rapace_getrandom(void *buffer, size_t length) { return (long)getrandom(buffer, length, 0); }

int rapace_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int rapace_open_directory_path(const char *path) {
    return open(path, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
}

int rapace_socket_stream(int domain) {
    return socket(domain, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
}

int rapace_accept(int fd, struct sockaddr *address, socklen_t *length) {
    return accept4(fd, address, length, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int rapace_set_nodelay(int fd) {
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int rapace_set_reuseaddr(int fd) {
    int one = 1;
    return setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
}

ssize_t rapace_send_with_fds(int socket, const void *bytes, size_t length, const int *fds, int count) {
    struct iovec iov = { .iov_base = (void *)bytes, .iov_len = length };
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int) * 16)];
    if (count > 16) { errno = EINVAL; return -1; }
    if (count > 0) {
        memset(control, 0, sizeof(control));
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)count);
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)count);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)count);
    }
    return sendmsg(socket, &msg, MSG_NOSIGNAL);
}

ssize_t rapace_recv_with_fds(int socket, void *bytes, size_t length, int *fds, int capacity, int *received) {
    struct iovec iov = { .iov_base = bytes, .iov_len = length };
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int) * 16)];
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    *received = 0;
    ssize_t n = recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
        int n_fds = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *data = (int *)CMSG_DATA(cmsg);
        for (int i = 0; i < n_fds; i++) {
            if (*received < capacity) {
                fds[(*received)++] = data[i];
            } else {
                close(data[i]);  // never leak descriptors we have no room for
            }
        }
    }
    return n;
}

ssize_t rapace_send(int socket, const void *bytes, size_t length) {
    return send(socket, bytes, length, MSG_NOSIGNAL);
}

int rapace_pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
    // Called through syscall(2): glibc before 2.36 has no pidfd_open wrapper.
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

int rapace_pidfd_send_signal(int pidfd, int signal) {
#ifdef SYS_pidfd_send_signal
    // Called through syscall(2): glibc before 2.36 has no pidfd_send_signal wrapper.
    return (int)syscall(SYS_pidfd_send_signal, pidfd, signal, NULL, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

int rapace_set_parent_death_signal(int signal) { return prctl(PR_SET_PDEATHSIG, signal, 0, 0, 0); }

uint64_t rapace_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static _Thread_local void *rapace_current_reactor = NULL;
void *rapace_thread_current_reactor(void) { return rapace_current_reactor; }
void rapace_thread_set_current_reactor(void *reactor) { rapace_current_reactor = reactor; }
#include <pthread.h>
#include <sched.h>
void rapace_thread_set_name(const char *name) {
    char buffer[16];
    strncpy(buffer, name, 15);
    buffer[15] = 0;
    pthread_setname_np(pthread_self(), buffer);
}
int rapace_current_cpu(void) { return sched_getcpu(); }
