/*
 * xenstore.c - emulated libxenstore.so.4 (VERS_4.0), test only.
 *
 * The store is a directory tree under XENEMU_DIR/store: node /a/b is the
 * directory store/a/b, its value the file "#v" and its permissions the file
 * "#p" ("owner default [id perm]...", XS_PERM_* bits) -- '#' cannot occur in
 * a XenStore node name, so these never collide with children.  Rules follow
 * xenstored: dom0 may do anything; a node's owner has full access; other
 * domains get the permission listed for them, else the default; a new node
 * inherits its parent's permissions, owned by its creator unless created by
 * dom0; relative paths are under /local/domain/<own domid>.  xs_open seeds
 * /local/domain/<own domid> and its "domid" node, as the toolstack would.
 *
 * A transaction holds one store-wide lock (flock) from start to end; ending
 * it with abort=true does not roll back (nothing in the tests aborts).
 *
 * Watches: xs_watch records (our socket, path, token) as a file under
 * watch/ and queues the initial event xenstored sends; every write, mkdir,
 * rm and permission change fires the matching watches (emu_common.h);
 * xs_fileno is the handle's datagram socket, readable while events are
 * queued, xs_check_watch / xs_read_watch take one.  A domain whose processes
 * are all gone has its home removed (by the last one's watchdog, or here,
 * lazily, when someone looks) and fires @releaseDomain (emu_common.h).
 */
#include "emu_common.h"

#include <stdbool.h>

#include <xenstore.h>

#define MAX_PERMS 64

struct xs_handle {
    unsigned dom;
    int txn_fd; /* lock held by the open transaction, or -1 */
    xs_transaction_t txn;
    int wfd;    /* watch event socket, or -1 until the first watch */
    char wname[128];
    unsigned nwatch;
};

struct perms {
    unsigned n;
    struct xs_permissions p[MAX_PERMS];
};

static bool valid_name(const char *path)
{
    static const char ok[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-/_@";
    size_t n = strlen(path);
    if (n == 0 || n > 3072 || strspn(path, ok) != n)
        return false;
    if (strstr(path, "//"))
        return false;
    if (n > 1 && path[n - 1] == '/')
        return false;
    return true;
}

/* Absolute XenStore path for `path` (relative ones are under our domain). */
static int abs_path(struct xs_handle *h, const char *path, char *out, size_t n)
{
    if (!path || !valid_name(path)) {
        errno = EINVAL;
        return -1;
    }
    int r = path[0] == '/' ? snprintf(out, n, "%s", path)
                           : snprintf(out, n, "/local/domain/%u/%s", h->dom, path);
    if (r < 0 || (size_t)r >= n) {
        errno = ENAMETOOLONG;
        return -1;
    }
    return 0;
}

static int node_dir(const char *abs, char *out, size_t n)
{
    const char *d = emu_dir();
    int r = snprintf(out, n, "%s/store%s", d, strcmp(abs, "/") ? abs : "");
    return r < 0 || (size_t)r >= n ? -1 : 0;
}

static bool node_exists(const char *abs)
{
    char dir[PATH_MAX];
    struct stat st;
    return node_dir(abs, dir, sizeof dir) == 0 && stat(dir, &st) == 0 && S_ISDIR(st.st_mode);
}

static void read_perms(const char *abs, struct perms *p)
{
    char dir[PATH_MAX], file[PATH_MAX + 4];
    p->n = 1;
    p->p[0].id = 0;
    p->p[0].perms = XS_PERM_NONE;
    if (node_dir(abs, dir, sizeof dir) < 0)
        return;
    snprintf(file, sizeof file, "%s/#p", dir);
    FILE *f = fopen(file, "re");
    if (!f)
        return;
    unsigned n = 0, id, perm;
    while (n < MAX_PERMS && fscanf(f, "%u %u", &id, &perm) == 2) {
        p->p[n].id = id;
        p->p[n].perms = perm;
        n++;
    }
    fclose(f);
    if (n)
        p->n = n;
}

static int write_perms(const char *abs, const struct perms *p)
{
    char dir[PATH_MAX], file[PATH_MAX + 4];
    if (node_dir(abs, dir, sizeof dir) < 0)
        return -1;
    snprintf(file, sizeof file, "%s/#p", dir);
    FILE *f = fopen(file, "we");
    if (!f)
        return -1;
    for (unsigned i = 0; i < p->n; i++)
        fprintf(f, "%u %u\n", p->p[i].id, p->p[i].perms);
    return fclose(f) == 0 ? 0 : -1;
}

static bool allowed(unsigned dom, const struct perms *p, unsigned want)
{
    if (dom == 0 || p->p[0].id == dom)
        return true;
    for (unsigned i = 1; i < p->n; i++)
        if (p->p[i].id == dom)
            return (p->p[i].perms & want) == want;
    return (p->p[0].perms & want) == want;
}

static bool may(struct xs_handle *h, const char *abs, unsigned want)
{
    struct perms p;
    read_perms(abs, &p);
    return allowed(h->dom, &p, want);
}

/* --- locking ------------------------------------------------------------ */

static int lock_store(void)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/store.lock", emu_dir());
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    while (flock(fd, LOCK_EX) < 0 && errno == EINTR)
        ;
    return fd;
}

static int begin(struct xs_handle *h, xs_transaction_t t)
{
    if (t != XBT_NULL && t != h->txn) {
        errno = ENOENT;
        return -2;
    }
    if (h->txn_fd >= 0)
        return -1; /* already locked by our transaction */
    return lock_store();
}

static void end(int fd)
{
    if (fd >= 0)
        close(fd);
}

/* Create `abs` and missing ancestors, inheriting permissions (caller holds
 * the lock and checked write access on the nearest existing ancestor). */
static int create_node(struct xs_handle *h, const char *abs, bool force_owner)
{
    if (node_exists(abs))
        return 0;
    char parent[3100];
    snprintf(parent, sizeof parent, "%s", abs);
    char *slash = strrchr(parent, '/');
    if (slash == parent)
        parent[1] = 0;
    else
        *slash = 0;
    if (create_node(h, parent, force_owner) < 0)
        return -1;
    char dir[PATH_MAX];
    if (node_dir(abs, dir, sizeof dir) < 0 || (mkdir(dir, 0700) < 0 && errno != EEXIST))
        return -1;
    struct perms p;
    read_perms(parent, &p);
    if (h->dom != 0 || force_owner)
        p.p[0].id = h->dom;
    return write_perms(abs, &p);
}

/* Nearest existing ancestor of abs (or abs itself). */
static void nearest(const char *abs, char *out, size_t n)
{
    snprintf(out, n, "%s", abs);
    while (!node_exists(out)) {
        char *slash = strrchr(out, '/');
        if (!slash || slash == out) {
            snprintf(out, n, "/");
            return;
        }
        *slash = 0;
    }
}

/* A dead domain's home goes away (the toolstack's job); done lazily for a
 * domain that died with no watchdog left to do it.  Caller holds the lock. */
static void reap(const char *abs)
{
    unsigned dom;
    int used = 0;
    if (sscanf(abs, "/local/domain/%u%n", &dom, &used) != 1 ||
        (abs[used] != 0 && abs[used] != '/'))
        return;
    char home[64];
    snprintf(home, sizeof home, "/local/domain/%u", dom);
    if (!node_exists(home) || emu_dom_alive(dom, 0))
        return;
    char dir[PATH_MAX];
    if (node_dir(home, dir, sizeof dir) == 0)
        emu_rm_tree(dir);
}

/* --- API ---------------------------------------------------------------- */

struct xs_handle *xs_open(unsigned long flags)
{
    (void)flags;
    const char *d = emu_dir();
    if (!d) {
        errno = ENOENT;
        return NULL;
    }
    struct xs_handle *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->dom = emu_domid();
    h->txn_fd = -1;
    h->wfd = -1;
    emu_dom_join(h->dom);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/store", d);
    if (emu_mkdirs(path) < 0) {
        free(h);
        return NULL;
    }
    /* Seed our domain's home as the toolstack does when it builds a domain. */
    int fd = lock_store();
    char home[64], domid[80];
    snprintf(home, sizeof home, "/local/domain/%u", h->dom);
    snprintf(domid, sizeof domid, "%s/domid", home);
    reap(home);
    if (!node_exists(domid)) {
        unsigned saved = h->dom;
        h->dom = 0;
        create_node(h, "/local/domain", false);
        h->dom = saved;
        create_node(h, home, true);
        create_node(h, domid, true);
        char dir[PATH_MAX], file[PATH_MAX + 4];
        node_dir(domid, dir, sizeof dir);
        snprintf(file, sizeof file, "%s/#v", dir);
        FILE *f = fopen(file, "we");
        if (f) {
            fprintf(f, "%u", h->dom);
            fclose(f);
        }
    }
    end(fd);
    return h;
}

struct xs_handle *xs_daemon_open(void)
{
    return xs_open(0);
}

static void drop_watches(struct xs_handle *h, const char *path, const char *token);

void xs_close(struct xs_handle *xsh)
{
    if (!xsh)
        return;
    end(xsh->txn_fd);
    if (xsh->wfd >= 0) {
        drop_watches(xsh, NULL, NULL);
        close(xsh->wfd);
    }
    free(xsh);
}

void xs_daemon_close(struct xs_handle *xsh)
{
    xs_close(xsh);
}

void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len)
{
    char abs[3100];
    if (abs_path(h, path, abs, sizeof abs) < 0)
        return NULL;
    int fd = begin(h, t);
    if (fd == -2)
        return NULL;
    char *out = NULL;
    reap(abs);
    if (!node_exists(abs)) {
        errno = ENOENT;
        goto done;
    }
    if (!may(h, abs, XS_PERM_READ)) {
        errno = EACCES;
        goto done;
    }
    char dir[PATH_MAX], file[PATH_MAX + 4];
    node_dir(abs, dir, sizeof dir);
    snprintf(file, sizeof file, "%s/#v", dir);
    int vfd = open(file, O_RDONLY | O_CLOEXEC);
    struct stat st;
    size_t size = 0;
    if (vfd >= 0 && fstat(vfd, &st) == 0)
        size = (size_t)st.st_size;
    out = malloc(size + 1);
    if (out) {
        ssize_t r = vfd >= 0 ? pread(vfd, out, size, 0) : 0;
        if (r < 0)
            r = 0;
        out[r] = 0;
        if (len)
            *len = (unsigned)r;
    }
    if (vfd >= 0)
        close(vfd);
done:
    end(fd);
    return out;
}

bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data,
              unsigned int len)
{
    char abs[3100], anc[3100];
    if (abs_path(h, path, abs, sizeof abs) < 0)
        return false;
    int fd = begin(h, t);
    if (fd == -2)
        return false;
    bool ok = false;
    nearest(abs, anc, sizeof anc);
    if (!may(h, anc, XS_PERM_WRITE)) {
        errno = EACCES;
        goto done;
    }
    if (create_node(h, abs, false) < 0)
        goto done;
    char dir[PATH_MAX], file[PATH_MAX + 4], tmp[PATH_MAX + 16];
    node_dir(abs, dir, sizeof dir);
    snprintf(file, sizeof file, "%s/#v", dir);
    snprintf(tmp, sizeof tmp, "%s/#v.%d", dir, (int)getpid());
    int vfd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (vfd < 0)
        goto done;
    ok = write(vfd, data, len) == (ssize_t)len;
    close(vfd);
    ok = ok && rename(tmp, file) == 0;
done:
    end(fd);
    if (ok)
        emu_fire_watches(abs, 0);
    return ok;
}

bool xs_mkdir(struct xs_handle *h, xs_transaction_t t, const char *path)
{
    char abs[3100], anc[3100];
    if (abs_path(h, path, abs, sizeof abs) < 0)
        return false;
    int fd = begin(h, t);
    if (fd == -2)
        return false;
    bool ok = false;
    nearest(abs, anc, sizeof anc);
    if (!may(h, anc, XS_PERM_WRITE))
        errno = EACCES;
    else
        ok = create_node(h, abs, false) == 0;
    end(fd);
    if (ok)
        emu_fire_watches(abs, 0);
    return ok;
}

bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path)
{
    char abs[3100];
    if (abs_path(h, path, abs, sizeof abs) < 0)
        return false;
    int fd = begin(h, t);
    if (fd == -2)
        return false;
    bool ok = false;
    if (!node_exists(abs))
        errno = ENOENT;
    else if (!strcmp(abs, "/") || !may(h, abs, XS_PERM_WRITE))
        errno = EACCES;
    else {
        char dir[PATH_MAX];
        node_dir(abs, dir, sizeof dir);
        ok = emu_rm_tree(dir) == 0;
    }
    end(fd);
    if (ok)
        emu_fire_watches(abs, 1);
    return ok;
}

char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *num)
{
    char abs[3100];
    if (abs_path(h, path, abs, sizeof abs) < 0)
        return NULL;
    int fd = begin(h, t);
    if (fd == -2)
        return NULL;
    char **out = NULL;
    reap(abs);
    if (!node_exists(abs)) {
        errno = ENOENT;
        goto done;
    }
    if (!may(h, abs, XS_PERM_READ)) {
        errno = EACCES;
        goto done;
    }
    char dir[PATH_MAX];
    node_dir(abs, dir, sizeof dir);
    DIR *d = opendir(dir);
    if (!d)
        goto done;
    size_t count = 0, bytes = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.' && e->d_name[0] != '#') {
            count++;
            bytes += strlen(e->d_name) + 1;
        }
    rewinddir(d);
    out = malloc((count + 1) * sizeof(char *) + bytes);
    if (out) {
        char *s = (char *)(out + count + 1);
        size_t i = 0;
        while ((e = readdir(d)) && i < count)
            if (e->d_name[0] != '.' && e->d_name[0] != '#') {
                size_t l = strlen(e->d_name) + 1;
                memcpy(s, e->d_name, l);
                out[i++] = s;
                s += l;
            }
        out[i] = NULL;
        *num = (unsigned)i;
    }
    closedir(d);
done:
    end(fd);
    return out;
}

struct xs_permissions *xs_get_permissions(struct xs_handle *h, xs_transaction_t t,
                                          const char *path, unsigned int *num)
{
    char abs[3100];
    if (abs_path(h, path, abs, sizeof abs) < 0)
        return NULL;
    int fd = begin(h, t);
    if (fd == -2)
        return NULL;
    struct xs_permissions *out = NULL;
    if (!node_exists(abs))
        errno = ENOENT;
    else if (!may(h, abs, XS_PERM_READ))
        errno = EACCES;
    else {
        struct perms p;
        read_perms(abs, &p);
        out = malloc(p.n * sizeof *out);
        if (out) {
            memcpy(out, p.p, p.n * sizeof *out);
            *num = p.n;
        }
    }
    end(fd);
    return out;
}

bool xs_set_permissions(struct xs_handle *h, xs_transaction_t t, const char *path,
                        struct xs_permissions *perms, unsigned int num_perms)
{
    char abs[3100];
    if (abs_path(h, path, abs, sizeof abs) < 0)
        return false;
    if (num_perms == 0 || num_perms > MAX_PERMS) {
        errno = EINVAL;
        return false;
    }
    int fd = begin(h, t);
    if (fd == -2)
        return false;
    bool ok = false;
    struct perms cur;
    if (!node_exists(abs)) {
        errno = ENOENT;
        goto done;
    }
    read_perms(abs, &cur);
    /* Only the owner (or dom0) may change permissions. */
    if (h->dom != 0 && cur.p[0].id != h->dom) {
        errno = EACCES;
        goto done;
    }
    struct perms p;
    p.n = num_perms;
    for (unsigned i = 0; i < num_perms; i++) {
        p.p[i].id = perms[i].id;
        p.p[i].perms = perms[i].perms & (XS_PERM_READ | XS_PERM_WRITE);
    }
    ok = write_perms(abs, &p) == 0;
done:
    end(fd);
    if (ok)
        emu_fire_watches(abs, 0);
    return ok;
}

xs_transaction_t xs_transaction_start(struct xs_handle *h)
{
    if (h->txn_fd >= 0) {
        errno = EBUSY;
        return XBT_NULL;
    }
    h->txn_fd = lock_store();
    if (h->txn_fd < 0)
        return XBT_NULL;
    h->txn = h->txn + 1 ? h->txn + 1 : 1;
    return h->txn;
}

bool xs_transaction_end(struct xs_handle *h, xs_transaction_t t, bool abort)
{
    (void)abort; /* no rollback: see the file comment */
    if (t == XBT_NULL || t != h->txn || h->txn_fd < 0) {
        errno = ENOENT;
        return false;
    }
    end(h->txn_fd);
    h->txn_fd = -1;
    return true;
}

char *xs_get_domain_path(struct xs_handle *h, unsigned int domid)
{
    (void)h;
    char *out = malloc(32);
    if (out)
        snprintf(out, 32, "/local/domain/%u", domid);
    return out;
}

/* --- watches ------------------------------------------------------------ */

static unsigned long wcounter;

static int watch_socket(struct xs_handle *h)
{
    if (h->wfd >= 0)
        return 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    unsigned r = 0;
    int rfd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (rfd >= 0) {
        if (read(rfd, &r, sizeof r) != (ssize_t)sizeof r)
            r = 0;
        close(rfd);
    }
    snprintf(h->wname, sizeof h->wname, "xenemu-xsw-%d-%lu-%08x", (int)getpid(), ++wcounter, r);
    struct sockaddr_un sa;
    socklen_t sl = emu_sockaddr(&sa, h->wname);
    if (bind(fd, (struct sockaddr *)&sa, sl) < 0) {
        close(fd);
        return -1;
    }
    h->wfd = fd;
    return 0;
}

int xs_fileno(struct xs_handle *h)
{
    return watch_socket(h) < 0 ? -1 : h->wfd;
}

/* Remove our watch files matching path and token (NULL: any). */
static void drop_watches(struct xs_handle *h, const char *path, const char *token)
{
    char wdir[PATH_MAX];
    snprintf(wdir, sizeof wdir, "%s/watch", emu_dir());
    DIR *d = opendir(wdir);
    if (!d)
        return;
    struct dirent *e;
    size_t nl = strlen(h->wname);
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, h->wname, nl) || e->d_name[nl] != '.')
            continue;
        char file[PATH_MAX + 256], buf[4096];
        snprintf(file, sizeof file, "%s/%s", wdir, e->d_name);
        if (path) {
            int fd = open(file, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            if (n <= 0)
                continue;
            buf[n] = 0;
            char want[4096];
            snprintf(want, sizeof want, "%s\n%s\n%s\n", h->wname, path, token);
            if (strncmp(buf, want, strlen(want)))
                continue;
        }
        unlink(file);
    }
    closedir(d);
}

static int watch_abs(struct xs_handle *h, const char *path, char *out, size_t n, size_t *strip)
{
    *strip = 0;
    if (path && path[0] == '@') {
        snprintf(out, n, "%s", path);
        return 0;
    }
    if (abs_path(h, path, out, n) < 0)
        return -1;
    if (path[0] != '/')
        *strip = strlen(out) - strlen(path);
    return 0;
}

bool xs_watch(struct xs_handle *h, const char *path, const char *token)
{
    char abs[3100];
    size_t strip;
    if (!token || strchr(token, '\n') || watch_abs(h, path, abs, sizeof abs, &strip) < 0 ||
        watch_socket(h) < 0)
        return false;
    char wdir[PATH_MAX], file[PATH_MAX + 256], tmp[PATH_MAX + 300];
    snprintf(wdir, sizeof wdir, "%s/watch", emu_dir());
    if (emu_mkdirs(wdir) < 0)
        return false;
    snprintf(file, sizeof file, "%s/%s.%u", wdir, h->wname, ++h->nwatch);
    snprintf(tmp, sizeof tmp, "%s.tmp", file);
    FILE *f = fopen(tmp, "we");
    if (!f)
        return false;
    fprintf(f, "%s\n%s\n%s\n%zu\n", h->wname, abs, token, strip);
    if (fclose(f) != 0 || rename(tmp, file) < 0) {
        unlink(tmp);
        return false;
    }
    /* xenstored fires every new watch once, with the path as registered. */
    char msg[4096];
    size_t pl = strlen(path), tl = strlen(token);
    if (pl + tl + 2 <= sizeof msg) {
        memcpy(msg, path, pl + 1);
        memcpy(msg + pl + 1, token, tl + 1);
        struct sockaddr_un sa;
        socklen_t sl = emu_sockaddr(&sa, h->wname);
        if (sendto(h->wfd, msg, pl + tl + 2, MSG_DONTWAIT, (struct sockaddr *)&sa, sl) < 0) {
            /* a full queue already has events to wake the watcher */
        }
    }
    return true;
}

bool xs_unwatch(struct xs_handle *h, const char *path, const char *token)
{
    char abs[3100];
    size_t strip;
    if (h->wfd < 0 || !token || watch_abs(h, path, abs, sizeof abs, &strip) < 0) {
        errno = ENOENT;
        return false;
    }
    drop_watches(h, abs, token);
    return true;
}

static char **take_event(struct xs_handle *h, unsigned *num, int flags)
{
    if (watch_socket(h) < 0)
        return NULL;
    char msg[4096];
    ssize_t n;
    do {
        n = recv(h->wfd, msg, sizeof msg - 1, flags);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return NULL;
    msg[n] = 0;
    char *path = msg, *token = memchr(msg, 0, (size_t)n);
    if (!token || token + 1 > msg + n) {
        errno = EIO;
        return NULL;
    }
    token++;
    size_t pl = strlen(path) + 1, tl = strlen(token) + 1;
    char **out = malloc(3 * sizeof(char *) + pl + tl);
    if (!out)
        return NULL;
    char *s = (char *)(out + 3);
    memcpy(s, path, pl);
    memcpy(s + pl, token, tl);
    out[XS_WATCH_PATH] = s;
    out[XS_WATCH_TOKEN] = s + pl;
    out[2] = NULL;
    if (num)
        *num = 2;
    return out;
}

char **xs_check_watch(struct xs_handle *h)
{
    return take_event(h, NULL, MSG_DONTWAIT);
}

char **xs_read_watch(struct xs_handle *h, unsigned int *num)
{
    return take_event(h, num, 0);
}
