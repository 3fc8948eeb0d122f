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
 */
#include "emu_common.h"

#include <dirent.h>
#include <stdbool.h>
#include <sys/file.h>

#include <xenstore.h>

#define MAX_PERMS 64

struct xs_handle {
    unsigned dom;
    int txn_fd; /* lock held by the open transaction, or -1 */
    xs_transaction_t txn;
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

void xs_close(struct xs_handle *xsh)
{
    if (!xsh)
        return;
    end(xsh->txn_fd);
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
    return ok;
}

static int rm_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char sub[PATH_MAX];
        snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
        struct stat st;
        if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode))
            rm_tree(sub);
        else
            unlink(sub);
    }
    closedir(d);
    return rmdir(dir);
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
        ok = rm_tree(dir) == 0;
    }
    end(fd);
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
