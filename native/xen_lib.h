/*
 * xen_lib.h - internal to native/: the Xen libraries as the Xen provider's
 * files see them (xen_lib.c loads them; xen_vchan.c and xen_store.c call
 * through the table).
 *
 * The prototypes are the few we need from xenevtchn.h, xengnttab.h and
 * xenstore.h, declared here with opaque handles rather than taken from
 * libxen-dev, which need not be installed: meshlink never links against
 * Xen, it dlopens the libraries on first use (xen_lib.c says how).
 */
#ifndef MESHLINK_XEN_LIB_H
#define MESHLINK_XEN_LIB_H

#include <stdbool.h>
#include <stdint.h>

typedef struct xenevtchn_handle xenevtchn_handle;
typedef struct xengntdev_handle xengntdev_handle;
struct xs_handle;
struct xs_permissions {
    unsigned int id;
    unsigned int perms;
};

#define XS_PERM_NONE 0
#define XS_PERM_READ 1

/* Every entry is filled once ml_xen_ensure_loaded() has returned ML_OK. */
struct ml_xen_lib {
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
    bool (*xs_watch)(struct xs_handle *, const char *path, const char *token);
    bool (*xs_unwatch)(struct xs_handle *, const char *path, const char *token);
    int (*xs_fileno)(struct xs_handle *);
    /* NULL-terminated vector [path, token, NULL] in one allocation, or NULL
     * with errno EAGAIN when no event is queued. */
    char **(*xs_check_watch)(struct xs_handle *);
};

extern struct ml_xen_lib ml_xen;

/* Load the three libraries once (thread-safe).  ML_OK, or ML_ESYS with
 * errno = ENOENT and ml_xen_error() naming what is missing. */
int ml_xen_ensure_loaded(void);
/* Record why this thread's current ml_xen_* / ml_xs_* call fails, for
 * ml_xen_error(); errno is left as it was. */
void ml_xen_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
