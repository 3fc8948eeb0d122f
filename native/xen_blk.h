/*
 * xen_blk.h - the blk ring over Xen grants and event channels: the pages
 * and the event channel under native/blkring.c's ring, for a meshlink
 * frontend (sharing) and a backend (mapping) in two domains.  The XenStore
 * handshake that exchanges the refs and the port is Python's
 * (meshlink/disk/blk/xenbus.py); docs/blkif.md section 8.
 */
#ifndef MESHLINK_XEN_BLK_H
#define MESHLINK_XEN_BLK_H

#include <stddef.h>
#include <stdint.h>

#include "blkring.h"
#include "ml_errors.h"

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py): only declarations, integer #defines and enums. */

typedef struct ml_xen_blk ml_xen_blk;

/*
 * Frontend: share 2^order ring pages followed by `data_pages` pages with
 * `backend_domid` (writable, one share call) and bind an unbound event
 * channel for it.  The refs must come out consecutive (a slot's pages are
 * named first_ref + i); ML_ESYS otherwise.  The ring's first ref is
 * ml_xen_blk_first_ref(), page i's ref is first_ref + i.
 */
int ml_xen_blk_front_open(uint32_t backend_domid, int order, uint32_t data_pages,
                          ml_xen_blk **out);
/*
 * Backend: map the frontend's 2^order ring pages (refs as it published
 * them) read-write and bind to its event channel `port`.
 */
int ml_xen_blk_back_open(uint32_t frontend_domid, const uint32_t *ring_refs, int order,
                         uint32_t port, ml_xen_blk **out);
/* The shared memory: the ring (backend), the ring then the data (frontend). */
void *ml_xen_blk_memory(ml_xen_blk *x);
uint32_t ml_xen_blk_first_ref(const ml_xen_blk *x);
uint32_t ml_xen_blk_port(const ml_xen_blk *x);
/* The event channel's fd (non-blocking). */
int ml_xen_blk_event_fd(const ml_xen_blk *x);
int ml_xen_blk_notify(ml_xen_blk *x);
/* Take and unmask every pending event: count, or ML_ESYS. */
int ml_xen_blk_ack(ml_xen_blk *x);
/*
 * Backend: copy a checked, servable request's data between `buf`
 * (c->length bytes) and its segments' granted pages, mapped for the copy and
 * unmapped after: into the pages for a READ (to_segments = 1), out of them
 * for a WRITE.  ML_ESYS if a grant cannot be mapped (the request then gets
 * an error response).
 */
int ml_xen_blk_copy(ml_xen_blk *x, const struct ml_blk_checked *c, uint8_t *buf,
                    int to_segments);
void ml_xen_blk_free(ml_xen_blk *x);

/* cffi:end */

#endif
