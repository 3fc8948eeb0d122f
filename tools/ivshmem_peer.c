/*
 * ivshmem_peer.c - a vchan peer for guests without Python: the same ring code
 * (native/vchan_ring.c, vchan_setup.c) and ivshmem provider (native/ivshmem.c)
 * as the library, linked statically so it runs from a busybox initramfs.
 *
 *   ivshmem_peer REGION ROLE NAME MODE [ARG]
 *   ivshmem_peer tcp HOST PORT MODE [ARG]
 *
 * REGION is a file or "auto" (the first 1af4:1110 PCI device's resource2);
 * ROLE is "listen", "connect" or "probe" (open the region once and print
 * "IVSPEER OPEN host_id=..." or the error; NAME and MODE are ignored).
 * listen and connect wait up to 60 s for a valid header (a guest may boot
 * before the host stamps the region) and for the other end.  MODE is one of
 *   recv        read to end of stream; print "IVSPEER RECV <bytes> <crc32>"
 *   send N      write N pattern bytes, close; print "IVSPEER SENT <bytes> <crc32>"
 *   echo        write back everything read until end of stream
 *   drain       as recv without the checksum; source N: as send with a
 *               constant buffer (the bench: transport cost, not the guest's
 *               byte-by-byte CRC under TCG)
 * The tcp form runs the same modes over a TCP connection (the bench's
 * baseline through the guest's NIC).  Every line the tests wait for starts
 * with "IVSPEER"; exit status 3 means the peer was lost.
 *
 * Waiting is polling: a busy spin of up to 200 us (a ping's answer usually
 * comes sooner than a sleep would end), then sleeps from 10 us doubling to
 * 2 ms; the heartbeat is bumped at least every 100 ms from the same loop.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ivshmem.h"
#include "vchan.h"

#define BEAT_NS 100000000ll
#define DEAD_NS 600000000ll
#define MAX_SLEEP_NS 2000000l
#define SPIN_NS 200000ll
#define FIRST_SLEEP_NS 10000l
#define BUF 65536

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* zlib's crc32, so the Python side compares with zlib.crc32. */
static uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

/* A transport: the vchan or a TCP socket. */
struct conn {
    ml_vchan *v;
    int fd;
    long long beat_at;
    uint32_t peer_beat;
    long long peer_beat_at;
};

static int find_region(char *out, size_t cap)
{
    const char *root = "/sys/bus/pci/devices";
    DIR *d = opendir(root);
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while (found < 0 && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[512];
        unsigned vendor = 0, device = 0;
        snprintf(path, sizeof path, "%s/%s/vendor", root, e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (fscanf(f, "%x", &vendor) != 1)
            vendor = 0;
        fclose(f);
        snprintf(path, sizeof path, "%s/%s/device", root, e->d_name);
        f = fopen(path, "r");
        if (!f)
            continue;
        if (fscanf(f, "%x", &device) != 1)
            device = 0;
        fclose(f);
        if (vendor == 0x1af4 && device == 0x1110) {
            snprintf(out, cap, "%s/%s/resource2", root, e->d_name);
            found = 0;
        }
    }
    closedir(d);
    return found;
}

/* Heartbeat and peer liveness; returns -1 once the peer is lost. */
static int tick(struct conn *c)
{
    if (!c->v)
        return 0;
    long long t = now_ns();
    if (t - c->beat_at >= BEAT_NS) {
        ml_ivshmem_beat(c->v);
        c->beat_at = t;
    }
    uint32_t pb = ml_ivshmem_peer_beat(c->v);
    if (pb != c->peer_beat) {
        c->peer_beat = pb;
        c->peer_beat_at = t;
    } else if (t - c->peer_beat_at > DEAD_NS) {
        return -1;
    }
    return 0;
}

/* One wait: spin until SPIN_NS after `since`, then sleep with backoff. */
struct pause {
    long long since;
    long sleep_ns;
};

static void pause_start(struct pause *p)
{
    p->since = now_ns();
    p->sleep_ns = FIRST_SLEEP_NS;
}

static void pause_once(struct pause *p)
{
    if (now_ns() - p->since < SPIN_NS)
        return;
    struct timespec ts = {0, p->sleep_ns};
    nanosleep(&ts, NULL);
    p->sleep_ns = p->sleep_ns * 2 > MAX_SLEEP_NS ? MAX_SLEEP_NS : p->sleep_ns * 2;
}

static void backoff(long *ns)
{
    struct timespec ts = {0, *ns};
    nanosleep(&ts, NULL);
    *ns = *ns * 2 > MAX_SLEEP_NS ? MAX_SLEEP_NS : *ns * 2;
}

static void lost(void)
{
    printf("IVSPEER LOST\n");
    fflush(stdout);
    exit(3);
}

/* Read something: > 0 bytes, 0 at end of stream. */
static long conn_read(struct conn *c, uint8_t *buf, size_t n)
{
    if (!c->v) {
        for (;;) {
            ssize_t got = read(c->fd, buf, n);
            if (got >= 0)
                return got;
            if (errno != EINTR)
                lost();
        }
    }
    struct pause w;
    pause_start(&w);
    for (;;) {
        long got = ml_vchan_read(c->v, buf, n);
        if (got < 0)
            lost();
        if (got > 0)
            return got;
        int live = ml_vchan_peer_live(c->v);
        if (live == ML_LIVE_EXITED) {
            /* Data written before the close was published before the live
             * byte: one more look drains it, then it is end of stream. */
            got = ml_vchan_read(c->v, buf, n);
            if (got < 0)
                lost();
            return got;
        }
        if (live < 0 || tick(c) < 0)
            lost();
        pause_once(&w);
    }
}

static void conn_write(struct conn *c, const uint8_t *buf, size_t n)
{
    if (!c->v) {
        while (n) {
            ssize_t put = write(c->fd, buf, n);
            if (put < 0 && errno == EINTR)
                continue;
            if (put <= 0)
                lost();
            buf += put;
            n -= (size_t)put;
        }
        return;
    }
    struct pause w;
    pause_start(&w);
    while (n) {
        long put = ml_vchan_write(c->v, buf, n);
        if (put < 0)
            lost();
        if (put > 0) {
            buf += put;
            n -= (size_t)put;
            pause_start(&w);
            continue;
        }
        if (tick(c) < 0 || ml_vchan_peer_live(c->v) != ML_LIVE_CONNECTED)
            lost();
        pause_once(&w);
    }
}

static void conn_close(struct conn *c)
{
    if (c->v) {
        ml_vchan_close(c->v);
        ml_vchan_free(c->v);
    } else {
        shutdown(c->fd, SHUT_WR);
        uint8_t b[256];
        while (read(c->fd, b, sizeof b) > 0) {
        }
        close(c->fd);
    }
}

static int run_mode(struct conn *c, const char *mode, const char *arg)
{
    static uint8_t buf[BUF];
    uint32_t crc = 0;
    unsigned long long total = 0;
    if (!strcmp(mode, "recv")) {
        long got;
        while ((got = conn_read(c, buf, sizeof buf)) > 0) {
            crc = crc_update(crc, buf, (size_t)got);
            total += (unsigned long long)got;
            tick(c);
        }
        printf("IVSPEER RECV %llu %08x\n", total, crc);
    } else if (!strcmp(mode, "send") && arg) {
        unsigned long long n = strtoull(arg, NULL, 10);
        uint32_t x = 0x12345678u;
        while (total < n) {
            size_t chunk = n - total < sizeof buf ? (size_t)(n - total) : sizeof buf;
            for (size_t i = 0; i < chunk; i++) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf[i] = (uint8_t)x;
            }
            conn_write(c, buf, chunk);
            crc = crc_update(crc, buf, chunk);
            total += chunk;
            tick(c);
        }
        printf("IVSPEER SENT %llu %08x\n", total, crc);
    } else if (!strcmp(mode, "drain")) {
        long got;
        while ((got = conn_read(c, buf, sizeof buf)) > 0) {
            total += (unsigned long long)got;
            tick(c);
        }
        printf("IVSPEER RECV %llu -\n", total);
    } else if (!strcmp(mode, "source") && arg) {
        unsigned long long n = strtoull(arg, NULL, 10);
        memset(buf, 0xa5, sizeof buf);
        while (total < n) {
            size_t chunk = n - total < sizeof buf ? (size_t)(n - total) : sizeof buf;
            conn_write(c, buf, chunk);
            total += chunk;
            tick(c);
        }
        printf("IVSPEER SENT %llu -\n", total);
    } else if (!strcmp(mode, "echo")) {
        long got;
        while ((got = conn_read(c, buf, sizeof buf)) > 0) {
            conn_write(c, buf, (size_t)got);
            total += (unsigned long long)got;
        }
        printf("IVSPEER ECHOED %llu\n", total);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    fflush(stdout);
    conn_close(c);
    return 0;
}

static int open_tcp(const char *host, const char *port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(port))};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        return -1;
    /* The host end may not be listening yet: retry for about 30 s. */
    for (int i = 0; i < 300; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return -1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            return fd;
        }
        close(fd);
        struct timespec ts = {0, 100000000l};
        nanosleep(&ts, NULL);
    }
    return -1;
}

int main(int argc, char **argv)
{
    crc_init();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 5) {
        fprintf(stderr, "usage: %s REGION listen|connect NAME MODE [ARG]\n"
                        "       %s tcp HOST PORT MODE [ARG]\n", argv[0], argv[0]);
        return 2;
    }
    struct conn c = {.fd = -1};
    const char *arg = argc > 5 ? argv[5] : NULL;
    if (!strcmp(argv[1], "tcp")) {
        c.fd = open_tcp(argv[2], argv[3]);
        if (c.fd < 0) {
            printf("IVSPEER ERROR tcp connect\n");
            return 1;
        }
        printf("IVSPEER CONNECTED tcp\n");
        return run_mode(&c, argv[4], arg);
    }
    char path[512];
    if (!strcmp(argv[1], "auto")) {
        if (find_region(path, sizeof path) < 0) {
            printf("IVSPEER ERROR no ivshmem device\n");
            return 1;
        }
    } else {
        snprintf(path, sizeof path, "%s", argv[1]);
    }
    ml_ivshmem_region *r;
    int probe = !strcmp(argv[2], "probe");
    /* Up to about 60 s for the other end to appear (a guest may boot slowly). */
    long long deadline = now_ns() + 60000000000ll;
    long delay = 1000;
    int rc;
    while ((rc = ml_ivshmem_open(path, 0, 0, NULL, 0, &r)) == ML_ECORRUPT && !probe &&
           now_ns() < deadline)
        backoff(&delay);
    if (rc < 0) {
        printf("IVSPEER ERROR open %s: %d (%s)\n", path, rc,
               rc == ML_ECORRUPT ? "bad header" : strerror(errno));
        return 1;
    }
    if (probe) {
        printf("IVSPEER OPEN host_id=%s\n", ml_ivshmem_host_id(r));
        ml_ivshmem_close(r);
        return 0;
    }
    uint32_t party = (uint32_t)getpid() | 0x80000000u;
    delay = 1000;
    if (!strcmp(argv[2], "connect")) {
        for (;;) {
            rc = ml_ivshmem_connect(r, argv[3], party, &c.v);
            if (rc == ML_OK)
                break;
            if (!(rc == ML_ESYS && errno == ENOENT) || now_ns() > deadline) {
                printf("IVSPEER ERROR connect: %d\n", rc);
                return 1;
            }
            backoff(&delay);
        }
    } else {
        rc = ml_ivshmem_listen(r, argv[3], party, 18, 18, &c.v);
        if (rc < 0) {
            printf("IVSPEER ERROR listen: %d\n", rc);
            return 1;
        }
        printf("IVSPEER LISTENING %s\n", argv[3]);
        while (ml_vchan_peer_live(c.v) == ML_LIVE_WAITING) {
            if (now_ns() > deadline) {
                printf("IVSPEER ERROR nobody connected\n");
                return 1;
            }
            ml_ivshmem_beat(c.v);
            backoff(&delay);
        }
    }
    c.beat_at = now_ns();
    c.peer_beat = ml_ivshmem_peer_beat(c.v);
    c.peer_beat_at = c.beat_at;
    printf("IVSPEER CONNECTED host_id=%s\n", ml_ivshmem_host_id(r));
    ml_ivshmem_close(r);
    return run_mode(&c, argv[4], arg);
}
