/*
 * vchan_wait.c - a reader's wait in one call, for a thread of its own.
 *
 * Why: the blocking client (meshlink/blocking.py) waits for each reply.
 * In Python that wait was a read that found nothing, a spin of cffi calls,
 * an arm, a poll(2), an eventfd read and a read again: about 400 bytecodes
 * per call, which under load (17 processes on 2 cores, cold caches) cost
 * more than the C.  Here it is one call, and the GIL is not held (cffi
 * releases it around the call), so the spin does not stop other threads.
 * A call's write goes in the same C call (ml_vchan_write_wait), and the
 * look before it (ml_vchan_idle) is one call too: the client's Python per
 * call then is packing the request and decoding the reply.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include "vchan.h"

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

long ml_vchan_read_wait(ml_vchan *v, void *buf, size_t n, int wait_fd, int ack_fd,
                        long spin_ns, int timeout_ms)
{
    if (n == 0 || wait_fd < 0)
        return ML_EINVAL;
    long got = ml_vchan_read(v, buf, n);
    if (got != 0)
        return got;
    int live = ml_vchan_peer_live(v);
    if (live != 1)
        return live < 0 ? live : 0; /* closed or not yet connected: the caller looks */
    int64_t now = mono_ns();
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : now + (int64_t)timeout_ms * 1000000;
    if (spin_ns > 0) {
        /* Waking a sleeping process costs more than this on VMs whose idle
         * vCPUs must be woken by the hypervisor; the caller sizes the spin
         * from its recent waits, and passes 0 when the peer is usually slow. */
        int64_t until = now + spin_ns;
        do {
            got = ml_vchan_read(v, buf, n);
            if (got != 0)
                return got;
        } while (mono_ns() < until);
    }
    for (;;) {
        /* Arm, then look again: a write that came before the peer could see
         * the armed bit is found here, and one after it signals wait_fd. */
        long avail = ml_vchan_arm_read(v);
        if (avail < 0)
            return avail;
        if (avail == 0) {
            now = mono_ns();
            if (now >= deadline)
                return ML_ETIMEDOUT;
            int64_t left_ms = (deadline - now + 999999) / 1000000;
            int wait_ms = deadline == INT64_MAX || left_ms > 1000000000 ? -1 : (int)left_ms;
            struct pollfd p = {.fd = wait_fd, .events = POLLIN};
            int rc = poll(&p, 1, wait_ms);
            if (rc < 0)
                /* A signal: back to Python, which runs its handler (Ctrl-C
                 * must end a blocked call) and calls again if it returns. */
                return errno == EINTR ? 0 : ML_ESYS;
            if (rc == 0)
                return ML_ETIMEDOUT;
            uint64_t count;
            /* The eventfd is non-blocking: nothing to read (the wake-up was
             * the liveness socket) is EAGAIN, and harmless. */
            if (ack_fd >= 0 && read(ack_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                return ML_ESYS;
        }
        got = ml_vchan_read(v, buf, n);
        if (got != 0)
            return got;
        if (avail == 0)
            return 0; /* woken without data: the caller looks at the liveness socket */
    }
}

int ml_vchan_idle(ml_vchan *v, int live_fd)
{
    long ready = ml_vchan_data_ready(v);
    if (ready != 0)
        return ready < 0 ? (int)ready : 0; /* bytes in: a ping, a close, a late reply */
    int live = ml_vchan_peer_live(v);
    if (live != 1)
        return live < 0 ? live : 0;
    if (live_fd >= 0) {
        /* The liveness socket carries no data: EOF (0) is the peer's death,
         * EAGAIN is a live peer; anything else the caller looks at. */
        char c;
        ssize_t r = recv(live_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        if (!(r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)))
            return 0;
    }
    return 1;
}

long ml_vchan_write_wait(ml_vchan *v, const void *req, size_t req_len, void *buf, size_t n,
                         int wait_fd, int ack_fd, long spin_ns, int timeout_ms)
{
    if (req_len == 0)
        return ML_EINVAL;
    long space = ml_vchan_buffer_space(v);
    if (space < 0)
        return space;
    if ((size_t)space < req_len)
        return ML_ENOROOM;
    long w = ml_vchan_write(v, req, req_len);
    if (w < 0)
        return w;
    /* We are the ring's only writer: its free space can only have grown
     * since we looked.  Less means the peer moved the consumer index back. */
    if ((size_t)w != req_len)
        return ML_ECORRUPT;
    return ml_vchan_read_wait(v, buf, n, wait_fd, ack_fd, spin_ns, timeout_ms);
}
