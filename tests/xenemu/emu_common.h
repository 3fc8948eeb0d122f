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
 *   dom/<dom>.alive   a domain is alive while a process of it holds a read
 *                     lock (fcntl) on byte 0 of this file
 *   watch/<name>      one registered XenStore watch (socket, path, token)
 *
 * Domains live and die with their processes: every process that opens one
 * of the libraries joins its domain (takes the read lock and keeps it until
 * it exits), and the domain is dead once no process of it is left, as if
 * the toolstack had destroyed it.  Its XenStore home /local/domain/<dom> is
 * then removed and @releaseDomain fires, and -- the one thing that lets a
 * peer tell a crash from a close -- the unmap notifications of its grants
 * do not fire: a dead domain's kernel clears nothing.  A process that dies
 * while another process of its domain lives is a process crash: its
 * kernel (alive) performs the unmap notifications.  Domain 0 never dies.
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
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
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

/* --- domains ------------------------------------------------------------ */

struct emu_joined {
    char *dir;
    unsigned dom;
    int fd;
    int watched; /* a domain watchdog is armed (emu_dom_watchdog) */
};
static struct emu_joined emu_joined_tab[256];
static unsigned emu_njoined;

static inline int emu_dom_file(char *buf, size_t n, unsigned dom)
{
    const char *d = emu_dir();
    if (!d)
        return -1;
    snprintf(buf, n, "%s/dom", d);
    if (emu_mkdirs(buf) < 0)
        return -1;
    int r = snprintf(buf, n, "%s/dom/%u.alive", d, dom);
    return r < 0 || (size_t)r >= n ? -1 : 0;
}

static inline int emu_dom_joined(unsigned dom)
{
    const char *d = emu_dir();
    for (unsigned i = 0; d && i < emu_njoined; i++)
        if (emu_joined_tab[i].dom == dom && !strcmp(emu_joined_tab[i].dir, d))
            return 1;
    return 0;
}

/* Make this process part of domain `dom` (of this emulated host) until it
 * exits.  The lock's fd is kept open on purpose: closing any fd of the file
 * would drop the process's fcntl locks on it. */
static inline void emu_dom_join(unsigned dom)
{
    char path[PATH_MAX];
    if (emu_dom_joined(dom) || emu_njoined >= 256 || emu_dom_file(path, sizeof path, dom) < 0)
        return;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    struct flock fl = {.l_type = F_RDLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
    if (fcntl(fd, F_SETLK, &fl) < 0) {
        close(fd);
        return;
    }
    char *d = strdup(emu_dir());
    if (!d) {
        close(fd);
        return;
    }
    emu_joined_tab[emu_njoined].dir = d;
    emu_joined_tab[emu_njoined].dom = dom;
    emu_joined_tab[emu_njoined].fd = fd;
    emu_njoined++;
}

/*
 * Whether domain `dom` has a live process.  `dying` is a process known to be
 * exiting (a watchdog's owner): its lock may linger for a moment while the
 * kernel closes its files, so it is waited out (bounded) rather than counted.
 */
static inline int emu_dom_alive(unsigned dom, pid_t dying)
{
    if (dom == 0 || (dying <= 0 && emu_dom_joined(dom)))
        return 1;
    char path[PATH_MAX];
    if (emu_dom_file(path, sizeof path, dom) < 0)
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    int alive = 1;
    for (int i = 0; i < 3000; i++) {
        struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 1};
        if (fcntl(fd, F_GETLK, &fl) < 0)
            break;
        if (fl.l_type == F_UNLCK) {
            alive = 0;
            break;
        }
        if (dying <= 0 || fl.l_pid != dying)
            break;
        usleep(1000);
    }
    close(fd);
    return alive;
}

static inline int emu_rm_tree(const char *dir);

/* --- XenStore watches (registered by xenstore.c, fired by anyone) ------- */

/*
 * Fire every watch on `abs` or one of its ancestors (a node changed), and
 * with `removed` also those on its descendants (a subtree went away).  The
 * event names the changed node, relative when the watch was registered
 * relative.  A watcher whose socket is gone is dropped.  (xenstored would
 * also filter events by the watcher's permissions; the emulation does not.)
 */
static inline void emu_fire_watches(const char *abs, int removed)
{
    const char *d = emu_dir();
    if (!d)
        return;
    char wdir[PATH_MAX];
    snprintf(wdir, sizeof wdir, "%s/watch", d);
    DIR *dh = opendir(wdir);
    if (!dh)
        return;
    int s = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct dirent *e;
    size_t alen = strlen(abs);
    while (s >= 0 && (e = readdir(dh))) {
        if (e->d_name[0] == '.')
            continue;
        char file[PATH_MAX + 256], buf[4096];
        snprintf(file, sizeof file, "%s/%s", wdir, e->d_name);
        int fd = open(file, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = 0;
        /* sock \n path \n token \n strip \n */
        char *sock = buf, *wpath = strchr(sock, '\n');
        if (!wpath)
            continue;
        *wpath++ = 0;
        char *token = strchr(wpath, '\n');
        if (!token)
            continue;
        *token++ = 0;
        char *strip_s = strchr(token, '\n');
        if (!strip_s)
            continue;
        *strip_s++ = 0;
        size_t strip = strtoul(strip_s, NULL, 10);
        size_t wlen = strlen(wpath);
        const char *event = NULL;
        if (wpath[0] == '@') {
            if (!strcmp(abs, wpath))
                event = wpath;
        } else if (!strncmp(abs, wpath, wlen) && (abs[wlen] == 0 || abs[wlen] == '/')) {
            event = abs;
        } else if (removed && !strncmp(wpath, abs, alen) && wpath[alen] == '/') {
            event = wpath;
        }
        if (!event)
            continue;
        if (event[0] == '/' && strip && strlen(event) > strip)
            event += strip;
        char msg[4096];
        size_t el = strlen(event), tl = strlen(token);
        if (el + tl + 2 > sizeof msg)
            continue;
        memcpy(msg, event, el + 1);
        memcpy(msg + el + 1, token, tl + 1);
        struct sockaddr_un sa;
        socklen_t sl = emu_sockaddr(&sa, sock);
        if (sendto(s, msg, el + tl + 2, MSG_DONTWAIT, (struct sockaddr *)&sa, sl) < 0 &&
            errno != EAGAIN)
            unlink(file); /* the watcher is gone */
    }
    if (s >= 0)
        close(s);
    closedir(dh);
}

/* Domain `dom` has no process left: the toolstack's part (its home goes
 * away) and xenstored's (@releaseDomain).  Idempotent. */
static inline void emu_domain_died(unsigned dom)
{
    const char *d = emu_dir();
    if (!d || dom == 0)
        return;
    char lock[PATH_MAX], home[PATH_MAX];
    snprintf(lock, sizeof lock, "%s/store.lock", d);
    snprintf(home, sizeof home, "%s/store/local/domain/%u", d, dom);
    int fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0)
        while (flock(fd, LOCK_EX) < 0 && errno == EINTR)
            ;
    emu_rm_tree(home);
    if (fd >= 0)
        close(fd);
    emu_fire_watches("@releaseDomain", 0);
}

static inline int emu_rm_tree(const char *dir)
{
    DIR *dh = opendir(dir);
    if (!dh)
        return -1;
    struct dirent *e;
    while ((e = readdir(dh))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char sub[PATH_MAX + 256];
        int r = snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
        if (r < 0 || (size_t)r >= PATH_MAX)
            continue;
        struct stat st;
        if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
            emu_rm_tree(sub);
        else
            unlink(sub);
    }
    closedir(dh);
    return rmdir(dir);
}

/* --- unmap notification ------------------------------------------------- */

struct emu_unmap_notify {
    int active;
    pid_t owner;         /* the process that armed it */
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
    n->owner = getpid();
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
        /* Our process died without unmapping.  If its domain lives on, its
         * kernel performs the notification; if the domain died with it,
         * nothing clears the byte and only @releaseDomain tells. */
        if (emu_dom_alive(n->dom, n->owner))
            emu_fire(n);
        else
            emu_domain_died(n->dom);
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

/*
 * Arm, once per domain and process, a watchdog that declares the domain
 * dead (home removed, @releaseDomain) when this process dies and was its
 * last one, even if it held no grant mapping with an unmap notification.
 * It lives as long as the process (the pipe is never closed on purpose).
 */
static inline void emu_dom_watchdog(unsigned dom)
{
    const char *d = emu_dir();
    for (unsigned i = 0; d && i < emu_njoined; i++) {
        struct emu_joined *j = &emu_joined_tab[i];
        if (j->dom != dom || strcmp(j->dir, d) || j->watched)
            continue;
        struct emu_unmap_notify n = {.active = 1, .file_fd = -1, .byte_off = -1, .port = -1,
                                     .dom = dom, .pipe_w = -1};
        if (emu_arm_watchdog(&n) == 0)
            j->watched = 1;
        return;
    }
}

#endif
