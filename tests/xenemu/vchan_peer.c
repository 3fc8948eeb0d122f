/*
 * vchan_peer.c - a vchan peer built on the real libxenvchan (test only).
 *
 * Usage: vchan_peer server|client DOMID XS_PATH MODE [options]
 *
 * MODE stream: send --send N bytes of a seeded pseudo-random stream in random
 *   chunk sizes while reading until --expect M bytes came in (non-blocking
 *   libxenvchan, waiting on its event fd), then optionally (--until-eof) read
 *   until the peer closes, then libxenvchan_close.  --hold stops after
 *   sending without closing (the test kills it).
 * MODE packets: --count K --size S: K times libxenvchan_recv S bytes and
 *   libxenvchan_send them back (blocking mode), then close.
 * Server options: --read-min, --write-min (libxenvchan_server_init's).
 * Client option: --tries N (default 200, 50 ms apart) to wait for a server.
 *
 * Prints "ready" once initialised, then one JSON line: bytes and CRC-32
 * (as zlib.crc32) of each direction, the ring orders, extra bytes.
 */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libxenvchan.h>

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc_update(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static uint64_t rng_state;

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static size_t chunk_size(size_t cap)
{
    static const size_t sizes[] = {1, 7, 100, 1000, 4096, 65536, 200000};
    uint64_t r = rng();
    size_t n = r % 8 < 7 ? sizes[r % 8] : 1 + (size_t)((r >> 8) % 300000);
    return n < cap ? n : cap;
}

static void wait_event(struct libxenvchan *c)
{
    struct pollfd p = {.fd = libxenvchan_fd_for_select(c), .events = POLLIN};
    if (poll(&p, 1, 1000) > 0)
        libxenvchan_wait(c);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s server|client DOMID XS_PATH stream|packets [options]\n",
                argv[0]);
        return 2;
    }
    const char *role = argv[1], *path = argv[3], *mode = argv[4];
    int domid = atoi(argv[2]);
    size_t send_n = 0, expect_n = 0, read_min = 4096, write_min = 4096, count = 0, size = 0;
    int until_eof = 0, hold = 0, tries = 200;
    uint64_t seed = 1;
    for (int i = 5; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "0";
        if (!strcmp(a, "--send")) send_n = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--expect")) expect_n = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--read-min")) read_min = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--write-min")) write_min = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--count")) count = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--size")) size = strtoull(v, NULL, 0), i++;
        else if (!strcmp(a, "--until-eof")) until_eof = 1;
        else if (!strcmp(a, "--hold")) hold = 1;
        else if (!strcmp(a, "--tries")) tries = atoi(v), i++;
        else {
            fprintf(stderr, "unknown option %s\n", a);
            return 2;
        }
    }
    crc_init();
    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;

    struct libxenvchan *c = NULL;
    if (!strcmp(role, "server")) {
        c = libxenvchan_server_init(NULL, domid, path, read_min, write_min);
    } else {
        for (int t = 0; !c && t < tries; t++) {
            c = libxenvchan_client_init(NULL, domid, path);
            if (!c && t + 1 < tries)
                usleep(50000);
        }
    }
    if (!c) {
        fprintf(stderr, "libxenvchan %s init failed: %s\n", role, strerror(errno));
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    uint32_t sent_crc = 0, recv_crc = 0;
    size_t sent = 0, recvd = 0, extra = 0;
    static uint8_t out[300000], in[300000];

    if (!strcmp(mode, "packets")) {
        c->blocking = 1;
        if (size > sizeof in)
            return 2;
        for (size_t k = 0; k < count; k++) {
            if (libxenvchan_recv(c, in, size) != (int)size) {
                fprintf(stderr, "recv of packet %zu failed\n", k);
                return 1;
            }
            recv_crc = crc_update(recv_crc, in, size);
            recvd += size;
            if (libxenvchan_send(c, in, size) != (int)size) {
                fprintf(stderr, "send of packet %zu failed\n", k);
                return 1;
            }
            sent_crc = crc_update(sent_crc, in, size);
            sent += size;
        }
    } else {
        c->blocking = 0;
        size_t pos = 0, len = 0;
        while (sent < send_n || recvd < expect_n) {
            int progress = 0;
            if (sent < send_n) {
                if (pos == len) {
                    len = chunk_size(send_n - sent);
                    for (size_t i = 0; i < len; i++)
                        out[i] = (uint8_t)(rng() >> 32);
                    sent_crc = crc_update(sent_crc, out, len);
                    pos = 0;
                }
                int w = libxenvchan_write(c, out + pos, len - pos);
                if (w < 0) {
                    fprintf(stderr, "write failed after %zu bytes (peer closed?)\n", sent);
                    return 1;
                }
                pos += (size_t)w;
                if (pos == len)
                    sent += len;
                progress |= w > 0;
            }
            if (recvd < expect_n) {
                size_t want = chunk_size(expect_n - recvd);
                int r = libxenvchan_read(c, in, want);
                if (r < 0) {
                    fprintf(stderr, "peer closed after %zu of %zu bytes\n", recvd, expect_n);
                    return 1;
                }
                recv_crc = crc_update(recv_crc, in, (size_t)r);
                recvd += (size_t)r;
                progress |= r > 0;
            }
            if (!progress)
                wait_event(c);
        }
        if (hold) {
            printf("{\"sent\": %zu, \"sent_crc\": %u}\n", sent, sent_crc);
            fflush(stdout);
            for (;;)
                pause();
        }
        if (until_eof) {
            c->blocking = 1;
            int r;
            while ((r = libxenvchan_read(c, in, sizeof in)) > 0)
                extra += (size_t)r;
        }
    }
    int read_order = c->read.order, write_order = c->write.order;
    libxenvchan_close(c);
    printf("{\"sent\": %zu, \"sent_crc\": %u, \"recv\": %zu, \"recv_crc\": %u, "
           "\"read_order\": %d, \"write_order\": %d, \"extra\": %zu}\n",
           sent, sent_crc, recvd, recv_crc, read_order, write_order, extra);
    return 0;
}
