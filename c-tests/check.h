/* Small helpers shared by the C programs: CHECK macros that print the
 * livemig error text, a monotonic clock, bounded waits. */
#ifndef LIVEMIG_CHECK_H
#define LIVEMIG_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "livemig.h"

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__,        \
                    __LINE__, #cond);                                     \
            fprintf(stderr, __VA_ARGS__);                                 \
            fprintf(stderr, "\n");                                        \
            exit(1);                                                      \
        }                                                                 \
    } while (0)

/* Fails with the error's text when a call set *errp. */
#define CHECK_OK(err)                                                     \
    CHECK((err) == NULL, "unexpected error: %s", error_get_pretty(err))

static inline double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static inline void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

static inline MigrationStatus query_status(bool incoming)
{
    Error *err = NULL;
    MigrationInfo *info = incoming ? livemig_query_incoming(&err) : qmp_query_migrate(&err);
    CHECK_OK(err);
    MigrationStatus st = info->has_status ? info->status : MIGRATION_STATUS_NONE;
    qapi_free_MigrationInfo(info);
    return st;
}

static inline const char *status_name(MigrationStatus s)
{
    switch (s) {
    case MIGRATION_STATUS_NONE: return "none";
    case MIGRATION_STATUS_SETUP: return "setup";
    case MIGRATION_STATUS_CANCELLING: return "cancelling";
    case MIGRATION_STATUS_CANCELLED: return "cancelled";
    case MIGRATION_STATUS_ACTIVE: return "active";
    case MIGRATION_STATUS_COMPLETED: return "completed";
    case MIGRATION_STATUS_FAILED: return "failed";
    default: return "other";
    }
}

/* Waits (bounded) until the migration of one direction leaves the active
 * states; returns the final status. */
static inline MigrationStatus wait_done(bool incoming, double timeout_s)
{
    double end = now_s() + timeout_s;
    for (;;) {
        MigrationStatus st = query_status(incoming);
        if (st == MIGRATION_STATUS_COMPLETED || st == MIGRATION_STATUS_FAILED ||
            st == MIGRATION_STATUS_CANCELLED)
            return st;
        CHECK(now_s() < end, "timed out after %.0f s in state %s", timeout_s, status_name(st));
        sleep_ms(5);
    }
}

#endif
