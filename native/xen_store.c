/*
 * xen_store.c - XenStore access for meshlink's own use: our domain id and a
 * thin client (read, write, rm, directory, permissions, transactions) that
 * the Python service registry (meshlink/xenstore_registry.py) drives.
 *
 * Each call is one round trip to xenstored through libxenstore (reached
 * through xen_lib.c's table), so the Python side calls these from a thread.
 * Failures record a message for ml_xen_error() and keep errno, which the
 * registry reads (EAGAIN: retry the transaction; ENOENT, EACCES...).  The
 * vchan rendezvous nodes are written by xen_vchan.c, as part of setting a
 * channel up, not through this client.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "ml_errors.h"
#include "xen_lib.h"
#include "xen_provider.h"

int ml_xen_own_domid(uint32_t *out)
{
    int rc = ml_xen_ensure_loaded();
    if (rc < 0)
        return rc;
    struct xs_handle *xs = ml_xen.xs_open(0);
    if (!xs) {
        ml_xen_set_error("xs_open failed: %s", strerror(errno));
        return ML_ESYS;
    }
    char *s = ml_xen.xs_read(xs, 0, "domid", NULL);
    ml_xen.xs_close(xs);
    if (!s) {
        ml_xen_set_error("cannot read XenStore node domid: %s", strerror(errno));
        return ML_ESYS;
    }
    *out = (uint32_t)strtoul(s, NULL, 10);
    free(s);
    return ML_OK;
}

struct ml_xs {
    struct xs_handle *h;
};

ml_xs *ml_xs_open(void)
{
    if (ml_xen_ensure_loaded() < 0)
        return NULL;
    struct xs_handle *h = ml_xen.xs_open(0);
    if (!h) {
        ml_xen_set_error("xs_open failed: %s", strerror(errno));
        return NULL;
    }
    ml_xs *m = malloc(sizeof *m);
    if (!m) {
        ml_xen.xs_close(h);
        return NULL;
    }
    m->h = h;
    return m;
}

void ml_xs_close(ml_xs *m)
{
    if (m) {
        ml_xen.xs_close(m->h);
        free(m);
    }
}

uint32_t ml_xs_transaction_start(ml_xs *m)
{
    uint32_t t = ml_xen.xs_transaction_start(m->h);
    if (!t)
        ml_xen_set_error("xs_transaction_start: %s", strerror(errno));
    return t;
}

int ml_xs_transaction_end(ml_xs *m, uint32_t t, int abort)
{
    if (ml_xen.xs_transaction_end(m->h, t, abort != 0))
        return ML_OK;
    ml_xen_set_error("xs_transaction_end: %s", strerror(errno));
    return ML_ESYS;
}

long ml_xs_read(ml_xs *m, uint32_t t, const char *path, char *buf, size_t cap)
{
    unsigned len = 0;
    char *s = ml_xen.xs_read(m->h, t, path, &len);
    if (!s) {
        ml_xen_set_error("xs_read %s: %s", path, strerror(errno));
        return ML_ESYS;
    }
    memcpy(buf, s, len < cap ? len : cap);
    free(s);
    return (long)len;
}

int ml_xs_write(ml_xs *m, uint32_t t, const char *path, const char *data, size_t len)
{
    if (ml_xen.xs_write(m->h, t, path, data, (unsigned)len))
        return ML_OK;
    ml_xen_set_error("xs_write %s: %s", path, strerror(errno));
    return ML_ESYS;
}

int ml_xs_rm(ml_xs *m, uint32_t t, const char *path)
{
    if (ml_xen.xs_rm(m->h, t, path))
        return ML_OK;
    ml_xen_set_error("xs_rm %s: %s", path, strerror(errno));
    return ML_ESYS;
}

int ml_xs_set_permissions(ml_xs *m, uint32_t t, const char *path, const uint32_t *ids,
                          const uint32_t *perms, unsigned n)
{
    struct xs_permissions p[64];
    if (n == 0 || n > 64) {
        ml_xen_set_error("1..64 permissions");
        return ML_EINVAL;
    }
    for (unsigned i = 0; i < n; i++) {
        p[i].id = ids[i];
        p[i].perms = perms[i];
    }
    if (ml_xen.xs_set_permissions(m->h, t, path, p, n))
        return ML_OK;
    ml_xen_set_error("xs_set_permissions %s: %s", path, strerror(errno));
    return ML_ESYS;
}

long ml_xs_directory(ml_xs *m, uint32_t t, const char *path, char *buf, size_t cap)
{
    unsigned num = 0;
    char **names = ml_xen.xs_directory(m->h, t, path, &num);
    if (!names) {
        ml_xen_set_error("xs_directory %s: %s", path, strerror(errno));
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

int ml_xs_watch(ml_xs *m, const char *path, const char *token)
{
    if (ml_xen.xs_watch(m->h, path, token))
        return ML_OK;
    ml_xen_set_error("xs_watch %s: %s", path, strerror(errno));
    return ML_ESYS;
}

int ml_xs_unwatch(ml_xs *m, const char *path, const char *token)
{
    if (ml_xen.xs_unwatch(m->h, path, token))
        return ML_OK;
    ml_xen_set_error("xs_unwatch %s: %s", path, strerror(errno));
    return ML_ESYS;
}

int ml_xs_fileno(ml_xs *m)
{
    int fd = ml_xen.xs_fileno(m->h);
    if (fd < 0) {
        ml_xen_set_error("xs_fileno: %s", strerror(errno));
        return ML_ESYS;
    }
    return fd;
}

static void copy_str(char *dst, size_t cap, const char *src)
{
    if (!cap)
        return;
    size_t n = strlen(src);
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

int ml_xs_check_watch(ml_xs *m, char *path, size_t path_cap, char *token, size_t token_cap)
{
    errno = 0;
    char **ev = ml_xen.xs_check_watch(m->h);
    if (!ev) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == 0)
            return 0;
        ml_xen_set_error("xs_check_watch: %s", strerror(errno));
        return ML_ESYS;
    }
    /* XS_WATCH_PATH = 0, XS_WATCH_TOKEN = 1 (xenstore_lib.h). */
    copy_str(path, path_cap, ev[0]);
    copy_str(token, token_cap, ev[1]);
    free(ev);
    return 1;
}
