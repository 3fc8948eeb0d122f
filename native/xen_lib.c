/*
 * xen_lib.c - loading Xen's userspace libraries for the Xen provider: the
 * symbol tables of libxenevtchn.so.1, libxengnttab.so.1 and
 * libxenstore.so.4, the per-thread error message, and the probe.
 *
 * Why dlopen: meshlink must build and run where Xen is absent, so nothing
 * links against Xen.  The three libraries are dlopen'ed once, on first use,
 * and each symbol is looked up at the version node libxenvchan itself uses
 * (VERS_1.0, VERS_4.0); MESHLINK_XEN_LIBDIR names another directory.  When
 * loading fails every entry point returns ML_ESYS and ml_xen_error() says
 * which Debian package is missing.  The vchan provider (xen_vchan.c) and the
 * XenStore client (xen_store.c) call Xen only through the table filled here.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ml_errors.h"
#include "xen_lib.h"
#include "xen_provider.h"

struct ml_xen_lib ml_xen;

static _Thread_local char last_error[2048];
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static char load_error[2048];
static int load_rc;

void ml_xen_set_error(const char *fmt, ...)
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

#define SYM(field, name) {(void **)&ml_xen.field, name}

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
        SYM(xs_transaction_end, "xs_transaction_end"), SYM(xs_watch, "xs_watch"),
        SYM(xs_unwatch, "xs_unwatch"), SYM(xs_fileno, "xs_fileno"),
        SYM(xs_check_watch, "xs_check_watch"),
    };
    if (load_lib("libxenevtchn.so.1", "VERS_1.0", "libxenevtchn1", evt,
                 sizeof evt / sizeof evt[0]) < 0 ||
        load_lib("libxengnttab.so.1", "VERS_1.0", "libxengnttab1", gnt,
                 sizeof gnt / sizeof gnt[0]) < 0 ||
        load_lib("libxenstore.so.4", "VERS_4.0", "libxenstore4", xs, sizeof xs / sizeof xs[0]) <
            0)
        load_rc = -1;
}

int ml_xen_ensure_loaded(void)
{
    pthread_once(&load_once, load_all);
    if (load_rc < 0) {
        errno = ENOENT;
        ml_xen_set_error("%s", load_error);
        return ML_ESYS;
    }
    return ML_OK;
}

int ml_xen_probe(void)
{
    int rc = ml_xen_ensure_loaded();
    if (rc < 0)
        return rc;
    xenevtchn_handle *h = ml_xen.evt_open(NULL, 0);
    if (!h) {
        ml_xen_set_error("xenevtchn_open failed (%s): no Xen event channel device "
                         "(/dev/xen/evtchn); not running under Xen?",
                         strerror(errno));
        return ML_ESYS;
    }
    ml_xen.evt_close(h);
    return ML_OK;
}
