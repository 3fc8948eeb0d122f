/*
 * xen_provider.c - the Xen provider: grants (gntshr to share, gnttab to
 * map), event channels (evtchn) and XenStore, plugged into the ring through
 * struct ml_provider (provider.h).
 *
 * Protocol: Xen 4.17 tools/libs/vchan/init.c conventions, xen/io/libxenvchan.h
 * layout; DESIGN.md sections 2 and 7.  The server shares the control page
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
 * Theory of operation: the three Xen libraries are dlopen'ed once (symbols
 * looked up at the version nodes libxenvchan uses: VERS_1.0, VERS_4.0), so
 * nothing links against Xen; MESHLINK_XEN_LIBDIR names another directory.  The prototypes are declared here with opaque
 * handles rather than taken from libxen-dev, which need not be installed.
 * The event channel fd is made non-blocking: trio waits for it, and
 * ml_xen_event_ack takes the pending ports and unmasks them (xenevtchn's
 * pending/unmask protocol).  Nothing here sleeps; XenStore calls are
 * round trips to xenstored, so the Python side runs setup in a thread.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "provider.h"
#include "xen_provider.h"

/* --- the few Xen prototypes we need (xenevtchn.h, xengnttab.h, xenstore.h) */

typedef struct xenevtchn_handle xenevtchn_handle;
typedef struct xengntdev_handle xengntdev_handle;
struct xs_handle;
struct xs_permissions {
    unsigned int id;
    unsigned int perms;
};

static struct {
    xenevtchn_handle *(*evt_open)(void *logger, unsigned flags);
    int (*evt_close)(xenevtchn_handle *);
    int (*evt_fd)(xenevtchn_handle *);
    int (*evt_notify)(xenevtchn_handle *, uint32_t port);
    int (*evt_bind_unbound)(xenevtchn_handle *, uint32_t domid);
    int (*evt_bind_interdomain)(xenevtchn_handle *, uint32_t domid, uint32_t port);
    int (*evt_unbind)(xenevtchn_handle *, uint32_t port);
    int (*evt_pending)(xenevtchn_handle *);
    int (*evt_unmask)(xenevtchn_handle *, uint32_t port);

    xengntdev_handle *(*shr_open)(void *logger, unsigned flags);
    int (*shr_close)(xengntdev_handle *);
    void *(*shr_share_pages)(xengntdev_handle *, uint32_t domid, int count, uint32_t *refs,
                             int writable);
    void *(*shr_share_page_notify)(xengntdev_handle *, uint32_t domid, uint32_t *ref,
                                   int writable, uint32_t notify_off, uint32_t notify_port);
    int (*shr_unshare)(xengntdev_handle *, void *addr, uint32_t count);
    xengntdev_handle *(*tab_open)(void *logger, unsigned flags);
    int (*tab_close)(xengntdev_handle *);
    void *(*tab_map_domain_grant_refs)(xengntdev_handle *, uint32_t count, uint32_t domid,
                                       uint32_t *refs, int prot);
    void *(*tab_map_grant_ref_notify)(xengntdev_handle *, uint32_t domid, uint32_t ref, int prot,
                                      uint32_t notify_off, uint32_t notify_port);
    int (*tab_unmap)(xengntdev_handle *, void *addr, uint32_t count);

    struct xs_handle *(*xs_open)(unsigned long flags);
    void (*xs_close)(struct xs_handle *);
    void *(*xs_read)(struct xs_handle *, uint32_t t, const char *path, unsigned *len);
    bool (*xs_write)(struct xs_handle *, uint32_t t, const char *path, const void *data,
                     unsigned len);
    bool (*xs_rm)(struct xs_handle *, uint32_t t, const char *path);
    char **(*xs_directory)(struct xs_handle *, uint32_t t, const char *path, unsigned *num);
    bool (*xs_set_permissions)(struct xs_handle *, uint32_t t, const char *path,
                               struct xs_permissions *perms, unsigned n);
    uint32_t (*xs_transaction_start)(struct xs_handle *);
    bool (*xs_transaction_end)(struct xs_handle *, uint32_t t, bool abort);
} X;

#define XS_PERM_NONE 0
#define XS_PERM_READ 1
#define NO_NOTIFY ((uint32_t)-1)

static _Thread_local char last_error[2048];
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[2048];
static int load_rc;

static void set_error(const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    errno = saved;
}

const char *ml_xen_error(void)
{
    return last_error;
}

struct sym {
    void **slot;
    const char *name;
};

static int load_lib(const char *soname, const char *version, const char *package,
                    const struct sym *syms, size_t n)
{
    /* MESHLINK_XEN_LIBDIR: load the libraries from that directory only
     * (a non-standard Xen install, or the tests' emulation in-process,
     * where LD_LIBRARY_PATH can no longer be changed). */
    char path[1024];
    const char *dir = getenv("MESHLINK_XEN_LIBDIR");
    if (dir && *dir)
        snprintf(path, sizeof path, "%s/%s", dir, soname);
    else
        snprintf(path, sizeof path, "%s", soname);
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        snprintf(load_error, sizeof load_error,
                 "cannot load %.900s (%.900s): install Debian package %s or run under Xen", path,
                 dlerror(), package);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        void *f = dlvsym(h, syms[i].name, version);
        if (!f)
            f = dlsym(h, syms[i].name);
        if (!f) {
            snprintf(load_error, sizeof load_error, "%s has no symbol %s@%s", soname,
                     syms[i].name, version);
            return -1; /* keep h loaded: harmless, and dlclose could race */
        }
        *syms[i].slot = f;
    }
    return 0;
}

#define SYM(field, name) {(void **)&X.field, name}

static void load_all(void)
{
    const struct sym evt[] = {
        SYM(evt_open, "xenevtchn_open"), SYM(evt_close, "xenevtchn_close"),
        SYM(evt_fd, "xenevtchn_fd"), SYM(evt_notify, "xenevtchn_notify"),
        SYM(evt_bind_unbound, "xenevtchn_bind_unbound_port"),
        SYM(evt_bind_interdomain, "xenevtchn_bind_interdomain"),
        SYM(evt_unbind, "xenevtchn_unbind"), SYM(evt_pending, "xenevtchn_pending"),
        SYM(evt_unmask, "xenevtchn_unmask"),
    };
    const struct sym gnt[] = {
        SYM(shr_open, "xengntshr_open"), SYM(shr_close, "xengntshr_close"),
        SYM(shr_share_pages, "xengntshr_share_pages"),
        SYM(shr_share_page_notify, "xengntshr_share_page_notify"),
        SYM(shr_unshare, "xengntshr_unshare"), SYM(tab_open, "xengnttab_open"),
        SYM(tab_close, "xengnttab_close"),
        SYM(tab_map_domain_grant_refs, "xengnttab_map_domain_grant_refs"),
        SYM(tab_map_grant_ref_notify, "xengnttab_map_grant_ref_notify"),
        SYM(tab_unmap, "xengnttab_unmap"),
    };
    const struct sym xs[] = {
        SYM(xs_open, "xs_open"), SYM(xs_close, "xs_close"), SYM(xs_read, "xs_read"),
        SYM(xs_write, "xs_write"), SYM(xs_rm, "xs_rm"), SYM(xs_directory, "xs_directory"),
        SYM(xs_set_permissions, "xs_set_permissions"),
        SYM(xs_transaction_start, "xs_transaction_start"),
        SYM(xs_transaction_end, "xs_transaction_end"),
    };
    if (load_lib("libxenevtchn.so.1", "VERS_1.0", "libxenevtchn1", evt,
                 sizeof evt / sizeof evt[0]) < 0 ||
        load_lib("libxengnttab.so.1", "VERS_1.0", "libxengnttab1", gnt,
                 sizeof gnt / sizeof gnt[0]) < 0 ||
        load_lib("libxenstore.so.4", "VERS_4.0", "libxenstore4", xs, sizeof xs / sizeof xs[0]) <
            0)
        load_rc = -1;
}

static int ensure_loaded(void)
{
    pthread_once(&load_once, load_all);
    if (load_rc < 0) {
        errno = ENOENT;
        set_error("%s", load_error);
        return ML_ESYS;
    }
    return ML_OK;
}

int ml_xen_probe(void)
{
    int rc = ensure_loaded();
    if (rc < 0)
        return rc;
    xenevtchn_handle *h = X.evt_open(NULL, 0);
    if (!h) {
        set_error("xenevtchn_open failed (%s): no Xen event channel device "
                  "(/dev/xen/evtchn); not running under Xen?",
                  strerror(errno));
        return ML_ESYS;
    }
    X.evt_close(h);
    return ML_OK;
}

/* --- the channel ---------------------------------------------------------- */

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
    if (X.evt_notify(x->evt, x->port) < 0) {
        set_error("xenevtchn_notify(%u): %s", x->port, strerror(errno));
        return ML_ESYS;
    }
    return ML_OK;
}

static void xs_remove(const char *path)
{
    struct xs_handle *xs = X.xs_open(0);
    if (xs) {
        X.xs_rm(xs, 0, path);
        X.xs_close(xs);
    }
}

/* Reverse order of setup; every step tolerates a half-built channel. */
static void xen_release(struct ml_vchan *v)
{
    struct xen_vchan *x = xv(v);
    int server = v->is_server;
    int (*unmap)(xengntdev_handle *, void *, uint32_t) = server ? X.shr_unshare : X.tab_unmap;
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
            X.evt_unbind(x->evt, x->port);
        X.evt_close(x->evt);
    }
    if (x->gnt)
        (server ? X.shr_close : X.tab_close)(x->gnt);
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
    x->evt = X.evt_open(NULL, 0);
    if (!x->evt) {
        set_error("xenevtchn_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    int fd = X.evt_fd(x->evt);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        set_error("cannot make the event channel fd non-blocking: %s", strerror(errno));
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
    struct xs_handle *xs = X.xs_open(0);
    if (!xs) {
        set_error("xs_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    int rc = ML_ESYS;
    char *domid = X.xs_read(xs, 0, "domid", NULL);
    if (!domid) {
        set_error("cannot read our own domain id (XenStore node domid): %s", strerror(errno));
        goto out;
    }
    struct xs_permissions perms[2] = {
        {(unsigned)strtoul(domid, NULL, 10), XS_PERM_NONE},
        {x->peer_domid, XS_PERM_READ},
    };
    free(domid);
    char node[512], val[16];
    for (;;) {
        uint32_t t = X.xs_transaction_start(xs);
        if (!t) {
            set_error("xs_transaction_start failed: %s", strerror(errno));
            goto out;
        }
        const char *keys[2] = {"ring-ref", "event-channel"};
        uint32_t vals[2] = {ring_ref, x->port};
        bool ok = true;
        for (int i = 0; i < 2 && ok; i++) {
            snprintf(node, sizeof node, "%s/%s", xs_path, keys[i]);
            snprintf(val, sizeof val, "%u", vals[i]);
            ok = X.xs_write(xs, t, node, val, (unsigned)strlen(val)) &&
                 X.xs_set_permissions(xs, t, node, perms, 2);
        }
        if (!ok) {
            set_error("cannot write %s: %s", node, strerror(errno));
            X.xs_transaction_end(xs, t, true);
            goto out;
        }
        if (X.xs_transaction_end(xs, t, false))
            break;
        if (errno != EAGAIN) {
            set_error("xs_transaction_end failed: %s", strerror(errno));
            goto out;
        }
    }
    rc = ML_OK;
out:
    X.xs_close(xs);
    return rc;
}

int ml_xen_server_new(uint32_t peer_domid, const char *xs_path, size_t read_min,
                      size_t write_min, ml_vchan **out)
{
    int rc = ensure_loaded();
    if (rc < 0)
        return rc;
    int lo, ro;
    if (!out || !xs_path || strlen(xs_path) > 400 ||
        ml_vchan_choose_orders(read_min, write_min, &lo, &ro) < 0) {
        set_error("invalid arguments");
        return ML_EINVAL;
    }
    struct xen_vchan *x = xen_alloc(1, peer_domid);
    if (!x)
        return ML_ENOMEM;
    struct ml_vchan *v = &x->base;
    rc = ML_ESYS;

    x->gnt = X.shr_open(NULL, 0);
    if (!x->gnt) {
        set_error("xengntshr_open failed: %s", strerror(errno));
        goto fail;
    }
    if ((rc = open_event(x)) < 0)
        goto fail;
    rc = ML_ESYS;
    int port = X.evt_bind_unbound(x->evt, peer_domid);
    if (port < 0) {
        set_error("xenevtchn_bind_unbound_port(%u): %s", peer_domid, strerror(errno));
        goto fail;
    }
    x->port = (uint32_t)port;
    x->port_bound = 1;
    if (X.evt_unmask(x->evt, x->port) < 0) {
        set_error("xenevtchn_unmask: %s", strerror(errno));
        goto fail;
    }

    uint32_t ring_ref = 0;
    x->ctrl_map = X.shr_share_page_notify(x->gnt, peer_domid, &ring_ref, 1,
                                          offsetof(struct ml_vchan_interface, srv_live), x->port);
    if (!x->ctrl_map) {
        set_error("xengntshr_share_page_notify: %s", strerror(errno));
        goto fail;
    }
    memset(x->ctrl_map, 0, ML_PAGE_SIZE);
    v->ctrl = x->ctrl_map;

    uint32_t grants[(ML_PAGE_SIZE - 24) / 4];
    x->left_pages = ml_vchan_ring_pages(lo);
    x->right_pages = ml_vchan_ring_pages(ro);
    if (x->left_pages) {
        x->left_map = X.shr_share_pages(x->gnt, peer_domid, (int)x->left_pages, grants, 1);
        if (!x->left_map) {
            set_error("xengntshr_share_pages(%zu): %s", x->left_pages, strerror(errno));
            goto fail;
        }
    }
    if (x->right_pages) {
        x->right_map = X.shr_share_pages(x->gnt, peer_domid, (int)x->right_pages,
                                         grants + x->left_pages, 1);
        if (!x->right_map) {
            set_error("xengntshr_share_pages(%zu): %s", x->right_pages, strerror(errno));
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
    char *s = X.xs_read(xs, 0, node, &len);
    if (!s) {
        set_error("cannot read %s: %s", node, strerror(errno));
        return ML_ESYS;
    }
    char *end;
    errno = 0;
    unsigned long val = strtoul(s, &end, 10);
    int bad = errno || end == s || *end || val == 0 || val > UINT32_MAX;
    free(s);
    if (bad) {
        set_error("%s is not a valid non-zero number", node);
        return ML_ECORRUPT;
    }
    *out = (uint32_t)val;
    return ML_OK;
}

int ml_xen_client_new(uint32_t server_domid, const char *xs_path, ml_vchan **out)
{
    int rc = ensure_loaded();
    if (rc < 0)
        return rc;
    if (!out || !xs_path || strlen(xs_path) > 400) {
        set_error("invalid arguments");
        return ML_EINVAL;
    }
    uint32_t ring_ref, remote_port;
    struct xs_handle *xs = X.xs_open(0);
    if (!xs) {
        set_error("xs_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    rc = read_u32(xs, xs_path, "ring-ref", &ring_ref);
    if (rc == ML_OK)
        rc = read_u32(xs, xs_path, "event-channel", &remote_port);
    X.xs_close(xs);
    if (rc < 0)
        return rc;

    struct xen_vchan *x = xen_alloc(0, server_domid);
    if (!x)
        return ML_ENOMEM;
    struct ml_vchan *v = &x->base;
    rc = ML_ESYS;
    x->gnt = X.tab_open(NULL, 0);
    if (!x->gnt) {
        set_error("xengnttab_open failed: %s", strerror(errno));
        goto fail;
    }
    if ((rc = open_event(x)) < 0)
        goto fail;
    rc = ML_ESYS;
    int port = X.evt_bind_interdomain(x->evt, server_domid, remote_port);
    if (port < 0) {
        set_error("xenevtchn_bind_interdomain(%u, %u): %s", server_domid, remote_port,
                  strerror(errno));
        goto fail;
    }
    x->port = (uint32_t)port;
    x->port_bound = 1;
    if (X.evt_unmask(x->evt, x->port) < 0) {
        set_error("xenevtchn_unmask: %s", strerror(errno));
        goto fail;
    }
    x->ctrl_map = X.tab_map_grant_ref_notify(x->gnt, server_domid, ring_ref,
                                             PROT_READ | PROT_WRITE,
                                             offsetof(struct ml_vchan_interface, cli_live),
                                             x->port);
    if (!x->ctrl_map) {
        set_error("xengnttab_map_grant_ref_notify(ref %u): %s", ring_ref, strerror(errno));
        goto fail;
    }
    v->ctrl = x->ctrl_map;

    /* Read the orders once, validate, and from here on use only the copies. */
    int lo = atomic_load_explicit(&v->ctrl->left_order, memory_order_acquire);
    int ro = atomic_load_explicit(&v->ctrl->right_order, memory_order_acquire);
    if (!ml_vchan_orders_valid(lo, ro)) {
        set_error("server's control page has invalid ring orders %d/%d", lo, ro);
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
        x->left_map = X.tab_map_domain_grant_refs(x->gnt, (uint32_t)pl, server_domid, grants,
                                                  PROT_READ | PROT_WRITE);
        if (!x->left_map) {
            set_error("xengnttab_map_domain_grant_refs(left, %zu): %s", pl, strerror(errno));
            goto fail;
        }
        x->left_pages = pl;
    }
    if (pr) {
        /* ...and only reads the right one: map it read-only. */
        x->right_map = X.tab_map_domain_grant_refs(x->gnt, (uint32_t)pr, server_domid,
                                                   grants + pl, PROT_READ);
        if (!x->right_map) {
            set_error("xengnttab_map_domain_grant_refs(right, %zu): %s", pr, strerror(errno));
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

int ml_xen_event_fd(const ml_vchan *v)
{
    const struct xen_vchan *x = (const struct xen_vchan *)v;
    return v->provider == &xen_provider ? X.evt_fd(x->evt) : -1;
}

int ml_xen_event_ack(ml_vchan *v)
{
    if (v->provider != &xen_provider)
        return ML_EINVAL;
    struct xen_vchan *x = xv(v);
    int n = 0;
    for (;;) {
        int port = X.evt_pending(x->evt);
        if (port < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return n;
            set_error("xenevtchn_pending: %s", strerror(errno));
            return ML_ESYS;
        }
        /* Re-arm the port /then/ the caller re-checks the ring, so an event
         * raised after this point wakes the next wait. */
        if (X.evt_unmask(x->evt, (uint32_t)port) < 0) {
            set_error("xenevtchn_unmask: %s", strerror(errno));
            return ML_ESYS;
        }
        n++;
    }
}

int ml_xen_own_domid(uint32_t *out)
{
    int rc = ensure_loaded();
    if (rc < 0)
        return rc;
    struct xs_handle *xs = X.xs_open(0);
    if (!xs) {
        set_error("xs_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    char *s = X.xs_read(xs, 0, "domid", NULL);
    X.xs_close(xs);
    if (!s) {
        set_error("cannot read XenStore node domid: %s", strerror(errno));
        return ML_ESYS;
    }
    *out = (uint32_t)strtoul(s, NULL, 10);
    free(s);
    return ML_OK;
}

/* --- XenStore --------------------------------------------------------------- */

struct ml_xs {
    struct xs_handle *h;
};

ml_xs *ml_xs_open(void)
{
    if (ensure_loaded() < 0)
        return NULL;
    struct xs_handle *h = X.xs_open(0);
    if (!h) {
        set_error("xs_open failed: %s", strerror(errno));
        return NULL;
    }
    ml_xs *m = malloc(sizeof *m);
    if (!m) {
        X.xs_close(h);
        return NULL;
    }
    m->h = h;
    return m;
}

void ml_xs_close(ml_xs *m)
{
    if (m) {
        X.xs_close(m->h);
        free(m);
    }
}

uint32_t ml_xs_transaction_start(ml_xs *m)
{
    uint32_t t = X.xs_transaction_start(m->h);
    if (!t)
        set_error("xs_transaction_start: %s", strerror(errno));
    return t;
}

int ml_xs_transaction_end(ml_xs *m, uint32_t t, int abort)
{
    if (X.xs_transaction_end(m->h, t, abort != 0))
        return ML_OK;
    set_error("xs_transaction_end: %s", strerror(errno));
    return ML_ESYS;
}

long ml_xs_read(ml_xs *m, uint32_t t, const char *path, char *buf, size_t cap)
{
    unsigned len = 0;
    char *s = X.xs_read(m->h, t, path, &len);
    if (!s) {
        set_error("xs_read %s: %s", path, strerror(errno));
        return ML_ESYS;
    }
    memcpy(buf, s, len < cap ? len : cap);
    free(s);
    return (long)len;
}

int ml_xs_write(ml_xs *m, uint32_t t, const char *path, const char *data, size_t len)
{
    if (X.xs_write(m->h, t, path, data, (unsigned)len))
        return ML_OK;
    set_error("xs_write %s: %s", path, strerror(errno));
    return ML_ESYS;
}

int ml_xs_rm(ml_xs *m, uint32_t t, const char *path)
{
    if (X.xs_rm(m->h, t, path))
        return ML_OK;
    set_error("xs_rm %s: %s", path, strerror(errno));
    return ML_ESYS;
}

int ml_xs_set_permissions(ml_xs *m, uint32_t t, const char *path, const uint32_t *ids,
                          const uint32_t *perms, unsigned n)
{
    struct xs_permissions p[64];
    if (n == 0 || n > 64) {
        set_error("1..64 permissions");
        return ML_EINVAL;
    }
    for (unsigned i = 0; i < n; i++) {
        p[i].id = ids[i];
        p[i].perms = perms[i];
    }
    if (X.xs_set_permissions(m->h, t, path, p, n))
        return ML_OK;
    set_error("xs_set_permissions %s: %s", path, strerror(errno));
    return ML_ESYS;
}

long ml_xs_directory(ml_xs *m, uint32_t t, const char *path, char *buf, size_t cap)
{
    unsigned num = 0;
    char **names = X.xs_directory(m->h, t, path, &num);
    if (!names) {
        set_error("xs_directory %s: %s", path, strerror(errno));
        return ML_ESYS;
    }
    size_t total = 0;
    for (unsigned i = 0; i < num; i++) {
        size_t l = strlen(names[i]) + 1;
        if (total + l <= cap)
            memcpy(buf + total, names[i], l);
        total += l;
    }
    free(names);
    return (long)total;
}
