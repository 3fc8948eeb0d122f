/*
 * emu_common.h - shared helpers of the emulated Xen userspace (test only).
 *
 * The emulation stands in for libxenevtchn.so.1, libxengnttab.so.1 and
 * libxenstore.so.4 (same sonames and symbol versions) so that the unmodified
 * libxenvchan and meshlink's Xen provider can run between ordinary processes.
 * Every process is one "domain": its id comes from XENEMU_DOMID (default 0),
 * and the emulated host lives under the directory XENEMU_DIR:
 *
 *   gnt/<dom>.pages   the pages a domain granted (grant ref = page index)
 *   gnt/<dom>.table   8 bytes per ref: grantee domid + 1 (0 = free), flags
 *   evtchn/<dom>/<port>   one bound port: "<abstract socket name>\n<rdom> <rport>\n"
 *   store/...         XenStore: one directory per node ("#v" value, "#p" perms)
 *
 * An event channel end is an abstract-namespace datagram socket per
 * xenevtchn handle; notifying a port sends the peer's port number to the
 * peer handle's socket.  Unmap notifications (the byte cleared and the port
 * signalled when a grant mapping goes away, even when the process dies) are
 * carried out by a small watchdog child per registered mapping: it waits on
 * a pipe and performs the notification if the pipe reaches EOF without the
 * "quiet" byte, that is if its parent died without unmapping.
 *
 * Everything here is static so that each library carries its own copy.
 */
#ifndef XENEMU_COMMON_H
#define XENEMU_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define EMU_PAGE 4096u

static inline const char *emu_dir(void)
{
    const char *d = getenv("XENEMU_DIR");
    return d && *d ? d : NULL;
}

static inline unsigned emu_domid(void)
{
    const char *d = getenv("XENEMU_DOMID");
    return d && *d ? (unsigned)strtoul(d, NULL, 10) : 0u;
}

static inline int emu_mkdirs(const char *path)
{
    char buf[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(buf, 0700) < 0 && errno != EEXIST)
                return -1;
            *p = '/';
        }
    }
    if (mkdir(buf, 0700) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

/* --- event channel ports (shared by evtchn, gnttab and the watchdog) ---- */

static inline int emu_port_path(char *buf, size_t n, unsigned dom, unsigned port)
{
    const char *d = emu_dir();
    if (!d) {
        errno = ENOENT;
        return -1;
    }
    int r = snprintf(buf, n, "%s/evtchn/%u/%u", d, dom, port);
    return r < 0 || (size_t)r >= n ? -1 : 0;
}

/* Read a port file: the bound socket name and the remote end (-1 if none). */
static inline int emu_port_read(unsigned dom, unsigned port, char *sock, size_t socklen,
                                long *rdom, long *rport)
{
    char path[PATH_MAX];
    if (emu_port_path(path, sizeof path, dom, port) < 0)
        return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[512];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) {
        errno = EIO;
        return -1;
    }
    buf[n] = 0;
    char *nl = strchr(buf, '\n');
    if (!nl || (size_t)(nl - buf) >= socklen) {
        errno = EIO;
        return -1;
    }
    memcpy(sock, buf, (size_t)(nl - buf));
    sock[nl - buf] = 0;
    char *end;
    *rdom = strtol(nl + 1, &end, 10);
    *rport = strtol(end, NULL, 10);
    return 0;
}

static inline int emu_port_write(unsigned dom, unsigned port, const char *sock, long rdom,
                                 long rport, int exclusive)
{
    char path[PATH_MAX], tmp[PATH_MAX + 32];
    if (emu_port_path(path, sizeof path, dom, port) < 0)
        return -1;
    char buf[512];
    int len = snprintf(buf, sizeof buf, "%s\n%ld %ld\n", sock, rdom, rport);
    if (exclusive) {
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0)
            return -1;
        ssize_t w = write(fd, buf, (size_t)len);
        close(fd);
        return w == len ? 0 : -1;
    }
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, buf, (size_t)len);
    close(fd);
    if (w != len || rename(tmp, path) < 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

static inline socklen_t emu_sockaddr(struct sockaddr_un *sa, const char *name)
{
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (n > sizeof sa->sun_path - 2)
        n = sizeof sa->sun_path - 2;
    /* Abstract namespace: leading NUL, no file, gone with the socket. */
    memcpy(sa->sun_path + 1, name, n);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

/*
 * Signal local port `port` of domain `dom`: find its remote end and send the
 * remote port number to the socket bound there.  An unconnected or vanished
 * remote drops the event silently, as Xen does for an unbound port.
 */
static inline int emu_notify_port(int sendfd, unsigned dom, unsigned port)
{
    char sock[256];
    long rdom, rport;
    if (emu_port_read(dom, port, sock, sizeof sock, &rdom, &rport) < 0) {
        errno = EINVAL;
        return -1;
    }
    if (rdom < 0 || rport <= 0)
        return 0;
    char rsock[256];
    long d2, p2;
    if (emu_port_read((unsigned)rdom, (unsigned)rport, rsock, sizeof rsock, &d2, &p2) < 0)
        return 0;
    struct sockaddr_un sa;
    socklen_t sl = emu_sockaddr(&sa, rsock);
    uint32_t msg = (uint32_t)rport;
    if (sendto(sendfd, &msg, sizeof msg, MSG_DONTWAIT, (struct sockaddr *)&sa, sl) < 0) {
        /* EAGAIN: the peer already has wakeups queued; anything else: the
         * peer is gone.  Neither is an error for the sender. */
        return 0;
    }
    return 0;
}

/* --- unmap notification ------------------------------------------------- */

struct emu_unmap_notify {
    int active;
    int file_fd;         /* the pages file holding the page (owned) */
    off_t byte_off;      /* absolute offset of the byte to clear, or -1 */
    long port;           /* local event port to signal, or -1 */
    unsigned dom;        /* our domid (owner of the port) */
    int pipe_w;          /* watchdog's lifeline; -1 if no watchdog */
};

static inline void emu_fire(const struct emu_unmap_notify *n)
{
    if (n->byte_off >= 0) {
        uint8_t zero = 0;
        if (pwrite(n->file_fd, &zero, 1, n->byte_off) != 1) {
            /* nothing more we can do */
        }
    }
    if (n->port > 0) {
        int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (s >= 0) {
            emu_notify_port(s, n->dom, (unsigned)n->port);
            close(s);
        }
    }
}

/*
 * Arrange for `n` to fire if this process dies: fork a watchdog that keeps
 * only the file and the pipe open and waits for EOF.
 */
static inline int emu_arm_watchdog(struct emu_unmap_notify *n)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    /* Double fork: the watchdog is reparented to init, so the caller never
     * collects zombies of ours. */
    pid_t pid = fork();
    if (pid < 0) {
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid == 0) {
        if (fork() != 0)
            _exit(0);
        /* Grandchild: drop every other descriptor so that it keeps nothing
         * of the parent's alive (pipes to test harnesses, sockets...). */
        int keep_file = n->file_fd, keep_pipe = p[0];
        for (int fd = 0; fd < 4096; fd++)
            if (fd != keep_file && fd != keep_pipe)
                close(fd);
        signal(SIGINT, SIG_IGN);
        signal(SIGTERM, SIG_IGN);
        signal(SIGPIPE, SIG_IGN);
        char c = 0;
        ssize_t r;
        do {
            r = read(keep_pipe, &c, 1);
        } while (r < 0 && errno == EINTR);
        if (r == 1 && c == 'q')
            _exit(0);
        emu_fire(n);
        _exit(0);
    }
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
        ;
    close(p[0]);
    n->pipe_w = p[1];
    return 0;
}

/* Release `n`: fire it ourselves (a clean unmap) and dismiss the watchdog. */
static inline void emu_disarm(struct emu_unmap_notify *n, int fire)
{
    if (!n->active)
        return;
    if (fire)
        emu_fire(n);
    if (n->pipe_w >= 0) {
        char q = 'q';
        if (write(n->pipe_w, &q, 1) != 1) {
            /* watchdog already gone */
        }
        close(n->pipe_w);
        n->pipe_w = -1;
    }
    if (n->file_fd >= 0)
        close(n->file_fd);
    n->file_fd = -1;
    n->active = 0;
}

#endif
