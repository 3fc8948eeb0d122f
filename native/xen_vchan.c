/*
 * xen_vchan.c - the Xen vchan provider: ring memory from grant tables
 * (gntshr to share, gnttab to map), signals over event channels (evtchn),
 * and the rendezvous through XenStore, plugged into the ring through struct
 * ml_provider (provider.h).  The ring code itself is the same as for the
 * local provider (vchan_ring.c, vchan_setup.c); only pages and events differ.
 *
 * Protocol: Xen 4.17 tools/libs/vchan/init.c conventions, xen/io/libxenvchan.h
 * layout; docs/vchan.md section 9.  The server shares the control page
 * with unmap-notify at offsetof(srv_live), then the left ring's pages, then
 * the right ring's (refs listed in that order in grants[]), and writes
 * ring-ref and event-channel (decimal) under its XenStore path in one
 * transaction, readable by the client's domain only.  The client maps the
 * control page with unmap-notify at offsetof(cli_live), validates what it
 * read once, maps its write (left) ring read-write and its read (right)
 * ring read-only, sets cli_live = 1, arms the server's WRITE bit, signals.
 * Unmap-notify is what makes a crashed peer visible: Xen clears the dead
 * side's live byte and signals the port.
 *
 * The event channel fd is made non-blocking: trio waits for it, and
 * ml_xen_event_ack takes the pending ports and unmasks them (xenevtchn's
 * pending/unmask protocol).  Nothing here sleeps; the XenStore rendezvous is
 * round trips to xenstored, so the Python side runs setup in a thread.  The
 * libraries are reached through xen_lib.c's table.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ml_errors.h"
#include "provider.h"
#include "xen_lib.h"
#include "xen_provider.h"

struct xen_vchan {
    struct ml_vchan base; /* first: ml_vchan_free() frees the whole struct */
    xenevtchn_handle *evt;
    uint32_t port;
    int port_bound;
    xengntdev_handle *gnt; /* gntshr (server) or gnttab (client) */
    uint32_t peer_domid;
    void *ctrl_map;
    void *left_map;
    size_t left_pages;
    void *right_map;
    size_t right_pages;
    char *xs_path; /* server: removed on release */
};

static struct xen_vchan *xv(struct ml_vchan *v)
{
    return (struct xen_vchan *)v;
}

static int xen_notify(struct ml_vchan *v)
{
    struct xen_vchan *x = xv(v);
    if (ml_xen.evt_notify(x->evt, x->port) < 0) {
        ml_xen_set_error("xenevtchn_notify(%u): %s", x->port, strerror(errno));
        return ML_ESYS;
    }
    return ML_OK;
}

static void xs_remove(const char *path)
{
    struct xs_handle *xs = ml_xen.xs_open(0);
    if (xs) {
        ml_xen.xs_rm(xs, 0, path);
        ml_xen.xs_close(xs);
    }
}

/* Reverse order of setup; every step tolerates a half-built channel. */
static void xen_release(struct ml_vchan *v)
{
    struct xen_vchan *x = xv(v);
    int server = v->is_server;
    int (*unmap)(xengntdev_handle *, void *, uint32_t) =
        server ? ml_xen.shr_unshare : ml_xen.tab_unmap;
    if (x->right_map)
        unmap(x->gnt, x->right_map, (uint32_t)x->right_pages);
    if (x->left_map)
        unmap(x->gnt, x->left_map, (uint32_t)x->left_pages);
    /* Unmapping the control page fires the unmap-notify: the peer sees our
     * live byte cleared and gets a signal even if we never closed. */
    if (x->ctrl_map)
        unmap(x->gnt, x->ctrl_map, 1);
    if (x->evt) {
        if (x->port_bound)
            ml_xen.evt_unbind(x->evt, x->port);
        ml_xen.evt_close(x->evt);
    }
    if (x->gnt)
        (server ? ml_xen.shr_close : ml_xen.tab_close)(x->gnt);
    if (x->xs_path) {
        xs_remove(x->xs_path);
        free(x->xs_path);
    }
}

static const struct ml_provider xen_provider = {
    .notify = xen_notify,
    .release = xen_release,
};

static struct xen_vchan *xen_alloc(int is_server, uint32_t peer_domid)
{
    struct xen_vchan *x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->base.provider = &xen_provider;
    x->base.is_server = is_server;
    x->base.memfd = -1;
    x->base.peer_evfd = -1;
    x->peer_domid = peer_domid;
    return x;
}

static int open_event(struct xen_vchan *x)
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

static uint8_t *ring_buffer(struct ml_vchan *v, int order, void *pages)
{
    size_t inpage = ml_vchan_inpage_offset(order);
    return inpage ? (uint8_t *)v->ctrl + inpage : pages;
}

/* Publish ring-ref and event-channel in one transaction, readable by the
 * client only (owner: ourselves, default: none). */
static int publish(struct xen_vchan *x, const char *xs_path, uint32_t ring_ref)
{
    struct xs_handle *xs = ml_xen.xs_open(0);
    if (!xs) {
        ml_xen_set_error("xs_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    int rc = ML_ESYS;
    char *domid = ml_xen.xs_read(xs, 0, "domid", NULL);
    if (!domid) {
        ml_xen_set_error("cannot read our own domain id (XenStore node domid): %s",
                         strerror(errno));
        goto out;
    }
    struct xs_permissions perms[2] = {
        {(unsigned)strtoul(domid, NULL, 10), XS_PERM_NONE},
        {x->peer_domid, XS_PERM_READ},
    };
    free(domid);
    char node[512], val[16];
    for (;;) {
        uint32_t t = ml_xen.xs_transaction_start(xs);
        if (!t) {
            ml_xen_set_error("xs_transaction_start failed: %s", strerror(errno));
            goto out;
        }
        const char *keys[2] = {"ring-ref", "event-channel"};
        uint32_t vals[2] = {ring_ref, x->port};
        bool ok = true;
        for (int i = 0; i < 2 && ok; i++) {
            snprintf(node, sizeof node, "%s/%s", xs_path, keys[i]);
            snprintf(val, sizeof val, "%u", vals[i]);
            ok = ml_xen.xs_write(xs, t, node, val, (unsigned)strlen(val)) &&
                 ml_xen.xs_set_permissions(xs, t, node, perms, 2);
        }
        if (!ok) {
            ml_xen_set_error("cannot write %s: %s", node, strerror(errno));
            ml_xen.xs_transaction_end(xs, t, true);
            goto out;
        }
        if (ml_xen.xs_transaction_end(xs, t, false))
            break;
        if (errno != EAGAIN) {
            ml_xen_set_error("xs_transaction_end failed: %s", strerror(errno));
            goto out;
        }
    }
    rc = ML_OK;
out:
    ml_xen.xs_close(xs);
    return rc;
}

int ml_xen_server_new(uint32_t peer_domid, const char *xs_path, size_t read_min,
                      size_t write_min, ml_vchan **out)
{
    int rc = ml_xen_ensure_loaded();
    if (rc < 0)
        return rc;
    int lo, ro;
    if (!out || !xs_path || strlen(xs_path) > 400 ||
        ml_vchan_choose_orders(read_min, write_min, &lo, &ro) < 0) {
        ml_xen_set_error("invalid arguments");
        return ML_EINVAL;
    }
    struct xen_vchan *x = xen_alloc(1, peer_domid);
    if (!x)
        return ML_ENOMEM;
    struct ml_vchan *v = &x->base;
    rc = ML_ESYS;

    x->gnt = ml_xen.shr_open(NULL, 0);
    if (!x->gnt) {
        ml_xen_set_error("xengntshr_open failed: %s", strerror(errno));
        goto fail;
    }
    if ((rc = open_event(x)) < 0)
        goto fail;
    rc = ML_ESYS;
    int port = ml_xen.evt_bind_unbound(x->evt, peer_domid);
    if (port < 0) {
        ml_xen_set_error("xenevtchn_bind_unbound_port(%u): %s", peer_domid, strerror(errno));
        goto fail;
    }
    x->port = (uint32_t)port;
    x->port_bound = 1;
    if (ml_xen.evt_unmask(x->evt, x->port) < 0) {
        ml_xen_set_error("xenevtchn_unmask: %s", strerror(errno));
        goto fail;
    }

    uint32_t ring_ref = 0;
    x->ctrl_map =
        ml_xen.shr_share_page_notify(x->gnt, peer_domid, &ring_ref, 1,
                                     offsetof(struct ml_vchan_interface, srv_live), x->port);
    if (!x->ctrl_map) {
        ml_xen_set_error("xengntshr_share_page_notify: %s", strerror(errno));
        goto fail;
    }
    memset(x->ctrl_map, 0, ML_PAGE_SIZE);
    v->ctrl = x->ctrl_map;

    uint32_t grants[(ML_PAGE_SIZE - 24) / 4];
    x->left_pages = ml_vchan_ring_pages(lo);
    x->right_pages = ml_vchan_ring_pages(ro);
    if (x->left_pages) {
        x->left_map = ml_xen.shr_share_pages(x->gnt, peer_domid, (int)x->left_pages, grants, 1);
        if (!x->left_map) {
            ml_xen_set_error("xengntshr_share_pages(%zu): %s", x->left_pages, strerror(errno));
            goto fail;
        }
    }
    if (x->right_pages) {
        x->right_map = ml_xen.shr_share_pages(x->gnt, peer_domid, (int)x->right_pages,
                                              grants + x->left_pages, 1);
        if (!x->right_map) {
            ml_xen_set_error("xengntshr_share_pages(%zu): %s", x->right_pages, strerror(errno));
            goto fail;
        }
    }
    rc = ml_vchan_ctrl_init(v->ctrl, lo, ro, grants, x->left_pages + x->right_pages);
    if (rc < 0)
        goto fail;
    v->left_order = (uint16_t)lo;
    v->right_order = (uint16_t)ro;
    /* The server reads the left ring and writes the right one. */
    ml_ring_setup(&v->read, &v->ctrl->left, ring_buffer(v, lo, x->left_map), lo);
    ml_ring_setup(&v->write, &v->ctrl->right, ring_buffer(v, ro, x->right_map), ro);

    if ((rc = publish(x, xs_path, ring_ref)) < 0)
        goto fail;
    x->xs_path = strdup(xs_path);
    if (!x->xs_path) {
        xs_remove(xs_path);
        rc = ML_ENOMEM;
        goto fail;
    }
    *out = v;
    return ML_OK;

fail:
    ml_vchan_free(v);
    return rc;
}

/* A decimal u32 from XenStore, strictly; 0 is invalid (as for libxenvchan). */
static int read_u32(struct xs_handle *xs, const char *base, const char *key, uint32_t *out)
{
    char node[512];
    snprintf(node, sizeof node, "%s/%s", base, key);
    unsigned len = 0;
    char *s = ml_xen.xs_read(xs, 0, node, &len);
    if (!s) {
        ml_xen_set_error("cannot read %s: %s", node, strerror(errno));
        return ML_ESYS;
    }
    char *end;
    errno = 0;
    unsigned long val = strtoul(s, &end, 10);
    int bad = errno || end == s || *end || val == 0 || val > UINT32_MAX;
    free(s);
    if (bad) {
        ml_xen_set_error("%s is not a valid non-zero number", node);
        return ML_ECORRUPT;
    }
    *out = (uint32_t)val;
    return ML_OK;
}

int ml_xen_client_new(uint32_t server_domid, const char *xs_path, ml_vchan **out)
{
    int rc = ml_xen_ensure_loaded();
    if (rc < 0)
        return rc;
    if (!out || !xs_path || strlen(xs_path) > 400) {
        ml_xen_set_error("invalid arguments");
        return ML_EINVAL;
    }
    uint32_t ring_ref, remote_port;
    struct xs_handle *xs = ml_xen.xs_open(0);
    if (!xs) {
        ml_xen_set_error("xs_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    rc = read_u32(xs, xs_path, "ring-ref", &ring_ref);
    if (rc == ML_OK)
        rc = read_u32(xs, xs_path, "event-channel", &remote_port);
    ml_xen.xs_close(xs);
    if (rc < 0)
        return rc;

    struct xen_vchan *x = xen_alloc(0, server_domid);
    if (!x)
        return ML_ENOMEM;
    struct ml_vchan *v = &x->base;
    rc = ML_ESYS;
    x->gnt = ml_xen.tab_open(NULL, 0);
    if (!x->gnt) {
        ml_xen_set_error("xengnttab_open failed: %s", strerror(errno));
        goto fail;
    }
    if ((rc = open_event(x)) < 0)
        goto fail;
    rc = ML_ESYS;
    int port = ml_xen.evt_bind_interdomain(x->evt, server_domid, remote_port);
    if (port < 0) {
        ml_xen_set_error("xenevtchn_bind_interdomain(%u, %u): %s", server_domid, remote_port,
                         strerror(errno));
        goto fail;
    }
    x->port = (uint32_t)port;
    x->port_bound = 1;
    if (ml_xen.evt_unmask(x->evt, x->port) < 0) {
        ml_xen_set_error("xenevtchn_unmask: %s", strerror(errno));
        goto fail;
    }
    x->ctrl_map = ml_xen.tab_map_grant_ref_notify(x->gnt, server_domid, ring_ref,
                                                  PROT_READ | PROT_WRITE,
                                                  offsetof(struct ml_vchan_interface, cli_live),
                                                  x->port);
    if (!x->ctrl_map) {
        ml_xen_set_error("xengnttab_map_grant_ref_notify(ref %u): %s", ring_ref,
                         strerror(errno));
        goto fail;
    }
    v->ctrl = x->ctrl_map;

    /* Read the orders once, validate, and from here on use only the copies. */
    int lo = atomic_load_explicit(&v->ctrl->left_order, memory_order_acquire);
    int ro = atomic_load_explicit(&v->ctrl->right_order, memory_order_acquire);
    if (!ml_vchan_orders_valid(lo, ro)) {
        ml_xen_set_error("server's control page has invalid ring orders %d/%d", lo, ro);
        rc = ML_ECORRUPT;
        goto fail;
    }
    v->left_order = (uint16_t)lo;
    v->right_order = (uint16_t)ro;
    size_t pl = ml_vchan_ring_pages(lo), pr = ml_vchan_ring_pages(ro);
    uint32_t grants[(ML_PAGE_SIZE - 24) / 4];
    for (size_t i = 0; i < pl + pr; i++)
        grants[i] = atomic_load_explicit(&v->ctrl->grants[i], memory_order_relaxed);
    if (pl) {
        /* The client writes the left ring... */
        x->left_map = ml_xen.tab_map_domain_grant_refs(x->gnt, (uint32_t)pl, server_domid,
                                                       grants, PROT_READ | PROT_WRITE);
        if (!x->left_map) {
            ml_xen_set_error("xengnttab_map_domain_grant_refs(left, %zu): %s", pl,
                             strerror(errno));
            goto fail;
        }
        x->left_pages = pl;
    }
    if (pr) {
        /* ...and only reads the right one: map it read-only. */
        x->right_map = ml_xen.tab_map_domain_grant_refs(x->gnt, (uint32_t)pr, server_domid,
                                                        grants + pl, PROT_READ);
        if (!x->right_map) {
            ml_xen_set_error("xengnttab_map_domain_grant_refs(right, %zu): %s", pr,
                             strerror(errno));
            goto fail;
        }
        x->right_pages = pr;
    }
    ml_ring_setup(&v->write, &v->ctrl->left, ring_buffer(v, lo, x->left_map), lo);
    ml_ring_setup(&v->read, &v->ctrl->right, ring_buffer(v, ro, x->right_map), ro);
    v->write.own = atomic_load_explicit(&v->ctrl->left.prod, memory_order_relaxed);
    v->read.own = atomic_load_explicit(&v->ctrl->right.cons, memory_order_relaxed);

    /* Announce ourselves /then/ ask for the server's first write, then
     * signal so a server waiting for "client connected" wakes. */
    atomic_store_explicit(&v->ctrl->cli_live, ML_LIVE_CONNECTED, memory_order_seq_cst);
    atomic_fetch_or_explicit(&v->ctrl->srv_notify, ML_VCHAN_NOTIFY_WRITE, memory_order_seq_cst);
    if ((rc = xen_notify(v)) < 0)
        goto fail;
    *out = v;
    return ML_OK;

fail:
    ml_vchan_free(v);
    return rc;
}

int ml_xen_server_unpublish(ml_vchan *v)
{
    if (v->provider != &xen_provider || !v->is_server)
        return ML_EINVAL;
    struct xen_vchan *x = xv(v);
    if (x->xs_path) {
        xs_remove(x->xs_path);
        free(x->xs_path);
        x->xs_path = NULL;
    }
    return ML_OK;
}

int ml_xen_event_fd(const ml_vchan *v)
{
    const struct xen_vchan *x = (const struct xen_vchan *)v;
    return v->provider == &xen_provider ? ml_xen.evt_fd(x->evt) : -1;
}

int ml_xen_event_ack(ml_vchan *v)
{
    if (v->provider != &xen_provider)
        return ML_EINVAL;
    struct xen_vchan *x = xv(v);
    int n = 0;
    for (;;) {
        int port = ml_xen.evt_pending(x->evt);
        if (port < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return n;
            ml_xen_set_error("xenevtchn_pending: %s", strerror(errno));
            return ML_ESYS;
        }
        /* Re-arm the port /then/ the caller re-checks the ring, so an event
         * raised after this point wakes the next wait. */
        if (ml_xen.evt_unmask(x->evt, (uint32_t)port) < 0) {
            ml_xen_set_error("xenevtchn_unmask: %s", strerror(errno));
            return ML_ESYS;
        }
        n++;
    }
}
