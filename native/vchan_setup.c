/*
 * vchan_setup.c - lays a vchan out: ring orders, where each ring lives, and
 * the server's initial control page.  Provider-independent.
 *
 * Protocol: Xen 4.17 xen/io/libxenvchan.h and libxenvchan's server_init;
 * docs/vchan.md section 2.  Order 10 rings live at offset 1024 of the control
 * page, order 11 at 2048 (one ring per slot); orders 12..20 use
 * 2^(order-12) separately granted pages listed in grants[], left ring first.
 */
#include <stdlib.h>
#include <string.h>

#include "ml_errors.h"
#include "provider.h"

#define SMALL_RING_OFFSET 1024u
#define LARGE_RING_OFFSET 2048u
#define HEADER_SIZE 24u

size_t ml_vchan_header_size(void)
{
    return HEADER_SIZE;
}

/* Field offsets by index, so that tests can compare them with Xen's header
 * without the Python side duplicating the layout. */
size_t ml_vchan_field_offset(int field)
{
    switch (field) {
    case 0: return offsetof(struct ml_vchan_interface, left.cons);
    case 1: return offsetof(struct ml_vchan_interface, left.prod);
    case 2: return offsetof(struct ml_vchan_interface, right.cons);
    case 3: return offsetof(struct ml_vchan_interface, right.prod);
    case 4: return offsetof(struct ml_vchan_interface, left_order);
    case 5: return offsetof(struct ml_vchan_interface, right_order);
    case 6: return offsetof(struct ml_vchan_interface, cli_live);
    case 7: return offsetof(struct ml_vchan_interface, srv_live);
    case 8: return offsetof(struct ml_vchan_interface, cli_notify);
    case 9: return offsetof(struct ml_vchan_interface, srv_notify);
    case 10: return offsetof(struct ml_vchan_interface, grants);
    default: return (size_t)-1;
    }
}

size_t ml_vchan_inpage_offset(int order)
{
    if (order == 10)
        return SMALL_RING_OFFSET;
    if (order == 11)
        return LARGE_RING_OFFSET;
    return 0;
}

size_t ml_vchan_ring_pages(int order)
{
    if (order < ML_PAGE_SHIFT || order > ML_VCHAN_MAX_ORDER)
        return 0;
    return (size_t)1 << (order - ML_PAGE_SHIFT);
}

/* Smallest page order (>= 12) whose ring holds `size` bytes. */
static int page_order_for(size_t size)
{
    int order = ML_PAGE_SHIFT;
    while (((size_t)1 << order) < size)
        order++;
    return order;
}

int ml_vchan_choose_orders(size_t read_min, size_t write_min, int *left_order,
                           int *right_order)
{
    const size_t max_ring = (size_t)1 << ML_VCHAN_MAX_ORDER;
    if (read_min > max_ring || write_min > max_ring)
        return ML_EINVAL;
    int lo = page_order_for(read_min);
    int ro = page_order_for(write_min);
    /* Use the control page's spare room when it saves granting pages; the
     * 1 KiB slot can only be paired with the 2 KiB one. */
    if (read_min <= SMALL_RING_OFFSET && write_min <= LARGE_RING_OFFSET) {
        lo = 10;
        ro = 11;
    } else if (read_min <= LARGE_RING_OFFSET && write_min <= SMALL_RING_OFFSET) {
        lo = 11;
        ro = 10;
    } else if (read_min <= LARGE_RING_OFFSET) {
        lo = 11;
    } else if (write_min <= LARGE_RING_OFFSET) {
        ro = 11;
    }
    *left_order = lo;
    *right_order = ro;
    return ML_OK;
}

int ml_vchan_orders_valid(int left_order, int right_order)
{
    if (left_order < ML_VCHAN_MIN_ORDER || left_order > ML_VCHAN_MAX_ORDER ||
        right_order < ML_VCHAN_MIN_ORDER || right_order > ML_VCHAN_MAX_ORDER)
        return 0;
    /* Only one ring may occupy each in-page slot. */
    if (left_order == right_order && left_order < ML_PAGE_SHIFT)
        return 0;
    /* grants[] must neither run into an in-page ring nor off the page. */
    size_t end = HEADER_SIZE + 4 * (ml_vchan_ring_pages(left_order) +
                                    ml_vchan_ring_pages(right_order));
    size_t limit = ML_PAGE_SIZE;
    if (left_order == 10 || right_order == 10)
        limit = SMALL_RING_OFFSET;
    else if (left_order == 11 || right_order == 11)
        limit = LARGE_RING_OFFSET;
    return end <= limit;
}

int ml_vchan_ctrl_init(void *page, int left_order, int right_order,
                       const uint32_t *grants, size_t ngrants)
{
    if (!page || !ml_vchan_orders_valid(left_order, right_order))
        return ML_EINVAL;
    if (ngrants != ml_vchan_ring_pages(left_order) + ml_vchan_ring_pages(right_order))
        return ML_EINVAL;
    struct ml_vchan_interface *c = page;
    memset(page, 0, HEADER_SIZE);
    atomic_store_explicit(&c->left_order, (uint16_t)left_order, memory_order_relaxed);
    atomic_store_explicit(&c->right_order, (uint16_t)right_order, memory_order_relaxed);
    atomic_store_explicit(&c->cli_live, ML_LIVE_WAITING, memory_order_relaxed);
    atomic_store_explicit(&c->srv_live, ML_LIVE_CONNECTED, memory_order_relaxed);
    /* The server wants to hear about the client's first write. */
    atomic_store_explicit(&c->cli_notify, ML_VCHAN_NOTIFY_WRITE, memory_order_relaxed);
    atomic_store_explicit(&c->srv_notify, 0, memory_order_relaxed);
    for (size_t i = 0; i < ngrants; i++)
        atomic_store_explicit(&c->grants[i], grants[i], memory_order_relaxed);
    /* Initialise everything /then/ let anyone who maps the page see it. */
    atomic_thread_fence(memory_order_release);
    return ML_OK;
}

void ml_ring_setup(struct ml_ring *r, struct ml_ring_shared *shr, uint8_t *buf, int order)
{
    r->shr = shr;
    r->buf = buf;
    r->size = (uint32_t)1 << order;
    r->mask = r->size - 1;
    r->own = 0;
}

void ml_vchan_free(ml_vchan *v)
{
    if (!v)
        return;
    if (v->provider && v->provider->release)
        v->provider->release(v);
    free(v);
}
