/*
 * provider.h - the seam between the vchan ring and whatever supplies shared
 * pages and event channels, plus the layout of the shared control page.
 *
 * Internal to native/.  A provider fills in struct ml_provider; the ring code
 * (vchan_ring.c) only ever calls provider->notify, and vchan_setup.c calls
 * provider->release when a channel is freed.  The local provider lives in
 * local_grant.c (memfd pages) and local_event.c (eventfd); the Xen provider
 * (gntshr/gnttab + evtchn, xen_vchan.c) plugs in the same way.
 */
#ifndef MESHLINK_PROVIDER_H
#define MESHLINK_PROVIDER_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "vchan.h"

/* One ring's indices as they sit in shared memory (libxenvchan ring_shared). */
struct ml_ring_shared {
    _Atomic uint32_t cons;
    _Atomic uint32_t prod;
};

/*
 * The control page, libxenvchan's struct vchan_interface.  Every field is
 * atomic because the peer writes them concurrently; offsets are checked
 * below and against Xen's header by tests/native.
 */
struct ml_vchan_interface {
    struct ml_ring_shared left;  /* client writes, server reads */
    struct ml_ring_shared right; /* server writes, client reads */
    _Atomic uint16_t left_order;
    _Atomic uint16_t right_order;
    _Atomic uint8_t cli_live;
    _Atomic uint8_t srv_live;
    _Atomic uint8_t cli_notify; /* bits the client must signal on */
    _Atomic uint8_t srv_notify; /* bits the server must signal on */
    _Atomic uint32_t grants[];  /* left ring's refs, then right's */
};

_Static_assert(sizeof(_Atomic uint32_t) == 4, "atomic u32 must be plain-sized");
_Static_assert(sizeof(_Atomic uint16_t) == 2, "atomic u16 must be plain-sized");
_Static_assert(sizeof(_Atomic uint8_t) == 1, "atomic u8 must be plain-sized");
_Static_assert(offsetof(struct ml_vchan_interface, left_order) == 16, "layout");
_Static_assert(offsetof(struct ml_vchan_interface, cli_live) == 20, "layout");
_Static_assert(offsetof(struct ml_vchan_interface, srv_notify) == 23, "layout");
_Static_assert(offsetof(struct ml_vchan_interface, grants) == 24, "layout");

struct ml_provider {
    /* Signal the peer.  Returns 0 or ML_ESYS. */
    int (*notify)(struct ml_vchan *v);
    /* Unmap memory and drop provider state; called once from ml_vchan_free. */
    void (*release)(struct ml_vchan *v);
};

/* One direction as seen by this end.  `size` and `mask` are private copies. */
struct ml_ring {
    struct ml_ring_shared *shr;
    uint8_t *buf;
    uint32_t size;
    uint32_t mask;
    /* Our own index (cons for the read ring, prod for the write ring).  We
     * keep it privately and only ever store it to shared memory: a peer that
     * scribbles on our index cannot make us read or write the wrong bytes. */
    uint32_t own;
};

struct ml_vchan {
    struct ml_vchan_interface *ctrl;
    struct ml_ring read;
    struct ml_ring write;
    int is_server;
    int closed;
    uint16_t left_order; /* validated copies of the orders */
    uint16_t right_order;
    const struct ml_provider *provider;
    /* Provider state.  The local provider uses these directly. */
    void *map_base;      /* whole mapping (server) or control page (client) */
    size_t map_len;
    void *read_map;      /* client: separately mapped rings */
    size_t read_map_len;
    void *write_map;
    size_t write_map_len;
    int memfd;           /* server: owned memfd; client: -1 */
    int peer_evfd;       /* not owned */
};

/* Own and peer bytes, chosen by role (vchan_ring.c). */
static inline _Atomic uint8_t *ml_own_live(struct ml_vchan *v)
{
    return v->is_server ? &v->ctrl->srv_live : &v->ctrl->cli_live;
}
static inline _Atomic uint8_t *ml_peer_live(struct ml_vchan *v)
{
    return v->is_server ? &v->ctrl->cli_live : &v->ctrl->srv_live;
}
/* The byte the peer arms when it wants us to signal. */
static inline _Atomic uint8_t *ml_own_notify(struct ml_vchan *v)
{
    return v->is_server ? &v->ctrl->srv_notify : &v->ctrl->cli_notify;
}
/* The byte we arm when we want the peer to signal us. */
static inline _Atomic uint8_t *ml_peer_notify(struct ml_vchan *v)
{
    return v->is_server ? &v->ctrl->cli_notify : &v->ctrl->srv_notify;
}

/* vchan_setup.c: validate orders and lay out rings over mapped memory. */
int ml_vchan_orders_valid(int left_order, int right_order);
void ml_ring_setup(struct ml_ring *r, struct ml_ring_shared *shr, uint8_t *buf, int order);

/* local_event.c: the local event provider (eventfd). */
int ml_local_event_notify(struct ml_vchan *v);

#endif
