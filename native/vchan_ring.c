/*
 * vchan_ring.c - moves bytes through the two rings of a vchan.
 *
 * Protocol: Xen 4.17 xen/io/libxenvchan.h; docs/vchan.md sections 3-7.
 * Indices are free-running u32; data = prod - cons; offset = idx & (size-1).
 *
 * Hostile-peer rules followed throughout:
 *  - our own index (cons of the read ring, prod of the write ring) is kept in
 *    private memory and only stored to the shared page, never loaded back;
 *  - the peer's index is loaded exactly once per operation into a local, and
 *    a distance above the ring size is reported as ML_ECORRUPT (libxenvchan
 *    stalls there; we must report it);
 *  - ring sizes come from the validated private copy of the orders, and the
 *    shared order fields are compared against it so tampering is reported.
 *
 * Nothing here blocks: callers sleep on the event channel after arming.
 */
#include <string.h>

#include "ml_errors.h"
#include "provider.h"

/* The orders in the shared page must stay what we validated at setup. */
static int ctrl_tampered(const struct ml_vchan *v)
{
    uint16_t lo = atomic_load_explicit(&v->ctrl->left_order, memory_order_relaxed);
    uint16_t ro = atomic_load_explicit(&v->ctrl->right_order, memory_order_relaxed);
    return lo != v->left_order || ro != v->right_order;
}

/* Bytes the peer has produced and we have not consumed, or ML_ECORRUPT. */
static long read_avail(struct ml_vchan *v)
{
    struct ml_ring *r = &v->read;
    /* Load prod /then/ read the data it covers (acquire pairs with the
     * writer's release store of prod). */
    uint32_t prod = atomic_load_explicit(&r->shr->prod, memory_order_acquire);
    uint32_t data = prod - r->own;
    if (data > r->size || ctrl_tampered(v))
        return ML_ECORRUPT;
    return (long)data;
}

/* Free bytes in our write ring, or ML_ECORRUPT. */
static long write_space(struct ml_vchan *v)
{
    struct ml_ring *r = &v->write;
    /* Load the peer's cons /then/ overwrite the bytes it released (acquire
     * pairs with the reader's release store of cons after its copy-out). */
    uint32_t cons = atomic_load_explicit(&r->shr->cons, memory_order_acquire);
    uint32_t used = r->own - cons;
    if (used > r->size || ctrl_tampered(v))
        return ML_ECORRUPT;
    return (long)(r->size - used);
}

/* The only place that knows a copy may wrap around the end of the ring. */
static void copy_out(const struct ml_ring *r, uint32_t idx, uint8_t *dst, size_t n)
{
    size_t off = idx & r->mask;
    size_t first = r->size - off;
    if (first > n)
        first = n;
    memcpy(dst, r->buf + off, first);
    if (n > first)
        memcpy(dst + first, r->buf, n - first);
}

static void copy_in(struct ml_ring *r, uint32_t idx, const uint8_t *src, size_t n)
{
    size_t off = idx & r->mask;
    size_t first = r->size - off;
    if (first > n)
        first = n;
    memcpy(r->buf + off, src, first);
    if (n > first)
        memcpy(r->buf, src + first, n - first);
}

/*
 * Signal the peer if it armed `bit` in our notify byte.  Called after an
 * index update: the full fence orders "store our index" /then/ "read the
 * peer's notify request".  The peer does the mirror image (arm, fence,
 * re-read our index) in arm_*, so at least one of us sees the other:
 * either we see the armed bit and signal, or the peer sees our new index
 * and does not sleep.
 */
static int signal_if_armed(struct ml_vchan *v, uint8_t bit)
{
    atomic_thread_fence(memory_order_seq_cst);
    uint8_t prev = atomic_fetch_and_explicit(ml_own_notify(v), (uint8_t)~bit,
                                             memory_order_seq_cst);
    if (prev & bit)
        return v->provider->notify(v);
    return ML_OK;
}

static long consume(struct ml_vchan *v, uint8_t *buf, size_t n)
{
    struct ml_ring *r = &v->read;
    copy_out(r, r->own, buf, n);
    r->own += (uint32_t)n;
    /* Copy out /then/ release the space: the release store keeps our loads
     * of the data before the peer can see the new cons and overwrite. */
    atomic_store_explicit(&r->shr->cons, r->own, memory_order_release);
    int rc = signal_if_armed(v, ML_VCHAN_NOTIFY_READ);
    return rc < 0 ? rc : (long)n;
}

static long produce(struct ml_vchan *v, const uint8_t *buf, size_t n)
{
    struct ml_ring *r = &v->write;
    copy_in(r, r->own, buf, n);
    r->own += (uint32_t)n;
    /* Write data /then/ publish prod (release). */
    atomic_store_explicit(&r->shr->prod, r->own, memory_order_release);
    int rc = signal_if_armed(v, ML_VCHAN_NOTIFY_WRITE);
    return rc < 0 ? rc : (long)n;
}

long ml_vchan_data_ready(ml_vchan *v)
{
    return read_avail(v);
}

long ml_vchan_buffer_space(ml_vchan *v)
{
    return write_space(v);
}

long ml_vchan_read(ml_vchan *v, void *buf, size_t n)
{
    long avail = read_avail(v);
    if (avail <= 0 || n == 0)
        return avail < 0 ? avail : 0;
    if ((size_t)avail < n)
        n = (size_t)avail;
    return consume(v, buf, n);
}

long ml_vchan_peek(ml_vchan *v, size_t *offset)
{
    long avail = read_avail(v);
    if (avail < 0)
        return avail;
    size_t off = v->read.own & v->read.mask;
    *offset = off;
    /* Only the contiguous part: the caller copies it out in one go. */
    size_t contiguous = v->read.size - off;
    return (size_t)avail < contiguous ? avail : (long)contiguous;
}

const uint8_t *ml_vchan_read_base(const ml_vchan *v)
{
    return v->read.buf;
}

long ml_vchan_consume(ml_vchan *v, size_t n)
{
    struct ml_ring *r = &v->read;
    long avail = read_avail(v);
    if (avail < 0)
        return avail;
    if (n > (size_t)avail)
        return ML_EINVAL;
    r->own += (uint32_t)n;
    /* The caller copied the bytes out before calling us /then/ we release
     * the space (release store). */
    atomic_store_explicit(&r->shr->cons, r->own, memory_order_release);
    int rc = signal_if_armed(v, ML_VCHAN_NOTIFY_READ);
    return rc < 0 ? rc : (long)n;
}

long ml_vchan_recv(ml_vchan *v, void *buf, size_t n)
{
    if (n > v->read.size)
        return ML_ETOOBIG;
    long avail = read_avail(v);
    if (avail < 0)
        return avail;
    if (n == 0 || (size_t)avail < n)
        return 0;
    return consume(v, buf, n);
}

long ml_vchan_write(ml_vchan *v, const void *buf, size_t n)
{
    if (v->closed)
        return ML_ECLOSED;
    long space = write_space(v);
    if (space <= 0 || n == 0)
        return space < 0 ? space : 0;
    if ((size_t)space < n)
        n = (size_t)space;
    return produce(v, buf, n);
}

long ml_vchan_send(ml_vchan *v, const void *buf, size_t n)
{
    if (v->closed)
        return ML_ECLOSED;
    if (n > v->write.size)
        return ML_ETOOBIG;
    long space = write_space(v);
    if (space < 0)
        return space;
    if (n == 0 || (size_t)space < n)
        return 0;
    return produce(v, buf, n);
}

long ml_vchan_arm_read(ml_vchan *v)
{
    long avail = read_avail(v);
    /* Only arm WRITE when the ring is empty: otherwise there is work to do
     * and an armed bit would only cost the peer a needless signal. */
    if (avail != 0)
        return avail;
    atomic_fetch_or_explicit(ml_peer_notify(v), ML_VCHAN_NOTIFY_WRITE, memory_order_seq_cst);
    /* Arm /then/ re-read prod: covers a peer that wrote after our first
     * check but before it could see the armed bit. */
    atomic_thread_fence(memory_order_seq_cst);
    return read_avail(v);
}

long ml_vchan_arm_write(ml_vchan *v)
{
    atomic_fetch_or_explicit(ml_peer_notify(v), ML_VCHAN_NOTIFY_READ, memory_order_seq_cst);
    /* Arm /then/ re-read cons (same interleaving as arm_read). */
    atomic_thread_fence(memory_order_seq_cst);
    return write_space(v);
}

int ml_vchan_peer_live(ml_vchan *v)
{
    /* Acquire: a peer that wrote data and then cleared its live byte has its
     * data visible to our next read_avail. */
    uint8_t live = atomic_load_explicit(ml_peer_live(v), memory_order_acquire);
    if (live > ML_LIVE_WAITING)
        return ML_ECORRUPT;
    return live;
}

int ml_vchan_close(ml_vchan *v)
{
    if (v->closed)
        return ML_OK;
    v->closed = 1;
    /* Publish everything written so far /then/ the live byte (seq_cst store
     * orders after the release stores of prod). */
    atomic_store_explicit(ml_own_live(v), ML_LIVE_EXITED, memory_order_seq_cst);
    return v->provider->notify(v);
}

int ml_vchan_notify(ml_vchan *v)
{
    return v->provider->notify(v);
}

size_t ml_vchan_read_size(const ml_vchan *v)
{
    return v->read.size;
}

size_t ml_vchan_write_size(const ml_vchan *v)
{
    return v->write.size;
}

int ml_vchan_left_order(const ml_vchan *v)
{
    return v->left_order;
}

int ml_vchan_right_order(const ml_vchan *v)
{
    return v->right_order;
}
