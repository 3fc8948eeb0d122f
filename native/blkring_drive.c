/*
 * blkring_drive.c - the blk ring's native load generator (see blkring_drive.h).
 *
 * Why in C: the benchmark compares the blk ring against nbdkit driven by
 * fio, a C client.  Driven from Python, the client's own per-request cost
 * (a trio task switch and a few hundred bytecodes) dominated the 4 KiB
 * figures, and the null disk moved with it; this loop costs the client a
 * few hundred nanoseconds per request, so the figures show the server.
 */
#define _GNU_SOURCE /* POLLRDHUP */
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blkring_drive.h"

#define PAGE_SIZE 4096u
#define MAX_QD 512u /* the largest ring (order 4) */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* xorshift64*: cheap, and good enough to spread offsets over the span. */
static uint64_t next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

struct drive_state {
    ml_blk_front *f;
    struct ml_blk_drive *d;
    uint8_t *base;
    uint8_t *buf;
    uint32_t pool_page, slot_pages, indirect_page;
    uint64_t blocks;  /* block-sized positions in the span */
    uint64_t next;    /* next sequential position */
    uint64_t rng;
    struct ml_blk_request req;
};

static uint8_t *slot_data(const struct drive_state *s, uint32_t id)
{
    return s->base + ((uint64_t)s->pool_page + (uint64_t)id * s->slot_pages) * PAGE_SIZE;
}

/* Queue and publish request `id`; 1 if the backend must be signalled. */
static int submit(struct drive_state *s, uint32_t id)
{
    struct ml_blk_drive *d = s->d;
    uint64_t pos;
    if (d->random) {
        pos = next_random(&s->rng) % s->blocks;
    } else {
        pos = s->next;
        s->next = s->next + 1 == s->blocks ? 0 : s->next + 1;
    }
    uint8_t *data = slot_data(s, id);
    if (d->op == ML_BLK_OP_WRITE)
        memcpy(data, s->buf + (uint64_t)id * d->block, d->block);
    uint32_t first = s->pool_page + id * s->slot_pages;
    uint8_t *ind = s->indirect_page ? data + (uint64_t)s->indirect_page * PAGE_SIZE : NULL;
    return ml_blk_front_submit(s->f, &s->req, id, d->op,
                               pos * d->block / ML_BLK_SECTOR_SIZE, d->block, first, ind,
                               first + s->indirect_page);
}

static int check_params(ml_blk_front *f, uint64_t base_len, uint32_t pool_page,
                        uint32_t slot_pages, uint32_t indirect_page, uint64_t buf_len,
                        const struct ml_blk_drive *d)
{
    if (d->op != ML_BLK_OP_READ && d->op != ML_BLK_OP_WRITE)
        return 0;
    if (d->block == 0 || d->block % ML_BLK_SECTOR_SIZE || d->span < d->block)
        return 0;
    if (d->qd == 0 || d->qd > MAX_QD || d->qd > ml_blk_front_free_slots(f))
        return 0;
    uint64_t pages = (d->block + PAGE_SIZE - 1) / PAGE_SIZE;
    if (pages > ML_BLK_MAX_INDIRECT_SEGMENTS)
        return 0;
    if (pages > ML_BLK_MAX_SEGMENTS && indirect_page == 0)
        return 0;
    /* Each id's data pages, and its indirect page, lie inside the slot... */
    uint64_t used = indirect_page ? (uint64_t)indirect_page + 1 : pages;
    if (pages > slot_pages || (indirect_page && indirect_page < pages) || used > slot_pages)
        return 0;
    /* ...and every slot inside the shared memory; the buffer holds qd blocks. */
    uint64_t end_page = (uint64_t)pool_page + (uint64_t)d->qd * slot_pages;
    if (end_page > base_len / PAGE_SIZE || end_page > UINT32_MAX)
        return 0;
    return buf_len / d->block >= d->qd;
}

int ml_blk_front_drive(ml_blk_front *f, uint8_t *base, uint64_t base_len, uint32_t pool_page,
                       uint32_t slot_pages, uint32_t indirect_page, int own_fd, int peer_fd,
                       int live_fd, uint8_t *buf, uint64_t buf_len, struct ml_blk_drive *d)
{
    if (!f || !base || !buf || !d)
        return ML_EINVAL;
    d->requests = d->errors = d->elapsed_ns = d->sleeps = 0;
    if (!check_params(f, base_len, pool_page, slot_pages, indirect_page, buf_len, d))
        return ML_EINVAL;
    struct drive_state s = {.f = f, .d = d, .base = base, .buf = buf,
                            .pool_page = pool_page, .slot_pages = slot_pages,
                            .indirect_page = indirect_page, .blocks = d->span / d->block,
                            .rng = d->seed | 1};
    uint8_t inflight[MAX_QD] = {0};
    uint64_t ids[MAX_QD];
    int16_t statuses[MAX_QD];
    static const uint64_t one = 1;
    uint32_t pending = 0;
    int signal = 0;
    int rc = ML_OK;
    uint64_t start = now_ns();
    uint64_t deadline = start + d->duration_ns;
    for (uint32_t id = 0; id < d->qd; id++) {
        int r = submit(&s, id);
        if (r < 0)
            return r; /* nothing published for this id; the earlier ones are answered below */
        signal |= r;
        inflight[id] = 1;
        pending++;
    }
    uint64_t progress = start;
    while (pending) {
        if (signal) {
            /* A failed signal only delays the backend until its own spin
             * or our next request; the stall timeout bounds it anyway. */
            if (write(peer_fd, &one, sizeof one) < 0 && errno != EAGAIN)
                rc = rc ? rc : ML_ESYS;
            signal = 0;
        }
        long n = ml_blk_front_get_many(f, ids, statuses, d->qd);
        if (n < 0)
            return (int)n;
        uint64_t now = now_ns();
        if (n > 0) {
            progress = now;
            for (long i = 0; i < n; i++) {
                uint64_t id = ids[i];
                if (id >= d->qd || !inflight[id])
                    return ML_ECORRUPT;
                inflight[id] = 0;
                pending--;
                if (statuses[i] == ML_BLK_RSP_OKAY) {
                    d->requests++;
                    if (d->op == ML_BLK_OP_READ)
                        memcpy(buf + id * d->block, slot_data(&s, (uint32_t)id), d->block);
                } else {
                    d->errors++;
                }
                if (now < deadline && rc == ML_OK) {
                    int r = submit(&s, (uint32_t)id);
                    if (r < 0)
                        return r;
                    signal |= r;
                    inflight[id] = 1;
                    pending++;
                }
            }
            d->elapsed_ns = now - start;
            continue;
        }
        if (now - progress < d->spin_ns)
            continue;
        if (now - progress > d->stall_ns) {
            errno = ETIMEDOUT;
            return ML_ESYS;
        }
        int armed = ml_blk_front_final_check(f);
        if (armed < 0)
            return armed;
        if (armed)
            continue;
        struct pollfd fds[2] = {{.fd = own_fd, .events = POLLIN},
                                {.fd = live_fd, .events = POLLRDHUP}};
        uint64_t wait_ms = (d->stall_ns - (now - progress)) / 1000000u + 1;
        int got = poll(fds, live_fd >= 0 ? 2 : 1, wait_ms > 1000 ? 1000 : (int)wait_ms);
        if (got < 0 && errno != EINTR)
            return ML_ESYS;
        d->sleeps++;
        if (got > 0 && fds[1].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
            errno = EPIPE;
            return ML_ESYS;
        }
        if (got > 0 && fds[0].revents & POLLIN) {
            uint64_t count;
            if (read(own_fd, &count, sizeof count) < 0 && errno != EAGAIN)
                return ML_ESYS;
        }
    }
    return rc;
}
