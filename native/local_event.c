/*
 * local_event.c - the local event provider: an event channel is an eventfd.
 *
 * Each end owns one eventfd that its peer signals (docs/vchan.md section 8,
 * "Local provider"), mirroring a Xen event channel, which is one port per
 * end.  Waiting is not done here: trio waits for the fd to become readable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include "ml_errors.h"
#include "provider.h"

int ml_local_event_notify(struct ml_vchan *v)
{
    uint64_t one = 1;
    for (;;) {
        ssize_t n = write(v->peer_evfd, &one, sizeof one);
        if (n == (ssize_t)sizeof one)
            return ML_OK;
        if (n < 0 && errno == EINTR)
            continue;
        /* EAGAIN means the counter is saturated: the peer already has a
         * pending wakeup, which is all a signal promises. */
        if (n < 0 && errno == EAGAIN)
            return ML_OK;
        return ML_ESYS;
    }
}
