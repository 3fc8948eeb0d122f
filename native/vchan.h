/*
 * vchan.h - meshlink's vchan ring: a byte-compatible implementation of the
 * shared control page and data rings of Xen's libxenvchan
 * (xen/io/libxenvchan.h, Xen 4.17; docs/vchan.md).
 *
 * The ring code never blocks and never sleeps: every call either makes
 * progress or reports "nothing to do" (0) so that the caller (trio) can wait
 * on the event file descriptor.  Every value read from shared memory is
 * treated as hostile: it is read once into a local, validated, and a bad
 * value is reported as ML_ECORRUPT instead of being used.
 *
 * Memory and events come from a provider (provider.h): the local provider
 * (memfd pages + eventfd, local_grant.c / local_event.c) or Xen's grant
 * tables and event channels (xen_vchan.c).
 */
#ifndef MESHLINK_VCHAN_H
#define MESHLINK_VCHAN_H

#include <stddef.h>
#include <stdint.h>

#include "ml_errors.h" /* what every call below returns */

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py), so it holds only declarations, integer
 * #defines and enums: no expressions, no includes. */

#define ML_VCHAN_NOTIFY_WRITE 0x1
#define ML_VCHAN_NOTIFY_READ 0x2

#define ML_VCHAN_MIN_ORDER 10
#define ML_VCHAN_MAX_ORDER 20
#define ML_PAGE_SHIFT 12
#define ML_PAGE_SIZE 4096u

/* Live byte values (shutdown detection). */
#define ML_LIVE_EXITED 0
#define ML_LIVE_CONNECTED 1
#define ML_LIVE_WAITING 2

typedef struct ml_vchan ml_vchan;

/* --- layout helpers (pure functions, no shared memory) ------------------ */

/* Size of the fixed header of the control page (24) and offset of grants[]. */
size_t ml_vchan_header_size(void);
/* Offset of a field of the control page by name index; see vchan_setup.c. */
size_t ml_vchan_field_offset(int field);
/* In-page ring offset for orders 10 (1024) and 11 (2048); 0 otherwise. */
size_t ml_vchan_inpage_offset(int order);
/* Number of separately granted pages for a ring of `order` (0 for 10, 11). */
size_t ml_vchan_ring_pages(int order);
/*
 * The server's choice of ring orders from requested minimum sizes, as
 * libxenvchan_server_init makes it: read (left) and write (right) rings get
 * the smallest page order that fits, and small rings move into the control
 * page when that saves pages.  Returns ML_EINVAL if a minimum exceeds 1 MiB.
 */
int ml_vchan_choose_orders(size_t read_min, size_t write_min, int *left_order,
                           int *right_order);
/*
 * Fill a control page as a freshly initialised server does: indices zero,
 * orders, cli_live = 2 (not yet connected), srv_live = 1, cli_notify = WRITE,
 * grants[] = left ring's refs then right ring's.
 */
int ml_vchan_ctrl_init(void *page, int left_order, int right_order,
                       const uint32_t *grants, size_t ngrants);

/* --- channel operations ------------------------------------------------- */

/* Stream mode: copy up to n bytes; returns bytes moved (0 = would block). */
long ml_vchan_read(ml_vchan *v, void *buf, size_t n);
long ml_vchan_write(ml_vchan *v, const void *buf, size_t n);
/* Packet mode: all or nothing.  Returns n, 0 (would block) or an error. */
long ml_vchan_recv(ml_vchan *v, void *buf, size_t n);
long ml_vchan_send(ml_vchan *v, const void *buf, size_t n);
/*
 * Zero-allocation read for callers that copy out themselves: peek returns
 * the readable bytes that are contiguous from *offset (relative to
 * ml_vchan_read_base), consume then releases n of them (n <= readable).
 */
long ml_vchan_peek(ml_vchan *v, size_t *offset);
const uint8_t *ml_vchan_read_base(const ml_vchan *v);
long ml_vchan_consume(ml_vchan *v, size_t n);
/* Bytes readable now / bytes writable now, or ML_ECORRUPT. */
long ml_vchan_data_ready(ml_vchan *v);
long ml_vchan_buffer_space(ml_vchan *v);
/* Sizes of our read and write rings in bytes. */
size_t ml_vchan_read_size(const ml_vchan *v);
size_t ml_vchan_write_size(const ml_vchan *v);
/*
 * Prepare to sleep.  arm_read asks the peer to signal when it writes (only
 * when our read ring is empty) and returns data_ready after arming; a
 * positive result means "do not sleep".  arm_write asks the peer to signal
 * when it consumes and returns buffer_space after arming.
 */
long ml_vchan_arm_read(ml_vchan *v);
long ml_vchan_arm_write(ml_vchan *v);
/* Peer's live byte (0, 1, 2) or ML_ECORRUPT for any other value. */
int ml_vchan_peer_live(ml_vchan *v);
/*
 * Clear our live byte and signal the peer unconditionally.  The rings stay
 * mapped (a half-closed stream may still read) until ml_vchan_free().
 */
int ml_vchan_close(ml_vchan *v);
/* Signal the peer's event channel. */
int ml_vchan_notify(ml_vchan *v);
/*
 * A reader's whole wait, for a thread that owns this end alone (the
 * blocking client): copy up to n readable bytes into buf; if there are
 * none, poll the ring for spin_ns, then arm, poll(2) on wait_fd (the
 * doorbell's epoll set: our eventfd and the liveness socket) for at most
 * timeout_ms (< 0: no limit), read ack_fd (our eventfd) to acknowledge,
 * and look again.  Returns the bytes copied (> 0); 0 when there is nothing
 * to read but something to look at (the peer's live byte is not 1, a
 * wake-up that brought no data: the liveness socket or a spurious signal,
 * or a signal handler to run: EINTR); ML_ETIMEDOUT; or an error.
 */
long ml_vchan_read_wait(ml_vchan *v, void *buf, size_t n, int wait_fd, int ack_fd,
                        long spin_ns, int timeout_ms);
/*
 * Whether a blocking client's connection is idle, so that a call may go
 * out at once: nothing to read, the peer's live byte 1, and live_fd (its
 * liveness socket, or -1) not at EOF.  Returns 1 or 0, or an error (a
 * corrupted ring).
 */
int ml_vchan_idle(ml_vchan *v, int live_fd);
/*
 * A blocking client's call in one step: write the whole of req (or, if it
 * does not fit now, nothing: ML_ENOROOM), then ml_vchan_read_wait() for the
 * reply, with the same arguments and results.
 */
long ml_vchan_write_wait(ml_vchan *v, const void *req, size_t req_len, void *buf, size_t n,
                         int wait_fd, int ack_fd, long spin_ns, int timeout_ms);
/* Unmap everything and release provider resources; v may be half-built. */
void ml_vchan_free(ml_vchan *v);

/* --- local provider (memfd grants, eventfd events) ---------------------- */

/*
 * Server side: create a sealed memfd holding the control page (grant ref 0)
 * and the ring pages (refs 1..n), initialise the control page, and keep the
 * two eventfds: `own_evfd` is the one the peer signals, `peer_evfd` the one we
 * signal.  The fds are not owned by the channel (the caller closes them).
 */
int ml_local_server_new(int left_order, int right_order, int own_evfd,
                        int peer_evfd, ml_vchan **out);
/* The memfd of a local server channel (to pass to the client), or -1. */
int ml_local_memfd(const ml_vchan *v);
/*
 * Client side: validate and map a server's memfd.  Checks that the memfd is
 * sealed against shrinking, reads orders and grant refs once, validates them,
 * maps the rings (our read ring read-only), sets cli_live = 1, arms the
 * server's WRITE notification and signals.
 */
int ml_local_client_new(int memfd, uint32_t ctrl_ref, int own_evfd,
                        int peer_evfd, ml_vchan **out);
/* Orders a channel runs with (validated copies, not shared memory). */
int ml_vchan_left_order(const ml_vchan *v);
int ml_vchan_right_order(const ml_vchan *v);

/* cffi:end */

#endif
