#include "fakehost.h"

#include <stdio.h>
#include <string.h>

#include "check.h"

FakeHost fake_host = { .lock = PTHREAD_MUTEX_INITIALIZER };
Event events[MAX_EVENTS];
int n_events;
static pthread_mutex_t events_lock = PTHREAD_MUTEX_INITIALIZER;
static LivemigHostOps ops;
void (*fakehost_on_stop)(void);

static void host_lock(void *opaque)
{
    FakeHost *h = opaque;
    pthread_mutex_lock(&h->lock);
    h->owner = pthread_self();
    h->locked = true;
}

static void host_unlock(void *opaque)
{
    FakeHost *h = opaque;
    h->locked = false;
    pthread_mutex_unlock(&h->lock);
}

static bool lock_held(FakeHost *h)
{
    return h->locked && pthread_equal(h->owner, pthread_self());
}

static int host_stop(void *opaque, RunState state)
{
    FakeHost *h = opaque;
    CHECK(lock_held(h), "vm_stop_force_state without the host lock");
    if (fakehost_on_stop)
        fakehost_on_stop();
    h->state = state;
    h->stops++;
    return 0;
}

static int host_start(void *opaque)
{
    FakeHost *h = opaque;
    CHECK(lock_held(h), "vm_start without the host lock");
    h->state = RUN_STATE_RUNNING;
    h->starts++;
    return 0;
}

static bool host_is_running(void *opaque)
{
    return ((FakeHost *)opaque)->state == RUN_STATE_RUNNING;
}

static void host_set(void *opaque, RunState state)
{
    ((FakeHost *)opaque)->state = state;
}

static RunState host_get(void *opaque)
{
    return ((FakeHost *)opaque)->state;
}

static void record(Notifier *n, void *data)
{
    (void)n;
    MigrationState *s = data;
    pthread_mutex_lock(&events_lock);
    if (n_events < MAX_EVENTS) {
        events[n_events].incoming = livemig_migration_is_incoming(s);
        events[n_events].status = livemig_migration_status(s);
        events[n_events].lock_held = lock_held(&fake_host);
        n_events++;
    }
    pthread_mutex_unlock(&events_lock);
}

static Notifier notifier = { .notify = record };

void fakehost_setup(bool running, bool autostart)
{
    Error *err = NULL;
    memset(&ops, 0, sizeof(ops));
    ops.version = LIVEMIG_HOST_OPS_VERSION;
    ops.size = sizeof(ops);
    ops.iothread_lock = host_lock;
    ops.iothread_unlock = host_unlock;
    ops.vm_stop_force_state = host_stop;
    ops.vm_start = host_start;
    ops.runstate_is_running = host_is_running;
    ops.runstate_set = host_set;
    ops.runstate_get = host_get;
    ops.autostart = autostart;
    fake_host.state = running ? RUN_STATE_RUNNING : RUN_STATE_PRELAUNCH;
    CHECK(livemig_set_host_ops(&ops, &fake_host, &err), "livemig_set_host_ops: %s", error_get_pretty(err));
    add_migration_state_change_notifier(&notifier);
}

void fakehost_dirty_log(int (*sync)(void *, const char *, void *, uint64_t, uint64_t *))
{
    Error *err = NULL;
    ops.dirty_log_sync = sync;
    CHECK(livemig_set_host_ops(&ops, &fake_host, &err), "livemig_set_host_ops: %s", error_get_pretty(err));
}

bool fakehost_running(void)
{
    pthread_mutex_lock(&fake_host.lock);
    bool r = fake_host.state == RUN_STATE_RUNNING;
    pthread_mutex_unlock(&fake_host.lock);
    return r;
}

void fakehost_events(char *out, size_t len, bool incoming)
{
    /* livemig makes each final transition and runs its notifiers under the
     * host lock: taking it once after seeing the final state waits for
     * those notifiers to finish. */
    pthread_mutex_lock(&fake_host.lock);
    pthread_mutex_unlock(&fake_host.lock);
    pthread_mutex_lock(&events_lock);
    out[0] = 0;
    for (int i = 0; i < n_events; i++) {
        if (events[i].incoming != incoming)
            continue;
        CHECK(events[i].lock_held, "notifier %d (%s) ran without the host lock", i, status_name(events[i].status));
        if (out[0])
            strncat(out, ",", len - strlen(out) - 1);
        strncat(out, status_name(events[i].status), len - strlen(out) - 1);
    }
    pthread_mutex_unlock(&events_lock);
}

void fakehost_clear_events(void)
{
    pthread_mutex_lock(&events_lock);
    n_events = 0;
    pthread_mutex_unlock(&events_lock);
}
