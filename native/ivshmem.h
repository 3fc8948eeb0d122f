/*
 * ivshmem.h - the ivshmem provider: vchan rings inside one shared region that
 * several parties map (a host file, or the BAR2 of QEMU's ivshmem device in a
 * guest, mmapped from /sys/bus/pci/devices/<dev>/resource2).
 *
 * The region starts with a one-page header (docs/vchan.md section 10): magic,
 * version, the creator's host id, and a table of channel slots (name, owner,
 * offsets of the control page and rings, heartbeats, bell counters).  Each
 * slot owns a fixed area of ring space after the header; a grant ref is a
 * page index inside the region.  Everything read from the region is
 * attacker-controlled: the header is copied and validated once at open, a
 * slot entry is copied and validated once at connect, and afterwards only
 * the private copies are used.
 *
 * Events: there is no event channel without ivshmem-server, so "notify"
 * increments a bell counter in the peer's slot half and a waiter polls it
 * with a bounded backoff.  A crashed party cannot clear its live byte, so
 * each end bumps a heartbeat counter; a counter that stops moving means the
 * peer is gone.  Implemented in ivshmem.c; used by the Python side
 * (meshlink/transport/vchan/ivshmem.py) and the static guest peer
 * (tools/ivshmem_peer.c).
 */
#ifndef MESHLINK_IVSHMEM_H
#define MESHLINK_IVSHMEM_H

#include <stddef.h>
#include <stdint.h>

#include "ml_errors.h"
#include "vchan.h"

/* cffi:begin -- from here to cffi:end this header is also read by cffi
 * (meshlink/_ffi_build.py): only declarations, integer #defines and enums.
 * `struct ml_vchan` rather than the typedef: cffi reads this header before
 * vchan.h. */

#define ML_IVSHMEM_VERSION 1
#define ML_IVSHMEM_MAX_SLOTS 16
#define ML_IVSHMEM_NAME_MAX 63
#define ML_IVSHMEM_HOST_ID_MAX 63
/* Smallest region: the header page plus one slot of a control page. */
#define ML_IVSHMEM_MIN_SIZE 8192

/* Slot states (the entry's state word). */
#define ML_IVSHMEM_FREE 0
#define ML_IVSHMEM_CLAIMING 1
#define ML_IVSHMEM_LISTENING 2
#define ML_IVSHMEM_CONNECTED 3
#define ML_IVSHMEM_HALF 4

typedef struct ml_ivshmem_region ml_ivshmem_region;

/*
 * Map a region.  `create` non-zero: (re)initialise a host file of `size`
 * bytes with a fresh header naming `host_id` and `nslots` slots (the file is
 * created if missing).  `create` zero: map what is there (a host file or a
 * PCI resource file) and validate its header.  Returns ML_OK, ML_ECORRUPT
 * (bad header), ML_EINVAL (bad arguments) or ML_ESYS (errno kept).
 */
int ml_ivshmem_open(const char *path, int create, uint64_t size, const char *host_id,
                    uint32_t nslots, ml_ivshmem_region **out);
/* Unmap.  Channels made from the region keep their own mapping reference. */
void ml_ivshmem_close(ml_ivshmem_region *r);
/* First byte of our mapping (tests and the fuzz target check layouts). */
uint8_t *ml_ivshmem_base(const ml_ivshmem_region *r);
/* The validated host id (NUL-terminated copy) and geometry. */
const char *ml_ivshmem_host_id(const ml_ivshmem_region *r);
size_t ml_ivshmem_size(const ml_ivshmem_region *r);
uint32_t ml_ivshmem_nslots(const ml_ivshmem_region *r);
/* Largest ring (bytes) a slot can hold for each direction. */
size_t ml_ivshmem_max_ring(const ml_ivshmem_region *r);
/* State word of slot i (for diagnostics and tests), or ML_EINVAL. */
int ml_ivshmem_slot_state(const ml_ivshmem_region *r, uint32_t i);

/*
 * Server end: claim a free slot for `name`, lay out the control page and
 * rings of the given orders in its area and mark it LISTENING.  The channel
 * is connected once ml_vchan_peer_live() stops returning 2.  ML_ESYS with
 * errno ENOSPC: no free slot; ML_EINVAL: orders that do not fit a slot.
 */
int ml_ivshmem_listen(ml_ivshmem_region *r, const char *name, uint32_t party,
                      int left_order, int right_order, struct ml_vchan **out);
/*
 * Client end: find a LISTENING slot named `name`, take it, validate its
 * offsets and control page (ML_ECORRUPT), set cli_live = 1, ask for the
 * server's first write and ring its bell.  ML_ESYS with errno ENOENT: no
 * listener of that name.
 */
int ml_ivshmem_connect(ml_ivshmem_region *r, const char *name, uint32_t party,
                       struct ml_vchan **out);
/* Bump our heartbeat; read the peer's; read our bell counter. */
void ml_ivshmem_beat(struct ml_vchan *v);
uint32_t ml_ivshmem_peer_beat(const struct ml_vchan *v);
uint32_t ml_ivshmem_bell(const struct ml_vchan *v);
/* Party id of the peer (0 until a client connected), and the slot index. */
uint32_t ml_ivshmem_peer_party(const struct ml_vchan *v);
int ml_ivshmem_slot(const struct ml_vchan *v);
/* The peer is known dead: freeing the channel frees the slot at once. */
void ml_ivshmem_forget_peer(struct ml_vchan *v);

/* cffi:end */

#endif
