/*
 * xen_provider.h - the Xen provider: vchan rings over Xen grant tables and
 * event channels, rendezvous through XenStore, exactly as libxenvchan does
 * it (Xen 4.17 tools/libs/vchan; docs/vchan.md section 9), and a thin
 * XenStore client.
 *
 * libxenevtchn.so.1, libxengnttab.so.1 and libxenstore.so.4 are loaded with
 * dlopen on first use (never linked), so meshlink builds and runs where Xen
 * is absent; every entry point then fails with ML_ESYS and ml_xen_error()
 * says what is missing.  Implemented by xen_lib.c (loading, errors, probe),
 * xen_vchan.c (the channel) and xen_store.c (XenStore access).
 */
#ifndef MESHLINK_XEN_PROVIDER_H
#define MESHLINK_XEN_PROVIDER_H

#include <stddef.h>
#include <stdint.h>

#include "ml_errors.h" /* what every call below returns */
#include "vchan.h"

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py): only declarations, integer #defines and enums. */

/* Why the last failing ml_xen_* / ml_xs_* call of this thread failed. */
const char *ml_xen_error(void);
/*
 * Load the three libraries and open (then close) an event channel handle,
 * which is what fails on a machine without /dev/xen.  0 or ML_ESYS.
 */
int ml_xen_probe(void);

/*
 * Server end, as libxenvchan_server_init: bind an unbound event channel
 * for `peer_domid`, share the control page (unmap-notify at srv_live) and
 * the ring pages with it, and publish ring-ref and event-channel under
 * `xs_path` readable by `peer_domid` only.  Orders from the minimum sizes
 * (read_min: the ring we read).  The server's XenStore node is removed when
 * the channel is freed.
 */
int ml_xen_server_new(uint32_t peer_domid, const char *xs_path, size_t read_min,
                      size_t write_min, ml_vchan **out);
/*
 * Client end, as libxenvchan_client_init: read ring-ref and event-channel
 * under `xs_path`, bind to the server's port, map the control page
 * (unmap-notify at cli_live), validate it, map the rings (our read ring
 * read-only), set cli_live = 1, ask for the server's first write, signal.
 */
int ml_xen_client_new(uint32_t server_domid, const char *xs_path, ml_vchan **out);
/*
 * Server end: remove the channel's XenStore nodes now rather than when it
 * is freed (a connected channel is single-use; its path may then carry the
 * next channel for the same client domain).  Blocks on XenStore.
 */
int ml_xen_server_unpublish(ml_vchan *v);
/* The event channel's fd (non-blocking; readable when the peer signalled). */
int ml_xen_event_fd(const ml_vchan *v);
/* Take every pending event and unmask its port.  Count taken, or ML_ESYS. */
int ml_xen_event_ack(ml_vchan *v);
/* Our own domain id, from the relative XenStore node "domid". */
int ml_xen_own_domid(uint32_t *out);

/* --- a thin XenStore client (for the service registry) ------------------- */

typedef struct ml_xs ml_xs;
ml_xs *ml_xs_open(void);
void ml_xs_close(ml_xs *h);
/* Transaction id (non-zero) or 0 on failure. */
uint32_t ml_xs_transaction_start(ml_xs *h);
/* 0, or ML_ESYS (errno EAGAIN: the transaction must be retried). */
int ml_xs_transaction_end(ml_xs *h, uint32_t t, int abort);
/* Value length (copied up to cap), or ML_ESYS (errno ENOENT, EACCES...). */
long ml_xs_read(ml_xs *h, uint32_t t, const char *path, char *buf, size_t cap);
int ml_xs_write(ml_xs *h, uint32_t t, const char *path, const char *data, size_t len);
int ml_xs_rm(ml_xs *h, uint32_t t, const char *path);
/* perms[0] is the owner and the default for domains not listed. */
int ml_xs_set_permissions(ml_xs *h, uint32_t t, const char *path, const uint32_t *ids,
                          const uint32_t *perms, unsigned n);
/* Children as NUL-terminated names back to back; total bytes, or ML_ESYS. */
long ml_xs_directory(ml_xs *h, uint32_t t, const char *path, char *buf, size_t cap);
/* Watch `path` (or a special path such as "@releaseDomain") under `token`;
 * XenStore queues one event at once, then one per change. */
int ml_xs_watch(ml_xs *h, const char *path, const char *token);
int ml_xs_unwatch(ml_xs *h, const char *path, const char *token);
/* An fd readable while watch events are queued, or ML_ESYS. */
int ml_xs_fileno(ml_xs *h);
/*
 * Take one queued watch event without waiting: 1 (path and token copied,
 * NUL-terminated, truncated to their caps), 0 (none queued), or ML_ESYS.
 */
int ml_xs_check_watch(ml_xs *h, char *path, size_t path_cap, char *token, size_t token_cap);

/* cffi:end */

#endif
