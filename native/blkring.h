/*
 * blkring.h - the Xen block ring (blkif), byte-compatible with Xen 4.17's
 * xen/io/blkif.h and xen/io/ring.h on the x86_64 ABI (docs/blkif.md sections 1-3).
 *
 * A shared ring is a 64-byte header (req_prod, req_event, rsp_prod,
 * rsp_event, padding) followed by a power-of-two number of 112-byte slots,
 * each holding a request or, once served, its 16-byte response.  The
 * frontend (the disk's user) produces requests and consumes responses; the
 * backend (the disk's server) does the reverse.  Data travels in granted
 * 4 KiB pages named by grant refs in each request's segments.
 *
 * Nothing here blocks.  Every index and request field read from shared
 * memory is copied out once and validated before use.
 */
#ifndef MESHLINK_BLKRING_H
#define MESHLINK_BLKRING_H

#include <stddef.h>
#include <stdint.h>

#include "ml_errors.h" /* what every call below returns */

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py): only declarations, integer #defines and enums. */

enum ml_blk_limits {
    ML_BLK_SECTOR_SIZE = 512,
    ML_BLK_MAX_SEGMENTS = 11,
    ML_BLK_MAX_RING_ORDER = 4,
    /* Indirect requests: segments per indirect page, pages per request, and
     * the most segments we accept (advertised as max indirect segments). */
    ML_BLK_SEGS_PER_INDIRECT_PAGE = 512,
    ML_BLK_MAX_INDIRECT_PAGES = 8,
    ML_BLK_MAX_INDIRECT_SEGMENTS = 256
};

#define ML_BLK_OP_READ 0
#define ML_BLK_OP_WRITE 1
#define ML_BLK_OP_WRITE_BARRIER 2
#define ML_BLK_OP_FLUSH_DISKCACHE 3
#define ML_BLK_OP_DISCARD 5
#define ML_BLK_OP_INDIRECT 6

enum ml_blk_status {
    ML_BLK_RSP_OKAY = 0,
    ML_BLK_RSP_ERROR = -1,
    ML_BLK_RSP_EOPNOTSUPP = -2
};

struct ml_blk_segment {
    uint32_t gref;
    uint8_t first_sect;
    uint8_t last_sect;
    uint8_t pad[2];
};

/* blkif_request (x86_64 layout: 4 bytes of padding before id). */
struct ml_blk_request {
    uint8_t operation;
    uint8_t nr_segments;
    uint16_t handle;
    uint32_t pad;
    uint64_t id;
    uint64_t sector_number;
    struct ml_blk_segment seg[ML_BLK_MAX_SEGMENTS];
};

/* blkif_request_discard, which shares the slot with the request. */
struct ml_blk_request_discard {
    uint8_t operation;
    uint8_t flag;
    uint16_t handle;
    uint32_t pad;
    uint64_t id;
    uint64_t sector_number;
    uint64_t nr_sectors;
};

/* blkif_request_indirect (64 bytes on x86_64). */
struct ml_blk_request_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint32_t pad;
    uint64_t id;
    uint64_t sector_number;
    uint16_t handle;
    uint16_t pad2;
    uint32_t indirect_grefs[ML_BLK_MAX_INDIRECT_PAGES];
    uint32_t pad3;
};

struct ml_blk_response {
    uint64_t id;
    uint8_t operation;
    uint8_t pad;
    int16_t status;
    uint32_t pad2;
};

/* A request as the backend accepted it: copied out and checked. */
struct ml_blk_checked {
    struct ml_blk_request req;   /* the one copy taken from the ring */
    int16_t status;              /* OKAY if servable, else the error to answer */
    uint8_t op;                  /* effective operation (indirect_op for INDIRECT) */
    uint64_t nr_sectors;         /* total sectors moved (read/write/discard) */
    uint64_t offset;             /* byte offset on the disk */
    uint64_t length;             /* bytes */
    uint32_t nsegs;              /* segments below, copied out once */
    struct ml_blk_segment segs[ML_BLK_MAX_INDIRECT_SEGMENTS];
};

/* Layout facts, for the tests that compare them with Xen's headers. */
size_t ml_blk_request_size(void);
size_t ml_blk_response_size(void);
size_t ml_blk_sring_header_size(void);
size_t ml_blk_field_offset(int field);
/* Entries of a ring made of 2^order pages (32, 64, 128, 256, 512). */
unsigned ml_blk_ring_entries(int order);

typedef struct ml_blk_front ml_blk_front;
typedef struct ml_blk_back ml_blk_back;

/* --- frontend ------------------------------------------------------------ */

/* SHARED_RING_INIT on `ring` (2^order pages) and FRONT_RING_INIT. */
int ml_blk_front_new(void *ring, int order, ml_blk_front **out);
void ml_blk_front_free(ml_blk_front *f);
/* Slots free for new requests. */
unsigned ml_blk_front_free_slots(const ml_blk_front *f);
/* Copy a request into the next private slot (not yet visible). */
int ml_blk_front_put(ml_blk_front *f, const struct ml_blk_request *req);
/* Publish queued requests; returns 1 if the backend must be signalled. */
int ml_blk_front_push(ml_blk_front *f);
/* Take the next response: 1 = got one, 0 = none, ML_ECORRUPT. */
int ml_blk_front_get(ml_blk_front *f, struct ml_blk_response *out);
/* Take up to `max` responses into ids[] and statuses[]: count, or ML_ECORRUPT. */
long ml_blk_front_get_many(ml_blk_front *f, uint64_t *ids, int16_t *statuses, unsigned max);
/*
 * Build a request in `req` and queue it and publish it (put + push): READ or
 * WRITE of `nbytes` (a multiple of 512, at most 4096 * 256) at `sector`,
 * from the consecutive data pages whose first grant ref is `first_gref`,
 * as a direct request when it fits 11 segments, else as INDIRECT with its
 * segment list written into `indirect_page` (grant `indirect_gref`); or a
 * DISCARD of `nbytes`; or FLUSH_DISKCACHE / WRITE_BARRIER with no data.
 * `id` is echoed in the response.  Returns 1 if the backend must be
 * signalled, 0 if not, ML_EINVAL for a request that cannot be built.
 */
int ml_blk_front_submit(ml_blk_front *f, struct ml_blk_request *req, uint64_t id, uint8_t op,
                        uint64_t sector, uint64_t nbytes, uint32_t first_gref,
                        uint8_t *indirect_page, uint32_t indirect_gref);
/* Arm rsp_event and re-check before sleeping: 1 = responses pending. */
int ml_blk_front_final_check(ml_blk_front *f);

/* --- backend ------------------------------------------------------------- */

/*
 * Attach to a frontend's ring.  Grant refs in requests must lie in
 * [gref_base, gref_base + npages); `pages` maps page (ref - gref_base).
 * `disk_sectors` bounds every request; read_only refuses writes.
 */
int ml_blk_back_new(void *ring, int order, uint8_t *pages, uint32_t gref_base,
                    uint32_t npages, uint64_t disk_sectors, int read_only,
                    ml_blk_back **out);
/*
 * Attach to a ring whose data pages are Xen grants mapped per request
 * (native/xen_blk.c): every segment's gref passes here (the hypervisor
 * checks it when it is mapped), INDIRECT is answered EOPNOTSUPP, and the
 * pool-based calls (segment, gather, scatter, copy_*, serve_buffer) refuse.
 */
int ml_blk_back_new_granted(void *ring, int order, uint64_t disk_sectors, int read_only,
                            ml_blk_back **out);
void ml_blk_back_free(ml_blk_back *b);
/* Copy the next request out and validate it: 1 = got one (see
 * out->status), 0 = none, ML_ECORRUPT = hostile indices. */
int ml_blk_back_get(ml_blk_back *b, struct ml_blk_checked *out);
/* Address of segment `i` of a checked request (within its granted page). */
uint8_t *ml_blk_back_segment(ml_blk_back *b, const struct ml_blk_checked *c, int i,
                             uint32_t *len);
/* Copy a READ's data from `src` (length bytes) into its segments, or a
 * WRITE's segments into `dst`.  Only for checked, servable requests. */
void ml_blk_back_gather(ml_blk_back *b, const struct ml_blk_checked *c, uint8_t *dst);
void ml_blk_back_scatter(ml_blk_back *b, const struct ml_blk_checked *c, const uint8_t *src);
/* Copy `len` bytes between a checked request's segments, starting at byte
 * `at` of the request's data, and `buf`: into the segments (copy_to, for a
 * READ's data) or out of them (copy_from, for a WRITE's).  Lets a backend
 * that keeps its data in pieces fill or drain the pages piece by piece.
 * Returns ML_EINVAL, touching nothing, unless at + len <= the data length. */
int ml_blk_back_copy_to(ml_blk_back *b, const struct ml_blk_checked *c, uint64_t at,
                        const uint8_t *buf, size_t len);
int ml_blk_back_copy_from(ml_blk_back *b, const struct ml_blk_checked *c, uint64_t at,
                          uint8_t *buf, size_t len);
/* Queue a response privately. */
int ml_blk_back_put(ml_blk_back *b, uint64_t id, uint8_t op, int16_t status);
/* Publish queued responses; returns 1 if the frontend must be signalled. */
int ml_blk_back_push(ml_blk_back *b);
/* Arm req_event and re-check before sleeping: 1 = requests pending. */
int ml_blk_back_final_check(ml_blk_back *b);
/*
 * The native service loop for a disk that is one contiguous buffer (`disk`,
 * or NULL for the null disk: reads zeros, writes dropped).  Serves every
 * request available now; READ, WRITE, DISCARD (zeroes the range) and
 * FLUSH/WRITE_BARRIER (no-ops in memory) are answered in C.  Returns the
 * number served (>= 0), or ML_ECORRUPT.  *notify is set when the frontend
 * must be signalled.
 */
long ml_blk_back_serve_buffer(ml_blk_back *b, uint8_t *disk, int *notify);
/*
 * Give the native loop the eventfd that signals the frontend (-1: none, the
 * default).  With it, ml_blk_back_serve_buffer publishes the response to
 * each large request (64 KiB or more) as soon as it is served and signals
 * the frontend at once if it sleeps, so the frontend works on one response
 * while the loop serves the next request; *notify then covers only what is
 * left at the batch's end.  Without it the loop still publishes early but
 * leaves every signal to *notify.  Returns ML_EINVAL for fd < -1.
 */
int ml_blk_back_set_notify_fd(ml_blk_back *b, int fd);
/*
 * The whole service loop in C for a ring served by ml_blk_back_serve_buffer
 * (same `disk`), run in a thread of its own: serve, signal the frontend
 * (`peer_fd`), poll the ring for spin_ns after the last request, then arm
 * req_event and sleep in poll() on `own_fd` (the eventfd the frontend
 * signals), `live_fd` (the rendezvous socket: its hang-up means the
 * frontend died) and `stop_fd`.  Sets the notify fd to `peer_fd`.
 * Returns ML_OK once *stop is non-zero (the caller sets it, then makes
 * stop_fd readable to wake a sleeping loop; it is checked after every
 * batch, so a busy ring cannot hold the loop), ML_ESYS with errno EPIPE
 * when the frontend died, ML_ECORRUPT for hostile indices, ML_ESYS if
 * poll() failed.
 */
int ml_blk_back_run(ml_blk_back *b, uint8_t *disk, int own_fd, int peer_fd, int live_fd,
                    int stop_fd, const int *stop, uint64_t spin_ns);
/*
 * Give the native loop a map of the disk's written chunks, one byte per
 * 2^shift bytes of disk (map_len bytes, covering the whole disk): each
 * WRITE it serves stores 1 into the bytes of the chunks it touches, so a
 * sparse in-memory backend still knows which chunks hold data (its extents
 * and allocated size).  Only stores of 1, never a read-modify-write, so
 * another thread clearing bytes for a discard cannot lose a neighbour's
 * mark.  NULL map: no marking (the default).  Returns ML_EINVAL, changing
 * nothing, if the map does not cover the disk or shift is not 9..30.
 */
int ml_blk_back_set_write_map(ml_blk_back *b, uint8_t *map, uint64_t map_len,
                              unsigned shift);
/*
 * What the native loop served on this ring so far (only it counts: the
 * Python loop keeps its own counters), written to out[0..ML_BLK_NCOUNTERS):
 * requests by kind (READ, WRITE incl. WRITE_BARRIER, FLUSH_DISKCACHE,
 * DISCARD, other), bytes read, bytes written, requests answered with an
 * error, then the nanoseconds spent serving batches and the requests they
 * held (the order of meshlink/disk/counters.py's DISK_COUNTERS).  One
 * writer (the thread serving the ring), relaxed atomic stores; this call
 * may run in another thread meanwhile.
 */
#define ML_BLK_NCOUNTERS 10
void ml_blk_back_counters(const ml_blk_back *b, uint64_t *out);

/* cffi:end */

#endif
