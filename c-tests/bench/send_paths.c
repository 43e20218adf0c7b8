/* send_paths: why the source sends pages with writev, not splice.
 *
 * A RAM stream is a sequence of records [8-byte header][4 KiB page] with
 * the page taken from guest memory. A child process (pinned to CPU 0)
 * sends 1 GiB of such records over loopback TCP from a 1 GiB region in one
 * of two ways; the parent (CPU 1) receives them with 256 KiB reads and a
 * copy per page, as livemig's loader does. Each side reports its CPU time:
 *
 *   writev   64 records per sendmsg, the pages pointed at in place (what
 *            livemig's stream does): the kernel copies each page once;
 *   splice   the records vmspliced into a 1 MiB pipe (headers from a page
 *            dropped with MADV_DONTNEED after each batch, so that bytes in
 *            flight are never rewritten) and spliced to the socket: the
 *            sender copies nothing, the socket holds references to the
 *            pages, and the receiver copies them out of the frames.
 *
 *   send_paths [RUNS]   (default 3; the modes alternate within each run)
 *
 * The last lines give each mode's median sender and receiver CPU time and
 * wall time.
 */
#include "paths.h"

#include <fcntl.h>
#include <stdint.h>
#include <sys/uio.h>
#include <sys/wait.h>

#define PIPE_SIZE (1 << 20)

enum mode { WRITEV, SPLICE, MODES };
static const char *const mode_name[MODES] = { "writev", "splice" };

/* Drops the first `n` bytes of the iovec array `*v` of `*cnt` entries. */
static void advance(struct iovec **v, int *cnt, size_t n)
{
    while (n > 0) {
        if (n >= (*v)->iov_len) {
            n -= (*v)->iov_len;
            (*v)++;
            (*cnt)--;
        } else {
            (*v)->iov_base = (char *)(*v)->iov_base + n;
            (*v)->iov_len -= n;
            n = 0;
        }
    }
}

/* The records of pages [first, first + BATCH) as iovecs, headers in `hdr`. */
static void records(struct iovec *v, uint64_t *hdr, const char *guest, size_t first)
{
    for (size_t j = 0; j < BATCH; j++) {
        hdr[j] = __builtin_bswap64((uint64_t)((first + j) * PAGE) | 0x8);
        v[2 * j] = (struct iovec){ &hdr[j], 8 };
        v[2 * j + 1] = (struct iovec){ (void *)(guest + (first + j) * PAGE), PAGE };
    }
}

/* Child: fills its guest, sends every page as a record, writes its CPU
 * time to `report`. */
static void send_records(const struct sockaddr_in *a, size_t pages, enum mode m, int report)
{
    pin(0);
    char *guest = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (guest == MAP_FAILED)
        die("mmap");
    uint64_t x = 88172645463325252ULL;
    for (size_t i = 0; i < pages * PAGE / 8; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        ((uint64_t *)guest)[i] = x;
    }
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (const struct sockaddr *)a, sizeof *a) != 0)
        die("connect");
    double c0 = thread_cpu_s();
    struct iovec iov[2 * BATCH];
    if (m == WRITEV) {
        uint64_t hdr[BATCH];
        for (size_t i = 0; i < pages; i += BATCH) {
            records(iov, hdr, guest, i);
            struct iovec *v = iov;
            int cnt = 2 * BATCH;
            while (cnt > 0) {
                ssize_t w = writev(c, v, cnt);
                if (w <= 0)
                    die("writev");
                advance(&v, &cnt, (size_t)w);
            }
        }
    } else {
        int p[2];
        if (pipe(p) != 0 || fcntl(p[1], F_SETPIPE_SZ, PIPE_SIZE) < 0)
            die("pipe");
        uint64_t *hdr = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (hdr == MAP_FAILED)
            die("mmap");
        for (size_t i = 0; i < pages; i += BATCH) {
            records(iov, hdr, guest, i);
            struct iovec *v = iov;
            int cnt = 2 * BATCH;
            size_t in_pipe = 0, left = (size_t)BATCH * REC;
            while (left > 0) {
                if (cnt > 0) {
                    ssize_t r = vmsplice(p[1], v, (unsigned long)cnt, SPLICE_F_NONBLOCK);
                    if (r > 0) {
                        advance(&v, &cnt, (size_t)r);
                        in_pipe += (size_t)r;
                    } else if (in_pipe == 0) {
                        die("vmsplice");
                    }
                }
                ssize_t s = splice(p[0], NULL, c, NULL, in_pipe, SPLICE_F_MORE);
                if (s <= 0)
                    die("splice");
                in_pipe -= (size_t)s;
                left -= (size_t)s;
            }
            /* The socket may still hold the header page: take a fresh one. */
            if (madvise(hdr, PAGE, MADV_DONTNEED) != 0)
                die("madvise");
        }
    }
    double cpu = thread_cpu_s() - c0;
    if (write(report, &cpu, sizeof cpu) != sizeof cpu)
        die("report");
    close(c);
    _exit(0);
}

int main(int argc, char **argv)
{
    int runs = argc > 1 ? atoi(argv[1]) : 3;
    if (runs < 1 || runs > 1000) {
        fprintf(stderr, "usage: send_paths [RUNS (1..1000)]\n");
        return 2;
    }
    double *fig[MODES][3];
    for (int m = 0; m < MODES; m++)
        for (int k = 0; k < 3; k++)
            if (!(fig[m][k] = calloc((size_t)runs, sizeof(double))))
                die("calloc");
    size_t pages = (1UL << 30) / PAGE;
    char *guest = receiver_guest(pages);
    pin(1);
    for (int run = 0; run < runs; run++)
        for (int m = 0; m < MODES; m++) {
            struct sockaddr_in a;
            int ls = listen_loopback(&a);
            int report[2];
            if (pipe(report) != 0)
                die("pipe");
            pid_t child = fork();
            if (child < 0)
                die("fork");
            if (child == 0)
                send_records(&a, pages, (enum mode)m, report[1]);
            int c = accept(ls, NULL, NULL);
            if (c < 0)
                die("accept");
            double t0 = now_s(), c0 = thread_cpu_s();
            size_t got = receive_buffered(c, guest, pages);
            double t1 = now_s(), c1 = thread_cpu_s(), sender = -1;
            if (read(report[0], &sender, sizeof sender) != sizeof sender)
                sender = -1;
            close(c);
            close(ls);
            close(report[0]);
            close(report[1]);
            waitpid(child, NULL, 0);
            if (got != pages * REC || sender < 0) {
                fprintf(stderr, "%s: received %zu of %zu bytes\n", mode_name[m], got, pages * REC);
                return 1;
            }
            printf("run %d %-6s sender CPU %.3f s, receiver CPU %.3f s, wall %.3f s (1 GiB of pages)\n", run + 1,
                   mode_name[m], sender, c1 - c0, t1 - t0);
            fig[m][0][run] = sender;
            fig[m][1][run] = c1 - c0;
            fig[m][2][run] = t1 - t0;
        }
    for (int m = 0; m < MODES; m++) {
        printf("%-6s medians over %d runs: sender CPU %.3f s, receiver CPU %.3f s, wall %.3f s\n", mode_name[m], runs,
               median(fig[m][0], runs), median(fig[m][1], runs), median(fig[m][2], runs));
        for (int k = 0; k < 3; k++)
            free(fig[m][k]);
    }
    return 0;
}
