/* A fake host VMM for the C tests: a real lock, a run state, a notifier
 * that records every transition and checks the lock is held. */
#ifndef LIVEMIG_FAKEHOST_H
#define LIVEMIG_FAKEHOST_H

#include <pthread.h>
#include <stdbool.h>
#include "livemig.h"

typedef struct FakeHost {
    pthread_mutex_t lock;
    pthread_t owner;
    bool locked;
    RunState state;
    int starts;
    int stops;
} FakeHost;

#define MAX_EVENTS 64

typedef struct Event {
    bool incoming;
    MigrationStatus status;
    bool lock_held;
} Event;

extern FakeHost fake_host;
/* Called by vm_stop_force_state (host lock held): stop guest writers. */
extern void (*fakehost_on_stop)(void);
extern Event events[MAX_EVENTS];
extern int n_events;

/* Registers the fake host (running or not) and the recording notifier. */
void fakehost_setup(bool running, bool autostart);
bool fakehost_running(void);
/* Events recorded since the last call, as "setup,active,completed". */
void fakehost_events(char *out, size_t len, bool incoming);
void fakehost_clear_events(void);
void fakehost_dirty_log(int (*sync)(void *, const char *, void *, uint64_t, uint64_t *));

#endif
