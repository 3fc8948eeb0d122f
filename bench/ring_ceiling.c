/*
 * The ceiling of a shared-memory ring on this machine, without Python or trio.
 *
 * bench_vchan.py compiles and runs this next to its zero-copy figure.  Two
 * threads copy 64 KiB pieces from a 64 MiB source, through a ring of the
 * vchan bench's size, into a 64 MiB destination, busy-polling two counters
 * (the vchan protocol's producer and consumer indices, minus its
 * notifications): the best any ring transport can do here, since every byte
 * crosses from one core's cache to the other's.  It prints that rate and a
 * single-core memcpy of the same pieces, measured in the same run.
 *
 * Usage: ring_ceiling RING_BYTES TOTAL_MIB
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PIECE ((size_t)64 << 10)
#define BIG ((size_t)64 << 20)

static char *ring, *src, *dst;
static size_t ring_size;
static uint64_t total;
/* Bytes written into and read out of the ring so far: release/acquire pairs
 * publish the copied bytes to the other thread, as the vchan indices do. */
static _Atomic uint64_t produced, consumed;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void *consumer(void *arg)
{
    (void)arg;
    for (uint64_t c = 0; c < total; c += PIECE) {
        while (atomic_load_explicit(&produced, memory_order_acquire) - c < PIECE)
            ;
        memcpy(dst + c % BIG, ring + c % ring_size, PIECE);
        atomic_store_explicit(&consumed, c + PIECE, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s RING_BYTES TOTAL_MIB\n", argv[0]);
        return 2;
    }
    ring_size = strtoull(argv[1], NULL, 0);
    total = strtoull(argv[2], NULL, 0) << 20;
    /* Pieces must tile the ring and the buffers exactly. */
    if (ring_size < PIECE || ring_size % PIECE || total < PIECE || total % PIECE) {
        fprintf(stderr, "ring must be a multiple of 64 KiB, total at least 1 MiB\n");
        return 2;
    }
    ring = aligned_alloc(4096, ring_size);
    src = aligned_alloc(4096, BIG);
    dst = aligned_alloc(4096, BIG);
    if (!ring || !src || !dst)
        return 1;
    /* Touch every page first: page faults are not what is measured. */
    memset(ring, 0, ring_size);
    memset(src, 0xa5, BIG);
    memset(dst, 0x5a, BIG);

    double t0 = now();
    for (uint64_t p = 0; p < total; p += PIECE)
        memcpy(dst + p % BIG, src + p % BIG, PIECE);
    double memcpy_rate = (double)total / (now() - t0) / (1 << 20);

    pthread_t thread;
    if (pthread_create(&thread, NULL, consumer, NULL))
        return 1;
    t0 = now();
    for (uint64_t p = 0; p < total; p += PIECE) {
        while (p + PIECE - atomic_load_explicit(&consumed, memory_order_acquire) > ring_size)
            ;
        memcpy(ring + p % ring_size, src + p % BIG, PIECE);
        atomic_store_explicit(&produced, p + PIECE, memory_order_release);
    }
    pthread_join(thread, NULL);
    double ring_rate = (double)total / (now() - t0) / (1 << 20);
    printf("%.0f %.0f\n", memcpy_rate, ring_rate);
    return 0;
}
