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
#include "paths.h"

#include <sys/uio.h>
#include <sys/wait.h>

enum mode { BUFFERED, PER_PAGE, MODES };
static const char *const mode_name[MODES] = { "buffered", "per-page" };

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
    return receive_buffered(c, guest, pages);
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
    char *guest = receiver_guest(pages);
    pin(1);
    for (int run = 0; run < runs; run++)
        for (int m = 0; m < MODES; m++) {
            struct sockaddr_in a;
            int ls = listen_loopback(&a);
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
        double med = median(cpu[m], runs);
        printf("%-9s median receiver CPU %.3f s (min %.3f, max %.3f) over %d runs\n", mode_name[m], med, cpu[m][0],
               cpu[m][runs - 1], runs);
        free(cpu[m]);
    }
    return 0;
}
