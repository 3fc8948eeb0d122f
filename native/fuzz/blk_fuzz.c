/*
 * blk_fuzz.c - libFuzzer target for the blk ring backend (blkring.c) driven
 * by a hostile frontend.  Protocol: docs/blkif.md, Xen 4.17
 * xen/io/ring.h and blkif.h.
 *
 * Theory of operation.  The input chooses a ring order (any byte: orders
 * above 4 must be refused), an in-memory disk of a few sectors (or the null
 * disk, with any size up to 2^64-1 sectors), a pool of granted pages with
 * any base ref, the shared ring header (any producer/consumer/event
 * indices), then a sequence of moves.  The frontend's moves: put a request
 * built from fuzz-chosen fields into the next slot and publish it (READ,
 * WRITE, WRITE_BARRIER, FLUSH, DISCARD, INDIRECT, unknown), write a segment
 * list into a pool page for INDIRECT requests to name, write raw bytes
 * anywhere in the slots, set req_prod / rsp_event to anything.
 * The backend's moves: the native serve loop (ml_blk_back_serve_buffer), or
 * the step-by-step path the Python server uses (get, then gather/scatter
 * on the checked request, put), push, final_check.
 *
 * What is asserted:
 *  - memory: the ring, the page pool and the disk are exactly-sized heap
 *    blocks, so any access outside them is an ASan report;
 *  - every request taken off the ring gets exactly one response in the
 *    slot it came from, carrying its id and operation, whose status is what
 *    an independent restatement of blkif's rules says (OKAY, ERROR or
 *    EOPNOTSUPP), or the whole call reports ML_ECORRUPT and serves nothing
 *    further;
 *  - the data: a shadow disk and shadow pages replay every servable request
 *    with plain loops; after each serve, disk and pages must equal them;
 *  - the written-chunk map (ml_blk_back_set_write_map), when one is given:
 *    after each native serve it must equal a shadow marked from the model;
 *  - notification: push signals exactly when ring.h's rule says;
 *  - the backend never has more requests outstanding than the ring holds.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blkring.h"
#include "ml_errors.h"

/* INDIRECT requests are part of the backend (blkring.h, docs/blkif.md section 2):
 * ml_blk_checked carries the effective op and the copied-out segments. */
#define HAVE_INDIRECT 1
#define C_OP(c) ((c).op)
#define C_NSEGS(c) ((c).nsegs)
#define MAX_SEGS ML_BLK_MAX_INDIRECT_SEGMENTS

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "blk_fuzz: invariant failed at line %d: %s\n", __LINE__, \
                    #cond);                                                          \
            abort();                                                                 \
        }                                                                            \
    } while (0)

#define HDR 64u
#define SLOT 112u
#define PAGE 4096u
#define SECTOR 512u

struct input {
    const uint8_t *p;
    size_t n;
};

static uint8_t take8(struct input *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static uint64_t takeN(struct input *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v |= (uint64_t)take8(in) << (8 * i);
    return v;
}
#define take16(in) ((uint16_t)takeN((in), 2))
#define take32(in) ((uint32_t)takeN((in), 4))
#define take64(in) (takeN((in), 8))

/* The shared header, by offset (docs/blkif.md section 1), read without the library. */
static uint32_t hdr_get(const uint8_t *ring, unsigned off)
{
    uint32_t v;
    memcpy(&v, ring + off, 4);
    return v;
}
static void hdr_set(uint8_t *ring, unsigned off, uint32_t v)
{
    memcpy(ring + off, &v, 4);
}
#define REQ_PROD 0
#define REQ_EVENT 4
#define RSP_PROD 8
#define RSP_EVENT 12

struct world {
    ml_blk_back *b;
    uint8_t *ring;
    uint32_t nr_ents;
    uint8_t *pages, *shadow_pages;
    uint32_t npages, gref_base;
    uint8_t *disk, *shadow_disk; /* NULL: the null disk */
    uint64_t disk_sectors;
    int read_only;
    uint32_t req_cons;     /* our model of the backend's private indices */
    uint32_t rsp_prod_pvt;
    uint32_t front_prod;   /* the honest part of the frontend */
    int corrupt;           /* the backend reported ML_ECORRUPT */
    uint8_t *map, *shadow_map; /* written-chunk map (set_write_map), or NULL */
    size_t map_len;
    unsigned map_shift;
};

static uint8_t *slot_at(struct world *w, uint32_t idx)
{
    return w->ring + HDR + (size_t)(idx & (w->nr_ents - 1)) * SLOT;
}

/* A request as the model understands it. */
struct mreq {
    uint8_t op;       /* effective operation (indirect_op for INDIRECT) */
    uint64_t sector, sectors;
    unsigned nsegs;
    uint8_t segs[MAX_SEGS][8]; /* gref u32, first u8, last u8, pad */
};

/* blkif's rules for one request, restated from docs/blkif.md section 6 independently of
 * blkring.c; an INDIRECT request's segments come from the pool page named by
 * its indirect grefs, read from `pages` as they are now.  Returns the status
 * the backend must answer with. */
static int16_t model_status(const struct world *w, const uint8_t *req, const uint8_t *pages,
                            struct mreq *m)
{
    uint8_t op = req[0];
    memcpy(&m->sector, req + 16, 8);
    m->op = op;
    m->sectors = 0;
    m->nsegs = 0;
    if (op == 3) { /* FLUSH_DISKCACHE: no range */
        m->sector = 0;
        return 0;
    }
    if (op == 5) { /* DISCARD: 32-byte form, nr_sectors at 24 */
        uint64_t n;
        memcpy(&n, req + 24, 8);
        if (w->read_only || m->sector > w->disk_sectors || n > w->disk_sectors - m->sector)
            return -1;
        m->sectors = n;
        return 0;
    }
    if (op <= 2) {
        if (req[1] > 11 || (req[1] == 0 && op != 2))
            return -1;
        m->nsegs = req[1];
        memcpy(m->segs, req + 24, 8u * req[1]);
    } else if (op == 6 && HAVE_INDIRECT) {
        /* 64-byte form: indirect_op @1, nr_segments u16 @2, grefs[8] @28;
         * 512 segments per indirect page. */
        uint16_t n;
        memcpy(&n, req + 2, 2);
        m->op = req[1];
        if ((m->op != 0 && m->op != 1) || n == 0 || n > MAX_SEGS)
            return -1;
        for (unsigned pg = 0; pg * 512u < n; pg++) {
            uint32_t g;
            memcpy(&g, req + 28 + 4 * pg, 4);
            if (pg >= 8 || g < w->gref_base || (uint64_t)g - w->gref_base >= w->npages)
                return -1;
            unsigned k = n - pg * 512u < 512u ? n - pg * 512u : 512u;
            memcpy(m->segs[pg * 512u], pages + (size_t)(g - w->gref_base) * PAGE, 8u * k);
        }
        m->nsegs = n;
    } else {
        return -2; /* unknown operations (and INDIRECT where unsupported) */
    }
    if (m->op != 0 && w->read_only)
        return -1;
    for (unsigned i = 0; i < m->nsegs; i++) {
        const uint8_t *sg = m->segs[i];
        uint32_t gref;
        memcpy(&gref, sg, 4);
        if (sg[4] > sg[5] || sg[5] > 7)
            return -1;
        if (gref < w->gref_base || (uint64_t)gref - w->gref_base >= w->npages)
            return -1;
        m->sectors += (uint64_t)(sg[5] - sg[4] + 1);
    }
    if (m->sector > w->disk_sectors || m->sectors > w->disk_sectors - m->sector)
        return -1;
    return 0;
}

/* Apply a servable request to the shadow disk and pages, sector by sector. */
static void model_apply(struct world *w, const struct mreq *m)
{
    if (m->op == 5) {
        if (w->shadow_disk)
            memset(w->shadow_disk + m->sector * SECTOR, 0, m->sectors * SECTOR);
        return;
    }
    if (m->op == 3)
        return;
    uint64_t at = m->sector * SECTOR;
    for (unsigned i = 0; i < m->nsegs; i++) {
        const uint8_t *sg = m->segs[i];
        uint32_t gref;
        memcpy(&gref, sg, 4);
        uint8_t *page = w->shadow_pages + (size_t)(gref - w->gref_base) * PAGE;
        for (unsigned sec = sg[4]; sec <= sg[5]; sec++, at += SECTOR) {
            uint8_t *p = page + sec * SECTOR;
            if (m->op == 0) {
                if (w->shadow_disk)
                    memcpy(p, w->shadow_disk + at, SECTOR);
                else
                    memset(p, 0, SECTOR);
            } else if (w->shadow_disk) {
                memcpy(w->shadow_disk + at, p, SECTOR);
            }
        }
    }
}

static void check_data(struct world *w)
{
    CHECK(memcmp(w->pages, w->shadow_pages, (size_t)w->npages * PAGE) == 0);
    if (w->disk)
        CHECK(memcmp(w->disk, w->shadow_disk, w->disk_sectors * SECTOR) == 0);
}

/* Pending requests as the model sees them, or -1 for a corrupt index. */
static long model_pending(struct world *w)
{
    uint32_t rp = hdr_get(w->ring, REQ_PROD);
    uint32_t unanswered = rp - w->rsp_prod_pvt; /* taken or not, no response yet */
    uint32_t untaken = rp - w->req_cons;
    /* More than the ring holds, or req_prod behind requests the backend
     * already took (it would take slots the frontend never published). */
    if (unanswered > w->nr_ents || untaken > unanswered)
        return -1;
    return untaken;
}

/* The ring.h notify rule: did [old, new) cross event? */
static int model_crosses(uint32_t old, uint32_t new_, uint32_t event)
{
    return (uint32_t)(new_ - event) < (uint32_t)(new_ - old);
}

/* The frontend writes one request from compact fuzz fields. */
static void front_request(struct world *w, struct input *in)
{
    uint8_t req[SLOT];
    memset(req, 0, sizeof req);
    uint8_t op = take8(in);
    req[0] = op < 0x80 ? op % 7 : op; /* mostly valid operations */
    uint8_t nseg = take8(in);
    req[1] = nseg < 0xf0 ? nseg % 12 : nseg;
    uint64_t id = take16(in);
    memcpy(req + 8, &id, 8);
    uint8_t sel = take8(in);
    uint64_t sector = (sel & 0x80) ? take64(in) : (uint64_t)(sel % 64);
    memcpy(req + 16, &sector, 8);
    if (req[0] == 6) {
        /* INDIRECT: indirect_op, u16 count, grefs of pages holding the
         * segment list (written by the frontend's "segment page" move). */
        req[1] = nseg < 0xf0 ? nseg % 3 : nseg;
        uint16_t cnt = take8(in);
        if (cnt & 0x80)
            cnt = take16(in);
        memcpy(req + 2, &cnt, 2);
        for (unsigned i = 0; i < 2; i++) {
            uint8_t g = take8(in);
            uint32_t gref = (g & 0x80) ? take32(in) : w->gref_base + (g % 8);
            memcpy(req + 28 + 4 * i, &gref, 4);
        }
    } else if (req[0] == 5) {
        uint8_t ns = take8(in);
        uint64_t n = (ns & 0x80) ? take64(in) : (uint64_t)(ns % 32);
        memcpy(req + 24, &n, 8);
    } else {
        unsigned k = req[1] < 11 ? req[1] : 11;
        for (unsigned i = 0; i < k; i++) {
            uint8_t g = take8(in);
            uint32_t gref = (g & 0x80) ? take32(in) : w->gref_base + (g % 8);
            memcpy(req + 24 + 8 * i, &gref, 4);
            uint8_t fl = take8(in);
            req[24 + 8 * i + 4] = (fl & 0x80) ? take8(in) : (fl >> 3) & 7;
            req[24 + 8 * i + 5] = (fl & 0x80) ? take8(in) : fl & 7;
        }
    }
    memcpy(slot_at(w, w->front_prod), req, SLOT);
    w->front_prod++;
    hdr_set(w->ring, REQ_PROD, w->front_prod);
}

/* One backend step through the native serve loop. */
static void back_serve(struct world *w)
{
    long pend = model_pending(w);
    /* Snapshot every request the backend may take, with its expected fate. */
    uint32_t n = pend > 0 ? (uint32_t)pend : 0;
    CHECK(n <= w->nr_ents);
    uint8_t (*reqs)[SLOT] = malloc((size_t)(n ? n : 1) * SLOT);
    CHECK(reqs);
    for (uint32_t i = 0; i < n; i++)
        memcpy(reqs[i], slot_at(w, w->req_cons + i), SLOT);
    uint32_t old_rsp = hdr_get(w->ring, RSP_PROD);
    uint32_t event = hdr_get(w->ring, RSP_EVENT);

    int notify = -1;
    long served = ml_blk_back_serve_buffer(w->b, w->disk, &notify);
    if (pend < 0) {
        /* A corrupt index is seen before anything is served: no request
         * executed, no response published. */
        CHECK(served == ML_ECORRUPT);
        CHECK(hdr_get(w->ring, RSP_PROD) == old_rsp);
        check_data(w);
        w->corrupt = 1;
        free(reqs);
        return;
    }
    CHECK(served == (long)n);
    static struct mreq m;
    for (uint32_t i = 0; i < n; i++) {
        int16_t st = model_status(w, reqs[i], w->shadow_pages, &m);
        if (st == 0)
            model_apply(w, &m);
        /* The native loop marks exactly the chunks its servable writes touch. */
        if (st == 0 && w->map && (m.op == 1 || m.op == 2) && m.sectors) {
            uint64_t first = m.sector * SECTOR >> w->map_shift;
            uint64_t last = ((m.sector + m.sectors) * SECTOR - 1) >> w->map_shift;
            memset(w->shadow_map + first, 1, (size_t)(last - first + 1));
        }
        const uint8_t *rsp = slot_at(w, w->rsp_prod_pvt + i);
        uint64_t id;
        int16_t status;
        memcpy(&id, rsp, 8);
        memcpy(&status, rsp + 10, 2);
        CHECK(memcmp(&id, reqs[i] + 8, 8) == 0);
        CHECK(rsp[8] == reqs[i][0]);
        CHECK(status == st);
    }
    w->req_cons += n;
    w->rsp_prod_pvt += n;
    if (n) {
        CHECK(hdr_get(w->ring, RSP_PROD) == w->rsp_prod_pvt);
        CHECK(notify == model_crosses(old_rsp, w->rsp_prod_pvt, event));
    } else {
        CHECK(notify == 0);
    }
    check_data(w);
    if (w->map)
        CHECK(memcmp(w->map, w->shadow_map, w->map_len) == 0);
    free(reqs);
}

/* One request through the step-by-step path (get, data, put), as Python's
 * server does for backends that are not one buffer. */
static void back_step(struct world *w, int hold)
{
    long pend = model_pending(w);
    uint8_t req[SLOT];
    if (pend > 0)
        memcpy(req, slot_at(w, w->req_cons), SLOT);
    struct ml_blk_checked c;
    int rc = ml_blk_back_get(w->b, &c);
    if (pend < 0) {
        CHECK(rc == ML_ECORRUPT);
        w->corrupt = 1;
        return;
    }
    CHECK(rc == (pend > 0));
    if (!rc)
        return;
    w->req_cons++;
    /* Never more requests taken than responses the ring has room for. */
    CHECK((uint32_t)(w->req_cons - w->rsp_prod_pvt) <= w->nr_ents);
    CHECK(memcmp(&c.req, req, SLOT) == 0);
    static struct mreq m;
    int16_t st = model_status(w, req, w->shadow_pages, &m);
    CHECK(c.status == st);
    if (st == 0) {
        CHECK(c.nr_sectors == m.sectors && c.offset == m.sector * SECTOR &&
              c.length == m.sectors * SECTOR);
        CHECK(C_OP(c) == m.op);
        if (m.op <= 2) {
            CHECK(C_NSEGS(c) == m.nsegs);
            /* Every segment the library hands out lies in the pool. */
            for (int i = 0; i < (int)C_NSEGS(c); i++) {
                uint32_t len;
                uint8_t *p = ml_blk_back_segment(w->b, &c, i, &len);
                CHECK(p >= w->pages && len <= PAGE &&
                      p + len <= w->pages + (size_t)w->npages * PAGE);
            }
        }
        uint8_t *at = w->disk ? w->disk + c.offset : NULL;
        /* The fuzz-chosen id picks the piecewise copies (copy_to/copy_from,
         * split at a fuzz-chosen byte) instead of scatter/gather: the model
         * must not see a difference, and a piece past the end must be
         * refused with nothing touched. */
        int pieces = at && (c.req.id & 1) && (m.op <= 2);
        uint64_t split = pieces ? (c.req.id >> 8) % (c.length + 1) : 0;
        if (pieces) {
            uint64_t rest = c.length - split;
            if (m.op == 0) {
                CHECK(ml_blk_back_copy_to(w->b, &c, split, at + split, rest + 1) == ML_EINVAL);
                CHECK(ml_blk_back_copy_to(w->b, &c, 0, at, split) == ML_OK);
                CHECK(ml_blk_back_copy_to(w->b, &c, split, at + split, rest) == ML_OK);
            } else {
                CHECK(ml_blk_back_copy_from(w->b, &c, c.length + 1, at, 0) == ML_EINVAL);
                CHECK(ml_blk_back_copy_from(w->b, &c, 0, at, split) == ML_OK);
                CHECK(ml_blk_back_copy_from(w->b, &c, split, at + split, rest) == ML_OK);
            }
        } else if (m.op == 0)
            ml_blk_back_scatter(w->b, &c, at);
        else if (at && (m.op == 1 || m.op == 2))
            ml_blk_back_gather(w->b, &c, at);
        else if (at && m.op == 5)
            memset(at, 0, c.length);
        model_apply(w, &m);
        check_data(w);
    }
    if (hold)
        return; /* a response owed later: the ring keeps its slot */
    CHECK(ml_blk_back_put(w->b, c.req.id, c.req.operation, c.status) == ML_OK);
    w->rsp_prod_pvt++;
}

/* Answer one held request (responses may come out of order in blkif). */
static void back_put_held(struct world *w, struct input *in)
{
    if (w->rsp_prod_pvt == w->req_cons)
        return;
    uint64_t id = take16(in);
    CHECK(ml_blk_back_put(w->b, id, 0, 0) == ML_OK);
    const uint8_t *rsp = slot_at(w, w->rsp_prod_pvt);
    CHECK(memcmp(rsp, &id, 8) == 0);
    w->rsp_prod_pvt++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    /* Ring order: mostly 0..4, sometimes above, sometimes negative. */
    uint8_t ob = take8(&in);
    int order = ob < 0x40 ? ob % 5 : ob < 0x80 ? 5 + (ob - 0x40) : (int)(int8_t)ob;
    uint8_t flags = take8(&in);
    struct world w = {0};
    w.read_only = flags & 1;
    int null_disk = flags & 2;
    w.npages = take8(&in) % 9;
    w.gref_base = (flags & 4) ? take32(&in) : 0;
    w.disk_sectors = null_disk ? ((flags & 8) ? take64(&in) : take8(&in))
                               : (uint64_t)(take8(&in) % 65);

    unsigned ents = ml_blk_ring_entries(order);
    size_t ring_len = (size_t)PAGE << (order >= 0 && order <= 4 ? order : 0);
    w.ring = malloc(ring_len);
    CHECK(w.ring);
    memset(w.ring, take8(&in), ring_len);
    /* Any header: producer/consumer/event indices as the fuzzer likes. */
    for (unsigned off = 0; off < 16; off += 4)
        hdr_set(w.ring, off, take32(&in));
    w.front_prod = hdr_get(w.ring, REQ_PROD);

    size_t pool = (size_t)w.npages * PAGE;
    w.pages = malloc(pool ? pool : 1);
    w.shadow_pages = malloc(pool ? pool : 1);
    CHECK(w.pages && w.shadow_pages);
    for (size_t i = 0; i < (size_t)w.npages * PAGE; i++)
        w.pages[i] = (uint8_t)(i / SECTOR * 13 + 1);
    memcpy(w.shadow_pages, w.pages, (size_t)w.npages * PAGE);
    if (!null_disk) {
        size_t len = w.disk_sectors * SECTOR;
        w.disk = malloc(len ? len : 1);
        w.shadow_disk = malloc(len ? len : 1);
        CHECK(w.disk && w.shadow_disk);
        for (size_t i = 0; i < len; i++)
            w.disk[i] = (uint8_t)(i / SECTOR * 7 + 2);
        memcpy(w.shadow_disk, w.disk, len);
    }

    int rc = ml_blk_back_new(w.ring, order, w.npages ? w.pages : NULL, w.gref_base, w.npages,
                             w.disk_sectors, w.read_only, &w.b);
    if (order < 0 || order > ML_BLK_MAX_RING_ORDER) {
        CHECK(rc == ML_EINVAL && ents == 0);
        goto out;
    }
    CHECK(rc == ML_OK && ents == (32u << order));
    w.nr_ents = ents;
    if (w.disk && (flags & 16)) {
        /* An exactly sized map (ASan sees any mark past it); one too short
         * and a bad shift are refused. */
        w.map_shift = 9 + take8(&in) % 4;
        uint64_t bytes = w.disk_sectors * SECTOR;
        w.map_len = (size_t)((bytes + (1u << w.map_shift) - 1) >> w.map_shift);
        w.map = calloc(w.map_len ? w.map_len : 1, 1);
        w.shadow_map = calloc(w.map_len ? w.map_len : 1, 1);
        CHECK(w.map && w.shadow_map);
        if (w.map_len)
            CHECK(ml_blk_back_set_write_map(w.b, w.map, w.map_len - 1, w.map_shift) == ML_EINVAL);
        CHECK(ml_blk_back_set_write_map(w.b, w.map, w.map_len, 8) == ML_EINVAL);
        CHECK(ml_blk_back_set_write_map(w.b, w.map, w.map_len, w.map_shift) == ML_OK);
    }

    unsigned steps = 0;
    while (in.n && steps++ < 512 && !w.corrupt) {
        uint8_t op = take8(&in);
        switch (op % 11) {
        case 10: { /* the frontend writes a segment list into a pool page */
            if (!w.npages)
                break;
            uint32_t pg = take8(&in) % w.npages;
            unsigned cnt = take8(&in) % 24;
            for (unsigned i = 0; i < cnt; i++) {
                uint8_t sg[8] = {0};
                uint8_t g = take8(&in);
                uint32_t gref = (g & 0x80) ? take32(&in) : w.gref_base + (g % 8);
                memcpy(sg, &gref, 4);
                uint8_t fl = take8(&in);
                sg[4] = (fl >> 3) & 7;
                sg[5] = (fl & 0x80) ? 8 : fl & 7;
                memcpy(w.pages + (size_t)pg * PAGE + 8 * i, sg, 8);
                memcpy(w.shadow_pages + (size_t)pg * PAGE + 8 * i, sg, 8);
            }
            break;
        }
        case 0:
        case 1:
            front_request(&w, &in);
            break;
        case 2: { /* raw bytes anywhere in the slot area */
            uint32_t at = take32(&in) % (uint32_t)(ring_len - HDR);
            w.ring[HDR + at] = take8(&in);
            break;
        }
        case 3: /* req_prod anywhere */
            w.front_prod = take32(&in);
            hdr_set(w.ring, REQ_PROD, w.front_prod);
            break;
        case 4:
            hdr_set(w.ring, RSP_EVENT, take32(&in));
            break;
        case 5:
            back_serve(&w);
            break;
        case 6:
            back_step(&w, take8(&in) & 1);
            break;
        case 7:
            back_put_held(&w, &in);
            break;
        case 8: {
            uint32_t old = hdr_get(w.ring, RSP_PROD);
            uint32_t event = hdr_get(w.ring, RSP_EVENT);
            int n = ml_blk_back_push(w.b);
            CHECK(hdr_get(w.ring, RSP_PROD) == w.rsp_prod_pvt);
            CHECK(n == model_crosses(old, w.rsp_prod_pvt, event));
            break;
        }
        default: {
            long pend = model_pending(&w);
            int more = ml_blk_back_final_check(w.b);
            if (pend < 0) {
                CHECK(more == ML_ECORRUPT);
                w.corrupt = 1;
            } else if (pend > 0) {
                CHECK(more == 1);
            } else {
                CHECK(more == 0 && hdr_get(w.ring, REQ_EVENT) == w.req_cons + 1);
            }
            break;
        }
        }
    }
    ml_blk_back_free(w.b);
out:
    free(w.ring);
    free(w.pages);
    free(w.shadow_pages);
    free(w.disk);
    free(w.shadow_disk);
    free(w.map);
    free(w.shadow_map);
    return 0;
}
