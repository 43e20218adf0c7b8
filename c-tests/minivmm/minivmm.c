/* minivmm: a small KVM VMM that links livemig the way a hypervisor would.
 *
 * One vCPU, N MiB of guest RAM, flat 32-bit protected mode set up through
 * KVM_SET_SREGS (no firmware), and a tiny guest that walks RAM in address
 * order incrementing the first byte of every 4 KiB page, pass after pass,
 * reporting progress (port 0x11, every MiB) and each completed pass
 * (port 0x10). Where /dev/kvm is missing or unusable (or with --no-kvm) the
 * same workload runs on a plain thread with a software dirty log.
 *
 *   minivmm --incoming URI [--port-file F]
 *   minivmm --migrate URI [--run-ms MS] [--speed B/s] [--downtime-ms MS]
 *           [--xbzrle] [--cache-size BYTES] [--csv FILE] [--raise-speed-after-syncs K]
 *   common: [--ram MiB] [--dirty-rate MB/s] [--no-kvm] [--quiet]
 *
 * Both sides print "CHECK name: ok|FAILED ..." lines and "RAMHASH <hex>"
 * (source: RAM at the switchover; destination: RAM as loaded, before the
 * guest starts) for demo.sh to compare. Exit status 0 only when the
 * migration completed and every check passed.
 *
 * The guest (32-bit code at GPA 0x1010; the first byte of page 1 is data):
 *
 *   00: 31 DB              outer: xor  ebx, ebx
 *   02: FE 03              inner: inc  byte [ebx]
 *   04: 81 C3 00 10 00 00         add  ebx, 0x1000
 *   0A: F7 C3 FF FF 0F 00         test ebx, 0xFFFFF      ; every MiB:
 *   10: 75 07                     jnz  skip
 *   12: 89 D8                     mov  eax, ebx
 *   14: 66 BA 11 00               mov  dx, 0x11
 *   18: EF                        out  dx, eax           ; progress
 *   19: 39 F3              skip:  cmp  ebx, esi          ; esi = RAM size
 *   1B: 72 E5                     jb   inner
 *   1D: 41                        inc  ecx               ; pass counter
 *   1E: 89 C8                     mov  eax, ecx
 *   20: 66 BA 10 00               mov  dx, 0x10
 *   24: EF                        out  dx, eax           ; pass done
 *   25: EB D9                     jmp  outer
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../check.h"
#include "livemig.h"

static const uint8_t guest_code[] = {
    0x31, 0xDB, 0xFE, 0x03, 0x81, 0xC3, 0x00, 0x10, 0x00, 0x00, 0xF7, 0xC3, 0xFF, 0xFF, 0x0F, 0x00,
    0x75, 0x07, 0x89, 0xD8, 0x66, 0xBA, 0x11, 0x00, 0xEF, 0x39, 0xF3, 0x72, 0xE5, 0x41, 0x89, 0xC8,
    0x66, 0xBA, 0x10, 0x00, 0xEF, 0xEB, 0xD9,
};
#define CODE_GPA 0x1010
#define PORT_PASS 0x10
#define PORT_PROGRESS 0x11

/* ---- the machine ---- */
static uint8_t *ram;
static uint64_t ram_size = 512ULL << 20;
static bool use_kvm = true;
static int kvm_fd = -1, vm_fd = -1, vcpu_fd = -1;
static struct kvm_run *run;
static double dirty_rate_mbs; /* 0: unthrottled */
static bool quiet;

/* The host lock (QEMU's iothread lock): taken by livemig's callbacks. */
static pthread_mutex_t big_lock = PTHREAD_MUTEX_INITIALIZER;
static RunState runstate = RUN_STATE_PRELAUNCH;

/* vCPU control: the vCPU thread never takes the big lock. */
static pthread_mutex_t vcpu_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t vcpu_cond = PTHREAD_COND_INITIALIZER;
static bool vcpu_should_run, vcpu_quit, vcpu_idle = true;
/* The vCPU thread, kicked out of KVM_RUN with SIGUSR1 (as QEMU's
 * kvm_cpu_kick: immediate_exit set, then a signal). */
static pthread_t vcpu_tid;
static bool vcpu_started;
static atomic_uint_fast64_t guest_pass, guest_exits;

/* Software vCPU state (no KVM), migrated as the "cpu" section. */
static uint64_t soft_page;
static uint32_t soft_pass;
/* Software dirty log: one bit per page. */
static uint64_t *soft_log;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

/* Destination: RAM as loaded, checked just before the guest starts. */
static uint64_t loaded_hash;
static bool loaded_edge_ok, loaded_checked;

static double throttle_start, throttle_bytes;

static void die_errno(const char *what)
{
    fprintf(stderr, "minivmm: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t ram_hash(void)
{
    /* FNV-1a over 64-bit words. */
    uint64_t h = 0xcbf29ce484222325ULL;
    const uint64_t *w = (const uint64_t *)ram;
    for (uint64_t i = 0; i < ram_size / 8; i++)
        h = (h ^ w[i]) * 0x100000001b3ULL;
    return h;
}

/* QEMU's single-edge check: walking pages in order, each page's first byte
 * equals the previous one's, except at most once where it is one less
 * (the pages before that point have been incremented once more). */
static bool single_edge(uint64_t *edge_page)
{
    int edges = 0;
    *edge_page = 0;
    for (uint64_t p = 1; p < ram_size / 4096; p++) {
        uint8_t prev = ram[(p - 1) * 4096], cur = ram[p * 4096];
        if (cur == prev)
            continue;
        if ((uint8_t)(cur + 1) != prev || ++edges > 1)
            return false;
        *edge_page = p;
    }
    return true;
}

/* Throttles the guest to the dirty rate: called every MiB it dirties. */
static void throttle(double mib)
{
    if (dirty_rate_mbs <= 0)
        return;
    throttle_bytes += mib * 1048576.0;
    double due = throttle_start + throttle_bytes / (dirty_rate_mbs * 1e6);
    double wait = due - now_s();
    if (wait < -0.2) { /* far behind (e.g. after a pause): don't catch up in a burst */
        throttle_start = now_s();
        throttle_bytes = 0;
    } else if (wait > 0) {
        /* Until due, or until the VM is being stopped: a stop must not
         * wait for the guest's pacing (a real vCPU is kicked at once). */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long ns = ts.tv_nsec + (long long)(wait * 1e9);
        ts.tv_sec += (time_t)(ns / 1000000000);
        ts.tv_nsec = (long)(ns % 1000000000);
        pthread_mutex_lock(&vcpu_lock);
        /* Idle while it waits: from here the thread runs no guest code
         * until vcpu_gate lets it (the KVM vCPU is out of KVM_RUN), so a
         * stop returns at once rather than when this thread next gets a
         * CPU, as a vCPU parked in the kernel costs a real VMM's stop
         * nothing. vcpu_gate clears it again. */
        vcpu_idle = true;
        pthread_cond_broadcast(&vcpu_cond);
        while (vcpu_should_run && !vcpu_quit)
            if (pthread_cond_timedwait(&vcpu_cond, &vcpu_lock, &ts) == ETIMEDOUT)
                break;
        pthread_mutex_unlock(&vcpu_lock);
    }
}

static void kick_handler(int sig) { (void)sig; }

/* Parks the vCPU while it should not run; false when it should quit. */
static bool vcpu_gate(void)
{
    pthread_mutex_lock(&vcpu_lock);
    if (!vcpu_should_run && !vcpu_quit) {
        vcpu_idle = true;
        pthread_cond_broadcast(&vcpu_cond);
        while (!vcpu_should_run && !vcpu_quit)
            pthread_cond_wait(&vcpu_cond, &vcpu_lock);
        throttle_start = now_s();
        throttle_bytes = 0;
    }
    vcpu_idle = false;
    /* A kick is for a stop; one left from a stop already undone (the VM
     * restarted before this thread saw it) must not keep KVM_RUN out. */
    if (use_kvm)
        __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    bool quit = vcpu_quit;
    pthread_mutex_unlock(&vcpu_lock);
    return !quit;
}

static void *vcpu_thread_kvm(void *arg)
{
    (void)arg;
    while (vcpu_gate()) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die_errno("KVM_RUN");
        }
        atomic_fetch_add(&guest_exits, 1);
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "minivmm: unexpected exit reason %u\n", run->exit_reason);
            exit(2);
        }
        uint32_t v;
        memcpy(&v, (uint8_t *)run + run->io.data_offset, 4);
        if (run->io.port == PORT_PASS)
            atomic_store(&guest_pass, v);
        else if (run->io.port == PORT_PROGRESS)
            throttle(1.0);
    }
    return NULL;
}

static void *vcpu_thread_soft(void *arg)
{
    (void)arg;
    uint64_t pages = ram_size / 4096;
    while (vcpu_gate()) {
        /* One MiB of the walk, then the same checks a port exit gives. */
        uint64_t first = soft_page, n = 256;
        if (first + n > pages)
            n = pages - first;
        for (uint64_t p = first; p < first + n; p++)
            ram[p * 4096]++;
        pthread_mutex_lock(&log_lock);
        for (uint64_t p = first; p < first + n; p++)
            soft_log[p / 64] |= 1ULL << (p % 64);
        pthread_mutex_unlock(&log_lock);
        soft_page += n;
        if (soft_page == pages) {
            soft_page = 0;
            soft_pass++;
            atomic_store(&guest_pass, soft_pass);
        }
        throttle((double)n / 256.0);
    }
    return NULL;
}

static void vcpu_set_running(bool on)
{
    pthread_mutex_lock(&vcpu_lock);
    vcpu_should_run = on;
    pthread_cond_broadcast(&vcpu_cond);
    if (!on && use_kvm && vcpu_started && !vcpu_idle) {
        /* Out of KVM_RUN now, not at the guest's next port exit: KVM_RUN
         * returns EINTR at once when immediate_exit is set before it is
         * entered, or when the signal arrives while it runs. */
        __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
        pthread_kill(vcpu_tid, SIGUSR1);
    }
    if (!on) {
        /* The vCPU leaves KVM_RUN at its next port exit (every MiB). */
        double end = now_s() + 10;
        while (!vcpu_idle) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&vcpu_cond, &vcpu_lock, &ts);
            CHECK(now_s() < end, "the vCPU did not stop within 10 s");
        }
    }
    pthread_mutex_unlock(&vcpu_lock);
}

/* ---- KVM setup ---- */
static bool kvm_setup(void)
{
    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0)
        return false;
    if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        return false;
    vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (vm_fd < 0)
        return false;
    ioctl(vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL);
    struct kvm_userspace_memory_region mr = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = ram_size, .userspace_addr = (uintptr_t)ram,
    };
    if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0)
        return false;
    vcpu_fd = ioctl(vm_fd, KVM_CREATE_VCPU, 0);
    if (vcpu_fd < 0)
        return false;
    int sz = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    run = mmap(NULL, (size_t)sz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    if (run == MAP_FAILED)
        return false;
    struct kvm_sregs sregs;
    if (ioctl(vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
        return false;
    struct kvm_segment seg = {
        .base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 3, .present = 1,
        .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
    };
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
    seg.type = 11;
    seg.selector = 0x08;
    sregs.cs = seg;
    sregs.cr0 |= 1; /* protected mode, no paging */
    if (ioctl(vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
        return false;
    struct kvm_regs regs = { .rip = CODE_GPA, .rflags = 2, .rsi = ram_size, .rcx = 0 };
    return ioctl(vcpu_fd, KVM_SET_REGS, &regs) == 0;
}

static int set_dirty_logging(bool on)
{
    struct kvm_userspace_memory_region mr = {
        .slot = 0, .flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0, .guest_phys_addr = 0,
        .memory_size = ram_size, .userspace_addr = (uintptr_t)ram,
    };
    return ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &mr) < 0 ? -errno : 0;
}

/* ---- host callbacks for livemig ---- */
static void host_lock(void *o) { (void)o; pthread_mutex_lock(&big_lock); }
static void host_unlock(void *o) { (void)o; pthread_mutex_unlock(&big_lock); }

static int host_stop(void *o, RunState st)
{
    (void)o;
    vcpu_set_running(false);
    runstate = st;
    return 0;
}

static int host_start(void *o)
{
    (void)o;
    if (runstate == RUN_STATE_INMIGRATE && !loaded_checked) {
        /* Destination: the RAM exactly as loaded, before the guest runs. */
        uint64_t edge;
        loaded_hash = ram_hash();
        loaded_edge_ok = single_edge(&edge);
        loaded_checked = true;
    }
    runstate = RUN_STATE_RUNNING;
    vcpu_set_running(true);
    return 0;
}

static bool host_is_running(void *o) { (void)o; return runstate == RUN_STATE_RUNNING; }
static void host_set(void *o, RunState st) { (void)o; runstate = st; }
static RunState host_get(void *o) { (void)o; return runstate; }
static int log_start(void *o) { (void)o; return use_kvm ? set_dirty_logging(true) : 0; }
static void log_stop(void *o) { (void)o; if (use_kvm) set_dirty_logging(false); }

static int log_sync(void *o, const char *idstr, void *host, uint64_t length, uint64_t *bitmap)
{
    (void)o; (void)idstr; (void)host;
    uint64_t words = (length / 4096 + 63) / 64;
    if (use_kvm) {
        static uint64_t *tmp;
        if (!tmp && !(tmp = calloc(words, 8)))
            return -ENOMEM;
        struct kvm_dirty_log dl = { .slot = 0, .dirty_bitmap = tmp };
        if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &dl) < 0)
            return -errno;
        for (uint64_t w = 0; w < words; w++)
            bitmap[w] |= tmp[w];
    } else {
        pthread_mutex_lock(&log_lock);
        for (uint64_t w = 0; w < words; w++) {
            bitmap[w] |= soft_log[w];
            soft_log[w] = 0;
        }
        pthread_mutex_unlock(&log_lock);
    }
    return 0;
}

/* ---- the "cpu" device: vCPU registers (KVM) or the walk position ---- */
static void cpu_save(QEMUFile *f, void *o)
{
    (void)o;
    qemu_put_byte(f, use_kvm);
    if (use_kvm) {
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        CHECK(ioctl(vcpu_fd, KVM_GET_REGS, &regs) == 0, "KVM_GET_REGS");
        CHECK(ioctl(vcpu_fd, KVM_GET_SREGS, &sregs) == 0, "KVM_GET_SREGS");
        qemu_put_be32(f, sizeof(regs));
        qemu_put_buffer(f, (const uint8_t *)&regs, sizeof(regs));
        qemu_put_be32(f, sizeof(sregs));
        qemu_put_buffer(f, (const uint8_t *)&sregs, sizeof(sregs));
    } else {
        qemu_put_be64(f, soft_page);
        qemu_put_be32(f, soft_pass);
    }
}

static int cpu_load(QEMUFile *f, void *o, int version_id)
{
    (void)o;
    if (version_id != 1)
        return -EINVAL;
    int kvm = qemu_get_byte(f);
    if (kvm != use_kvm) {
        fprintf(stderr, "minivmm: the source ran %s, this side %s\n", kvm ? "KVM" : "the software vCPU",
                use_kvm ? "KVM" : "the software vCPU");
        return -EINVAL;
    }
    if (use_kvm) {
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        if (qemu_get_be32(f) != sizeof(regs) || qemu_get_buffer(f, (uint8_t *)&regs, sizeof(regs)) != sizeof(regs) ||
            qemu_get_be32(f) != sizeof(sregs) || qemu_get_buffer(f, (uint8_t *)&sregs, sizeof(sregs)) != sizeof(sregs))
            return qemu_file_get_error(f) ? qemu_file_get_error(f) : -EINVAL;
        if (ioctl(vcpu_fd, KVM_SET_REGS, &regs) < 0 || ioctl(vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
            return -errno;
        atomic_store(&guest_pass, (uint32_t)regs.rcx);
    } else {
        uint64_t page = qemu_get_be64(f);
        uint32_t pass = qemu_get_be32(f);
        if (qemu_file_get_error(f))
            return qemu_file_get_error(f);
        if (page >= ram_size / 4096)
            return -ERANGE;
        soft_page = page;
        soft_pass = pass;
        atomic_store(&guest_pass, pass);
    }
    return 0;
}

/* ---- reporting ---- */
static int checks_failed;

static void report(const char *name, bool ok, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void report(const char *name, bool ok, const char *fmt, ...)
{
    char detail[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof(detail), fmt, ap);
    va_end(ap);
    printf("CHECK %s: %s (%s)\n", name, ok ? "ok" : "FAILED", detail);
    if (!ok)
        checks_failed++;
}

static void progress(FILE *csv, double t0, uint64_t *last_xfer, double *last_t, bool final)
{
    Error *err = NULL;
    MigrationInfo *i = qmp_query_migrate(&err);
    CHECK_OK(err);
    double t = now_s() - t0;
    if (i->has_ram) {
        MigrationStats *r = i->ram;
        /* Throughput of livemig's last 100 ms window. */
        double mbs = r->mbps / 8.0;
        double dirty = (double)r->dirty_pages_rate * 4096 / 1e6;
        if (csv)
            fprintf(csv, "%.3f,%" PRIu64 ",%" PRId64 ",%" PRId64 ",%.1f,%.1f,%s\n", t, (uint64_t)atomic_load(&guest_pass),
                    r->remaining, r->transferred, mbs, dirty, final ? "completed" : status_name(i->status));
        /* On a terminal the line updates in place; in a log, once a second. */
        static double last_line = -1;
        bool tty = isatty(2);
        if (!quiet && (tty || final || t - last_line >= 1.0)) {
            last_line = t;
            fprintf(stderr, "%s[%6.2fs] pass %4" PRIu64 " | %7.1f / %.0f MiB sent | remaining %7.1f MiB | %7.1f MB/s | dirty %6.1f MB/s | expected downtime %4" PRId64 " ms   %s",
                    tty ? "\r" : "", t, (uint64_t)atomic_load(&guest_pass), (double)r->transferred / 1048576, (double)r->total / 1048576,
                    (double)r->remaining / 1048576, mbs, dirty, i->has_expected_downtime ? i->expected_downtime : 0,
                    final || !tty ? "\n" : "");
        }
        *last_xfer = (uint64_t)r->transferred;
        *last_t = t;
    }
    qapi_free_MigrationInfo(i);
}

static void final_report(void)
{
    Error *err = NULL;
    MigrationInfo *i = qmp_query_migrate(&err);
    CHECK_OK(err);
    printf("status: %s\n", status_name(i->status));
    if (i->has_error_desc)
        printf("error: %s\n", i->error_desc);
    if (i->has_ram) {
        MigrationStats *r = i->ram;
        printf("total time:      %" PRId64 " ms\n", i->total_time);
        printf("downtime:        %" PRId64 " ms\n", i->has_downtime ? i->downtime : -1);
        printf("expected downtime at switchover: %" PRId64 " ms\n", i->has_expected_downtime ? i->expected_downtime : -1);
        printf("setup time:      %" PRId64 " ms\n", i->setup_time);
        printf("throughput:      %.1f Mbit/s\n", r->mbps);
        printf("transferred:     %" PRId64 " bytes (RAM %" PRId64 " MiB)\n", r->transferred, r->total >> 20);
        printf("pages:           zero %" PRId64 ", normal %" PRId64 ", xbzrle %" PRId64 ", skipped %" PRId64 "\n",
               r->duplicate, r->normal, i->has_xbzrle_cache ? i->xbzrle_cache->pages : 0, r->skipped);
        printf("passes:          %" PRId64 " (dirty syncs)\n", r->dirty_sync_count);
        printf("stats: dirty_sync_count=%" PRId64 " normal=%" PRId64 " total_pages=%" PRId64 " xbzrle_pages=%" PRId64 "\n",
               r->dirty_sync_count, r->normal, r->total / 4096, i->has_xbzrle_cache ? i->xbzrle_cache->pages : 0);
    }
    qapi_free_MigrationInfo(i);
}

int main(int argc, char **argv)
{
    const char *incoming = NULL, *migrate = NULL, *port_file = NULL, *csv_path = NULL;
    long run_ms = 1000, downtime_ms = -1, raise_after = 0;
    long long speed = -1, cache_size = -1;
    bool xbzrle = false;
    Error *err = NULL;
    setvbuf(stdout, NULL, _IONBF, 0);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--incoming") && v) incoming = argv[++i];
        else if (!strcmp(a, "--migrate") && v) migrate = argv[++i];
        else if (!strcmp(a, "--port-file") && v) port_file = argv[++i];
        else if (!strcmp(a, "--csv") && v) csv_path = argv[++i];
        else if (!strcmp(a, "--ram") && v) ram_size = strtoull(argv[++i], NULL, 0) << 20;
        else if (!strcmp(a, "--run-ms") && v) run_ms = atol(argv[++i]);
        else if (!strcmp(a, "--speed") && v) speed = atoll(argv[++i]);
        else if (!strcmp(a, "--downtime-ms") && v) downtime_ms = atol(argv[++i]);
        else if (!strcmp(a, "--cache-size") && v) cache_size = atoll(argv[++i]);
        else if (!strcmp(a, "--dirty-rate") && v) dirty_rate_mbs = atof(argv[++i]);
        else if (!strcmp(a, "--raise-speed-after-syncs") && v) raise_after = atol(argv[++i]);
        else if (!strcmp(a, "--xbzrle")) xbzrle = true;
        else if (!strcmp(a, "--no-kvm")) use_kvm = false;
        else if (!strcmp(a, "--quiet")) quiet = true;
        else CHECK(0, "bad argument '%s' (see the comment at the top of minivmm.c)", a);
    }
    CHECK(!incoming != !migrate, "exactly one of --incoming and --migrate");
    CHECK(ram_size >= (2 << 20) && ram_size % (1 << 20) == 0, "--ram takes a whole number of MiB >= 2");
    ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    CHECK(ram != MAP_FAILED, "mmap guest RAM");
    const char *role = incoming ? "dst" : "src";

    if (use_kvm && !kvm_setup()) {
        printf("%s: KVM is not usable here (%s); running the guest workload on a plain thread\n", role,
               errno ? strerror(errno) : "setup failed");
        use_kvm = false;
    } else if (!use_kvm) {
        printf("%s: KVM turned off (--no-kvm); running the guest workload on a plain thread\n", role);
    } else {
        printf("%s: KVM guest, %" PRIu64 " MiB of RAM, one vCPU\n", role, ram_size >> 20);
    }
    if (!use_kvm)
        CHECK(soft_log = calloc((ram_size / 4096 + 63) / 64, 8), "out of memory");
    if (!incoming)
        memcpy(ram + CODE_GPA, guest_code, sizeof(guest_code));

    LivemigHostOps ops = {
        .version = LIVEMIG_HOST_OPS_VERSION, .size = sizeof(ops),
        .iothread_lock = host_lock, .iothread_unlock = host_unlock,
        .vm_stop_force_state = host_stop, .vm_start = host_start,
        .runstate_is_running = host_is_running, .runstate_set = host_set, .runstate_get = host_get,
        .dirty_log_start = log_start, .dirty_log_sync = log_sync, .dirty_log_stop = log_stop,
        .autostart = true,
    };
    CHECK(livemig_set_host_ops(&ops, NULL, &err), "%s", error_get_pretty(err));
    CHECK(livemig_set_machine_name("minivmm", &err), "%s", error_get_pretty(err));
    CHECK(livemig_ram_block_add("ram", ram, ram_size, &err), "%s", error_get_pretty(err));
    CHECK(register_savevm(NULL, "cpu", 0, 1, cpu_save, cpu_load, NULL) >= 0, "register cpu");

    if (use_kvm) {
        /* The kick's signal only interrupts KVM_RUN; its handler does nothing. */
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = kick_handler;
        sigemptyset(&sa.sa_mask);
        CHECK(sigaction(SIGUSR1, &sa, NULL) == 0, "sigaction");
    }
    pthread_t vcpu;
    CHECK(pthread_create(&vcpu, NULL, use_kvm ? vcpu_thread_kvm : vcpu_thread_soft, NULL) == 0, "vcpu thread");
    pthread_mutex_lock(&vcpu_lock);
    vcpu_tid = vcpu;
    vcpu_started = true;
    pthread_mutex_unlock(&vcpu_lock);

    if (incoming) {
        runstate = RUN_STATE_INMIGRATE;
        qemu_start_incoming_migration(incoming, &err);
        CHECK_OK(err);
        if (port_file) {
            char tmp[4200];
            snprintf(tmp, sizeof(tmp), "%s.tmp", port_file);
            FILE *pf = fopen(tmp, "w");
            CHECK(pf, "open %s", tmp);
            fprintf(pf, "%d\n", livemig_incoming_port());
            fclose(pf);
            CHECK(rename(tmp, port_file) == 0, "rename");
        }
        MigrationStatus st = wait_done(true, 600);
        if (st != MIGRATION_STATUS_COMPLETED) {
            MigrationInfo *i = livemig_query_incoming(&err);
            printf("dst: incoming migration %s: %s\n", status_name(st), i->has_error_desc ? i->error_desc : "");
            qapi_free_MigrationInfo(i);
            return 1;
        }
        pthread_mutex_lock(&big_lock);
        bool checked = loaded_checked;
        pthread_mutex_unlock(&big_lock);
        report("dst-started", checked && runstate == RUN_STATE_RUNNING, "the guest was started after the load");
        printf("RAMHASH %016" PRIx64 "\n", loaded_hash);
        report("dst-single-edge", loaded_edge_ok, "loaded RAM has at most one edge");
        uint64_t p0 = atomic_load(&guest_pass);
        double end = now_s() + 20;
        while (atomic_load(&guest_pass) < p0 + 1 && now_s() < end)
            sleep_ms(5);
        uint64_t p1 = atomic_load(&guest_pass);
        report("guest-runs-on-dst", p1 >= p0 + 1, "pass counter %" PRIu64 " -> %" PRIu64 " on the destination", p0, p1);
    } else {
        if (xbzrle) {
            MigrationCapabilityStatus cap = { MIGRATION_CAPABILITY_XBZRLE, true };
            MigrationCapabilityStatusList l = { NULL, &cap };
            qmp_migrate_set_capabilities(&l, &err);
            CHECK_OK(err);
        }
        if (cache_size >= 0)
            qmp_migrate_set_cache_size(cache_size, &err);
        CHECK_OK(err);
        if (speed >= 0)
            qmp_migrate_set_speed(speed, &err);
        CHECK_OK(err);
        if (downtime_ms >= 0)
            qmp_migrate_set_downtime((double)downtime_ms / 1000.0, &err);
        CHECK_OK(err);
        pthread_mutex_lock(&big_lock);
        host_start(NULL);
        pthread_mutex_unlock(&big_lock);
        sleep_ms(run_ms);
        printf("src: guest ran %ld ms: %" PRIu64 " passes over RAM\n", run_ms, (uint64_t)atomic_load(&guest_pass));
        FILE *csv = csv_path ? fopen(csv_path, "w") : NULL;
        if (csv)
            fprintf(csv, "time_s,pass,remaining_bytes,transferred_bytes,throughput_MBps,dirty_rate_MBps,status\n");
        double t0 = now_s(), last_t = 0;
        uint64_t last_xfer = 0;
        qmp_migrate(migrate, false, false, false, false, false, false, &err);
        CHECK_OK(err);
        bool raised = false;
        double end = now_s() + 600;
        MigrationStatus st;
        while ((st = query_status(false)) == MIGRATION_STATUS_SETUP || st == MIGRATION_STATUS_ACTIVE) {
            progress(csv, t0, &last_xfer, &last_t, false);
            if (raise_after && !raised) {
                MigrationInfo *i = qmp_query_migrate(&err);
                if (i->has_ram && i->ram->dirty_sync_count >= raise_after) {
                    qmp_migrate_set_speed(0, &err);
                    qmp_migrate_set_downtime(0.5, &err);
                    raised = true;
                    if (!quiet)
                        fprintf(stderr, "\n[speed limit lifted after %ld dirty syncs]\n", raise_after);
                }
                qapi_free_MigrationInfo(i);
                CHECK_OK(err);
            }
            CHECK(now_s() < end, "migration did not finish in 600 s");
            sleep_ms(20);
        }
        progress(csv, t0, &last_xfer, &last_t, true);
        if (csv)
            fclose(csv);
        final_report();
        if (st != MIGRATION_STATUS_COMPLETED)
            return 1;
        /* The source VM is stopped: its RAM is the RAM at the switchover. */
        uint64_t edge;
        printf("RAMHASH %016" PRIx64 "\n", ram_hash());
        bool edge_ok = single_edge(&edge);
        report("src-single-edge", edge_ok, "edge at page %" PRIu64, edge);
        uint64_t p0 = atomic_load(&guest_pass);
        sleep_ms(300);
        /* Parked: told not to run, and out of guest code (vcpu_idle alone
         * is also true in the pacing wait of a running vCPU). */
        pthread_mutex_lock(&vcpu_lock);
        bool parked = !vcpu_should_run && vcpu_idle;
        pthread_mutex_unlock(&vcpu_lock);
        report("src-stays-stopped", runstate == RUN_STATE_POSTMIGRATE && atomic_load(&guest_pass) == p0 && parked,
               "run state %d, pass %" PRIu64 " -> %" PRIu64, runstate, p0, (uint64_t)atomic_load(&guest_pass));
    }
    pthread_mutex_lock(&vcpu_lock);
    vcpu_quit = true;
    pthread_cond_broadcast(&vcpu_cond);
    pthread_mutex_unlock(&vcpu_lock);
    /* A running KVM vCPU leaves KVM_RUN at its next port exit (every MiB). */
    pthread_join(vcpu, NULL);
    return checks_failed ? 1 : 0;
}
