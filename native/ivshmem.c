/*
 * ivshmem.c - the ivshmem provider (ivshmem.h; docs/vchan.md section 10).
 *
 * One mapping of the whole region per party; every channel is a slot whose
 * area holds a vchan control page and ring pages laid out exactly as for the
 * other providers, so the ring code (vchan_ring.c) runs unchanged.
 *
 * Hostile-peer rules: the header is read once into struct ml_ivshmem_region
 * and validated against the size *we* mapped, never re-read; a slot entry is
 * read once at connect and its offsets are checked to lie, page-aligned and
 * disjoint, inside that slot's own area (which lies inside our mapping), so
 * no value a peer writes later can move our accesses outside the region.
 * What a peer can still do is scribble over ring bytes and indices, which the
 * ring code reports as ML_ECORRUPT, or stop its heartbeat, which the waiter
 * reports as a lost peer.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ivshmem.h"
#include "provider.h"

/* "MLIVSHM1", little-endian. */
#define MAGIC 0x314d4853564c4c4dull
#define HEADER_PAGE 4096u
#define TABLE_OFF 128u
#define ENTRY_SIZE 128u

/* The header as it sits at offset 0 of the region. */
struct ivs_header {
    uint64_t magic;
    uint32_t version;
    uint32_t nslots;
    uint64_t region_size;
    uint64_t slot_size;
    uint64_t slots_off;
    char host_id[64];
    uint8_t pad[TABLE_OFF - 104];
};

/* One channel slot.  Words both parties write are atomic. */
struct ivs_entry {
    _Atomic uint32_t state;
    _Atomic uint32_t owner; /* server's party id */
    _Atomic uint32_t peer;  /* client's party id */
    _Atomic uint16_t left_order;
    _Atomic uint16_t right_order;
    _Atomic uint64_t ctrl_off;
    _Atomic uint64_t left_off;
    _Atomic uint64_t right_off;
    _Atomic uint32_t srv_beat;
    _Atomic uint32_t cli_beat;
    _Atomic uint32_t srv_bell; /* the server polls it; the client bumps it */
    _Atomic uint32_t cli_bell;
    char name[64];
    uint8_t pad[ENTRY_SIZE - 120];
};

_Static_assert(sizeof(struct ivs_header) == TABLE_OFF, "header layout");
_Static_assert(sizeof(struct ivs_entry) == ENTRY_SIZE, "entry layout");
_Static_assert(offsetof(struct ivs_entry, name) == 56, "entry layout");
_Static_assert(TABLE_OFF + ML_IVSHMEM_MAX_SLOTS * ENTRY_SIZE <= HEADER_PAGE, "table fits");

struct ml_ivshmem_region {
    uint8_t *base;
    size_t len; /* what we mapped: the only bound ever used */
    /* Validated private copies of the header. */
    uint32_t nslots;
    uint64_t slot_size;
    uint64_t slots_off;
    char host_id[ML_IVSHMEM_HOST_ID_MAX + 1];
    int refs; /* the handle plus one per live channel (one thread per process) */
};

struct ivs_vchan {
    struct ml_vchan base;
    struct ml_ivshmem_region *region;
    struct ivs_entry *entry;
    int slot;
    int peer_gone;
};

static struct ivs_entry *entry_at(const struct ml_ivshmem_region *r, uint32_t i)
{
    return (struct ivs_entry *)(r->base + TABLE_OFF + (size_t)i * ENTRY_SIZE);
}

static void region_unref(struct ml_ivshmem_region *r)
{
    if (--r->refs > 0)
        return;
    munmap(r->base, r->len);
    free(r);
}

/* A NUL-terminated, non-empty, printable string of at most `max` bytes in
 * `src[cap]`, copied once into `dst`. */
static int copy_text(char *dst, const char *src, size_t cap, size_t max)
{
    char tmp[64];
    memcpy(tmp, src, cap < sizeof tmp ? cap : sizeof tmp); /* read once */
    size_t n = 0;
    while (n < cap && n < sizeof tmp && tmp[n])
        n++;
    if (n == 0 || n > max || n == cap)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (tmp[i] < 0x21 || tmp[i] > 0x7e)
            return 0;
    memcpy(dst, tmp, n);
    dst[n] = 0;
    return 1;
}

static int name_ok(const char *name)
{
    size_t n = name ? strnlen(name, ML_IVSHMEM_NAME_MAX + 1) : 0;
    if (n == 0 || n > ML_IVSHMEM_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (name[i] < 0x21 || name[i] > 0x7e)
            return 0;
    return 1;
}

static void stamp_header(struct ml_ivshmem_region *r, const char *host_id, uint32_t nslots)
{
    memset(r->base, 0, HEADER_PAGE);
    struct ivs_header h = {0};
    h.magic = MAGIC;
    h.version = ML_IVSHMEM_VERSION;
    h.nslots = nslots;
    h.region_size = r->len;
    h.slots_off = HEADER_PAGE;
    h.slot_size = ((r->len - HEADER_PAGE) / nslots) & ~(uint64_t)(ML_PAGE_SIZE - 1);
    memcpy(h.host_id, host_id, strlen(host_id));
    memcpy(r->base, &h, sizeof h);
    atomic_thread_fence(memory_order_release);
}

/* Read the header once, validate it against our mapping, keep the copy. */
static int load_header(struct ml_ivshmem_region *r)
{
    struct ivs_header h;
    atomic_thread_fence(memory_order_acquire);
    memcpy(&h, r->base, sizeof h);
    if (h.magic != MAGIC || h.version != ML_IVSHMEM_VERSION)
        return ML_ECORRUPT;
    if (h.nslots == 0 || h.nslots > ML_IVSHMEM_MAX_SLOTS)
        return ML_ECORRUPT;
    if (h.slots_off != HEADER_PAGE || h.slot_size < ML_PAGE_SIZE ||
        h.slot_size % ML_PAGE_SIZE || h.slot_size > r->len)
        return ML_ECORRUPT;
    /* nslots <= 16 and slot_size <= len: the product cannot overflow. */
    if (h.region_size != r->len || h.slots_off + h.nslots * h.slot_size > r->len)
        return ML_ECORRUPT;
    if (!copy_text(r->host_id, h.host_id, sizeof h.host_id, ML_IVSHMEM_HOST_ID_MAX))
        return ML_ECORRUPT;
    r->nslots = h.nslots;
    r->slot_size = h.slot_size;
    r->slots_off = h.slots_off;
    return ML_OK;
}

int ml_ivshmem_open(const char *path, int create, uint64_t size, const char *host_id,
                    uint32_t nslots, ml_ivshmem_region **out)
{
    if (!path || !out)
        return ML_EINVAL;
    if (create && (!host_id || !name_ok(host_id) || strlen(host_id) > ML_IVSHMEM_HOST_ID_MAX ||
                   nslots == 0 || nslots > ML_IVSHMEM_MAX_SLOTS || size < ML_IVSHMEM_MIN_SIZE ||
                   size % ML_PAGE_SIZE || size > ((uint64_t)1 << 40) ||
                   (size - HEADER_PAGE) / nslots < ML_PAGE_SIZE))
        return ML_EINVAL;
    int fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0600);
    if (fd < 0)
        return ML_ESYS;
    int rc = ML_ESYS;
    struct stat st;
    if (create && ftruncate(fd, (off_t)size) < 0)
        goto fail_fd;
    if (fstat(fd, &st) < 0)
        goto fail_fd;
    rc = ML_ECORRUPT;
    if (st.st_size < (off_t)ML_IVSHMEM_MIN_SIZE || st.st_size % ML_PAGE_SIZE)
        goto fail_fd;
    rc = ML_ENOMEM;
    struct ml_ivshmem_region *r = calloc(1, sizeof *r);
    if (!r)
        goto fail_fd;
    r->len = (size_t)st.st_size;
    r->refs = 1;
    void *base = mmap(NULL, r->len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        int saved = errno;
        free(r);
        errno = saved;
        rc = ML_ESYS;
        goto fail_fd;
    }
    close(fd); /* the mapping keeps the pages */
    r->base = base;
    if (create)
        stamp_header(r, host_id, nslots);
    rc = load_header(r);
    if (rc < 0) {
        region_unref(r);
        return rc;
    }
    *out = r;
    return ML_OK;

fail_fd:;
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

void ml_ivshmem_close(ml_ivshmem_region *r)
{
    if (r)
        region_unref(r);
}

uint8_t *ml_ivshmem_base(const ml_ivshmem_region *r)
{
    return r->base;
}

const char *ml_ivshmem_host_id(const ml_ivshmem_region *r)
{
    return r->host_id;
}

size_t ml_ivshmem_size(const ml_ivshmem_region *r)
{
    return r->len;
}

uint32_t ml_ivshmem_nslots(const ml_ivshmem_region *r)
{
    return r->nslots;
}

size_t ml_ivshmem_max_ring(const ml_ivshmem_region *r)
{
    /* Control page plus two rings of equal power-of-two size. */
    size_t room = (size_t)(r->slot_size - ML_PAGE_SIZE) / 2;
    size_t ring = (size_t)1 << ML_VCHAN_MAX_ORDER;
    while (ring > room && ring > 1024)
        ring >>= 1;
    return ring;
}

int ml_ivshmem_slot_state(const ml_ivshmem_region *r, uint32_t i)
{
    if (i >= r->nslots)
        return ML_EINVAL;
    return (int)atomic_load_explicit(&entry_at(r, i)->state, memory_order_acquire);
}

/* --- the provider --------------------------------------------------------- */

static int ivs_notify(struct ml_vchan *v)
{
    struct ivs_vchan *x = (struct ivs_vchan *)v;
    _Atomic uint32_t *bell = v->is_server ? &x->entry->cli_bell : &x->entry->srv_bell;
    atomic_fetch_add_explicit(bell, 1, memory_order_seq_cst);
    return ML_OK;
}

/*
 * Give the slot back.  Each end moves CONNECTED to HALF and HALF to FREE, so
 * the slot is reused only once both have left (a new listener re-initialises
 * the control page); a server that never got a client frees it at once, and
 * so does an end whose peer is known dead.
 */
static void ivs_release(struct ml_vchan *v)
{
    struct ivs_vchan *x = (struct ivs_vchan *)v;
    if (!x->entry)
        goto unref;
    _Atomic uint32_t *st = &x->entry->state;
    for (int tries = 0; tries < 8; tries++) {
        uint32_t cur = atomic_load_explicit(st, memory_order_acquire);
        uint32_t next;
        if (x->peer_gone || cur == ML_IVSHMEM_HALF || cur == ML_IVSHMEM_LISTENING ||
            cur == ML_IVSHMEM_CLAIMING)
            next = ML_IVSHMEM_FREE;
        else if (cur == ML_IVSHMEM_CONNECTED)
            next = ML_IVSHMEM_HALF;
        else
            break; /* FREE or junk: nothing of ours to give back */
        if (atomic_compare_exchange_strong_explicit(st, &cur, next, memory_order_acq_rel,
                                                    memory_order_acquire))
            break;
    }
unref:
    if (x->region)
        region_unref(x->region);
}

static const struct ml_provider ivs_provider = {
    .notify = ivs_notify,
    .release = ivs_release,
};

static struct ivs_vchan *ivs_alloc(struct ml_ivshmem_region *r, int slot)
{
    struct ivs_vchan *x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->base.memfd = -1;
    x->base.peer_evfd = -1;
    x->base.provider = &ivs_provider;
    x->region = r;
    x->slot = slot;
    x->entry = entry_at(r, (uint32_t)slot);
    r->refs++;
    return x;
}

/* Bytes a ring of `order` takes outside the control page. */
static size_t ring_bytes(int order)
{
    return ml_vchan_ring_pages(order) * ML_PAGE_SIZE;
}

/*
 * Check a slot's layout: control page and out-of-page rings page-aligned,
 * inside the slot's own area and pairwise disjoint.  All arguments are
 * private copies.
 */
static int layout_ok(const struct ml_ivshmem_region *r, int slot, uint64_t ctrl, uint64_t lo_off,
                     int lo, uint64_t ro_off, int ro)
{
    uint64_t start = r->slots_off + (uint64_t)slot * r->slot_size;
    uint64_t end = start + r->slot_size;
    uint64_t off[3] = {ctrl, lo_off, ro_off};
    uint64_t len[3] = {ML_PAGE_SIZE, ring_bytes(lo), ring_bytes(ro)};
    for (int i = 0; i < 3; i++) {
        if (!len[i])
            continue;
        if (off[i] % ML_PAGE_SIZE || off[i] < start || off[i] > end || len[i] > end - off[i])
            return 0;
        for (int j = 0; j < i; j++)
            if (len[j] && off[i] < off[j] + len[j] && off[j] < off[i] + len[i])
                return 0;
    }
    return 1;
}

static uint8_t *ring_buf(struct ml_ivshmem_region *r, struct ml_vchan_interface *ctrl, int order,
                         uint64_t off)
{
    size_t inpage = ml_vchan_inpage_offset(order);
    return inpage ? (uint8_t *)ctrl + inpage : r->base + off;
}

int ml_ivshmem_listen(ml_ivshmem_region *r, const char *name, uint32_t party, int left_order,
                      int right_order, ml_vchan **out)
{
    if (!r || !out || !name_ok(name) || !ml_vchan_orders_valid(left_order, right_order))
        return ML_EINVAL;
    if (ML_PAGE_SIZE + ring_bytes(left_order) + ring_bytes(right_order) > r->slot_size)
        return ML_EINVAL;
    int slot = -1;
    for (uint32_t i = 0; i < r->nslots && slot < 0; i++) {
        uint32_t expect = ML_IVSHMEM_FREE;
        if (atomic_compare_exchange_strong_explicit(&entry_at(r, i)->state, &expect,
                                                    ML_IVSHMEM_CLAIMING, memory_order_acq_rel,
                                                    memory_order_relaxed))
            slot = (int)i;
    }
    if (slot < 0) {
        errno = ENOSPC;
        return ML_ESYS;
    }
    struct ivs_vchan *x = ivs_alloc(r, slot);
    if (!x) {
        atomic_store_explicit(&entry_at(r, (uint32_t)slot)->state, ML_IVSHMEM_FREE,
                              memory_order_release);
        return ML_ENOMEM;
    }
    struct ml_vchan *v = &x->base;
    struct ivs_entry *e = x->entry;
    v->is_server = 1;
    uint64_t start = r->slots_off + (uint64_t)slot * r->slot_size;
    uint64_t lo_off = start + ML_PAGE_SIZE;
    uint64_t ro_off = lo_off + ring_bytes(left_order);
    v->ctrl = (struct ml_vchan_interface *)(r->base + start);
    memset(r->base + start, 0, ML_PAGE_SIZE);

    /* Grant refs are page indices inside the region. */
    uint32_t grants[(ML_PAGE_SIZE - 24u) / 4u];
    size_t pl = ml_vchan_ring_pages(left_order), pr = ml_vchan_ring_pages(right_order);
    for (size_t i = 0; i < pl; i++)
        grants[i] = (uint32_t)(lo_off / ML_PAGE_SIZE + i);
    for (size_t i = 0; i < pr; i++)
        grants[pl + i] = (uint32_t)(ro_off / ML_PAGE_SIZE + i);
    int rc = ml_vchan_ctrl_init(v->ctrl, left_order, right_order, grants, pl + pr);
    if (rc < 0) {
        ml_vchan_free(v);
        return rc;
    }
    v->left_order = (uint16_t)left_order;
    v->right_order = (uint16_t)right_order;
    ml_ring_setup(&v->read, &v->ctrl->left, ring_buf(r, v->ctrl, left_order, lo_off), left_order);
    ml_ring_setup(&v->write, &v->ctrl->right, ring_buf(r, v->ctrl, right_order, ro_off),
                  right_order);

    memset(e->name, 0, sizeof e->name);
    memcpy(e->name, name, strlen(name));
    atomic_store_explicit(&e->owner, party, memory_order_relaxed);
    atomic_store_explicit(&e->peer, 0, memory_order_relaxed);
    atomic_store_explicit(&e->left_order, (uint16_t)left_order, memory_order_relaxed);
    atomic_store_explicit(&e->right_order, (uint16_t)right_order, memory_order_relaxed);
    atomic_store_explicit(&e->ctrl_off, start, memory_order_relaxed);
    atomic_store_explicit(&e->left_off, pl ? lo_off : 0, memory_order_relaxed);
    atomic_store_explicit(&e->right_off, pr ? ro_off : 0, memory_order_relaxed);
    atomic_store_explicit(&e->srv_beat, 1, memory_order_relaxed);
    atomic_store_explicit(&e->cli_beat, 0, memory_order_relaxed);
    atomic_store_explicit(&e->srv_bell, 0, memory_order_relaxed);
    atomic_store_explicit(&e->cli_bell, 0, memory_order_relaxed);
    /* Everything above /then/ the state a client looks for. */
    atomic_store_explicit(&e->state, ML_IVSHMEM_LISTENING, memory_order_release);
    *out = v;
    return ML_OK;
}

/* Does slot `e` (state LISTENING) carry `name`?  Reads the name once. */
static int slot_named(struct ivs_entry *e, const char *name)
{
    char copy[ML_IVSHMEM_NAME_MAX + 1];
    if (!copy_text(copy, e->name, sizeof e->name, ML_IVSHMEM_NAME_MAX))
        return 0;
    return strcmp(copy, name) == 0;
}

int ml_ivshmem_connect(ml_ivshmem_region *r, const char *name, uint32_t party, ml_vchan **out)
{
    if (!r || !out || !name_ok(name))
        return ML_EINVAL;
    int slot = -1;
    for (uint32_t i = 0; i < r->nslots && slot < 0; i++) {
        struct ivs_entry *e = entry_at(r, i);
        uint32_t cur = atomic_load_explicit(&e->state, memory_order_acquire);
        if (cur != ML_IVSHMEM_LISTENING || !slot_named(e, name))
            continue;
        if (atomic_compare_exchange_strong_explicit(&e->state, &cur, ML_IVSHMEM_CONNECTED,
                                                    memory_order_acq_rel, memory_order_relaxed))
            slot = (int)i;
    }
    if (slot < 0) {
        errno = ENOENT;
        return ML_ESYS;
    }
    struct ivs_vchan *x = ivs_alloc(r, slot);
    if (!x)
        return ML_ENOMEM;
    struct ml_vchan *v = &x->base;
    struct ivs_entry *e = x->entry;
    int rc = ML_ECORRUPT;

    /* Read the layout once; from here on only the copies are used. */
    int lo = atomic_load_explicit(&e->left_order, memory_order_acquire);
    int ro = atomic_load_explicit(&e->right_order, memory_order_relaxed);
    uint64_t ctrl = atomic_load_explicit(&e->ctrl_off, memory_order_relaxed);
    uint64_t lo_off = atomic_load_explicit(&e->left_off, memory_order_relaxed);
    uint64_t ro_off = atomic_load_explicit(&e->right_off, memory_order_relaxed);
    if (!ml_vchan_orders_valid(lo, ro) || !layout_ok(r, slot, ctrl, lo_off, lo, ro_off, ro))
        goto fail;
    v->ctrl = (struct ml_vchan_interface *)(r->base + ctrl);
    /* The control page must describe the same rings as the table: the ring
     * code compares its orders with our copies on every operation. */
    if (atomic_load_explicit(&v->ctrl->left_order, memory_order_acquire) != lo ||
        atomic_load_explicit(&v->ctrl->right_order, memory_order_relaxed) != ro)
        goto fail;
    v->left_order = (uint16_t)lo;
    v->right_order = (uint16_t)ro;
    ml_ring_setup(&v->write, &v->ctrl->left, ring_buf(r, v->ctrl, lo, lo_off), lo);
    ml_ring_setup(&v->read, &v->ctrl->right, ring_buf(r, v->ctrl, ro, ro_off), ro);
    v->write.own = atomic_load_explicit(&v->ctrl->left.prod, memory_order_relaxed);
    v->read.own = atomic_load_explicit(&v->ctrl->right.cons, memory_order_relaxed);

    atomic_store_explicit(&e->peer, party, memory_order_relaxed);
    atomic_store_explicit(&e->cli_beat, 1, memory_order_relaxed);
    atomic_store_explicit(&v->ctrl->cli_live, ML_LIVE_CONNECTED, memory_order_seq_cst);
    atomic_fetch_or_explicit(&v->ctrl->srv_notify, ML_VCHAN_NOTIFY_WRITE, memory_order_seq_cst);
    ivs_notify(v);
    *out = v;
    return ML_OK;

fail:
    x->peer_gone = 1; /* a slot we cannot use is not worth keeping */
    ml_vchan_free(v);
    return rc;
}

static struct ivs_vchan *as_ivs(const ml_vchan *v)
{
    return v && v->provider == &ivs_provider ? (struct ivs_vchan *)v : NULL;
}

void ml_ivshmem_beat(ml_vchan *v)
{
    struct ivs_vchan *x = as_ivs(v);
    if (x)
        atomic_fetch_add_explicit(v->is_server ? &x->entry->srv_beat : &x->entry->cli_beat, 1,
                                  memory_order_relaxed);
}

uint32_t ml_ivshmem_peer_beat(const ml_vchan *v)
{
    struct ivs_vchan *x = as_ivs(v);
    if (!x)
        return 0;
    return atomic_load_explicit(v->is_server ? &x->entry->cli_beat : &x->entry->srv_beat,
                                memory_order_relaxed);
}

uint32_t ml_ivshmem_bell(const ml_vchan *v)
{
    struct ivs_vchan *x = as_ivs(v);
    if (!x)
        return 0;
    return atomic_load_explicit(v->is_server ? &x->entry->srv_bell : &x->entry->cli_bell,
                                memory_order_acquire);
}

uint32_t ml_ivshmem_peer_party(const ml_vchan *v)
{
    struct ivs_vchan *x = as_ivs(v);
    if (!x)
        return 0;
    return atomic_load_explicit(v->is_server ? &x->entry->peer : &x->entry->owner,
                                memory_order_relaxed);
}

int ml_ivshmem_slot(const ml_vchan *v)
{
    struct ivs_vchan *x = as_ivs(v);
    return x ? x->slot : ML_EINVAL;
}

void ml_ivshmem_forget_peer(ml_vchan *v)
{
    struct ivs_vchan *x = as_ivs(v);
    if (x)
        x->peer_gone = 1;
}
