/*
 * local_grant.c - the local grant provider: shared pages are the pages of one
 * memfd and a grant reference is a page index into it (docs/vchan.md section 8,
 * "Local provider").  Also the local constructors of server and client
 * channels, which combine these pages with the eventfd provider.
 *
 * Safety against a hostile server: the client only maps a memfd that is
 * sealed against shrinking (otherwise the server could truncate it and turn
 * every ring access into SIGBUS), checks every grant ref against the memfd's
 * size, maps each ring into its own reserved address range (so a ring can
 * never reach past its own pages, whatever refs the server lists), and maps
 * its read ring read-only.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "grant.h"
#include "ml_errors.h"
#include "provider.h"

#define MAX_GRANTS ((ML_PAGE_SIZE - 24u) / 4u)

/* Most pages one ml_local_pages_* region may hold: far above the blk ring's
 * largest need (16 ring pages + 512 slots * 257 pages) and small enough that
 * every byte size below fits a 32-bit size_t and off_t. */
#define MAX_REGION_PAGES (1u << 18)

/*
 * A fresh memfd of `npages` zeroed pages, sealed so that neither side can
 * pull pages out from under the other.  Returns the fd, or -1 (errno kept).
 */
static int sealed_memfd(const char *name, size_t npages)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, (off_t)(npages * ML_PAGE_SIZE)) < 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/*
 * Check a peer's memfd before mapping any of it: a whole number of pages,
 * sealed against shrinking (an unsealed one could be truncated under us and
 * turn every access into SIGBUS).  The size is read once; *fd_pages is the
 * only copy used afterwards.
 */
static int check_peer_memfd(int memfd, size_t *fd_pages)
{
    struct stat st;
    if (fstat(memfd, &st) < 0)
        return ML_ESYS;
    if (st.st_size <= 0 || st.st_size % ML_PAGE_SIZE)
        return ML_ECORRUPT;
    int seals = fcntl(memfd, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK))
        return ML_ECORRUPT;
    *fd_pages = (size_t)st.st_size / ML_PAGE_SIZE;
    return ML_OK;
}

static void local_release(struct ml_vchan *v)
{
    if (v->map_base)
        munmap(v->map_base, v->map_len);
    if (v->read_map)
        munmap(v->read_map, v->read_map_len);
    if (v->write_map)
        munmap(v->write_map, v->write_map_len);
    if (v->memfd >= 0)
        close(v->memfd);
}

static const struct ml_provider local_provider = {
    .notify = ml_local_event_notify,
    .release = local_release,
};

static struct ml_vchan *vchan_alloc(int peer_evfd)
{
    struct ml_vchan *v = calloc(1, sizeof *v);
    if (!v)
        return NULL;
    v->memfd = -1;
    v->peer_evfd = peer_evfd;
    v->provider = &local_provider;
    return v;
}

/*
 * Map `n` grant refs of `fd` (which holds `fd_pages` pages) into one fresh,
 * contiguous address range.  Consecutive refs are mapped with one mmap.
 */
static int map_refs(int fd, size_t fd_pages, const uint32_t *refs, size_t n, int prot,
                    void **out)
{
    for (size_t i = 0; i < n; i++)
        if (refs[i] >= fd_pages)
            return ML_ECORRUPT;
    size_t len = n * ML_PAGE_SIZE;
    uint8_t *base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return ML_ESYS;
    size_t i = 0;
    while (i < n) {
        size_t run = 1;
        while (i + run < n && refs[i + run] == refs[i] + run)
            run++;
        void *p = mmap(base + i * ML_PAGE_SIZE, run * ML_PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED,
                       fd, (off_t)refs[i] * ML_PAGE_SIZE);
        if (p == MAP_FAILED) {
            int saved = errno;
            munmap(base, len);
            errno = saved;
            return ML_ESYS;
        }
        i += run;
    }
    *out = base;
    return ML_OK;
}

/* Where a ring's bytes are: inside the control page for orders 10 and 11,
 * else at `pages`. */
static uint8_t *ring_buf(struct ml_vchan *v, int order, uint8_t *pages)
{
    size_t inpage = ml_vchan_inpage_offset(order);
    return inpage ? (uint8_t *)v->ctrl + inpage : pages;
}

int ml_local_server_new(int left_order, int right_order, int own_evfd, int peer_evfd,
                        ml_vchan **out)
{
    (void)own_evfd; /* trio waits on it; the ring never touches it */
    if (!ml_vchan_orders_valid(left_order, right_order) || !out)
        return ML_EINVAL;
    size_t pl = ml_vchan_ring_pages(left_order);
    size_t pr = ml_vchan_ring_pages(right_order);
    size_t npages = 1 + pl + pr;
    int rc = ML_ESYS;

    struct ml_vchan *v = vchan_alloc(peer_evfd);
    if (!v)
        return ML_ENOMEM;
    v->is_server = 1;

    v->memfd = sealed_memfd("meshlink-vchan", npages);
    if (v->memfd < 0)
        goto fail;
    v->map_len = npages * ML_PAGE_SIZE;
    v->map_base = mmap(NULL, v->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, v->memfd, 0);
    if (v->map_base == MAP_FAILED) {
        v->map_base = NULL;
        goto fail;
    }
    v->ctrl = v->map_base;

    uint32_t grants[MAX_GRANTS];
    for (size_t i = 0; i < pl + pr; i++)
        grants[i] = (uint32_t)(1 + i);
    rc = ml_vchan_ctrl_init(v->ctrl, left_order, right_order, grants, pl + pr);
    if (rc < 0)
        goto fail;
    v->left_order = (uint16_t)left_order;
    v->right_order = (uint16_t)right_order;

    uint8_t *pages = (uint8_t *)v->map_base + ML_PAGE_SIZE;
    /* The server reads the left ring and writes the right one. */
    ml_ring_setup(&v->read, &v->ctrl->left, ring_buf(v, left_order, pages), left_order);
    ml_ring_setup(&v->write, &v->ctrl->right,
                  ring_buf(v, right_order, pages + pl * ML_PAGE_SIZE), right_order);
    *out = v;
    return ML_OK;

fail:
    ml_vchan_free(v);
    return rc;
}

int ml_local_memfd(const ml_vchan *v)
{
    return v->memfd;
}

int ml_local_client_new(int memfd, uint32_t ctrl_ref, int own_evfd, int peer_evfd,
                        ml_vchan **out)
{
    (void)own_evfd;
    if (!out)
        return ML_EINVAL;
    size_t fd_pages;
    int checked = check_peer_memfd(memfd, &fd_pages);
    if (checked < 0)
        return checked;

    struct ml_vchan *v = vchan_alloc(peer_evfd);
    if (!v)
        return ML_ENOMEM;
    int rc = map_refs(memfd, fd_pages, &ctrl_ref, 1, PROT_READ | PROT_WRITE, &v->map_base);
    if (rc < 0)
        goto fail;
    v->map_len = ML_PAGE_SIZE;
    v->ctrl = v->map_base;

    /* Read the orders once, validate, and from here on use only the copies. */
    int lo = atomic_load_explicit(&v->ctrl->left_order, memory_order_acquire);
    int ro = atomic_load_explicit(&v->ctrl->right_order, memory_order_acquire);
    rc = ML_ECORRUPT;
    if (!ml_vchan_orders_valid(lo, ro))
        goto fail;
    v->left_order = (uint16_t)lo;
    v->right_order = (uint16_t)ro;
    size_t pl = ml_vchan_ring_pages(lo);
    size_t pr = ml_vchan_ring_pages(ro);
    uint32_t grants[MAX_GRANTS];
    for (size_t i = 0; i < pl + pr; i++)
        grants[i] = atomic_load_explicit(&v->ctrl->grants[i], memory_order_relaxed);

    uint8_t *left_pages = NULL, *right_pages = NULL;
    if (pl) {
        /* The client writes the left ring. */
        rc = map_refs(memfd, fd_pages, grants, pl, PROT_READ | PROT_WRITE, &v->write_map);
        if (rc < 0)
            goto fail;
        v->write_map_len = pl * ML_PAGE_SIZE;
        left_pages = v->write_map;
    }
    if (pr) {
        /* ...and only reads the right one: map it read-only. */
        rc = map_refs(memfd, fd_pages, grants + pl, pr, PROT_READ, &v->read_map);
        if (rc < 0)
            goto fail;
        v->read_map_len = pr * ML_PAGE_SIZE;
        right_pages = v->read_map;
    }
    ml_ring_setup(&v->write, &v->ctrl->left, ring_buf(v, lo, left_pages), lo);
    ml_ring_setup(&v->read, &v->ctrl->right, ring_buf(v, ro, right_pages), ro);
    /* Start from wherever the indices are (zero on a fresh channel); each
     * is read once, and only the peer's one will ever be read again. */
    v->write.own = atomic_load_explicit(&v->ctrl->left.prod, memory_order_relaxed);
    v->read.own = atomic_load_explicit(&v->ctrl->right.cons, memory_order_relaxed);

    /* Announce ourselves /then/ ask for the server's first write, then
     * signal so a server sleeping on "client not yet connected" wakes. */
    atomic_store_explicit(&v->ctrl->cli_live, ML_LIVE_CONNECTED, memory_order_seq_cst);
    atomic_fetch_or_explicit(&v->ctrl->srv_notify, ML_VCHAN_NOTIFY_WRITE, memory_order_seq_cst);
    rc = ml_local_event_notify(v);
    if (rc < 0)
        goto fail;
    *out = v;
    return ML_OK;

fail:
    ml_vchan_free(v);
    return rc;
}

/* --- page regions for other rings (grant.h) ------------------------------ */

struct ml_grant_pages {
    uint8_t *base;
    size_t len;
    int memfd; /* sharing side until dropped; -1 otherwise */
};

int ml_local_pages_share(uint32_t npages, ml_grant_pages **out)
{
    if (!out || npages == 0 || npages > MAX_REGION_PAGES)
        return ML_EINVAL;
    struct ml_grant_pages *p = calloc(1, sizeof *p);
    if (!p)
        return ML_ENOMEM;
    p->len = (size_t)npages * ML_PAGE_SIZE;
    p->memfd = sealed_memfd("meshlink-blk", npages);
    if (p->memfd < 0)
        goto fail;
    void *base = mmap(NULL, p->len, PROT_READ | PROT_WRITE, MAP_SHARED, p->memfd, 0);
    if (base == MAP_FAILED)
        goto fail;
    p->base = base;
    *out = p;
    return ML_OK;

fail:
    ml_grant_pages_free(p);
    return ML_ESYS;
}

int ml_local_pages_map(int memfd, uint32_t npages, ml_grant_pages **out)
{
    if (!out || npages == 0 || npages > MAX_REGION_PAGES)
        return ML_EINVAL;
    size_t fd_pages;
    int rc = check_peer_memfd(memfd, &fd_pages);
    if (rc < 0)
        return rc;
    /* Exactly the announced size: the ring layout the peer described (ring
     * pages, then data pages) must be what the memfd holds, no more, no less. */
    if (fd_pages != npages)
        return ML_ECORRUPT;
    struct ml_grant_pages *p = calloc(1, sizeof *p);
    if (!p)
        return ML_ENOMEM;
    p->memfd = -1;
    p->len = (size_t)npages * ML_PAGE_SIZE;
    void *base = mmap(NULL, p->len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (base == MAP_FAILED) {
        int saved = errno;
        free(p);
        errno = saved;
        return ML_ESYS;
    }
    p->base = base;
    *out = p;
    return ML_OK;
}

uint8_t *ml_grant_pages_base(const ml_grant_pages *p)
{
    return p->base;
}

size_t ml_grant_pages_len(const ml_grant_pages *p)
{
    return p->len;
}

int ml_grant_pages_fd(const ml_grant_pages *p)
{
    return p->memfd;
}

void ml_grant_pages_drop_fd(ml_grant_pages *p)
{
    if (p->memfd >= 0)
        close(p->memfd);
    p->memfd = -1;
}

void ml_grant_pages_free(ml_grant_pages *p)
{
    if (!p)
        return;
    int saved = errno; /* keep the errno a failed constructor reports */
    if (p->base)
        munmap(p->base, p->len);
    ml_grant_pages_drop_fd(p);
    free(p);
    errno = saved;
}
