/* soak: N back-to-back small migrations between two processes over a unix
 * socket; each side checks that its thread and fd counts end where they
 * were after a warm-up, and that its memory (RSS) did not grow.
 *
 *   soak dst unix:PATH N     (start first)
 *   soak src unix:PATH N
 */
#include <dirent.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "fakehost.h"

#define RAM_SIZE (1 << 20)

static int count_dir(const char *path)
{
    DIR *d = opendir(path);
    CHECK(d, "opendir %s", path);
    int n = 0;
    while (readdir(d))
        n++;
    closedir(d);
    return n;
}

static long rss_kib(void)
{
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    CHECK(f && fscanf(f, "%ld %ld", &pages, &resident) == 2, "statm");
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

typedef struct Counts {
    int threads, fds;
    long rss;
} Counts;

static Counts counts(void)
{
    /* Let a migration thread that just set its final state finish. */
    Counts c = { 0, 0, 0 };
    for (int i = 0; i < 100; i++) {
        Counts n = { count_dir("/proc/self/task"), count_dir("/proc/self/fd"), rss_kib() };
        if (n.threads == c.threads && n.fds == c.fds)
            return n;
        c = n;
        sleep_ms(10);
    }
    return c;
}

int main(int argc, char **argv)
{
    CHECK(argc == 4, "usage: soak dst|src unix:PATH N");
    bool dst = !strcmp(argv[1], "dst");
    const char *uri = argv[2];
    long n = atol(argv[3]);
    CHECK(n >= 10 && !strncmp(uri, "unix:", 5), "N >= 10 and a unix: URI");
    Error *err = NULL;
    uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(ram != MAP_FAILED, "mmap");
    fakehost_setup(!dst, true);
    CHECK(livemig_set_machine_name("none", &err), "%s", error_get_pretty(err));
    CHECK(livemig_ram_block_add("ram", ram, RAM_SIZE, &err), "%s", error_get_pretty(err));
    Counts warm = { 0, 0, 0 };
    for (long i = 0; i < n; i++) {
        if (i == n / 10)
            warm = counts();
        if (dst) {
            memset(ram, 0, RAM_SIZE);
            /* The last load started the VM: a new incoming migration
             * needs it stopped, as after a reset. */
            fake_host.state = RUN_STATE_PRELAUNCH;
            qemu_start_incoming_migration(uri, &err);
            CHECK_OK(err);
            MigrationStatus st = wait_done(true, 30);
            CHECK(st == MIGRATION_STATUS_COMPLETED, "incoming migration %ld: %s", i, status_name(st));
            for (int p = 0; p < RAM_SIZE / 4096; p++)
                CHECK(ram[p * 4096] == (uint8_t)(p + i), "migration %ld: page %d not migrated", i, p);
        } else {
            for (int p = 0; p < RAM_SIZE / 4096; p++)
                ram[p * 4096] = (uint8_t)(p + i);
            struct stat sb;
            double end = now_s() + 10;
            while (stat(uri + 5, &sb) != 0) {
                CHECK(now_s() < end, "the destination is not listening for migration %ld", i);
                sleep_ms(1);
            }
            pthread_mutex_lock(&fake_host.lock);
            fake_host.state = RUN_STATE_RUNNING;
            pthread_mutex_unlock(&fake_host.lock);
            qmp_migrate(uri, false, false, false, false, false, false, &err);
            CHECK_OK(err);
            MigrationStatus st = wait_done(false, 30);
            CHECK(st == MIGRATION_STATUS_COMPLETED, "migration %ld: %s", i, status_name(st));
        }
    }
    Counts end = counts();
    printf("soak %s: %ld migrations; threads %d -> %d, fds %d -> %d, rss %ld -> %ld KiB\n", argv[1], n, warm.threads,
           end.threads, warm.fds, end.fds, warm.rss, end.rss);
    CHECK(end.threads == warm.threads, "threads leaked");
    CHECK(end.fds == warm.fds, "fds leaked");
    CHECK(end.rss - warm.rss < 4096, "memory grew by %ld KiB", end.rss - warm.rss);
    return 0;
}
