/*
 * vchan_fuzz.c - libFuzzer target for the vchan ring (vchan_ring.c,
 * vchan_setup.c, and the client constructor in local_grant.c) driven by a
 * hostile peer.  Protocol: docs/vchan.md, Xen 4.17 libxenvchan.h.
 *
 * Theory of operation.  The fuzz input is a control page header (indices,
 * orders, live and notify bytes, exactly as they sit in shared memory), a
 * flags byte, our private indices, initial ring contents, then a sequence
 * of operations.  Each operation is either one of our calls (read, write,
 * recv, send, peek, consume, data_ready, buffer_space, arm_read, arm_write,
 * peer_live, notify, close) or a move by the peer, who may do anything to the
 * shared page: produce or consume honestly, jump its index anywhere, scribble
 * on our index, the orders, the live and notify bytes, or the ring bytes.
 *
 * What is asserted:
 *  - memory: each ring lives in its own exactly-sized heap block (or, in
 *    "real layout" mode, at its libxenvchan offset inside a 4 KiB control
 *    page whose unused bytes are ASan-poisoned), so any access outside the
 *    control header and the rings is an ASan report;
 *  - a model of the ring: every call's result is recomputed from a snapshot
 *    of the shared page taken before the call.  A data count above the ring
 *    size or tampered orders must give ML_ECORRUPT (docs/vchan.md section 3: report, never
 *    stall), otherwise the exact byte count; bytes read are the ring's bytes;
 *    bytes written land where they belong; notify fires exactly when the peer
 *    armed the bit;
 *  - no loops: libFuzzer's -timeout catches a call that spins.
 *
 * A second mode builds the channel the way a real client does
 * (ml_local_client_new over a sealed memfd whose control page and grant refs
 * come from the input), checking that only valid orders and in-range refs
 * are accepted, then runs the same operations.
 *
 * Build: see run.sh (clang -fsanitize=fuzzer,address,undefined).
 */
#define _GNU_SOURCE
#include <assert.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ml_errors.h"
#include "provider.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#endif
#endif
#ifndef POISON
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* An assertion that survives -DNDEBUG and names the broken invariant. */
#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "vchan_fuzz: invariant failed at line %d: %s\n", __LINE__, \
                    #cond);                                                          \
            abort();                                                                 \
        }                                                                            \
    } while (0)

#define HDR 24u
#define MAX_RING (1u << ML_VCHAN_MAX_ORDER)

/* ---- input reader -------------------------------------------------------- */

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

static uint32_t take32(struct input *in)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)take8(in) << (8 * i);
    return v;
}

static uint16_t take16(struct input *in)
{
    uint16_t lo = take8(in);
    return (uint16_t)(lo | (uint16_t)take8(in) << 8);
}

/* A length: small values mostly, ring-sized and huge ones sometimes. */
static size_t take_len(struct input *in, uint32_t ring)
{
    uint8_t sel = take8(in);
    switch (sel >> 6) {
    case 0: return take8(in);
    case 1: return take16(in);
    case 2: return (size_t)ring + (size_t)(int8_t)take8(in); /* around the ring size */
    default: return take32(in);
    }
}

/* ---- the stub provider --------------------------------------------------- */

static unsigned notifies;

static int stub_notify(struct ml_vchan *v)
{
    (void)v;
    notifies++;
    return ML_OK;
}

static void stub_release(struct ml_vchan *v)
{
    (void)v; /* the harness owns the memory and frees it itself */
}

static const struct ml_provider stub_provider = {
    .notify = stub_notify,
    .release = stub_release,
};

/* ---- the world: our channel plus what the peer can see ------------------ */

struct world {
    struct ml_vchan *v;
    int content_checks; /* off when rings may alias each other (memfd mode) */
    int peer_writes_ok; /* the peer may write our read ring's bytes */
};

static uint32_t ld32(_Atomic uint32_t *p)
{
    return atomic_load_explicit(p, memory_order_relaxed);
}
static void st32(_Atomic uint32_t *p, uint32_t x)
{
    atomic_store_explicit(p, x, memory_order_relaxed);
}

static int tampered(struct ml_vchan *v)
{
    return atomic_load(&v->ctrl->left_order) != v->left_order ||
           atomic_load(&v->ctrl->right_order) != v->right_order;
}

/* What read_avail must return for the current shared state. */
static long model_avail(struct ml_vchan *v)
{
    uint32_t data = ld32(&v->read.shr->prod) - v->read.own;
    if (data > v->read.size || tampered(v))
        return ML_ECORRUPT;
    return (long)data;
}

static long model_space(struct ml_vchan *v)
{
    uint32_t used = v->write.own - ld32(&v->write.shr->cons);
    if (used > v->write.size || tampered(v))
        return ML_ECORRUPT;
    return (long)(v->write.size - used);
}

static void ring_bytes(const struct ml_ring *r, uint32_t idx, uint8_t *dst, size_t n)
{
    /* Deliberately not the library's split copy: byte by byte for small
     * n, two memcpys bounded by an explicit size check otherwise. */
    size_t off = idx & r->mask;
    CHECK(n <= r->size);
    size_t first = r->size - off < n ? r->size - off : n;
    memcpy(dst, r->buf + off, first);
    for (size_t i = first; i < n; i++)
        dst[i] = r->buf[i - first];
}

/* A caller's buffer for a call of length `n` on a ring of `ring` bytes:
 * exactly min(n, ring) bytes, since no call may move more than that, so
 * an over-long copy is an ASan report.  Filled with a position pattern. */
static uint8_t *exact_buf(size_t n, uint32_t ring)
{
    size_t len = n < ring ? n : ring;
    uint8_t *b = malloc(len ? len : 1);
    CHECK(b);
    for (size_t i = 0; i < len && i < 64; i++)
        b[i] = (uint8_t)(i * 7 + 3);
    for (size_t done = 64; done < len; done *= 2)
        memcpy(b + done, b, done < len - done ? done : len - done);
    return b;
}

static void check_read_like(struct world *w, int packet, size_t n)
{
    struct ml_vchan *v = w->v;
    long exp;
    if (packet && n > v->read.size)
        exp = ML_ETOOBIG;
    else if ((exp = model_avail(v)) > 0) {
        if (n == 0)
            exp = 0;
        else if (packet)
            exp = (size_t)exp < n ? 0 : (long)n;
        else
            exp = (size_t)exp < n ? exp : (long)n;
    }
    uint32_t own0 = v->read.own;
    uint8_t notify0 = atomic_load(ml_own_notify(v));
    unsigned calls0 = notifies;
    size_t want = exp > 0 ? (size_t)exp : 0;
    uint8_t *expect = malloc(want ? want : 1);
    CHECK(expect);
    ring_bytes(&v->read, own0, expect, want);

    uint8_t *buf = exact_buf(n, v->read.size);
    long got = packet ? ml_vchan_recv(v, buf, n) : ml_vchan_read(v, buf, n);
    CHECK(got == exp);
    if (got > 0) {
        if (w->content_checks)
            CHECK(memcmp(buf, expect, (size_t)got) == 0);
        CHECK(v->read.own == own0 + (uint32_t)got);
        if (w->content_checks)
            CHECK(ld32(&v->read.shr->cons) == v->read.own);
        CHECK(notifies == calls0 + ((notify0 & ML_VCHAN_NOTIFY_READ) ? 1u : 0u));
        if (w->content_checks)
            CHECK(!(atomic_load(ml_own_notify(v)) & ML_VCHAN_NOTIFY_READ));
    } else {
        CHECK(v->read.own == own0);
        CHECK(notifies == calls0);
    }
    free(buf);
    free(expect);
}

static void check_write_like(struct world *w, int packet, size_t n)
{
    struct ml_vchan *v = w->v;
    long exp;
    if (v->closed)
        exp = ML_ECLOSED;
    else if (packet && n > v->write.size)
        exp = ML_ETOOBIG;
    else if ((exp = model_space(v)) > 0) {
        if (n == 0)
            exp = 0;
        else if (packet)
            exp = (size_t)exp < n ? 0 : (long)n;
        else
            exp = (size_t)exp < n ? exp : (long)n;
    }
    uint32_t own0 = v->write.own;
    uint8_t notify0 = atomic_load(ml_own_notify(v));
    unsigned calls0 = notifies;

    uint8_t *buf = exact_buf(n, v->write.size);
    long got = packet ? ml_vchan_send(v, buf, n) : ml_vchan_write(v, buf, n);
    CHECK(got == exp);
    if (got > 0) {
        CHECK(v->write.own == own0 + (uint32_t)got);
        if (w->content_checks) {
            uint8_t *now = malloc((size_t)got);
            CHECK(now);
            ring_bytes(&v->write, own0, now, (size_t)got);
            CHECK(memcmp(now, buf, (size_t)got) == 0);
            free(now);
            CHECK(ld32(&v->write.shr->prod) == v->write.own);
            CHECK(!(atomic_load(ml_own_notify(v)) & ML_VCHAN_NOTIFY_WRITE));
        }
        if (w->content_checks) /* a write ring aliasing the control page moves the bits */
            CHECK(notifies == calls0 + ((notify0 & ML_VCHAN_NOTIFY_WRITE) ? 1u : 0u));
    } else {
        CHECK(v->write.own == own0);
        CHECK(notifies == calls0);
    }
    free(buf);
}

static void check_peek_consume(struct world *w, struct input *in)
{
    struct ml_vchan *v = w->v;
    long exp = model_avail(v);
    size_t off = (size_t)-1;
    long got = ml_vchan_peek(v, &off);
    if (exp < 0) {
        CHECK(got == exp);
        return;
    }
    CHECK(got >= 0 && got <= exp);
    CHECK(off == (v->read.own & v->read.mask));
    CHECK(off + (size_t)got <= v->read.size);
    CHECK(exp == 0 || got > 0);
    /* Copy out what peek promised, straight from the read base, as the
     * Python receive-into path does: ASan checks the promise. */
    const uint8_t *base = ml_vchan_read_base(v);
    uint8_t *copy = malloc(got ? (size_t)got : 1);
    CHECK(copy);
    memcpy(copy, base + off, (size_t)got);
    free(copy);
    /* Then consume some amount, possibly more than is there. */
    size_t n = (take8(in) & 1) ? (size_t)got : take_len(in, v->read.size);
    long cexp = model_avail(v);
    if (cexp >= 0)
        cexp = n > (size_t)cexp ? ML_EINVAL : (long)n;
    uint32_t own0 = v->read.own;
    long c = ml_vchan_consume(v, n);
    CHECK(c == cexp);
    if (c >= 0)
        CHECK(v->read.own == own0 + (uint32_t)n);
    else
        CHECK(v->read.own == own0);
}

/* ---- one run ------------------------------------------------------------- */

static void run_ops(struct world *w, struct input *in)
{
    struct ml_vchan *v = w->v;
    struct ml_vchan_interface *c = v->ctrl;
    unsigned steps = 0;
    while (in->n && steps++ < 256) {
        uint8_t op = take8(in);
        switch (op % 22) {
        case 0: check_read_like(w, 0, take_len(in, v->read.size)); break;
        case 1: check_write_like(w, 0, take_len(in, v->write.size)); break;
        case 2: check_read_like(w, 1, take_len(in, v->read.size)); break;
        case 3: check_write_like(w, 1, take_len(in, v->write.size)); break;
        case 4: CHECK(ml_vchan_data_ready(v) == model_avail(v)); break;
        case 5: CHECK(ml_vchan_buffer_space(v) == model_space(v)); break;
        case 6: {
            long exp = model_avail(v);
            uint8_t before = atomic_load(ml_peer_notify(v));
            long got = ml_vchan_arm_read(v);
            CHECK(got == exp);
            uint8_t after = atomic_load(ml_peer_notify(v));
            if (exp == 0)
                CHECK(after == (before | ML_VCHAN_NOTIFY_WRITE));
            else
                CHECK(after == before);
            break;
        }
        case 7: {
            long exp = model_space(v);
            uint8_t before = atomic_load(ml_peer_notify(v));
            CHECK(ml_vchan_arm_write(v) == exp);
            CHECK(atomic_load(ml_peer_notify(v)) == (before | ML_VCHAN_NOTIFY_READ));
            break;
        }
        case 8: check_peek_consume(w, in); break;
        case 9: {
            uint8_t live = atomic_load(ml_peer_live(v));
            int got = ml_vchan_peer_live(v);
            CHECK(got == (live > ML_LIVE_WAITING ? ML_ECORRUPT : live));
            break;
        }
        case 10: {
            int was = v->closed;
            unsigned calls0 = notifies;
            CHECK(ml_vchan_close(v) == ML_OK);
            CHECK(v->closed);
            CHECK(notifies == calls0 + (was ? 0u : 1u));
            if (!was)
                CHECK(atomic_load(ml_own_live(v)) == ML_LIVE_EXITED);
            break;
        }
        case 11: {
            unsigned calls0 = notifies;
            CHECK(ml_vchan_notify(v) == ML_OK && notifies == calls0 + 1);
            break;
        }
        /* ---- the peer's moves ---- */
        case 12: st32(&v->read.shr->prod, take32(in)); break;      /* jump prod anywhere */
        case 13: st32(&v->write.shr->cons, take32(in)); break;     /* jump cons anywhere */
        case 14: {                                                 /* honest produce */
            uint32_t prod = ld32(&v->read.shr->prod);
            uint32_t data = prod - v->read.own;
            uint32_t room = data <= v->read.size ? v->read.size - data : 0;
            uint32_t k = (uint32_t)take_len(in, v->read.size);
            if (k > room)
                k = room;
            uint8_t seed = take8(in);
            if (w->peer_writes_ok)
                for (uint32_t i = 0; i < k; i++)
                    v->read.buf[(prod + i) & v->read.mask] = (uint8_t)(seed + i);
            st32(&v->read.shr->prod, prod + k);
            break;
        }
        case 15: {                                                 /* honest consume */
            uint32_t cons = ld32(&v->write.shr->cons);
            uint32_t used = v->write.own - cons;
            uint32_t k = (uint32_t)take_len(in, v->write.size);
            if (used <= v->write.size && k > used)
                k = used;
            st32(&v->write.shr->cons, cons + k);
            break;
        }
        case 16: /* scribble on our indices: we must never load them back */
            st32(&v->read.shr->cons, take32(in));
            st32(&v->write.shr->prod, take32(in));
            break;
        case 17: atomic_store(&c->cli_notify, take8(in)); atomic_store(&c->srv_notify, take8(in)); break;
        case 18: atomic_store(&c->cli_live, take8(in)); atomic_store(&c->srv_live, take8(in)); break;
        case 19: /* tamper with the orders, or put them back */
            if (take8(in) & 1) {
                atomic_store(&c->left_order, take16(in));
                atomic_store(&c->right_order, take16(in));
            } else {
                atomic_store(&c->left_order, v->left_order);
                atomic_store(&c->right_order, v->right_order);
            }
            break;
        case 20: { /* the peer scribbles on its own ring's bytes */
            if (!w->peer_writes_ok)
                break;
            uint32_t at = take32(in);
            v->read.buf[at & v->read.mask] = take8(in);
            break;
        }
        default: { /* several calls in a row, as trio's loops make them */
            long a = ml_vchan_data_ready(v);
            CHECK(a == model_avail(v));
            long s = ml_vchan_buffer_space(v);
            CHECK(s == model_space(v));
            CHECK(a <= (long)v->read.size && s <= (long)v->write.size);
            break;
        }
        }
    }
}

/*
 * libxenvchan's rules, restated independently: orders 10..20; one ring per
 * in-page slot; grants[] must end before the lowest in-page ring (or the
 * end of the page).
 */
static int model_orders_valid(unsigned lo, unsigned ro)
{
    if (lo < 10 || lo > 20 || ro < 10 || ro > 20 || (lo == ro && lo < 12))
        return 0;
    unsigned pages = (lo >= 12 ? 1u << (lo - 12) : 0) + (ro >= 12 ? 1u << (ro - 12) : 0);
    unsigned limit = (lo == 10 || ro == 10) ? 1024 : (lo == 11 || ro == 11) ? 2048 : 4096;
    return HDR + 4 * pages <= limit;
}

/* Channel over exactly-sized heap blocks (or the real in-page layout). */
static void run_heap(struct input *in, const uint8_t hdr[HDR], uint8_t flags)
{
    int is_server = flags & 1;
    int real_layout = flags & 2;
    uint16_t lo = (uint16_t)(hdr[16] | hdr[17] << 8);
    uint16_t ro = (uint16_t)(hdr[18] | hdr[19] << 8);
    CHECK(ml_vchan_orders_valid(lo, ro) == model_orders_valid(lo, ro));
    if (!ml_vchan_orders_valid(lo, ro))
        return;
    size_t ngrants = ml_vchan_ring_pages(lo) + ml_vchan_ring_pages(ro);

    /* Exercise the layout helper over the same page as a server would. */
    uint8_t *page = malloc(ML_PAGE_SIZE);
    CHECK(page);
    uint32_t grants[(ML_PAGE_SIZE - HDR) / 4];
    for (size_t i = 0; i < ngrants; i++)
        grants[i] = (uint32_t)(i + 1);
    CHECK(ml_vchan_ctrl_init(page, lo, ro, grants, ngrants) == ML_OK);
    CHECK(ml_vchan_ctrl_init(page, lo, ro, grants, ngrants + 1) == ML_EINVAL);
    /* Now the peer's version of the header replaces it. */
    memcpy(page, hdr, HDR);
    struct ml_vchan_interface *ctrl = (struct ml_vchan_interface *)page;

    struct ml_vchan *v = calloc(1, sizeof *v);
    CHECK(v);
    v->ctrl = ctrl;
    v->is_server = is_server;
    v->left_order = lo;
    v->right_order = ro;
    v->provider = &stub_provider;
    v->memfd = -1;
    v->peer_evfd = -1;

    uint8_t *lbuf, *rbuf, *lheap = NULL, *rheap = NULL;
    uint32_t lsize = 1u << lo, rsize = 1u << ro;
    if (real_layout && lo < 12)
        lbuf = page + ml_vchan_inpage_offset(lo);
    else
        lbuf = lheap = malloc(lsize);
    if (real_layout && ro < 12)
        rbuf = page + ml_vchan_inpage_offset(ro);
    else
        rbuf = rheap = malloc(rsize);
    CHECK(lbuf && rbuf);
    /* Ring contents from the input (repeated), then poison every byte of
     * the control page that is neither header nor an in-page ring: the
     * ring code has no business there (grants are read at setup only). */
    uint8_t fill = take8(in);
    memset(lheap ? lheap : lbuf, fill, lsize);
    memset(rheap ? rheap : rbuf, (uint8_t)~fill, rsize);
    POISON(page + HDR, ML_PAGE_SIZE - HDR);
    if (!lheap)
        UNPOISON(lbuf, lsize);
    if (!rheap)
        UNPOISON(rbuf, rsize);

    /* The server reads left and writes right; the client the reverse. */
    if (is_server) {
        ml_ring_setup(&v->read, &ctrl->left, lbuf, lo);
        ml_ring_setup(&v->write, &ctrl->right, rbuf, ro);
    } else {
        ml_ring_setup(&v->read, &ctrl->right, rbuf, ro);
        ml_ring_setup(&v->write, &ctrl->left, lbuf, lo);
    }
    CHECK(v->read.size == (is_server ? lsize : rsize));
    /* Our private indices: a channel attached mid-stream. */
    v->read.own = take32(in);
    v->write.own = take32(in);

    struct world w = {.v = v, .content_checks = 1, .peer_writes_ok = 1};
    run_ops(&w, in);

    ml_vchan_free(v); /* stub release: frees only v */
    UNPOISON(page, ML_PAGE_SIZE);
    free(lheap);
    free(rheap);
    free(page);
}

/* The real client constructor over a memfd the hostile server made. */
static void run_memfd(struct input *in, const uint8_t hdr[HDR])
{
    static int evfd = -1;
    if (evfd < 0) {
        evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        CHECK(evfd >= 0);
    }
    uint8_t npages = (uint8_t)(1 + take8(in) % 8);
    uint8_t ngr = take8(in);
    int fd = memfd_create("vchan-fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)npages * ML_PAGE_SIZE) == 0);
    uint8_t *srv = mmap(NULL, (size_t)npages * ML_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
                        fd, 0);
    CHECK(srv != MAP_FAILED);
    memcpy(srv, hdr, HDR);
    uint32_t refs[256];
    for (unsigned i = 0; i < ngr; i++) {
        /* Mostly small refs (valid), sometimes anything. */
        uint8_t b = take8(in);
        refs[i] = (b & 0x80) ? take32(in) : (uint32_t)(b % 8);
        memcpy(srv + HDR + 4 * i, &refs[i], 4);
    }
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) == 0);

    uint16_t lo = (uint16_t)(hdr[16] | hdr[17] << 8);
    uint16_t ro = (uint16_t)(hdr[18] | hdr[19] << 8);
    int valid = ml_vchan_orders_valid(lo, ro);
    size_t pl = valid ? ml_vchan_ring_pages(lo) : 0, pr = valid ? ml_vchan_ring_pages(ro) : 0;
    int refs_ok = valid;
    for (size_t i = 0; valid && i < pl + pr; i++) {
        uint32_t r = i < ngr ? refs[i] : 0; /* unset grants read as 0 */
        if (r >= npages)
            refs_ok = 0;
    }

    /* Drain the eventfd so a signal from this run is seen. */
    uint64_t cnt;
    while (read(evfd, &cnt, sizeof cnt) > 0) {
    }
    struct ml_vchan *v = NULL;
    int rc = ml_local_client_new(fd, 0, -1, evfd, &v);
    if (!valid || !refs_ok) {
        CHECK(rc == ML_ECORRUPT && v == NULL);
    } else {
        CHECK(rc == ML_OK && v);
        CHECK(v->left_order == lo && v->right_order == ro);
        CHECK(atomic_load(&v->ctrl->cli_live) == ML_LIVE_CONNECTED);
        CHECK(read(evfd, &cnt, sizeof cnt) == sizeof cnt && cnt >= 1);
        CHECK(v->read.size == (1u << ro) && v->write.size == (1u << lo));
        /* Ring ops over the real mappings.  The server may alias pages
         * (a ring over the control page, both rings over one page), so
         * only results, not contents, are modelled; the stub provider
         * replaces eventfd signalling for the op sequence. */
        const struct ml_provider *real = v->provider;
        static struct ml_provider mixed;
        mixed.notify = stub_notify;
        mixed.release = real->release;
        v->provider = &mixed;
        struct world w = {.v = v, .content_checks = 0, .peer_writes_ok = 0};
        run_ops(&w, in);
        ml_vchan_free(v);
    }
    munmap(srv, (size_t)npages * ML_PAGE_SIZE);
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct input in = {data, size};
    uint8_t hdr[HDR];
    for (unsigned i = 0; i < HDR; i++)
        hdr[i] = take8(&in);
    uint8_t flags = take8(&in);
    if (flags & 4)
        run_memfd(&in, hdr);
    else
        run_heap(&in, hdr, flags);
    return 0;
}
