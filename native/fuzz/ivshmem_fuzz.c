/*
 * ivshmem_fuzz.c - libFuzzer target for the ivshmem provider's validation
 * (native/ivshmem.c): a hostile party rewrites any bytes of the region (its
 * header, the slot table, control pages, rings) before we open it, before we
 * connect, and between ring operations.  Protocol: docs/vchan.md section 10.
 *
 * Input: byte 0 flags (bit 0: stamp a valid region and listen first, so the
 * fuzzer starts from a real layout; bits 1-4: region size 2..17 pages),
 * byte 1 slot count, byte 2 ring orders (10 + b % 11, 10 + b / 11 % 11),
 * then patches: [u16 offset, u8 length (<= 32), bytes], each written into
 * the region file.  A patch with offset 0xffff is a "phase" marker: the
 * first moves from "before open" to "before connect", later ones run one
 * write+read on the connected channel.
 *
 * Asserted: open accepts only a header whose slots fit the file; a
 * connected channel's control page and both rings lie inside our mapping;
 * ring calls return a byte count or ML_ECORRUPT; nothing crashes (ASan,
 * UBSan) or leaks.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ivshmem.h"
#include "ml_errors.h"
#include "provider.h"

#define CHECK(c)                                                              \
    do {                                                                      \
        if (!(c)) {                                                           \
            fprintf(stderr, "invariant failed: %s (%s:%d)\n", #c, __FILE__,   \
                    __LINE__);                                                \
            abort();                                                          \
        }                                                                     \
    } while (0)

static int inside(const uint8_t *base, size_t len, const void *p, size_t n)
{
    const uint8_t *q = p;
    return q >= base && n <= len && (size_t)(q - base) <= len - n;
}

/* Apply patches until a phase marker or the end; returns the new position. */
static size_t patch(int fd, size_t len, const uint8_t *d, size_t n, size_t pos)
{
    while (pos + 3 <= n) {
        unsigned off = d[pos] | (unsigned)d[pos + 1] << 8;
        size_t plen = d[pos + 2] % 33;
        pos += 3;
        if (off == 0xffff)
            return pos;
        if (plen > n - pos)
            plen = n - pos;
        if (off < len && pwrite(fd, d + pos, plen < len - off ? plen : len - off, off) < 0)
            abort();
        pos += plen;
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n)
{
    if (n < 3)
        return 0;
    size_t len = (size_t)(2 + ((d[0] >> 1) & 15)) * ML_PAGE_SIZE;
    uint32_t nslots = 1 + d[1] % ML_IVSHMEM_MAX_SLOTS;
    int lo = 10 + d[2] % 11, ro = 10 + d[2] / 11 % 11;
    int fd = memfd_create("ivshmem-fuzz", 0);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, (off_t)len) == 0);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

    ml_ivshmem_region *r0 = NULL, *r1 = NULL;
    ml_vchan *srv = NULL, *cli = NULL;
    if (d[0] & 1) {
        if (ml_ivshmem_open(path, 1, len, "fuzz-host", nslots, &r0) == ML_OK &&
            ml_ivshmem_listen(r0, "f", 1, lo, ro, &srv) != ML_OK)
            srv = NULL;
    }
    size_t pos = patch(fd, len, d, n, 3);
    if (ml_ivshmem_open(path, 0, 0, NULL, 0, &r1) == ML_OK) {
        CHECK(ml_ivshmem_size(r1) == len);
        CHECK(ml_ivshmem_nslots(r1) >= 1 && ml_ivshmem_nslots(r1) <= ML_IVSHMEM_MAX_SLOTS);
        pos = patch(fd, len, d, n, pos);
        if (ml_ivshmem_connect(r1, "f", 2, &cli) == ML_OK) {
            const uint8_t *base = ml_ivshmem_base(r1);
            CHECK(inside(base, len, cli->ctrl, ML_PAGE_SIZE));
            CHECK(inside(base, len, cli->read.buf, cli->read.size));
            CHECK(inside(base, len, cli->write.buf, cli->write.size));
            uint8_t buf[256];
            while (pos < n) {
                long w = ml_vchan_write(cli, d + pos, n - pos < 64 ? n - pos : 64);
                CHECK(w >= 0 || w == ML_ECORRUPT);
                long rd = ml_vchan_read(cli, buf, sizeof buf);
                CHECK(rd >= 0 || rd == ML_ECORRUPT);
                if (srv) {
                    rd = ml_vchan_read(srv, buf, sizeof buf);
                    CHECK(rd >= 0 || rd == ML_ECORRUPT);
                    w = ml_vchan_write(srv, buf, 17);
                    CHECK(w >= 0 || w == ML_ECORRUPT);
                }
                pos = patch(fd, len, d, n, pos);
            }
            ml_ivshmem_beat(cli);
            (void)ml_ivshmem_peer_beat(cli);
            (void)ml_ivshmem_bell(cli);
            ml_vchan_close(cli);
            ml_vchan_free(cli);
        }
        ml_ivshmem_close(r1);
    }
    ml_vchan_free(srv);
    ml_ivshmem_close(r0);
    close(fd);
    return 0;
}
