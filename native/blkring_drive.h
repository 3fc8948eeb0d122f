/*
 * blkring_drive.h - a native load generator for the blk ring's frontend.
 *
 * Keeps a fixed number of READ or WRITE requests in flight on a frontend
 * ring for a fixed time, as fio does for an NBD server, so that a benchmark
 * of the blk ring measures the ring and the server, not the Python client
 * driving it (one Python request costs tens of microseconds, more than the
 * server spends on it).  It uses only the frontend's public calls
 * (blkring.h): nothing here parses what the backend wrote except through
 * ml_blk_front_get, and every response id is checked against the requests
 * this call has in flight.
 */
#ifndef MESHLINK_BLKRING_DRIVE_H
#define MESHLINK_BLKRING_DRIVE_H

#include <stdint.h>

#include "blkring.h"
#include "ml_errors.h"

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py): only declarations, integer #defines and enums. */

struct ml_blk_drive {
    /* What to run (the caller sets these). */
    uint8_t op;           /* ML_BLK_OP_READ or ML_BLK_OP_WRITE */
    uint8_t random;       /* 1: random block-aligned offsets; 0: sequential */
    uint32_t block;       /* bytes per request: a multiple of 512 */
    uint32_t qd;          /* requests in flight; they use ring ids 0..qd-1 */
    uint64_t span;        /* bytes of disk covered, from offset 0 (>= block) */
    uint64_t seed;        /* for random offsets */
    uint64_t duration_ns; /* submit new requests until this much time passed */
    uint64_t spin_ns;     /* poll the ring this long before sleeping */
    uint64_t stall_ns;    /* fail with ETIMEDOUT after this long without a response */
    /* What happened (ml_blk_front_drive sets these, also on failure). */
    uint64_t requests;    /* answered OKAY */
    uint64_t errors;      /* answered with an error status */
    uint64_t elapsed_ns;  /* first submit to last response */
    uint64_t sleeps;      /* times it slept on the doorbell */
};

/*
 * Run `d` on frontend `f`, whose shared memory is `base` (`base_len` bytes):
 * ring id i's data is `block` bytes at page pool_page + i * slot_pages, and
 * with indirect_page != 0 its indirect page is indirect_page pages after
 * that (needed when block > 11 pages).  Every request in flight has its own
 * `block` bytes of `buf` (buf_len >= qd * block): a WRITE's data is copied
 * from there into the ring's pages, a READ's out of them into it, once per
 * request, as a disk's user would.
 *
 * Waiting: after `spin_ns` of polling it arms the response event and sleeps
 * in poll() on `own_fd` (the eventfd the backend signals, read to clear it)
 * and `live_fd` (a socket whose hang-up means the backend died); `peer_fd`
 * is the eventfd it signals.  It returns only after every request it
 * submitted was answered, so the ring's slots are free again.
 *
 * Blocks the calling thread for about duration_ns.  Returns ML_OK;
 * ML_EINVAL (bad parameters, or fewer than qd free slots), ML_ECORRUPT (a
 * response the ring or this call cannot account for), or ML_ESYS with
 * errno EPIPE (the backend died) or ETIMEDOUT (no response for stall_ns).
 */
int ml_blk_front_drive(ml_blk_front *f, uint8_t *base, uint64_t base_len, uint32_t pool_page,
                       uint32_t slot_pages, uint32_t indirect_page, int own_fd, int peer_fd,
                       int live_fd, uint8_t *buf, uint64_t buf_len, struct ml_blk_drive *d);

/* cffi:end */

#endif
