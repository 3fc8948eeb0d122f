/*
 * xen_blk.c - pages and events of the blk ring over Xen (xen_blk.h).
 *
 * The frontend shares its ring and data pages with one xengntshr call and
 * binds an unbound port; the backend maps the ring pages and binds to the
 * port.  Data pages are never mapped wholesale by the backend: each
 * request's segment grants are mapped for its copy and unmapped at once,
 * so a frontend can only ever expose to us what it granted, and Xen checks
 * every ref.  The libraries come from xen_lib.c's table.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ml_errors.h"
#include "xen_blk.h"
#include "xen_lib.h"
#include "xen_provider.h"

#define XB_PAGE 4096u
#define XB_SECTOR 512u

struct ml_xen_blk {
    int is_back;
    uint32_t domid;
    xengntdev_handle *gnt;
    xenevtchn_handle *evt;
    uint32_t port;
    int port_bound;
    void *mem;
    uint32_t npages;
    uint32_t first_ref;
};

static int open_evt(struct ml_xen_blk *x)
{
    x->evt = ml_xen.evt_open(NULL, 0);
    if (!x->evt) {
        ml_xen_set_error("xenevtchn_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    int fd = ml_xen.evt_fd(x->evt);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        ml_xen_set_error("cannot make the event channel fd non-blocking: %s", strerror(errno));
        return ML_ESYS;
    }
    return ML_OK;
}

void ml_xen_blk_free(ml_xen_blk *x)
{
    if (!x)
        return;
    if (x->mem)
        (x->is_back ? ml_xen.tab_unmap : ml_xen.shr_unshare)(x->gnt, x->mem, x->npages);
    if (x->evt) {
        if (x->port_bound)
            ml_xen.evt_unbind(x->evt, x->port);
        ml_xen.evt_close(x->evt);
    }
    if (x->gnt)
        (x->is_back ? ml_xen.tab_close : ml_xen.shr_close)(x->gnt);
    free(x);
}

int ml_xen_blk_front_open(uint32_t backend_domid, int order, uint32_t data_pages,
                          ml_xen_blk **out)
{
    int rc = ml_xen_ensure_loaded();
    if (rc < 0)
        return rc;
    if (!out || order < 0 || order > ML_BLK_MAX_RING_ORDER || data_pages > (1u << 20)) {
        ml_xen_set_error("invalid arguments");
        return ML_EINVAL;
    }
    struct ml_xen_blk *x = calloc(1, sizeof *x);
    if (!x)
        return ML_ENOMEM;
    x->domid = backend_domid;
    x->npages = (1u << order) + data_pages;
    uint32_t *refs = calloc(x->npages, sizeof *refs);
    rc = ML_ESYS;
    if (!refs) {
        rc = ML_ENOMEM;
        goto fail;
    }
    x->gnt = ml_xen.shr_open(NULL, 0);
    if (!x->gnt) {
        ml_xen_set_error("xengntshr_open failed: %s", strerror(errno));
        goto fail;
    }
    if ((rc = open_evt(x)) < 0)
        goto fail;
    rc = ML_ESYS;
    int port = ml_xen.evt_bind_unbound(x->evt, backend_domid);
    if (port < 0) {
        ml_xen_set_error("xenevtchn_bind_unbound_port(%u): %s", backend_domid, strerror(errno));
        goto fail;
    }
    x->port = (uint32_t)port;
    x->port_bound = 1;
    x->mem = ml_xen.shr_share_pages(x->gnt, backend_domid, (int)x->npages, refs, 1);
    if (!x->mem) {
        ml_xen_set_error("xengntshr_share_pages(%u): %s", x->npages, strerror(errno));
        goto fail;
    }
    /* Slots name their pages as first_ref + i (ml_blk_front_submit). */
    for (uint32_t i = 1; i < x->npages; i++) {
        if (refs[i] != refs[0] + i) {
            ml_xen_set_error("grant refs are not consecutive (%u after %u)", refs[i], refs[i - 1]);
            goto fail;
        }
    }
    x->first_ref = refs[0];
    memset(x->mem, 0, XB_PAGE << order);
    free(refs);
    *out = x;
    return ML_OK;
fail:
    free(refs);
    ml_xen_blk_free(x);
    return rc;
}

int ml_xen_blk_back_open(uint32_t frontend_domid, const uint32_t *ring_refs, int order,
                         uint32_t port, ml_xen_blk **out)
{
    int rc = ml_xen_ensure_loaded();
    if (rc < 0)
        return rc;
    if (!out || !ring_refs || order < 0 || order > ML_BLK_MAX_RING_ORDER) {
        ml_xen_set_error("invalid arguments");
        return ML_EINVAL;
    }
    struct ml_xen_blk *x = calloc(1, sizeof *x);
    if (!x)
        return ML_ENOMEM;
    x->is_back = 1;
    x->domid = frontend_domid;
    rc = ML_ESYS;
    x->gnt = ml_xen.tab_open(NULL, 0);
    if (!x->gnt) {
        ml_xen_set_error("xengnttab_open failed: %s", strerror(errno));
        goto fail;
    }
    if ((rc = open_evt(x)) < 0)
        goto fail;
    rc = ML_ESYS;
    int lport = ml_xen.evt_bind_interdomain(x->evt, frontend_domid, port);
    if (lport < 0) {
        ml_xen_set_error("xenevtchn_bind_interdomain(%u, %u): %s", frontend_domid, port,
                         strerror(errno));
        goto fail;
    }
    x->port = (uint32_t)lport;
    x->port_bound = 1;
    uint32_t refs[1u << ML_BLK_MAX_RING_ORDER];
    memcpy(refs, ring_refs, sizeof(uint32_t) << order);
    x->mem = ml_xen.tab_map_domain_grant_refs(x->gnt, 1u << order, frontend_domid, refs,
                                              PROT_READ | PROT_WRITE);
    if (!x->mem) {
        ml_xen_set_error("cannot map the frontend's ring (%u pages): %s", 1u << order,
                         strerror(errno));
        goto fail;
    }
    x->npages = 1u << order;
    *out = x;
    return ML_OK;
fail:
    ml_xen_blk_free(x);
    return rc;
}

void *ml_xen_blk_memory(ml_xen_blk *x) { return x->mem; }
uint32_t ml_xen_blk_first_ref(const ml_xen_blk *x) { return x->first_ref; }
uint32_t ml_xen_blk_port(const ml_xen_blk *x) { return x->port; }
int ml_xen_blk_event_fd(const ml_xen_blk *x) { return ml_xen.evt_fd(x->evt); }

int ml_xen_blk_notify(ml_xen_blk *x)
{
    if (ml_xen.evt_notify(x->evt, x->port) < 0) {
        ml_xen_set_error("xenevtchn_notify(%u): %s", x->port, strerror(errno));
        return ML_ESYS;
    }
    return ML_OK;
}

int ml_xen_blk_ack(ml_xen_blk *x)
{
    int n = 0;
    for (;;) {
        int port = ml_xen.evt_pending(x->evt);
        if (port < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return n;
            ml_xen_set_error("xenevtchn_pending: %s", strerror(errno));
            return ML_ESYS;
        }
        if (ml_xen.evt_unmask(x->evt, (uint32_t)port) < 0) {
            ml_xen_set_error("xenevtchn_unmask: %s", strerror(errno));
            return ML_ESYS;
        }
        n++;
    }
}

int ml_xen_blk_copy(ml_xen_blk *x, const struct ml_blk_checked *c, uint8_t *buf,
                    int to_segments)
{
    uint32_t n = c->nsegs;
    if (!x->is_back || n == 0 || n > ML_BLK_MAX_SEGMENTS) {
        ml_xen_set_error("nothing to copy");
        return ML_EINVAL;
    }
    uint32_t refs[ML_BLK_MAX_SEGMENTS];
    for (uint32_t i = 0; i < n; i++)
        refs[i] = c->segs[i].gref;
    /* A READ writes into the frontend's pages; a WRITE only reads them. */
    int prot = to_segments ? PROT_READ | PROT_WRITE : PROT_READ;
    uint8_t *map = ml_xen.tab_map_domain_grant_refs(x->gnt, n, x->domid, refs, prot);
    if (!map) {
        ml_xen_set_error("cannot map the request's grants: %s", strerror(errno));
        return ML_ESYS;
    }
    uint64_t done = 0;
    for (uint32_t i = 0; i < n; i++) {
        /* segs were validated by blkring.c: first_sect <= last_sect <= 7. */
        const struct ml_blk_segment *s = &c->segs[i];
        size_t len = (size_t)(s->last_sect - s->first_sect + 1) * XB_SECTOR;
        uint8_t *page = map + (size_t)i * XB_PAGE + (size_t)s->first_sect * XB_SECTOR;
        if (done + len > c->length)
            break;
        if (to_segments)
            memcpy(page, buf + done, len);
        else
            memcpy(buf + done, page, len);
        done += len;
    }
    ml_xen.tab_unmap(x->gnt, map, n);
    return ML_OK;
}
