/* The C test harness: one program, two roles, run as separate source and
 * destination processes by run-tests.sh.
 *
 *   harness dst URI [--expect completed|failed] [--error TEXT] [--fail-load]
 *               [--port-file F] [--fd-name NAME:FD] [--seed N] [--size N]
 *   harness src [--seed N] [--size N] [--speed B] STEP...
 *       STEP = URI=completed | URI=cancelled | URI=failed | URI=blocked
 *
 * Both register the same two C devices: "dev", a live device whose state
 * (SIZE bytes derived from SEED) is sent in chunks over several iterations,
 * and "cfg", a non-live device of 64 bytes. The destination compares what
 * it loaded with what the source had, byte for byte. Every transition is
 * recorded by a notifier and the sequence checked, with the host lock held.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "fakehost.h"

enum { TAG_END = 0, TAG_SIZE = 1, TAG_CHUNK = 2, TAG_DONE = 3 };
#define CHUNK (64 * 1024)

static uint64_t seed = 1;
static size_t size = 4 << 20;
static uint8_t *dev_src, *dev_dst;
static size_t dev_sent;
static bool dev_done_loaded, fail_load;
static int cancels;
static uint8_t cfg_src[64], cfg_dst[64];

static void fill(uint8_t *p, size_t n, uint64_t s)
{
    uint64_t x = s * 0x9E3779B97F4A7C15ULL + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        p[i] = (uint8_t)x;
    }
}

static void put_chunks(QEMUFile *f, size_t max)
{
    size_t end = dev_sent + max > size ? size : dev_sent + max;
    while (dev_sent < end) {
        size_t n = end - dev_sent > CHUNK ? CHUNK : end - dev_sent;
        qemu_put_be32(f, TAG_CHUNK);
        qemu_put_be64(f, dev_sent);
        qemu_put_be32(f, (uint32_t)n);
        qemu_put_buffer(f, dev_src + dev_sent, n);
        dev_sent += n;
    }
}

static int dev_setup(QEMUFile *f, void *opaque)
{
    (void)opaque;
    dev_sent = 0;
    qemu_put_be32(f, TAG_SIZE);
    qemu_put_be64(f, size);
    qemu_put_be32(f, TAG_END);
    return 0;
}

static int dev_iterate(QEMUFile *f, void *opaque)
{
    (void)opaque;
    put_chunks(f, CHUNK);
    qemu_put_be32(f, TAG_END);
    return dev_sent == size ? 1 : 0;
}

static uint64_t dev_pending(QEMUFile *f, void *opaque, uint64_t max)
{
    (void)f; (void)opaque; (void)max;
    return size - dev_sent;
}

static int dev_complete(QEMUFile *f, void *opaque)
{
    (void)opaque;
    put_chunks(f, size);
    qemu_put_be32(f, TAG_DONE);
    qemu_put_be32(f, TAG_END);
    return qemu_file_get_error(f);
}

static void dev_cancel(void *opaque)
{
    (void)opaque;
    cancels++;
}

static int dev_load(QEMUFile *f, void *opaque, int version_id)
{
    (void)opaque;
    if (version_id != 1)
        return -EINVAL;
    if (fail_load)
        return -EINVAL;
    for (;;) {
        uint32_t tag = qemu_get_be32(f);
        if (qemu_file_get_error(f))
            return qemu_file_get_error(f);
        if (tag == TAG_END)
            return 0;
        if (tag == TAG_SIZE) {
            if (qemu_get_be64(f) != size)
                return -EINVAL;
        } else if (tag == TAG_CHUNK) {
            uint64_t off = qemu_get_be64(f);
            uint32_t n = qemu_get_be32(f);
            if (off > size || n > size - off)
                return -ERANGE;
            if (qemu_get_buffer(f, dev_dst + off, n) != n)
                return -EIO;
        } else if (tag == TAG_DONE) {
            dev_done_loaded = true;
        } else {
            return -EINVAL;
        }
    }
}

static void cfg_save(QEMUFile *f, void *opaque)
{
    (void)opaque;
    qemu_put_buffer(f, cfg_src, sizeof(cfg_src));
}

static int cfg_load(QEMUFile *f, void *opaque, int version_id)
{
    (void)opaque;
    if (version_id != 2)
        return -EINVAL;
    return qemu_get_buffer(f, cfg_dst, sizeof(cfg_dst)) == sizeof(cfg_dst) ? 0 : -EIO;
}

static SaveVMHandlers dev_ops = {
    .save_live_setup = dev_setup,
    .save_live_iterate = dev_iterate,
    .save_live_complete = dev_complete,
    .save_live_pending = dev_pending,
    .cancel = dev_cancel,
    .load_state = dev_load,
};

static void register_devices(void)
{
    Error *err = NULL;
    dev_src = malloc(size);
    dev_dst = calloc(1, size);
    CHECK(dev_src && dev_dst, "out of memory");
    fill(dev_src, size, seed);
    fill(cfg_src, sizeof(cfg_src), seed + 1000);
    CHECK(livemig_register_savevm_live(NULL, "dev", 0, 1, &dev_ops, NULL, &err) > 0,
          "register dev: %s", error_get_pretty(err));
    CHECK(register_savevm(NULL, "cfg", 0, 2, cfg_save, cfg_load, NULL) >= 0, "register cfg");
}

static char *error_desc(bool incoming)
{
    Error *err = NULL;
    MigrationInfo *info = incoming ? livemig_query_incoming(&err) : qmp_query_migrate(&err);
    CHECK_OK(err);
    char *d = strdup(info->has_error_desc ? info->error_desc : "");
    qapi_free_MigrationInfo(info);
    return d;
}

static int run_dst(const char *uri, const char *expect, const char *want_error, const char *port_file, const char *fd_name)
{
    Error *err = NULL;
    char evs[512];
    fakehost_setup(false, true);
    register_devices();
    if (fd_name) {
        char name[64];
        int fd;
        CHECK(sscanf(fd_name, "%63[^:]:%d", name, &fd) == 2, "--fd-name NAME:FD");
        CHECK(livemig_fd_add(name, fd, &err), "livemig_fd_add: %s", error_get_pretty(err));
    }
    qemu_start_incoming_migration(uri, &err);
    CHECK_OK(err);
    if (port_file) {
        char tmp[4096];
        snprintf(tmp, sizeof(tmp), "%s.tmp", port_file);
        FILE *pf = fopen(tmp, "w");
        CHECK(pf, "open %s", tmp);
        fprintf(pf, "%d\n", livemig_incoming_port());
        fclose(pf);
        CHECK(rename(tmp, port_file) == 0, "rename %s", tmp);
    }
    MigrationStatus st = wait_done(true, 60);
    fakehost_events(evs, sizeof(evs), true);
    if (strcmp(expect, "completed") == 0) {
        CHECK(st == MIGRATION_STATUS_COMPLETED, "status %s: %s", status_name(st), error_desc(true));
        CHECK(strcmp(evs, "setup,active,completed") == 0, "notifier order: %s", evs);
        CHECK(dev_done_loaded, "dev END never loaded");
        CHECK(memcmp(dev_src, dev_dst, size) == 0, "dev state differs after migration");
        CHECK(memcmp(cfg_src, cfg_dst, sizeof(cfg_src)) == 0, "cfg state differs after migration");
        CHECK(fake_host.state == RUN_STATE_RUNNING && fake_host.starts == 1,
              "destination VM not started once (state %d, starts %d)", fake_host.state, fake_host.starts);
        printf("dst %s: completed, %zu + %zu bytes identical, notifiers %s\n", uri, size, sizeof(cfg_src), evs);
    } else {
        char *d = error_desc(true);
        CHECK(st == MIGRATION_STATUS_FAILED, "status %s, wanted failed", status_name(st));
        CHECK(strncmp(evs, "setup", 5) == 0 && strstr(evs, ",failed") && !strstr(evs, "completed"),
              "notifier order: %s", evs);
        CHECK(!want_error || strstr(d, want_error), "error_desc '%s' lacks '%s'", d, want_error);
        CHECK(fake_host.starts == 0, "destination VM started after a failed load");
        printf("dst %s: failed as expected: %s\n", uri, d);
        free(d);
    }
    free(dev_src);
    free(dev_dst);
    return 0;
}

static void run_step(const char *uri, const char *expect)
{
    Error *err = NULL;
    char evs[512];
    fakehost_clear_events();
    fake_host.state = RUN_STATE_RUNNING;
    int stops = fake_host.stops, cancels0 = cancels;

    if (strcmp(expect, "blocked") == 0) {
        MigrationStatus before = query_status(false);
        Error *reason = error_new("device 'gpu0' does not support migration");
        Error *reason2 = error_new("device 'tpm0' does not support migration");
        CHECK(migrate_add_blocker(reason, &err) == 0, "add blocker: %s", error_get_pretty(err));
        CHECK(migrate_add_blocker(reason2, &err) == 0, "add blocker: %s", error_get_pretty(err));
        qmp_migrate(uri, false, false, false, false, false, false, &err);
        CHECK(err && strcmp(error_get_pretty(err), "device 'tpm0' does not support migration") == 0,
              "qmp_migrate with blockers: %s", err ? error_get_pretty(err) : "no error");
        error_free(err);
        err = NULL;
        CHECK(query_status(false) == before, "a refused migration changed the state");
        /* query-migrate lists them, oldest first, as QEMU 7.2 does. */
        MigrationInfo *info = qmp_query_migrate(&err);
        CHECK(info && info->has_blocked_reasons && info->blocked_reasons && info->blocked_reasons->next &&
              !info->blocked_reasons->next->next &&
              strcmp(info->blocked_reasons->value, "device 'gpu0' does not support migration") == 0 &&
              strcmp(info->blocked_reasons->next->value, "device 'tpm0' does not support migration") == 0,
              "blocked_reasons");
        qapi_free_MigrationInfo(info);
        migrate_del_blocker(reason);
        migrate_del_blocker(reason2);
        error_free(reason);
        error_free(reason2);
        info = qmp_query_migrate(&err);
        CHECK(info && !info->has_blocked_reasons && !info->blocked_reasons, "blocked_reasons after the blockers went");
        qapi_free_MigrationInfo(info);
        printf("src: blocked as expected, state unchanged (%s)\n", status_name(before));
        return;
    }
    qmp_migrate(uri, false, false, false, false, false, false, &err);
    CHECK_OK(err);
    if (strcmp(expect, "cancelled") == 0) {
        double end = now_s() + 30;
        while (query_status(false) != MIGRATION_STATUS_ACTIVE) {
            CHECK(now_s() < end, "never became active: %s", status_name(query_status(false)));
            sleep_ms(1);
        }
        sleep_ms(100);
        qmp_migrate_cancel(&err);
        CHECK_OK(err);
        qmp_migrate_cancel(&err); /* twice is harmless */
        CHECK_OK(err);
    }
    MigrationStatus st = wait_done(false, 60);
    fakehost_events(evs, sizeof(evs), false);
    char *d = error_desc(false);
    if (strcmp(expect, "completed") == 0) {
        CHECK(st == MIGRATION_STATUS_COMPLETED, "status %s: %s", status_name(st), d);
        CHECK(strcmp(evs, "setup,active,completed") == 0, "notifier order: %s", evs);
        CHECK(fake_host.state == RUN_STATE_POSTMIGRATE && fake_host.stops == stops + 1,
              "source VM state %d after completion", fake_host.state);
        MigrationInfo *info = qmp_query_migrate(&err);
        CHECK_OK(err);
        CHECK(info->has_downtime && info->has_total_time && info->total_time >= info->downtime,
              "times: total %" PRId64 " downtime %" PRId64, info->total_time, info->downtime);
        CHECK(info->has_ram && info->ram->total == 0 && info->ram->remaining == 0 && info->ram->normal == 0,
              "ram figures without ram: total %" PRId64 " normal %" PRId64, info->ram->total, info->ram->normal);
        printf("src %s: completed in %" PRId64 " ms (downtime %" PRId64 " ms), notifiers %s\n", uri,
               info->total_time, info->downtime, evs);
        qapi_free_MigrationInfo(info);
    } else if (strcmp(expect, "cancelled") == 0) {
        CHECK(st == MIGRATION_STATUS_CANCELLED, "status %s: %s", status_name(st), d);
        CHECK(strcmp(evs, "setup,active,cancelling,cancelled") == 0, "notifier order: %s", evs);
        CHECK(fakehost_running(), "source VM not running after cancel");
        CHECK(cancels == cancels0 + 1, "dev cancel handler called %d times", cancels - cancels0);
        CHECK(!migration_is_active(migrate_get_current()) && migration_has_failed(migrate_get_current()),
              "state predicates after cancel");
        printf("src %s: cancelled, VM running, notifiers %s\n", uri, evs);
    } else {
        CHECK(st == MIGRATION_STATUS_FAILED, "status %s, wanted failed", status_name(st));
        CHECK(strcmp(evs, "setup,active,failed") == 0 || strcmp(evs, "setup,failed") == 0, "notifier order: %s", evs);
        CHECK(d[0] != 0, "failed without error_desc");
        CHECK(fakehost_running(), "source VM not running after failure");
        printf("src %s: failed as expected (%s), VM running, notifiers %s\n", uri, d, evs);
    }
    free(d);
}

/* QEMU 7.2's migrate-set-parameters, written as code for 7.2 writes it
 * (designated members): all or nothing, read back by
 * query-migrate-parameters, and the limits the classic calls read. */
static void check_parameters(void)
{
    Error *err = NULL;
    MigrationParameters *before = qmp_query_migrate_parameters(&err);
    CHECK(before && !err && before->has_downtime_limit && before->has_tls_creds && before->tls_creds[0] == 0,
          "query-migrate-parameters");
    StrOrNull creds = { .type = QTYPE_QSTRING, .u.s = (char *)"tls0" };
    MigrateSetParameters bad = { .has_downtime_limit = true, .downtime_limit = 1234,
                                 .has_tls_creds = true, .tls_creds = &creds };
    qmp_migrate_set_parameters(&bad, &err);
    CHECK(err && strstr(error_get_pretty(err), "'tls-creds': TLS is not supported"), "TLS accepted");
    error_free(err), err = NULL;
    CHECK(migrate_max_downtime() == before->downtime_limit * 1000000, "a refused set changed the downtime limit");
    MigrateSetParameters p = { .has_downtime_limit = true, .downtime_limit = 1234,
                               .has_multifd_compression = true, .multifd_compression = MULTIFD_COMPRESSION_ZLIB };
    qmp_migrate_set_parameters(&p, &err);
    CHECK(!err && migrate_max_downtime() == 1234 * 1000000ULL, "downtime-limit not applied");
    MigrationParameters *after = qmp_query_migrate_parameters(&err);
    CHECK(after && after->downtime_limit == 1234 && after->multifd_compression == MULTIFD_COMPRESSION_ZLIB &&
          after->max_bandwidth == before->max_bandwidth && !after->has_block_bitmap_mapping, "parameters read back");
    MigrateSetParameters back = { .has_downtime_limit = true, .downtime_limit = before->downtime_limit,
                                  .has_multifd_compression = true, .multifd_compression = before->multifd_compression };
    qmp_migrate_set_parameters(&back, &err);
    CHECK(!err, "setting the parameters back");
    qapi_free_MigrationParameters(after);
    qapi_free_MigrationParameters(before);
    qmp_migrate_set_parameters(NULL, &err);
    CHECK(err && strcmp(error_get_pretty(err), "params must not be NULL") == 0, "NULL params");
    error_free(err);
}

/* Bad values and NULLs get a clear error and change nothing. */
static void check_bad_input(void)
{
    Error *err = NULL;
    uint64_t downtime = migrate_max_downtime();
    int64_t cache = migrate_xbzrle_cache_size();
    qmp_migrate_set_downtime(0.0 / 0.0, &err);
    CHECK(err && strstr(error_get_pretty(err), "downtime_limit"), "NaN downtime accepted");
    error_free(err), err = NULL;
    qmp_migrate_set_downtime(-1, &err);
    CHECK(err, "negative downtime accepted");
    error_free(err), err = NULL;
    qmp_migrate_set_speed(-5, &err);
    CHECK(err && strstr(error_get_pretty(err), "got -5"), "negative speed accepted");
    error_free(err), err = NULL;
    qmp_migrate_set_cache_size(100, &err);
    CHECK(err && strstr(error_get_pretty(err), "xbzrle_cache_size"), "tiny cache accepted");
    error_free(err), err = NULL;
    CHECK(migrate_max_downtime() == downtime && migrate_xbzrle_cache_size() == cache, "a refused value changed a parameter");
    qmp_migrate(NULL, false, false, false, false, false, false, &err);
    CHECK(err && strcmp(error_get_pretty(err), "uri must not be NULL") == 0, "NULL uri: %s", err ? error_get_pretty(err) : "accepted");
    error_free(err), err = NULL;
    qmp_migrate("ftp:x", false, false, false, false, false, false, &err);
    CHECK(err && strstr(error_get_pretty(err), "unknown protocol 'ftp'"), "bad uri accepted");
    error_free(err), err = NULL;
    qmp_migrate("tcp:127.0.0.1:1", true, true, false, false, false, false, &err);
    CHECK(err && strstr(error_get_pretty(err), "block migration"), "block migration accepted");
    error_free(err), err = NULL;
    CHECK(query_status(false) == MIGRATION_STATUS_NONE, "a refused migration changed the state");
    SaveVMHandlers bad = dev_ops;
    bad.save_live_pending = NULL;
    CHECK(livemig_register_savevm_live(NULL, "bad", 0, 1, &bad, NULL, &err) < 0 && err &&
          strstr(error_get_pretty(err), "required callback 'save_live_pending' is NULL"), "missing callback accepted");
    error_free(err), err = NULL;
    LivemigHostOps ops = { .version = LIVEMIG_HOST_OPS_VERSION, .size = sizeof(ops) };
    CHECK(!livemig_set_host_ops(&ops, NULL, &err) && err &&
          strstr(error_get_pretty(err), "required callback 'iothread_lock' is NULL"), "empty host ops accepted");
    error_free(err), err = NULL;
    ops.version = 99;
    CHECK(!livemig_set_host_ops(&ops, NULL, &err) && err && strstr(error_get_pretty(err), "version 99"), "bad version");
    error_free(err), err = NULL;
    MigrationCapabilityStatus caps[2] = { { MIGRATION_CAPABILITY_XBZRLE, true }, { (MigrationCapability)99, true } };
    MigrationCapabilityStatusList l2 = { NULL, &caps[1] }, l1 = { &l2, &caps[0] };
    qmp_migrate_set_capabilities(&l1, &err);
    CHECK(err && strstr(error_get_pretty(err), "unknown capability 99") && !migrate_use_xbzrle(),
          "a list with an unknown capability is refused whole");
    error_free(err), err = NULL;
    caps[1].capability = MIGRATION_CAPABILITY_COMPRESS;
    qmp_migrate_set_capabilities(&l1, &err);
    CHECK(err && strstr(error_get_pretty(err), "capability 'compress' is not supported") && !migrate_use_xbzrle(),
          "an unsupported capability is refused with its name");
    error_free(err), err = NULL;
    /* A list that loops back on itself ends, refused. */
    caps[1].capability = MIGRATION_CAPABILITY_XBZRLE;
    l2.next = &l1;
    qmp_migrate_set_capabilities(&l1, &err);
    l2.next = NULL;
    CHECK(err && strstr(error_get_pretty(err), "capability list longer than 4096 nodes") && !migrate_use_xbzrle(),
          "a looping capability list: %s", err ? error_get_pretty(err) : "accepted");
    error_free(err), err = NULL;
    /* A run state the host reports that is not a RunState (C lets an enum
     * hold any value) is refused with the value, not trusted. */
    fake_host.state = (RunState)42;
    qmp_migrate("exec:cat > /dev/null", false, false, false, false, false, false, &err);
    fake_host.state = RUN_STATE_RUNNING;
    CHECK(err && strstr(error_get_pretty(err), "runstate_get returned 42, which is not a RunState"),
          "a bad run state: %s", err ? error_get_pretty(err) : "accepted");
    error_free(err), err = NULL;
    CHECK(query_status(false) == MIGRATION_STATUS_NONE, "a refused migration changed the state");
    CHECK(qemu_get_be32(NULL) == 0 && qemu_file_get_error(NULL) < 0, "NULL QEMUFile");
    CHECK(!migration_is_active(NULL) && !migration_has_finished(NULL), "NULL state");
    /* A stream written on this (host) thread, whose reader is gone: the
     * write fails with EPIPE, and no SIGPIPE ends this process (SIGPIPE
     * keeps its default action here). */
    int pfd[2];
    CHECK(pipe(pfd) == 0, "pipe");
    close(pfd[0]);
    QEMUFile *pf = qemu_fdopen(pfd[1], "wb");
    CHECK(pf, "qemu_fdopen of a pipe");
    static uint8_t big[300 << 10];
    qemu_put_buffer(pf, big, sizeof(big));
    int rc = qemu_fclose(pf);
    CHECK(rc == -EPIPE, "a write into a pipe with no reader: %d (want -EPIPE)", rc);
    /* A stream opened for reading cannot carry an outgoing migration. */
    int sp[2];
    CHECK(pipe(sp) == 0, "pipe");
    close(sp[1]);
    migrate_fd_connect(NULL, qemu_fdopen(sp[0], "rb"), &err);
    CHECK(err && strstr(error_get_pretty(err), "not open for writing"), "a read stream for migrate_fd_connect: %s",
          err ? error_get_pretty(err) : "accepted");
    error_free(err), err = NULL;
    printf("src: bad input refused, nothing changed\n");
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    CHECK(argc >= 2, "usage: harness dst|src ...");
    const char *role = argv[1];
    const char *expect = "completed", *want_error = NULL, *port_file = NULL, *fd_name = NULL, *uri = NULL;
    const char *steps[16];
    int n_steps = 0;
    long speed = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--expect") && v) expect = argv[++i];
        else if (!strcmp(a, "--error") && v) want_error = argv[++i];
        else if (!strcmp(a, "--fail-load")) fail_load = true;
        else if (!strcmp(a, "--port-file") && v) port_file = argv[++i];
        else if (!strcmp(a, "--fd-name") && v) fd_name = argv[++i];
        else if (!strcmp(a, "--seed") && v) seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(a, "--size") && v) size = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(a, "--speed") && v) speed = strtol(argv[++i], NULL, 0);
        else if (a[0] != '-' && !strcmp(role, "dst") && !uri) uri = a;
        else if (a[0] != '-' && !strcmp(role, "src") && n_steps < 16) steps[n_steps++] = a;
        else CHECK(0, "bad argument '%s'", a);
    }
    if (!strcmp(role, "dst")) {
        CHECK(uri, "dst needs a URI");
        return run_dst(uri, expect, want_error, port_file, fd_name);
    }
    CHECK(!strcmp(role, "src") && n_steps > 0, "src needs steps");
    Error *err = NULL;
    fakehost_setup(true, true);
    register_devices();
    check_bad_input();
    check_parameters();
    if (speed) {
        qmp_migrate_set_speed(speed, &err);
        CHECK_OK(err);
    }
    for (int i = 0; i < n_steps; i++) {
        char buf[4096];
        snprintf(buf, sizeof(buf), "%s", steps[i]);
        char *eq = strrchr(buf, '=');
        CHECK(eq, "step '%s' needs =EXPECT", steps[i]);
        *eq = 0;
        /* "@portfile" in a URI is replaced by the port a destination wrote. */
        char uri_buf[4200];
        char *at = strchr(buf, '@');
        if (at) {
            *at = 0;
            double end = now_s() + 30;
            FILE *pf;
            while (!(pf = fopen(at + 1, "r"))) {
                CHECK(now_s() < end, "no port file %s", at + 1);
                sleep_ms(5);
            }
            int port = 0;
            CHECK(fscanf(pf, "%d", &port) == 1, "bad port file");
            fclose(pf);
            snprintf(uri_buf, sizeof(uri_buf), "%s%d", buf, port);
        } else {
            snprintf(uri_buf, sizeof(uri_buf), "%s", buf);
        }
        run_step(uri_buf, eq + 1);
    }
    free(dev_src);
    free(dev_dst);
    return 0;
}
