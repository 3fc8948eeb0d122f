/*
 * blkring_run.c - the blk backend's service loop in C, for a thread of its own.
 *
 * Why: a ring served by ml_blk_back_serve_buffer (memory and null disks)
 * spends nothing in Python per request, but the loop around it did: each
 * wake-up from the doorbell went through trio's epoll, a task switch and
 * the Python spin, tens of microseconds that a 4 KiB request at queue depth
 * 1 waits for and that the server's one core pays at queue depth 32.  Here
 * the wake-up is a poll() returning in this thread; the GIL is not held
 * (cffi releases it around the call).
 */
#define _GNU_SOURCE /* POLLRDHUP */
#include <errno.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

#include "blkring.h"

/* How often a loop that never sleeps looks at its stop and liveness fds:
 * one poll() per millisecond costs nothing measurable and bounds how long a
 * stop request waits. */
#define STOP_CHECK_NS 1000000u

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int stopped(const int *stop)
{
    return __atomic_load_n(stop, __ATOMIC_ACQUIRE) != 0;
}

/* What look_at_fds found: go on serving, or stop (a readable stop_fd). */
enum { FDS_GO_ON = 0, FDS_STOP = 1 };

/*
 * Poll the stop and liveness fds, and own_fd when it is >= 0 (poll ignores
 * negative fds, so live_fd may be -1 too), for up to timeout_ms (-1: until
 * one is ready).  Returns FDS_STOP, FDS_GO_ON (own_fd's signal consumed if
 * it came), or ML_ESYS with errno EPIPE when the frontend hung up.
 */
static int look_at_fds(int own_fd, int stop_fd, int live_fd, int timeout_ms)
{
    /* POLLIN is not asked of the liveness socket: the frontend never
     * writes to it after the handshake, and unread bytes there must not
     * turn a sleep into a spin.  Its hang-up is reported anyway. */
    struct pollfd fds[3] = {{.fd = own_fd, .events = POLLIN},
                            {.fd = stop_fd, .events = POLLIN},
                            {.fd = live_fd, .events = POLLRDHUP}};
    if (poll(fds, 3, timeout_ms) < 0)
        return errno == EINTR ? FDS_GO_ON : ML_ESYS;
    /* A readable stop_fd stops the loop by itself: it may be shared by
     * many loops (a server's stop pipe, never read here), whose flags
     * nobody sets, so waiting for the flag would spin. */
    if (fds[1].revents & POLLIN)
        return FDS_STOP;
    if (fds[2].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
        errno = EPIPE;
        return ML_ESYS;
    }
    if (fds[0].revents & POLLIN) {
        uint64_t count;
        if (read(own_fd, &count, sizeof count) < 0 && errno != EAGAIN)
            return ML_ESYS;
    }
    return FDS_GO_ON;
}

int ml_blk_back_run(ml_blk_back *b, uint8_t *disk, int own_fd, int peer_fd, int live_fd,
                    int stop_fd, const int *stop, uint64_t spin_ns)
{
    static const uint64_t one = 1;
    if (!b || !stop || own_fd < 0 || peer_fd < 0 || stop_fd < 0)
        return ML_EINVAL;
    int rc = ml_blk_back_set_notify_fd(b, peer_fd);
    if (rc != ML_OK)
        return rc;
    uint64_t last = mono_ns();
    uint64_t stop_check = last + STOP_CHECK_NS;
    while (!stopped(stop)) {
        int notify = 0;
        long n = ml_blk_back_serve_buffer(b, disk, &notify);
        if (n < 0)
            return (int)n;
        /* A lost signal (the eventfd cannot fail short of overflow) would
         * only leave the frontend to its own polling. */
        if (notify && write(peer_fd, &one, sizeof one) < 0 && errno != EAGAIN)
            return ML_ESYS;
        uint64_t now = mono_ns();
        if (now >= stop_check) {
            /* A frontend that never lets the ring go idle never lets us
             * reach the sleep below, so look at stop_fd (and the frontend's
             * hang-up) here too.  Without this a busy client held a stopping
             * server for its whole join deadline. */
            rc = look_at_fds(-1, stop_fd, live_fd, 0);
            if (rc != FDS_GO_ON)
                return rc == FDS_STOP ? ML_OK : rc;
            stop_check = now + STOP_CHECK_NS;
        }
        if (n) {
            last = now;
            continue;
        }
        if (now - last < spin_ns)
            continue;
        int pending = ml_blk_back_final_check(b);
        if (pending < 0)
            return pending;
        if (pending)
            continue;
        rc = look_at_fds(own_fd, stop_fd, live_fd, -1);
        if (rc != FDS_GO_ON)
            return rc == FDS_STOP ? ML_OK : rc;
        last = mono_ns();
    }
    return ML_OK;
}
