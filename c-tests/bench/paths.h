/* What recv_paths.c and send_paths.c share: pinning, clocks, medians,
 * and the loader-style buffered receive of [8-byte header][4 KiB page]
 * records. */
#ifndef LIVEMIG_BENCH_PATHS_H
#define LIVEMIG_BENCH_PATHS_H

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define REC (PAGE + 8)
#define BUF (256 * 1024)
#define BATCH 64

static inline int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts `v` and returns its median. */
static inline double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static inline void die(const char *what)
{
    perror(what);
    exit(1);
}

static inline void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s) != 0)
        perror("sched_setaffinity (running unpinned)");
}

static inline double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static inline double thread_cpu_s(void)
{
    struct rusage r;
    getrusage(RUSAGE_THREAD, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) + (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

/* The receiver's prefaulted guest region of `pages` pages, not shared with
 * forked senders (a write must not copy the page). */
static inline char *receiver_guest(size_t pages)
{
    char *guest = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (guest == MAP_FAILED || madvise(guest, pages * PAGE, MADV_DONTFORK) != 0)
        die("mmap");
    return guest;
}

/* A listening TCP socket on a free loopback port, whose address goes to `a`. */
static inline int listen_loopback(struct sockaddr_in *a)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    *a = (struct sockaddr_in){ .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof *a;
    if (ls < 0 || bind(ls, (struct sockaddr *)a, sizeof *a) != 0 || listen(ls, 1) != 0 ||
        getsockname(ls, (struct sockaddr *)a, &al) != 0)
        die("listen");
    return ls;
}

/* Receives `pages` records from `c` into `guest` with 256 KiB reads and a
 * copy per page (what livemig's loader does); returns the bytes received. */
static inline size_t receive_buffered(int c, char *guest, size_t pages)
{
    static char buf[BUF];
    size_t got = 0, rpos = 0, rlen = 0, page = 0, left = 8;
    int in_page = 0;
    while (page < pages) {
        if (rpos == rlen) {
            ssize_t r = read(c, buf, sizeof buf);
            if (r <= 0)
                return got;
            rpos = 0;
            rlen = (size_t)r;
            got += (size_t)r;
        }
        size_t k = rlen - rpos < left ? rlen - rpos : left;
        if (in_page)
            memcpy(guest + page * PAGE + (PAGE - left), buf + rpos, k);
        rpos += k;
        left -= k;
        if (left == 0) {
            if (in_page)
                page++;
            in_page = !in_page;
            left = in_page ? PAGE : 8;
        }
    }
    return got;
}

#endif
