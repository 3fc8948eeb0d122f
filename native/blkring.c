/*
 * blkring.c - producer/consumer logic of the Xen block ring (blkif).
 *
 * Protocol: Xen 4.17 xen/io/ring.h (DEFINE_RING_TYPES, RING_PUSH_*_AND_CHECK_
 * NOTIFY, RING_FINAL_CHECK_FOR_*) and xen/io/blkif.h; docs/blkif.md sections 1 and 4.
 *
 * Notify rule (both directions): after publishing a new producer index,
 * signal only if the range just published crosses the consumer's *_event
 * index; a consumer about to sleep sets *_event = cons + 1 and re-checks.
 *
 * Hostile-frontend rules in the backend: the producer index is loaded once
 * per call and a distance above the ring size is ML_ECORRUPT; each request
 * is memcpy'd out of its slot once and only the copy is validated and used
 * (a frontend rewriting the slot meanwhile changes nothing); every grant ref
 * is checked against the pool before its page is touched; every sector range
 * is checked against the disk without overflow.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, write */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "blkring.h"
#include "ml_errors.h"

#define SRING_HEADER 64u
#define SLOT_SIZE 112u
#define PAGE_SIZE 4096u
#define SECTORS_PER_PAGE (PAGE_SIZE / ML_BLK_SECTOR_SIZE)
/* Responses to requests of at least this many bytes are published (and
 * signalled) as soon as they are served; smaller ones wait for the batch's
 * end, where one push and one signal cover them all. */
#define EARLY_PUSH_MIN (64u * 1024u)

_Static_assert(sizeof(struct ml_blk_segment) == 8, "blkif segment is 8 bytes");
_Static_assert(sizeof(struct ml_blk_request) == SLOT_SIZE, "blkif request is 112 bytes");
_Static_assert(offsetof(struct ml_blk_request, id) == 8, "layout");
_Static_assert(offsetof(struct ml_blk_request, sector_number) == 16, "layout");
_Static_assert(offsetof(struct ml_blk_request, seg) == 24, "layout");
_Static_assert(sizeof(struct ml_blk_request_discard) == 32, "discard request is 32 bytes");
_Static_assert(sizeof(struct ml_blk_response) == 16, "blkif response is 16 bytes");
_Static_assert(sizeof(struct ml_blk_request_indirect) == 64, "indirect request is 64 bytes");
_Static_assert(offsetof(struct ml_blk_request_indirect, handle) == 24, "layout");
_Static_assert(offsetof(struct ml_blk_request_indirect, indirect_grefs) == 28, "layout");
_Static_assert(offsetof(struct ml_blk_response, status) == 10, "layout");

/* The shared ring header as ring.h lays it out. */
struct sring {
    _Atomic uint32_t req_prod;
    _Atomic uint32_t req_event;
    _Atomic uint32_t rsp_prod;
    _Atomic uint32_t rsp_event;
    uint8_t pad[48];
    uint8_t slots[];
};
_Static_assert(offsetof(struct sring, slots) == SRING_HEADER, "sring header is 64 bytes");

struct ml_blk_front {
    struct sring *s;
    uint32_t nr_ents;
    uint32_t req_prod_pvt;
    uint32_t rsp_cons;
};

struct ml_blk_back {
    struct sring *s;
    uint32_t nr_ents;
    uint32_t req_cons;
    uint32_t rsp_prod_pvt;
    uint8_t *pages;
    uint32_t gref_base;
    uint32_t npages;
    uint64_t disk_sectors;
    int read_only;
    /* Xen: no pool; each request's grants are mapped by native/xen_blk.c,
     * where the hypervisor checks them.  INDIRECT is then not offered. */
    int granted;
    uint64_t counters[ML_BLK_NCOUNTERS]; /* the native loop's; see ml_blk_back_counters */
    uint8_t *write_map;    /* see ml_blk_back_set_write_map; NULL: none */
    unsigned map_shift;
    int notify_fd;         /* see ml_blk_back_set_notify_fd; -1: none */
};

size_t ml_blk_request_size(void) { return sizeof(struct ml_blk_request); }
size_t ml_blk_response_size(void) { return sizeof(struct ml_blk_response); }
size_t ml_blk_sring_header_size(void) { return SRING_HEADER; }

size_t ml_blk_field_offset(int field)
{
    switch (field) {
    case 0: return offsetof(struct sring, req_prod);
    case 1: return offsetof(struct sring, req_event);
    case 2: return offsetof(struct sring, rsp_prod);
    case 3: return offsetof(struct sring, rsp_event);
    case 4: return offsetof(struct sring, slots);
    case 5: return offsetof(struct ml_blk_request, operation);
    case 6: return offsetof(struct ml_blk_request, nr_segments);
    case 7: return offsetof(struct ml_blk_request, handle);
    case 8: return offsetof(struct ml_blk_request, id);
    case 9: return offsetof(struct ml_blk_request, sector_number);
    case 10: return offsetof(struct ml_blk_request, seg);
    case 11: return offsetof(struct ml_blk_segment, first_sect);
    case 12: return offsetof(struct ml_blk_segment, last_sect);
    case 13: return offsetof(struct ml_blk_response, operation);
    case 14: return offsetof(struct ml_blk_response, status);
    case 15: return offsetof(struct ml_blk_request_discard, flag);
    case 16: return offsetof(struct ml_blk_request_discard, nr_sectors);
    case 17: return offsetof(struct ml_blk_request_indirect, indirect_op);
    case 18: return offsetof(struct ml_blk_request_indirect, nr_segments);
    case 19: return offsetof(struct ml_blk_request_indirect, handle);
    case 20: return offsetof(struct ml_blk_request_indirect, indirect_grefs);
    case 21: return sizeof(struct ml_blk_request_indirect);
    default: return (size_t)-1;
    }
}

unsigned ml_blk_ring_entries(int order)
{
    if (order < 0 || order > ML_BLK_MAX_RING_ORDER)
        return 0;
    /* __RD32((ring bytes - header) / slot size): largest power of two. */
    size_t fit = (((size_t)PAGE_SIZE << order) - SRING_HEADER) / SLOT_SIZE;
    unsigned n = 1;
    while ((size_t)n * 2 <= fit)
        n *= 2;
    return n;
}

static void *slot(struct sring *s, uint32_t nr_ents, uint32_t idx)
{
    return s->slots + (size_t)(idx & (nr_ents - 1)) * SLOT_SIZE;
}

/* new - event < new - old, in free-running u32 arithmetic (ring.h). */
static int crosses(uint32_t old, uint32_t new_, uint32_t event)
{
    return (uint32_t)(new_ - event) < (uint32_t)(new_ - old);
}

/* --- frontend ------------------------------------------------------------ */

int ml_blk_front_new(void *ring, int order, ml_blk_front **out)
{
    unsigned n = ml_blk_ring_entries(order);
    if (!ring || !n || !out)
        return ML_EINVAL;
    struct ml_blk_front *f = calloc(1, sizeof *f);
    if (!f)
        return ML_ENOMEM;
    f->s = ring;
    f->nr_ents = n;
    memset(ring, 0, SRING_HEADER);
    atomic_store_explicit(&f->s->req_event, 1, memory_order_relaxed);
    atomic_store_explicit(&f->s->rsp_event, 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    *out = f;
    return ML_OK;
}

void ml_blk_front_free(ml_blk_front *f)
{
    free(f);
}

unsigned ml_blk_front_free_slots(const ml_blk_front *f)
{
    return f->nr_ents - (f->req_prod_pvt - f->rsp_cons);
}

int ml_blk_front_put(ml_blk_front *f, const struct ml_blk_request *req)
{
    if (ml_blk_front_free_slots(f) == 0)
        return ML_EINVAL;
    memcpy(slot(f->s, f->nr_ents, f->req_prod_pvt), req, sizeof *req);
    f->req_prod_pvt++;
    return ML_OK;
}

int ml_blk_front_push(ml_blk_front *f)
{
    uint32_t old = atomic_load_explicit(&f->s->req_prod, memory_order_relaxed);
    uint32_t new_ = f->req_prod_pvt;
    /* Requests written /then/ req_prod published (release). */
    atomic_store_explicit(&f->s->req_prod, new_, memory_order_release);
    /* Publish req_prod /then/ read the backend's req_event. */
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t event = atomic_load_explicit(&f->s->req_event, memory_order_relaxed);
    return crosses(old, new_, event);
}

/* Responses available, or ML_ECORRUPT if the backend claims more responses
 * than we have requests outstanding. */
static long front_pending(ml_blk_front *f)
{
    uint32_t rp = atomic_load_explicit(&f->s->rsp_prod, memory_order_acquire);
    uint32_t n = rp - f->rsp_cons;
    if (n > f->req_prod_pvt - f->rsp_cons)
        return ML_ECORRUPT;
    return n;
}

int ml_blk_front_get(ml_blk_front *f, struct ml_blk_response *out)
{
    long n = front_pending(f);
    if (n <= 0)
        return (int)n;
    /* rsp_prod loaded (acquire) /then/ the response copied out. */
    memcpy(out, slot(f->s, f->nr_ents, f->rsp_cons), sizeof *out);
    f->rsp_cons++;
    return 1;
}

long ml_blk_front_get_many(ml_blk_front *f, uint64_t *ids, int16_t *statuses, unsigned max)
{
    long n = 0;
    struct ml_blk_response r;
    while ((unsigned long)n < max) {
        int rc = ml_blk_front_get(f, &r);
        if (rc < 0)
            return rc;
        if (rc == 0)
            break;
        ids[n] = r.id;
        statuses[n] = r.status;
        n++;
    }
    return n;
}

static void fill_segments(struct ml_blk_segment *seg, uint32_t pages, uint64_t nbytes,
                          uint32_t first_gref)
{
    for (uint32_t i = 0; i < pages; i++) {
        uint64_t left = nbytes - (uint64_t)i * PAGE_SIZE;
        uint64_t in_page = left < PAGE_SIZE ? left : PAGE_SIZE;
        seg[i].gref = first_gref + i;
        seg[i].first_sect = 0;
        seg[i].last_sect = (uint8_t)(in_page / ML_BLK_SECTOR_SIZE - 1);
        seg[i].pad[0] = seg[i].pad[1] = 0;
    }
}

int ml_blk_front_submit(ml_blk_front *f, struct ml_blk_request *req, uint64_t id, uint8_t op,
                        uint64_t sector, uint64_t nbytes, uint32_t first_gref,
                        uint8_t *indirect_page, uint32_t indirect_gref)
{
    if (ml_blk_front_free_slots(f) == 0 || nbytes % ML_BLK_SECTOR_SIZE)
        return ML_EINVAL;
    memset(req, 0, sizeof *req);
    uint32_t pages = (uint32_t)((nbytes + PAGE_SIZE - 1) / PAGE_SIZE);
    switch (op) {
    case ML_BLK_OP_DISCARD: {
        struct ml_blk_request_discard d = {.operation = op, .id = id,
                                           .sector_number = sector,
                                           .nr_sectors = nbytes / ML_BLK_SECTOR_SIZE};
        memcpy(req, &d, sizeof d);
        break;
    }
    case ML_BLK_OP_FLUSH_DISKCACHE:
    case ML_BLK_OP_WRITE_BARRIER:
        if (nbytes)
            return ML_EINVAL;
        req->operation = op;
        req->id = id;
        req->sector_number = sector;
        break;
    case ML_BLK_OP_READ:
    case ML_BLK_OP_WRITE:
        if (pages == 0 || pages > ML_BLK_MAX_INDIRECT_SEGMENTS)
            return ML_EINVAL;
        if (pages <= ML_BLK_MAX_SEGMENTS) {
            req->operation = op;
            req->nr_segments = (uint8_t)pages;
            req->id = id;
            req->sector_number = sector;
            fill_segments(req->seg, pages, nbytes, first_gref);
        } else {
            if (!indirect_page)
                return ML_EINVAL;
            /* The segment list goes into our own granted page /then/ the
             * request is published (push's release store orders both). */
            fill_segments((struct ml_blk_segment *)(void *)indirect_page, pages, nbytes,
                          first_gref);
            struct ml_blk_request_indirect ind = {.operation = ML_BLK_OP_INDIRECT,
                                                  .indirect_op = op,
                                                  .nr_segments = (uint16_t)pages,
                                                  .id = id, .sector_number = sector};
            ind.indirect_grefs[0] = indirect_gref;
            memcpy(req, &ind, sizeof ind);
        }
        break;
    default:
        return ML_EINVAL;
    }
    int rc = ml_blk_front_put(f, req);
    if (rc < 0)
        return rc;
    return ml_blk_front_push(f);
}

int ml_blk_front_final_check(ml_blk_front *f)
{
    long n = front_pending(f);
    if (n != 0)
        return n < 0 ? (int)n : 1;
    atomic_store_explicit(&f->s->rsp_event, f->rsp_cons + 1, memory_order_relaxed);
    /* Arm rsp_event /then/ re-read rsp_prod (closes the lost-wakeup race
     * with a backend that pushed between our check and the store). */
    atomic_thread_fence(memory_order_seq_cst);
    n = front_pending(f);
    return n < 0 ? (int)n : n > 0;
}

/* --- backend ------------------------------------------------------------- */

int ml_blk_back_new(void *ring, int order, uint8_t *pages, uint32_t gref_base,
                    uint32_t npages, uint64_t disk_sectors, int read_only, ml_blk_back **out)
{
    unsigned n = ml_blk_ring_entries(order);
    if (!ring || !n || !out || (npages && !pages))
        return ML_EINVAL;
    struct ml_blk_back *b = calloc(1, sizeof *b);
    if (!b)
        return ML_ENOMEM;
    b->s = ring;
    b->nr_ents = n;
    b->pages = pages;
    b->gref_base = gref_base;
    b->npages = npages;
    b->disk_sectors = disk_sectors;
    b->read_only = read_only;
    /* A fresh ring starts at zero; whatever the frontend published before
     * we attached is validated by back_pending like everything else. */
    b->req_cons = 0;
    b->rsp_prod_pvt = 0;
    b->notify_fd = -1;
    *out = b;
    return ML_OK;
}

int ml_blk_back_new_granted(void *ring, int order, uint64_t disk_sectors, int read_only,
                            ml_blk_back **out)
{
    int rc = ml_blk_back_new(ring, order, NULL, 0, 0, disk_sectors, read_only, out);
    if (rc == ML_OK)
        (*out)->granted = 1;
    return rc;
}

void ml_blk_back_free(ml_blk_back *b)
{
    free(b);
}

/* Check the sector range [sector, sector + count) lies inside the disk. */
static int range_ok(const ml_blk_back *b, uint64_t sector, uint64_t count)
{
    return sector <= b->disk_sectors && count <= b->disk_sectors - sector;
}

static int gref_ok(const ml_blk_back *b, uint32_t gref)
{
    if (b->granted)
        return 1; /* mapping the grant is the check (xen_blk.c) */
    return gref >= b->gref_base && gref - b->gref_base < b->npages;
}

static uint8_t *gref_page(ml_blk_back *b, uint32_t gref)
{
    return b->pages + (size_t)(gref - b->gref_base) * PAGE_SIZE;
}

/* Copy an INDIRECT request's segment list out of its (validated) indirect
 * pages into c->segs, once; the frontend may rewrite those pages meanwhile
 * without effect. */
static int16_t load_indirect(ml_blk_back *b, struct ml_blk_checked *c)
{
    struct ml_blk_request_indirect ind;
    memcpy(&ind, &c->req, sizeof ind); /* from our copy of the slot */
    if (ind.indirect_op != ML_BLK_OP_READ && ind.indirect_op != ML_BLK_OP_WRITE)
        return ML_BLK_RSP_ERROR;
    if (ind.nr_segments == 0 || ind.nr_segments > ML_BLK_MAX_INDIRECT_SEGMENTS)
        return ML_BLK_RSP_ERROR;
    uint32_t left = ind.nr_segments;
    for (uint32_t page = 0; left; page++) {
        uint32_t n = left < ML_BLK_SEGS_PER_INDIRECT_PAGE ? left : ML_BLK_SEGS_PER_INDIRECT_PAGE;
        if (page >= ML_BLK_MAX_INDIRECT_PAGES || !gref_ok(b, ind.indirect_grefs[page]))
            return ML_BLK_RSP_ERROR;
        memcpy(c->segs + page * ML_BLK_SEGS_PER_INDIRECT_PAGE,
               gref_page(b, ind.indirect_grefs[page]), n * sizeof(struct ml_blk_segment));
        left -= n;
    }
    c->nsegs = ind.nr_segments;
    c->op = ind.indirect_op;
    return ML_BLK_RSP_OKAY;
}

static int16_t validate(ml_blk_back *b, struct ml_blk_checked *c)
{
    const struct ml_blk_request *r = &c->req;
    c->op = r->operation;
    c->nsegs = 0;
    c->nr_sectors = 0;
    c->offset = 0;
    c->length = 0;
    switch (r->operation) {
    case ML_BLK_OP_READ:
    case ML_BLK_OP_WRITE:
    case ML_BLK_OP_WRITE_BARRIER:
        if (r->nr_segments > ML_BLK_MAX_SEGMENTS)
            return ML_BLK_RSP_ERROR;
        if (r->nr_segments == 0 && r->operation != ML_BLK_OP_WRITE_BARRIER)
            return ML_BLK_RSP_ERROR;
        c->nsegs = r->nr_segments;
        memcpy(c->segs, r->seg, c->nsegs * sizeof(struct ml_blk_segment));
        break;
    case ML_BLK_OP_INDIRECT: {
        if (b->granted)
            return ML_BLK_RSP_EOPNOTSUPP; /* not advertised over Xen */
        int16_t st = load_indirect(b, c);
        if (st != ML_BLK_RSP_OKAY)
            return st;
        break;
    }
    case ML_BLK_OP_FLUSH_DISKCACHE:
        return ML_BLK_RSP_OKAY;
    case ML_BLK_OP_DISCARD: {
        struct ml_blk_request_discard d;
        memcpy(&d, r, sizeof d); /* from our copy, not from the ring */
        if (b->read_only || !range_ok(b, d.sector_number, d.nr_sectors))
            return ML_BLK_RSP_ERROR;
        c->nr_sectors = d.nr_sectors;
        c->offset = d.sector_number * ML_BLK_SECTOR_SIZE;
        c->length = d.nr_sectors * ML_BLK_SECTOR_SIZE;
        return ML_BLK_RSP_OKAY;
    }
    default:
        /* Anything unknown: not supported. */
        return ML_BLK_RSP_EOPNOTSUPP;
    }
    if (c->op != ML_BLK_OP_READ && b->read_only)
        return ML_BLK_RSP_ERROR;
    uint64_t total = 0;
    for (uint32_t i = 0; i < c->nsegs; i++) {
        const struct ml_blk_segment *s = &c->segs[i];
        if (s->first_sect > s->last_sect || s->last_sect >= SECTORS_PER_PAGE)
            return ML_BLK_RSP_ERROR;
        if (!gref_ok(b, s->gref))
            return ML_BLK_RSP_ERROR;
        total += (uint64_t)(s->last_sect - s->first_sect + 1);
    }
    if (!range_ok(b, r->sector_number, total))
        return ML_BLK_RSP_ERROR;
    c->nr_sectors = total;
    c->offset = r->sector_number * ML_BLK_SECTOR_SIZE;
    c->length = total * ML_BLK_SECTOR_SIZE;
    return ML_BLK_RSP_OKAY;
}

/* Requests the frontend has published and we have not taken. */
static long back_pending(ml_blk_back *b)
{
    uint32_t rp = atomic_load_explicit(&b->s->req_prod, memory_order_acquire);
    /* More unconsumed requests than free response slots can only come from
     * a broken or hostile frontend (RING_REQUEST_PROD_OVERFLOW). */
    if ((uint32_t)(rp - b->rsp_prod_pvt) > b->nr_ents)
        return ML_ECORRUPT;
    /* req_prod moved back behind requests we took but have not answered
     * yet: rp - req_cons would wrap to ~2^32 and get would take slots the
     * frontend never published (found by native/fuzz/blk_fuzz). */
    if ((uint32_t)(rp - b->req_cons) > (uint32_t)(rp - b->rsp_prod_pvt))
        return ML_ECORRUPT;
    return (uint32_t)(rp - b->req_cons);
}

int ml_blk_back_get(ml_blk_back *b, struct ml_blk_checked *out)
{
    long n = back_pending(b);
    if (n <= 0)
        return (int)n;
    /* req_prod loaded (acquire) /then/ the request copied out, once. */
    memcpy(&out->req, slot(b->s, b->nr_ents, b->req_cons), sizeof out->req);
    b->req_cons++;
    out->status = validate(b, out);
    return 1;
}

uint8_t *ml_blk_back_segment(ml_blk_back *b, const struct ml_blk_checked *c, int i, uint32_t *len)
{
    const struct ml_blk_segment *s = &c->segs[i];
    if (b->granted) {
        *len = 0;
        return NULL;
    }
    *len = (uint32_t)(s->last_sect - s->first_sect + 1) * ML_BLK_SECTOR_SIZE;
    return b->pages + (size_t)(s->gref - b->gref_base) * PAGE_SIZE +
           (size_t)s->first_sect * ML_BLK_SECTOR_SIZE;
}

void ml_blk_back_gather(ml_blk_back *b, const struct ml_blk_checked *c, uint8_t *dst)
{
    if (b->granted)
        return; /* xen_blk.c copies through the mapped grants */
    for (int i = 0; i < (int)c->nsegs; i++) {
        uint32_t len;
        uint8_t *p = ml_blk_back_segment(b, c, i, &len);
        memcpy(dst, p, len);
        dst += len;
    }
}

void ml_blk_back_scatter(ml_blk_back *b, const struct ml_blk_checked *c, const uint8_t *src)
{
    if (b->granted)
        return;
    for (int i = 0; i < (int)c->nsegs; i++) {
        uint32_t len;
        uint8_t *p = ml_blk_back_segment(b, c, i, &len);
        if (src) {
            memcpy(p, src, len);
            src += len;
        } else {
            memset(p, 0, len);
        }
    }
}

/* Walk the segments covering [at, at + len) of a request's data, copying
 * between each piece and `buf` in the direction `to_pages` says. */
static int copy_pieces(ml_blk_back *b, const struct ml_blk_checked *c, uint64_t at,
                       uint8_t *buf, size_t len, int to_pages)
{
    if (b->granted || at > c->length || len > c->length - at)
        return ML_EINVAL;
    for (int i = 0; i < (int)c->nsegs && len; i++) {
        uint32_t seg_len;
        uint8_t *p = ml_blk_back_segment(b, c, i, &seg_len);
        if (at >= seg_len) {
            at -= seg_len;
            continue;
        }
        size_t n = seg_len - at;
        if (n > len)
            n = len;
        if (to_pages)
            memcpy(p + at, buf, n);
        else
            memcpy(buf, p + at, n);
        buf += n;
        len -= n;
        at = 0;
    }
    return ML_OK;
}

int ml_blk_back_copy_to(ml_blk_back *b, const struct ml_blk_checked *c, uint64_t at,
                        const uint8_t *buf, size_t len)
{
    /* copy_pieces only reads through buf in this direction. */
    return copy_pieces(b, c, at, (uint8_t *)(uintptr_t)buf, len, 1);
}

int ml_blk_back_copy_from(ml_blk_back *b, const struct ml_blk_checked *c, uint64_t at,
                          uint8_t *buf, size_t len)
{
    return copy_pieces(b, c, at, buf, len, 0);
}

int ml_blk_back_put(ml_blk_back *b, uint64_t id, uint8_t op, int16_t status)
{
    struct ml_blk_response r = {.id = id, .operation = op, .status = status};
    memcpy(slot(b->s, b->nr_ents, b->rsp_prod_pvt), &r, sizeof r);
    b->rsp_prod_pvt++;
    return ML_OK;
}

int ml_blk_back_push(ml_blk_back *b)
{
    uint32_t old = atomic_load_explicit(&b->s->rsp_prod, memory_order_relaxed);
    uint32_t new_ = b->rsp_prod_pvt;
    /* Responses (and READ data in the granted pages) written /then/
     * rsp_prod published (release). */
    atomic_store_explicit(&b->s->rsp_prod, new_, memory_order_release);
    /* Publish /then/ read the frontend's rsp_event. */
    atomic_thread_fence(memory_order_seq_cst);
    uint32_t event = atomic_load_explicit(&b->s->rsp_event, memory_order_relaxed);
    return crosses(old, new_, event);
}

int ml_blk_back_final_check(ml_blk_back *b)
{
    long n = back_pending(b);
    if (n != 0)
        return n < 0 ? (int)n : 1;
    atomic_store_explicit(&b->s->req_event, b->req_cons + 1, memory_order_relaxed);
    /* Arm req_event /then/ re-read req_prod. */
    atomic_thread_fence(memory_order_seq_cst);
    n = back_pending(b);
    return n < 0 ? (int)n : n > 0;
}

int ml_blk_back_set_write_map(ml_blk_back *b, uint8_t *map, uint64_t map_len,
                              unsigned shift)
{
    if (map == NULL) {
        b->write_map = NULL;
        return 0;
    }
    if (shift < 9 || shift > 30)
        return ML_EINVAL;
    /* Every validated request ends within disk_sectors, so a map covering
     * the whole disk keeps every mark below in bounds. */
    uint64_t bytes = b->disk_sectors << 9;
    uint64_t chunks = (bytes >> shift) + ((bytes & ((1ull << shift) - 1)) != 0);
    if (map_len < chunks)
        return ML_EINVAL;
    b->write_map = map;
    b->map_shift = shift;
    return 0;
}

/* Only stores of 1 (see ml_blk_back_set_write_map): a racing discard in
 * another thread clears whole bytes and loses nothing of ours. */
static void mark_written(ml_blk_back *b, uint64_t offset, uint64_t length)
{
    uint64_t first = offset >> b->map_shift;
    uint64_t last = (offset + length - 1) >> b->map_shift;
    memset(b->write_map + first, 1, (size_t)(last - first + 1));
}

/* The counters have one writer (the thread serving the ring) and may be
 * read by another (a stats snapshot) while it runs: relaxed atomic loads
 * and stores, no read-modify-write, so neither side ever sees a torn value
 * and the loop pays no locked instruction. */
static void count(ml_blk_back *b, int i, uint64_t v)
{
    uint64_t old = __atomic_load_n(&b->counters[i], __ATOMIC_RELAXED);
    __atomic_store_n(&b->counters[i], old + v, __ATOMIC_RELAXED);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int ml_blk_back_set_notify_fd(ml_blk_back *b, int fd)
{
    if (!b || fd < -1)
        return ML_EINVAL;
    b->notify_fd = fd;
    return ML_OK;
}

/* Publish the responses queued so far in the middle of a batch (see
 * EARLY_PUSH_MIN); signal the frontend at once through notify_fd if it is
 * asleep, else leave the signal to the caller at the end of the batch. */
static void push_early(ml_blk_back *b, int *notify)
{
    static const uint64_t one = 1;
    if (!ml_blk_back_push(b))
        return;
    if (b->notify_fd < 0 || write(b->notify_fd, &one, sizeof one) != (ssize_t)sizeof one)
        *notify = 1;
}

long ml_blk_back_serve_buffer(ml_blk_back *b, uint8_t *disk, int *notify)
{
    struct ml_blk_checked c;
    long served = 0;
    int rc;
    *notify = 0;
    if (b->granted)
        return ML_EINVAL; /* no pool to serve from */
    uint64_t t0 = now_ns();
    while ((rc = ml_blk_back_get(b, &c)) == 1) {
        count(b, c.op == ML_BLK_OP_READ ? 0
              : c.op == ML_BLK_OP_WRITE || c.op == ML_BLK_OP_WRITE_BARRIER ? 1
              : c.op == ML_BLK_OP_FLUSH_DISKCACHE ? 2
              : c.op == ML_BLK_OP_DISCARD ? 3 : 4, 1);
        if (c.status != ML_BLK_RSP_OKAY)
            count(b, 7, 1);
        if (c.status == ML_BLK_RSP_OKAY) {
            uint8_t *at = disk ? disk + c.offset : NULL;
            switch (c.op) {
            case ML_BLK_OP_READ:
                ml_blk_back_scatter(b, &c, at); /* NULL disk: zeros */
                count(b, 5, c.length);
                break;
            case ML_BLK_OP_WRITE:
            case ML_BLK_OP_WRITE_BARRIER:
                /* In memory every write is already "durable": barrier and
                 * flush semantics hold trivially (deliberate no-op). */
                if (at)
                    ml_blk_back_gather(b, &c, at);
                if (at && b->write_map && c.length)
                    mark_written(b, c.offset, c.length);
                count(b, 6, c.length);
                break;
            case ML_BLK_OP_DISCARD:
                if (at)
                    memset(at, 0, c.length);
                break;
            default: /* FLUSH_DISKCACHE: nothing volatile to flush */
                break;
            }
        }
        ml_blk_back_put(b, c.req.id, c.req.operation, c.status);
        served++;
        /* A large request's response goes out now, not after the batch:
         * the frontend copies its data while we copy the next request's,
         * instead of both ends taking turns (measured: 1 MiB reads at QD8). */
        if (c.length >= EARLY_PUSH_MIN)
            push_early(b, notify);
    }
    if (rc < 0)
        return rc;
    if (served && ml_blk_back_push(b))
        *notify = 1;
    if (served) {
        /* The batch's time once, its requests each: the sum over the count
         * is the mean service time per request (meshlink/disk/counters.py). */
        count(b, 8, now_ns() - t0);
        count(b, 9, (uint64_t)served);
    }
    return served;
}

void ml_blk_back_counters(const ml_blk_back *b, uint64_t *out)
{
    for (int i = 0; i < ML_BLK_NCOUNTERS; i++)
        out[i] = __atomic_load_n(&b->counters[i], __ATOMIC_RELAXED);
}
