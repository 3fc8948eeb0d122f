/*
 * gnttab.c - emulated libxengnttab.so.1 (VERS_1.0): xengntshr_* (share our
 * pages) and xengnttab_* (map a peer's), test only.
 *
 * A domain's grants are pages of gnt/<dom>.pages; grant ref N is page N,
 * and gnt/<dom>.table says to which domain each ref is granted and whether
 * writably (8 bytes per ref; bytes 0..3 hold the next free ref, starting at
 * 8 as refs handed out by a real Xen start small).  Mapping checks the table
 * as the hypervisor would: granted to the caller's domain, writable if
 * PROT_WRITE is asked.  Refs are never reused (the file is sparse).
 *
 * Mappings are plain shared mmaps of the pages file, so a caller may munmap
 * them directly (libxenvchan_close does so for ring pages).  Unmap notify:
 * see emu_common.h.
 */
#include "emu_common.h"

#include <sys/file.h>
#include <sys/mman.h>

#include <xengnttab.h>

struct mapping {
    struct mapping *next;
    void *addr;
    uint32_t count;
    int shared;       /* ours (gntshr) rather than a peer's (gnttab) */
    uint32_t first_ref;
    struct emu_unmap_notify notify;
};

struct xengntdev_handle {
    unsigned dom;
    struct mapping *maps;
};

static int table_path(char *buf, size_t n, unsigned dom, const char *ext)
{
    const char *d = emu_dir();
    if (!d) {
        errno = ENOENT;
        return -1;
    }
    snprintf(buf, n, "%s/gnt", d);
    if (emu_mkdirs(buf) < 0)
        return -1;
    snprintf(buf, n, "%s/gnt/%u.%s", d, dom, ext);
    return 0;
}

static int open_file(unsigned dom, const char *ext, int flags)
{
    char path[PATH_MAX];
    if (table_path(path, sizeof path, dom, ext) < 0)
        return -1;
    return open(path, flags | O_CLOEXEC, 0600);
}

static struct xengntdev_handle *open_handle(void)
{
    if (!emu_dir()) {
        errno = ENOENT;
        return NULL;
    }
    struct xengntdev_handle *h = calloc(1, sizeof *h);
    if (h) {
        h->dom = emu_domid();
        emu_dom_join(h->dom);
        /* A process that shares or maps memory is one whose death its peers
         * must hear of, mapping notifications or not. */
        emu_dom_watchdog(h->dom);
    }
    return h;
}

static void close_handle(struct xengntdev_handle *h)
{
    if (!h)
        return;
    struct mapping *m = h->maps;
    while (m) {
        struct mapping *next = m->next;
        /* The caller may already have munmapped the pages itself; never
         * touch the address again, only settle the notification. */
        emu_disarm(&m->notify, 1);
        free(m);
        m = next;
    }
    free(h);
}

static struct mapping *track(struct xengntdev_handle *h, void *addr, uint32_t count, int shared,
                             uint32_t first_ref)
{
    struct mapping *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->addr = addr;
    m->count = count;
    m->shared = shared;
    m->first_ref = first_ref;
    m->notify.file_fd = -1;
    m->notify.pipe_w = -1;
    m->next = h->maps;
    h->maps = m;
    return m;
}

static struct mapping *untrack(struct xengntdev_handle *h, void *addr)
{
    for (struct mapping **pp = &h->maps; *pp; pp = &(*pp)->next) {
        if ((*pp)->addr == addr) {
            struct mapping *m = *pp;
            *pp = m->next;
            return m;
        }
    }
    return NULL;
}

static int arm_notify(struct mapping *m, unsigned owner_dom, uint32_t ref, unsigned my_dom,
                      uint32_t notify_offset, evtchn_port_t notify_port)
{
    if (notify_offset == (uint32_t)-1 && notify_port == (evtchn_port_t)-1)
        return 0;
    if (notify_offset != (uint32_t)-1 && notify_offset >= EMU_PAGE) {
        errno = EINVAL;
        return -1;
    }
    m->notify.file_fd = open_file(owner_dom, "pages", O_RDWR);
    if (m->notify.file_fd < 0)
        return -1;
    m->notify.byte_off = notify_offset == (uint32_t)-1
                             ? -1
                             : (off_t)ref * EMU_PAGE + (off_t)notify_offset;
    m->notify.port = notify_port == (evtchn_port_t)-1 ? -1 : (long)notify_port;
    m->notify.dom = my_dom;
    m->notify.active = 1;
    if (emu_arm_watchdog(&m->notify) < 0) {
        close(m->notify.file_fd);
        m->notify.file_fd = -1;
        m->notify.active = 0;
        return -1;
    }
    return 0;
}

/* --- sharing ------------------------------------------------------------ */

xengntshr_handle *xengntshr_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return open_handle();
}

int xengntshr_close(xengntshr_handle *xgs)
{
    close_handle(xgs);
    return 0;
}

int xengntshr_fd(xengntshr_handle *xgs)
{
    (void)xgs;
    errno = ENOSYS;
    return -1;
}

static void *share(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                   int writable, uint32_t notify_offset, evtchn_port_t notify_port)
{
    if (count <= 0) {
        errno = EINVAL;
        return NULL;
    }
    int tfd = open_file(xgs->dom, "table", O_RDWR | O_CREAT);
    if (tfd < 0)
        return NULL;
    int pfd = open_file(xgs->dom, "pages", O_RDWR | O_CREAT);
    if (pfd < 0) {
        close(tfd);
        return NULL;
    }
    void *addr = NULL;
    flock(tfd, LOCK_EX);
    uint32_t next = 0;
    if (pread(tfd, &next, 4, 0) != 4 || next < 8)
        next = 8;
    uint32_t first = next;
    struct stat st;
    off_t need = (off_t)(first + (uint32_t)count) * EMU_PAGE;
    if (fstat(pfd, &st) < 0 || (st.st_size < need && ftruncate(pfd, need) < 0))
        goto out;
    for (int i = 0; i < count; i++) {
        uint32_t rec[2] = {domid + 1, writable ? 1u : 0u};
        if (pwrite(tfd, rec, sizeof rec, (off_t)(first + (uint32_t)i) * 8) != (ssize_t)sizeof rec)
            goto out;
        refs[i] = first + (uint32_t)i;
    }
    next = first + (uint32_t)count;
    if (pwrite(tfd, &next, 4, 0) != 4)
        goto out;
    addr = mmap(NULL, (size_t)count * EMU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, pfd,
                (off_t)first * EMU_PAGE);
    if (addr == MAP_FAILED) {
        addr = NULL;
        goto out;
    }
    struct mapping *m = track(xgs, addr, (uint32_t)count, 1, first);
    if (!m || arm_notify(m, xgs->dom, first, xgs->dom, notify_offset, notify_port) < 0) {
        if (m)
            free(untrack(xgs, addr));
        munmap(addr, (size_t)count * EMU_PAGE);
        addr = NULL;
    }
out:
    flock(tfd, LOCK_UN);
    close(tfd);
    close(pfd);
    return addr;
}

void *xengntshr_share_pages(xengntshr_handle *xgs, uint32_t domid, int count, uint32_t *refs,
                            int writable)
{
    return share(xgs, domid, count, refs, writable, (uint32_t)-1, (evtchn_port_t)-1);
}

void *xengntshr_share_page_notify(xengntshr_handle *xgs, uint32_t domid, uint32_t *ref,
                                  int writable, uint32_t notify_offset,
                                  evtchn_port_t notify_port)
{
    return share(xgs, domid, 1, ref, writable, notify_offset, notify_port);
}

int xengntshr_unshare(xengntshr_handle *xgs, void *start_address, uint32_t count)
{
    struct mapping *m = untrack(xgs, start_address);
    if (!m || m->count != count) {
        errno = EINVAL;
        return -1;
    }
    munmap(start_address, (size_t)count * EMU_PAGE);
    emu_disarm(&m->notify, 1);
    /* Revoke the grants (a peer that still maps them keeps its mapping, as
     * gntalloc keeps a page until the last mapping is gone). */
    int tfd = open_file(xgs->dom, "table", O_RDWR);
    if (tfd >= 0) {
        uint32_t rec[2] = {0, 0};
        for (uint32_t i = 0; i < count; i++)
            if (pwrite(tfd, rec, sizeof rec, (off_t)(m->first_ref + i) * 8) != (ssize_t)sizeof rec)
                break;
        close(tfd);
    }
    free(m);
    return 0;
}

/* --- mapping ------------------------------------------------------------ */

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return open_handle();
}

int xengnttab_close(xengnttab_handle *xgt)
{
    close_handle(xgt);
    return 0;
}

int xengnttab_fd(xengnttab_handle *xgt)
{
    (void)xgt;
    errno = ENOSYS;
    return -1;
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants)
{
    (void)xgt;
    (void)nr_grants;
    return 0;
}

void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t *domids,
                               uint32_t *refs, int prot);

static void *map_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid, uint32_t *refs,
                      int prot, uint32_t notify_offset, evtchn_port_t notify_port)
{
    if (count == 0 || count > (1u << 20)) {
        errno = EINVAL;
        return NULL;
    }
    int tfd = open_file(domid, "table", O_RDONLY);
    int pfd = open_file(domid, "pages", (prot & PROT_WRITE) ? O_RDWR : O_RDONLY);
    uint8_t *base = MAP_FAILED;
    struct stat st;
    if (tfd < 0 || pfd < 0 || fstat(pfd, &st) < 0) {
        errno = EINVAL;
        goto fail;
    }
    /* Check every ref as the hypervisor would, before mapping anything. */
    for (uint32_t i = 0; i < count; i++) {
        uint32_t rec[2];
        if (refs[i] < 8 || pread(tfd, rec, sizeof rec, (off_t)refs[i] * 8) != (ssize_t)sizeof rec ||
            rec[0] != xgt->dom + 1 || ((prot & PROT_WRITE) && !(rec[1] & 1)) ||
            (off_t)(refs[i] + 1) * EMU_PAGE > st.st_size) {
            errno = EINVAL;
            goto fail;
        }
    }
    size_t len = (size_t)count * EMU_PAGE;
    base = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        goto fail;
    for (uint32_t i = 0; i < count; i++) {
        void *p = mmap(base + (size_t)i * EMU_PAGE, EMU_PAGE, prot, MAP_SHARED | MAP_FIXED, pfd,
                       (off_t)refs[i] * EMU_PAGE);
        if (p == MAP_FAILED)
            goto fail;
    }
    struct mapping *m = track(xgt, base, count, 0, refs[0]);
    if (!m)
        goto fail;
    if (arm_notify(m, domid, refs[0], xgt->dom, notify_offset, notify_port) < 0) {
        free(untrack(xgt, base));
        goto fail;
    }
    close(tfd);
    close(pfd);
    return base;
fail:
    if (base != MAP_FAILED)
        munmap(base, (size_t)count * EMU_PAGE);
    if (tfd >= 0)
        close(tfd);
    if (pfd >= 0)
        close(pfd);
    return NULL;
}

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    return map_refs(xgt, 1, domid, &ref, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot)
{
    return map_refs(xgt, count, domid, refs, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

void *xengnttab_map_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t *domids,
                               uint32_t *refs, int prot)
{
    /* Only the single-domain case is emulated. */
    for (uint32_t i = 1; i < count; i++) {
        if (domids[i] != domids[0]) {
            errno = ENOSYS;
            return NULL;
        }
    }
    return map_refs(xgt, count, domids[0], refs, prot, (uint32_t)-1, (evtchn_port_t)-1);
}

void *xengnttab_map_grant_ref_notify(xengnttab_handle *xgt, uint32_t domid, uint32_t ref,
                                     int prot, uint32_t notify_offset,
                                     evtchn_port_t notify_port)
{
    return map_refs(xgt, 1, domid, &ref, prot, notify_offset, notify_port);
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    struct mapping *m = untrack(xgt, start_address);
    if (!m || m->count != count) {
        errno = EINVAL;
        return -1;
    }
    munmap(start_address, (size_t)count * EMU_PAGE);
    emu_disarm(&m->notify, 1);
    free(m);
    return 0;
}
