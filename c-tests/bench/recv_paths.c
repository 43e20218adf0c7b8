/* recv_paths: why the destination reads through a buffer.
 *
 * A RAM stream is a sequence of records [8-byte header][4 KiB page], and a
 * page's place in guest memory is known only once its header is read. A
 * child process (pinned to CPU 0) sends 1 GiB of such records over loopback
 * TCP; the parent (CPU 1) receives them into a prefaulted 1 GiB region in
 * one of two ways and prints its own CPU time:
 *
 *   buffered   256 KiB reads into a buffer, each page copied out with
 *              memcpy (what livemig's loader does);
 *   per-page   one readv per record: the header, then the page straight
 *              into guest memory (no user-space copy, a call per page).
 *
 *   recv_paths [RUNS]   (default 3; the modes alternate within each run)
 *
 * The last lines give each mode's median receiver CPU time.
 */
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
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define REC (PAGE + 8)
#define BUF (256 * 1024)
#define BATCH 64

enum mode { BUFFERED, PER_PAGE, MODES };
static const char *const mode_name[MODES] = { "buffered", "per-page" };

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void pin(int cpu)
{
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    if (sched_setaffinity(0, sizeof s, &s) != 0)
        perror("sched_setaffinity (running unpinned)");
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double thread_cpu_s(void)
{
    struct rusage r;
    getrusage(RUSAGE_THREAD, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) + (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

static void send_records(const struct sockaddr_in *a, size_t pages)
{
    pin(0);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (const struct sockaddr *)a, sizeof *a) != 0)
        die("connect");
    static char batch[BATCH * REC];
    memset(batch, 7, sizeof batch);
    for (size_t i = 0; i < pages; i += BATCH)
        for (size_t off = 0; off < sizeof batch;) {
            ssize_t w = write(c, batch + off, sizeof batch - off);
            if (w <= 0)
                die("write");
            off += (size_t)w;
        }
    close(c);
    _exit(0);
}

/* Receives `pages` records into `guest`; returns the bytes received. */
static size_t receive(int c, char *guest, size_t pages, enum mode m)
{
    size_t got = 0;
    if (m == PER_PAGE) {
        char hdr[8];
        for (size_t page = 0; page < pages;) {
            for (size_t done = 0; done < REC;) {
                struct iovec v[2];
                int n = 0;
                if (done < 8)
                    v[n++] = (struct iovec){ hdr + done, 8 - done };
                size_t in_page = done < 8 ? 0 : done - 8;
                v[n++] = (struct iovec){ guest + page * PAGE + in_page, PAGE - in_page };
                ssize_t r = readv(c, v, n);
                if (r <= 0)
                    return got;
                done += (size_t)r;
                got += (size_t)r;
            }
            page++;
        }
        return got;
    }
    static char buf[BUF];
    size_t rpos = 0, rlen = 0, page = 0, left = 8;
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
        if (in_page) {
            memcpy(guest + page * PAGE + (PAGE - left), buf + rpos, k);
        }
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

int main(int argc, char **argv)
{
    int runs = argc > 1 ? atoi(argv[1]) : 3;
    if (runs < 1 || runs > 1000) {
        fprintf(stderr, "usage: recv_paths [RUNS (1..1000)]\n");
        return 2;
    }
    double *cpu[MODES];
    for (int m = 0; m < MODES; m++)
        if (!(cpu[m] = calloc((size_t)runs, sizeof(double))))
            die("calloc");
    size_t pages = (1UL << 30) / PAGE;
    char *guest = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    /* Not shared with the forked senders: a write must not copy the page. */
    if (guest == MAP_FAILED || madvise(guest, pages * PAGE, MADV_DONTFORK) != 0)
        die("mmap");
    pin(1);
    for (int run = 0; run < runs; run++)
        for (int m = 0; m < MODES; m++) {
            int ls = socket(AF_INET, SOCK_STREAM, 0);
            struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
            socklen_t al = sizeof a;
            if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 1) != 0 ||
                getsockname(ls, (struct sockaddr *)&a, &al) != 0)
                die("listen");
            pid_t child = fork();
            if (child < 0)
                die("fork");
            if (child == 0)
                send_records(&a, pages);
            int c = accept(ls, NULL, NULL);
            if (c < 0)
                die("accept");
            double t0 = now_s(), c0 = thread_cpu_s();
            size_t got = receive(c, guest, pages, (enum mode)m);
            double t1 = now_s(), c1 = thread_cpu_s();
            close(c);
            close(ls);
            waitpid(child, NULL, 0);
            if (got != pages * REC) {
                fprintf(stderr, "%s: received %zu of %zu bytes\n", mode_name[m], got, pages * REC);
                return 1;
            }
            printf("run %d %-9s receiver CPU %.3f s, wall %.3f s (1 GiB of pages)\n", run + 1, mode_name[m], c1 - c0, t1 - t0);
            cpu[m][run] = c1 - c0;
        }
    for (int m = 0; m < MODES; m++) {
        qsort(cpu[m], (size_t)runs, sizeof(double), cmp_double);
        printf("%-9s median receiver CPU %.3f s (min %.3f, max %.3f) over %d runs\n", mode_name[m],
               runs % 2 ? cpu[m][runs / 2] : (cpu[m][runs / 2 - 1] + cpu[m][runs / 2]) / 2, cpu[m][0], cpu[m][runs - 1], runs);
        free(cpu[m]);
    }
    return 0;
}
