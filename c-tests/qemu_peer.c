/* qemu_peer: a livemig host that stands in for
 *   qemu-system-x86_64 -machine none -m SIZE
 * in both directions: one RAM block, the "timer" section, machine "none".
 *
 *   qemu_peer --incoming URI [--dump FILE] [--port-file F]
 *   qemu_peer --migrate URI [--xbzrle] [--speed B/s] [--downtime-ms MS]
 *             [--dirty-pages N] [--dump FILE] [--paused]
 *             [--converge-after-syncs K] [--dirty-log] [--return-path]
 *             [--cache-size BYTES]
 *   --prefault: touch all RAM before listening (like QEMU's prealloc=on)
 *   common:   [--ram-name NAME] [--ram-size SIZE[K|M|G]] [--ram-file FILE]
 *             [--memfd]
 *
 * --memfd backs RAM with a shared memfd (as vhost-user hosts do), kept
 * open; --ram-file then fills only its non-zero pages (zero pages stay
 * holes, never allocated).
 *
 * --dirty-pages N runs a thread that rewrites N pages continuously (a busy
 * guest: rounds back to back) while
 * the VM runs (so several passes happen); it stops when the VM is stopped.
 * --dirty-log makes the dirtier keep its own log, handed to livemig by the
 * dirty_log_sync callback (as a KVM host does), instead of calling
 * livemig_ram_mark_dirty.
 * --converge-after-syncs K raises the downtime limit to 2 s once K dirty
 * syncs have happened (so a low limit forces several passes, then ends).
 * --dump writes the block after the migration (on the source: the RAM as
 * it was at the switchover). Prints the final query-migrate figures, and
 * "cpu-migration-us:", the process's CPU time from the start of the
 * migration (after RAM is set up and prefaulted) to its end, and exits 0
 * only when the migration completed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "fakehost.h"

/* CPU time (user + system) of the whole process so far, in µs. */
static long long process_cpu_us(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

static uint8_t *ram;
static uint64_t ram_size = 64 << 20;
static const char *ram_name = "ram";
static int64_t timer_state[2];
static pthread_mutex_t vcpu_lock = PTHREAD_MUTEX_INITIALIZER;
static bool vcpu_paused;
static atomic_bool dirtier_quit;
static long dirty_pages;
static int mfd = -1; /* --memfd: the RAM's memfd */
static bool use_dirty_log;
static uint64_t *soft_log; /* one bit per page, guarded by log_lock */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static atomic_int log_syncs;

/* The host's dirty log: hands over and clears the pages written since the
 * last sync, as KVM_GET_DIRTY_LOG does. */
static int log_sync(void *opaque, const char *idstr, void *host, uint64_t length, uint64_t *bitmap)
{
    (void)opaque;
    CHECK(strcmp(idstr, ram_name) == 0 && host == ram && length == ram_size, "dirty_log_sync for an unknown block");
    pthread_mutex_lock(&log_lock);
    for (uint64_t w = 0; w < (ram_size / 4096 + 63) / 64; w++) {
        bitmap[w] |= soft_log[w];
        soft_log[w] = 0;
    }
    pthread_mutex_unlock(&log_lock);
    atomic_fetch_add(&log_syncs, 1);
    return 0;
}

static void timer_save(QEMUFile *f, void *o)
{
    (void)o;
    qemu_put_be64(f, (uint64_t)timer_state[0]);
    qemu_put_be64(f, 0);
    qemu_put_be64(f, (uint64_t)timer_state[1]);
}

static int timer_load(QEMUFile *f, void *o, int version_id)
{
    (void)o;
    if (version_id < 1) {
        fprintf(stderr, "timer: incoming version_id %d is too old for local minimum version_id  1\n", version_id);
        return -EINVAL;
    }
    timer_state[0] = (int64_t)qemu_get_be64(f);
    qemu_get_be64(f);
    timer_state[1] = (int64_t)qemu_get_be64(f);
    return qemu_file_get_error(f);
}

static void stop_vcpu(void)
{
    pthread_mutex_lock(&vcpu_lock);
    vcpu_paused = true;
    pthread_mutex_unlock(&vcpu_lock);
}

/* The "guest": rewrites N pages, one u64 counter at a varying offset. */
static void *dirtier(void *arg)
{
    (void)arg;
    uint64_t round = 0, pages = ram_size / 4096;
    while (!atomic_load(&dirtier_quit)) {
        pthread_mutex_lock(&vcpu_lock);
        if (!vcpu_paused) {
            for (long i = 0; i < dirty_pages; i++) {
                uint64_t page = ((uint64_t)i * 7919) % pages;
                uint64_t *p = (uint64_t *)(ram + page * 4096 + (round % 64) * 8);
                *p = round + 1;
                if (use_dirty_log) {
                    pthread_mutex_lock(&log_lock);
                    soft_log[page / 64] |= 1ULL << (page % 64);
                    pthread_mutex_unlock(&log_lock);
                } else {
                    Error *err = NULL;
                    livemig_ram_mark_dirty(ram_name, page * 4096, 8, &err);
                    CHECK_OK(err);
                }
            }
            round++;
        }
        pthread_mutex_unlock(&vcpu_lock);
        sched_yield();
    }
    return NULL;
}

static uint64_t parse_size(const char *s)
{
    char *end;
    uint64_t v = strtoull(s, &end, 0);
    switch (*end) {
    case 'K': case 'k': v <<= 10; break;
    case 'M': case 'm': v <<= 20; break;
    case 'G': case 'g': v <<= 30; break;
    case 0: break;
    default: CHECK(0, "bad size '%s'", s);
    }
    return v;
}

static void write_file(const char *path, const uint8_t *p, uint64_t n)
{
    FILE *f = fopen(path, "wb");
    CHECK(f, "open %s: %s", path, strerror(errno));
    CHECK(fwrite(p, 1, n, f) == n, "write %s", path);
    CHECK(fclose(f) == 0, "close %s", path);
}

static void print_info(void)
{
    Error *err = NULL;
    MigrationInfo *i = qmp_query_migrate(&err);
    CHECK_OK(err);
    printf("status: %s\n", status_name(i->status));
    if (i->has_error_desc)
        printf("error-desc: %s\n", i->error_desc);
    if (i->has_total_time)
        printf("total-time: %" PRId64 " ms\n", i->total_time);
    if (i->has_downtime)
        printf("downtime: %" PRId64 " ms\n", i->downtime);
    if (i->has_expected_downtime)
        printf("expected-downtime: %" PRId64 " ms\n", i->expected_downtime);
    if (i->has_ram)
        printf("precopy-bytes: %" PRId64 "\ndowntime-bytes: %" PRId64 "\n", i->ram->precopy_bytes, i->ram->downtime_bytes);
    if (i->has_setup_time)
        printf("setup-time: %" PRId64 " ms\n", i->setup_time);
    if (i->has_ram) {
        MigrationStats *r = i->ram;
        printf("ram: transferred %" PRId64 " remaining %" PRId64 " total %" PRId64 " duplicate %" PRId64
               " normal %" PRId64 " normal-bytes %" PRId64 " skipped %" PRId64 " dirty-sync-count %" PRId64
               " mbps %.1f\n", r->transferred, r->remaining, r->total, r->duplicate, r->normal, r->normal_bytes,
               r->skipped, r->dirty_sync_count, r->mbps);
    }
    if (i->has_xbzrle_cache) {
        XBZRLECacheStats *x = i->xbzrle_cache;
        printf("xbzrle: pages %" PRId64 " bytes %" PRId64 " cache-miss %" PRId64 " overflow %" PRId64 "\n",
               x->pages, x->bytes, x->cache_miss, x->overflow);
    }
    qapi_free_MigrationInfo(i);
}

int main(int argc, char **argv)
{
    const char *incoming = NULL, *migrate = NULL, *dump = NULL, *ram_file = NULL, *port_file = NULL;
    bool xbzrle = false, paused = false, return_path = false, prefault = false, use_memfd = false;
    long long speed = -1, downtime_ms = -1, converge_after = 0, cache_size = -1;
    Error *err = NULL;
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--incoming") && v) incoming = argv[++i];
        else if (!strcmp(a, "--migrate") && v) migrate = argv[++i];
        else if (!strcmp(a, "--dump") && v) dump = argv[++i];
        else if (!strcmp(a, "--port-file") && v) port_file = argv[++i];
        else if (!strcmp(a, "--ram-name") && v) ram_name = argv[++i];
        else if (!strcmp(a, "--ram-size") && v) ram_size = parse_size(argv[++i]);
        else if (!strcmp(a, "--ram-file") && v) ram_file = argv[++i];
        else if (!strcmp(a, "--xbzrle")) xbzrle = true;
        else if (!strcmp(a, "--paused")) paused = true;
        else if (!strcmp(a, "--speed") && v) speed = atoll(argv[++i]);
        else if (!strcmp(a, "--downtime-ms") && v) downtime_ms = atoll(argv[++i]);
        else if (!strcmp(a, "--dirty-pages") && v) dirty_pages = atol(argv[++i]);
        else if (!strcmp(a, "--converge-after-syncs") && v) converge_after = atoll(argv[++i]);
        else if (!strcmp(a, "--cache-size") && v) cache_size = (long long)parse_size(argv[++i]);
        else if (!strcmp(a, "--dirty-log")) use_dirty_log = true;
        else if (!strcmp(a, "--return-path")) return_path = true;
        else if (!strcmp(a, "--prefault")) prefault = true;
        else if (!strcmp(a, "--memfd")) use_memfd = true;
        else CHECK(0, "bad argument '%s' (see the comment at the top of qemu_peer.c)", a);
    }
    CHECK(!incoming != !migrate, "exactly one of --incoming and --migrate");
    if (use_memfd) {
        mfd = memfd_create("qemu_peer-ram", MFD_CLOEXEC);
        CHECK(mfd >= 0 && ftruncate(mfd, (off_t)ram_size) == 0, "memfd: %s", strerror(errno));
        ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        CHECK(ram != MAP_FAILED, "mmap memfd");
        if (ram_file) {
            /* Page by page, leaving zero pages as holes. */
            int fd = open(ram_file, O_RDONLY);
            CHECK(fd >= 0, "open %s: %s", ram_file, strerror(errno));
            static uint8_t page[4096], zero[4096];
            for (uint64_t off = 0; off < ram_size && pread(fd, page, sizeof page, (off_t)off) == (ssize_t)sizeof page; off += 4096)
                if (memcmp(page, zero, sizeof page) != 0)
                    memcpy(ram + off, page, sizeof page);
            close(fd);
            ram_file = NULL;
        }
        /* mfd stays open, as a vhost-user host keeps it to share RAM. */
    } else {
        ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    CHECK(ram != MAP_FAILED, "mmap %" PRIu64 " bytes", ram_size);
    if (prefault) {
        /* As QEMU's prealloc=on: one MADV_POPULATE_WRITE (Linux 5.14),
         * touching every page where the kernel lacks it. */
        if (madvise(ram, ram_size, 23 /* MADV_POPULATE_WRITE */) != 0)
            for (uint64_t off = 0; off < ram_size; off += 4096)
                ram[off] = 0;
    }
    if (ram_file) {
        int fd = open(ram_file, O_RDONLY);
        CHECK(fd >= 0, "open %s: %s", ram_file, strerror(errno));
        struct stat st;
        if (!prefault && fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size == ram_size) {
            /* A private mapping of the image, as QEMU's memory-backend-file
             * with share=off: pages come from the page cache on first touch
             * and copies are made only when the guest (dirtier) writes. */
            munmap(ram, ram_size);
            ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
            CHECK(ram != MAP_FAILED, "mmap %s", ram_file);
            close(fd);
            ram_file = NULL;
        }
    }
    if (ram_file) {
        int fd = open(ram_file, O_RDONLY);
        CHECK(fd >= 0, "open %s: %s", ram_file, strerror(errno));
        uint64_t done = 0;
        ssize_t n;
        while (done < ram_size && (n = read(fd, ram + done, ram_size - done)) > 0)
            done += (uint64_t)n;
        close(fd);
    }
    fakehost_on_stop = stop_vcpu;
    fakehost_setup(migrate && !paused, true);
    if (use_dirty_log) {
        soft_log = calloc((ram_size / 4096 + 63) / 64, sizeof(uint64_t));
        CHECK(soft_log, "out of memory");
        fakehost_dirty_log(log_sync);
    }
    CHECK(livemig_set_machine_name("none", &err), "%s", error_get_pretty(err));
    CHECK(livemig_ram_block_add(ram_name, ram, ram_size, &err), "%s", error_get_pretty(err));
    CHECK(register_savevm(NULL, "timer", 0, 2, timer_save, timer_load, NULL) >= 0, "register timer");

    long long cpu_start = process_cpu_us();
    if (incoming) {
        qemu_start_incoming_migration(incoming, &err);
        CHECK_OK(err);
        if (port_file) {
            FILE *pf = fopen(port_file, "w");
            CHECK(pf, "open %s", port_file);
            fprintf(pf, "%d\n", livemig_incoming_port());
            fclose(pf);
        }
        MigrationStatus st = wait_done(true, 300);
        printf("cpu-migration-us: %lld\n", process_cpu_us() - cpu_start);
        Error *e2 = NULL;
        MigrationInfo *i = livemig_query_incoming(&e2);
        printf("status: %s\n", status_name(st));
        if (i->has_error_desc)
            printf("error-desc: %s\n", i->error_desc);
        qapi_free_MigrationInfo(i);
        printf("runstate: %d (%s)\n", fake_host.state,
               fake_host.state == RUN_STATE_RUNNING ? "running" :
               fake_host.state == RUN_STATE_PAUSED ? "paused" :
               fake_host.state == RUN_STATE_PRELAUNCH ? "prelaunch" : "other");
        if (st == MIGRATION_STATUS_COMPLETED && dump)
            write_file(dump, ram, ram_size);
        return st == MIGRATION_STATUS_COMPLETED ? 0 : 1;
    }

    {
        MigrationCapabilityStatus caps[2] = { { MIGRATION_CAPABILITY_XBZRLE, xbzrle },
                                              { MIGRATION_CAPABILITY_RETURN_PATH, return_path } };
        MigrationCapabilityStatusList l2 = { NULL, &caps[1] };
        MigrationCapabilityStatusList l = { &l2, &caps[0] };
        qmp_migrate_set_capabilities(&l, &err);
        CHECK_OK(err);
    }
    if (cache_size >= 0) {
        qmp_migrate_set_cache_size(cache_size, &err);
        CHECK_OK(err);
    }
    if (speed >= 0) {
        qmp_migrate_set_speed(speed, &err);
        CHECK_OK(err);
    }
    if (downtime_ms >= 0) {
        qmp_migrate_set_downtime((double)downtime_ms / 1000.0, &err);
        CHECK_OK(err);
    }
    pthread_t t;
    if (dirty_pages > 0)
        CHECK(pthread_create(&t, NULL, dirtier, NULL) == 0, "pthread_create");
    qmp_migrate(migrate, false, false, false, false, false, false, &err);
    CHECK_OK(err);
    if (converge_after > 0) {
        double end = now_s() + 300;
        for (;;) {
            MigrationInfo *i = qmp_query_migrate(&err);
            CHECK_OK(err);
            bool active = i->status == MIGRATION_STATUS_ACTIVE || i->status == MIGRATION_STATUS_SETUP;
            bool synced = i->has_ram && i->ram->dirty_sync_count >= converge_after;
            qapi_free_MigrationInfo(i);
            if (!active || synced)
                break;
            CHECK(now_s() < end, "never reached %lld dirty syncs", converge_after);
            sleep_ms(5);
        }
        qmp_migrate_set_downtime(2.0, &err);
        CHECK_OK(err);
    }
    MigrationStatus st = wait_done(false, 300);
    printf("cpu-migration-us: %lld\n", process_cpu_us() - cpu_start);
    if (dirty_pages > 0) {
        atomic_store(&dirtier_quit, true);
        pthread_join(t, NULL);
    }
    print_info();
    struct stat mst;
    if (mfd >= 0 && fstat(mfd, &mst) == 0)
        printf("memfd-allocated: %lld\n", (long long)mst.st_blocks * 512);
    if (use_dirty_log)
        printf("dirty-log syncs: %d\n", atomic_load(&log_syncs));
    if (st == MIGRATION_STATUS_COMPLETED && dump)
        write_file(dump, ram, ram_size);
    return st == MIGRATION_STATUS_COMPLETED ? 0 : 1;
}
