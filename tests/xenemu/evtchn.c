/*
 * evtchn.c - emulated libxenevtchn.so.1 (VERS_1.0), test only.
 *
 * A handle is an abstract-namespace datagram socket; its fd is what
 * xenevtchn_fd returns, readable while events are queued.  A bound port is
 * a file evtchn/<dom>/<port> naming the handle's socket and the remote end;
 * ports are allocated per domain from 1 (libxenvchan treats 0 as invalid).
 * xenevtchn_pending coalesces everything queued and returns one port at a
 * time.  Masking is not modelled: unmask only checks the port (an event that
 * arrives while "masked" simply stays queued, which is what unmask would
 * deliver).  See emu_common.h for the layout.
 */
#include "emu_common.h"

#include <xenevtchn.h>

#define MAX_PORTS 4096

struct xenevtchn_handle {
    int fd;
    unsigned dom;
    char name[128];
    unsigned char bound[MAX_PORTS];   /* ports bound through this handle */
    unsigned char pending[MAX_PORTS]; /* coalesced, not yet returned */
};

static unsigned long counter;

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    const char *d = emu_dir();
    if (!d) {
        errno = ENOENT;
        return NULL;
    }
    xenevtchn_handle *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->dom = emu_domid();
    emu_dom_join(h->dom);
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/evtchn/%u", d, h->dom);
    if (emu_mkdirs(dir) < 0)
        goto fail;
    h->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (h->fd < 0)
        goto fail;
    unsigned r = 0;
    int rfd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (rfd >= 0) {
        if (read(rfd, &r, sizeof r) != (ssize_t)sizeof r)
            r = 0;
        close(rfd);
    }
    snprintf(h->name, sizeof h->name, "xenemu-evtchn-%d-%lu-%08x", (int)getpid(), ++counter, r);
    struct sockaddr_un sa;
    socklen_t sl = emu_sockaddr(&sa, h->name);
    if (bind(h->fd, (struct sockaddr *)&sa, sl) < 0) {
        close(h->fd);
        goto fail;
    }
    return h;
fail:
    free(h);
    return NULL;
}

int xenevtchn_close(xenevtchn_handle *xce)
{
    if (!xce)
        return 0;
    for (unsigned p = 1; p < MAX_PORTS; p++)
        if (xce->bound[p])
            xenevtchn_unbind(xce, p);
    close(xce->fd);
    free(xce);
    return 0;
}

int xenevtchn_fd(xenevtchn_handle *xce)
{
    return xce->fd;
}

int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port)
{
    if (port >= MAX_PORTS || !xce->bound[port]) {
        errno = EINVAL;
        return -1;
    }
    return emu_notify_port(xce->fd, xce->dom, port);
}

/* Allocate the lowest free port of our domain, recording the remote end. */
static int alloc_port(xenevtchn_handle *xce, long rdom, long rport)
{
    for (unsigned p = 1; p < MAX_PORTS; p++) {
        if (emu_port_write(xce->dom, p, xce->name, rdom, rport, 1) == 0) {
            xce->bound[p] = 1;
            return (int)p;
        }
        if (errno != EEXIST)
            return -1;
    }
    errno = ENOSPC;
    return -1;
}

xenevtchn_port_or_error_t xenevtchn_bind_unbound_port(xenevtchn_handle *xce, uint32_t domid)
{
    /* Unbound: the remote domain is recorded, the remote port is not yet
     * known (-domid-1 encodes "reserved for domid"). */
    return alloc_port(xce, -(long)domid - 1, -1);
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port)
{
    char rsock[256];
    long rdom, rport;
    if (emu_port_read(domid, remote_port, rsock, sizeof rsock, &rdom, &rport) < 0) {
        errno = EINVAL;
        return -1;
    }
    /* Only an unbound port reserved for us may be connected. */
    if (rdom != -(long)xce->dom - 1 || rport != -1) {
        errno = EINVAL;
        return -1;
    }
    int lport = alloc_port(xce, (long)domid, (long)remote_port);
    if (lport < 0)
        return -1;
    if (emu_port_write(domid, remote_port, rsock, xce->dom, lport, 0) < 0) {
        xenevtchn_unbind(xce, (evtchn_port_t)lport);
        return -1;
    }
    return lport;
}

int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port)
{
    if (port >= MAX_PORTS || !xce->bound[port]) {
        errno = EINVAL;
        return -1;
    }
    char path[PATH_MAX];
    if (emu_port_path(path, sizeof path, xce->dom, port) == 0)
        unlink(path);
    xce->bound[port] = 0;
    xce->pending[port] = 0;
    return 0;
}

static int take_pending(xenevtchn_handle *xce)
{
    for (unsigned p = 1; p < MAX_PORTS; p++) {
        if (xce->pending[p]) {
            xce->pending[p] = 0;
            return (int)p;
        }
    }
    return -1;
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    int p = take_pending(xce);
    if (p > 0)
        return p;
    /* Wait (unless the fd was made non-blocking) for one event, then take
     * whatever else is queued without waiting. */
    uint32_t msg;
    ssize_t n;
    for (;;) {
        n = recv(xce->fd, &msg, sizeof msg, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == (ssize_t)sizeof msg && msg < MAX_PORTS && xce->bound[msg]) {
            xce->pending[msg] = 1;
            break;
        }
        /* An event for a port we no longer have: drop it, keep waiting. */
    }
    while ((n = recv(xce->fd, &msg, sizeof msg, MSG_DONTWAIT)) > 0)
        if (n == (ssize_t)sizeof msg && msg < MAX_PORTS && xce->bound[msg])
            xce->pending[msg] = 1;
    return take_pending(xce);
}

int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port)
{
    if (port >= MAX_PORTS || !xce->bound[port]) {
        errno = EINVAL;
        return -1;
    }
    return 0;
}
