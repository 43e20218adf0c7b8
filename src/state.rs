//! The migration state machine, the state objects and the notifier list.
//!
//! States follow QEMU 7.2's `MigrationStatus` (same names, same numeric
//! values). Every transition is a compare-and-swap, so a late cancel can
//! never overwrite COMPLETED and a failure can never overwrite CANCELLED.
//!
//! Transitions are made by livemig's own threads, except `cancelling`, which
//! `qmp_migrate_cancel` makes from the host's thread. Notifiers are called
//! only from livemig's threads, with the host lock held, once per transition
//! and in order; each gets a snapshot [`MigrationState`] whose status is the
//! state just entered, so a notifier always sees the transition it is told
//! about even if another has happened since.

use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::ThreadId;

use parking_lot::{Condvar, Mutex};

/// Migration status, numbered as QEMU 7.2's QAPI `MigrationStatus`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration has run.
    None = 0,
    /// Connecting and sending the setup sections.
    Setup = 1,
    /// A cancel was requested and is being carried out.
    Cancelling = 2,
    /// Cancelled; the source VM runs again.
    Cancelled = 3,
    /// Pre-copy passes are running.
    Active = 4,
    /// Unused (postcopy).
    PostcopyActive = 5,
    /// Unused (postcopy).
    PostcopyPaused = 6,
    /// Unused (postcopy).
    PostcopyRecover = 7,
    /// The stream was sent (source) or loaded (destination) completely.
    Completed = 8,
    /// Failed; see `error_desc`.
    Failed = 9,
    /// Unused (COLO).
    Colo = 10,
    /// Unused.
    PreSwitchover = 11,
    /// Unused.
    Device = 12,
    /// Unused.
    WaitUnplug = 13,
}

impl MigrationStatus {
    fn from_u32(v: u32) -> MigrationStatus {
        use MigrationStatus::*;
        [
            None,
            Setup,
            Cancelling,
            Cancelled,
            Active,
            PostcopyActive,
            PostcopyPaused,
            PostcopyRecover,
            Completed,
            Failed,
            Colo,
            PreSwitchover,
            Device,
            WaitUnplug,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(Failed)
    }

    /// QEMU's name for the state, as in query-migrate.
    pub fn name(self) -> &'static str {
        use MigrationStatus::*;
        match self {
            None => "none",
            Setup => "setup",
            Cancelling => "cancelling",
            Cancelled => "cancelled",
            Active => "active",
            PostcopyActive => "postcopy-active",
            PostcopyPaused => "postcopy-paused",
            PostcopyRecover => "postcopy-recover",
            Completed => "completed",
            Failed => "failed",
            Colo => "colo",
            PreSwitchover => "pre-switchover",
            Device => "device",
            WaitUnplug => "wait-unplug",
        }
    }

    /// True in the states a migration is under way in.
    pub fn is_active(self) -> bool {
        matches!(self, MigrationStatus::Setup | MigrationStatus::Active | MigrationStatus::Cancelling)
    }

    /// True in the states a new migration may start from.
    pub fn is_idle(self) -> bool {
        matches!(self, MigrationStatus::None | MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled)
    }
}

/// A migration state object, opaque to C (`MigrationState`): the live one
/// of each direction (the outgoing one is `migrate_get_current()`, valid
/// for the life of the process), and the copies handed to notifiers, each
/// frozen in the state just entered and valid only during the call.
pub struct MigrationState {
    status: AtomicU32,
    incoming: bool,
}

impl MigrationState {
    const fn new(incoming: bool) -> MigrationState {
        MigrationState { status: AtomicU32::new(MigrationStatus::None as u32), incoming }
    }

    /// A frozen copy in state `st`, for a notifier.
    pub fn snapshot(st: MigrationStatus, incoming: bool) -> MigrationState {
        MigrationState { status: AtomicU32::new(st as u32), incoming }
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus::from_u32(self.status.load(Ordering::Acquire))
    }

    /// True for the destination's state.
    pub fn is_incoming(&self) -> bool {
        self.incoming
    }

    /// Moves `from` → `to` if the state is still `from`.
    pub fn cas(&self, from: MigrationStatus, to: MigrationStatus) -> bool {
        let ok = self.status.compare_exchange(from as u32, to as u32, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if ok {
            log::info!("{} migration: {} -> {}", if self.incoming { "incoming" } else { "outgoing" }, from.name(), to.name());
        }
        ok
    }

    /// Moves to `to` from any state in `from`; returns the state it left.
    pub fn cas_any(&self, from: &[MigrationStatus], to: MigrationStatus) -> Option<MigrationStatus> {
        from.iter().copied().find(|&f| self.cas(f, to))
    }
}

/// The outgoing (source) migration state: what `migrate_get_current` returns.
pub static OUTGOING: MigrationState = MigrationState::new(false);
/// The incoming (destination) migration state.
pub static INCOMING: MigrationState = MigrationState::new(true);

/// A registered notifier: the C `Notifier *`, kept as an address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NotifierRef(pub usize);

/// Calls one notifier with a snapshot.
pub type NotifyFn = fn(NotifierRef, &MigrationState);

/// The registered notifiers, and the calls in progress.
struct Notifiers {
    list: Vec<NotifierRef>,
    /// Each notifier being called, with the thread calling it.
    calling: Vec<(NotifierRef, ThreadId)>,
}

static NOTIFIERS: Mutex<Notifiers> = Mutex::new(Notifiers { list: Vec::new(), calling: Vec::new() });
/// Signalled when a notifier call returns.
static NOTIFIER_RETURNED: Condvar = Condvar::new();
static NOTIFY_CALL: Mutex<Option<NotifyFn>> = Mutex::new(None);

/// Held while a migration leaves idle, by either direction: each checks
/// that the other is not active and changes its own state under it, so an
/// outgoing and an incoming migration never both start.
pub(crate) static STARTING: Mutex<()> = Mutex::new(());

/// Installs the function that calls a notifier (set by the C boundary).
pub fn set_notify_fn(f: NotifyFn) {
    *NOTIFY_CALL.lock() = Some(f);
}

/// Adds a notifier (appended: notifiers run in registration order).
pub fn add_notifier(n: NotifierRef) {
    let mut l = NOTIFIERS.lock();
    if !l.list.contains(&n) {
        l.list.push(n);
    }
}

/// Removes a notifier. Safe to call from inside a notifier. If that
/// notifier is being called on another thread, waits until the call has
/// returned, so the host may free it then (no other lock is waited for:
/// a notifier may release the host lock and wait for a thread that
/// removes another notifier).
pub fn remove_notifier(n: NotifierRef) {
    let me = std::thread::current().id();
    let mut l = NOTIFIERS.lock();
    l.list.retain(|x| *x != n);
    while l.calling.iter().any(|&(c, t)| c == n && t != me) {
        NOTIFIER_RETURNED.wait(&mut l);
    }
}

/// Calls every notifier with a snapshot in state `st`. Must be called with
/// the host lock held, from a livemig thread.
pub fn notify(st: MigrationStatus, incoming: bool) {
    let snap = MigrationState::snapshot(st, incoming);
    let call = *NOTIFY_CALL.lock();
    let Some(call) = call else { return };
    let me = std::thread::current().id();
    // Iterate over a copy so a notifier may add or remove notifiers, but
    // skip one that was removed by an earlier notifier of this round.
    let list = NOTIFIERS.lock().list.clone();
    for n in list {
        {
            let mut l = NOTIFIERS.lock();
            if !l.list.contains(&n) {
                continue;
            }
            l.calling.push((n, me));
        }
        // Unregisters the call even if the notifier panics.
        let _returned = CallReturned(n, me);
        call(n, &snap);
    }
}

/// Marks the call of a notifier on a thread as returned, when dropped.
struct CallReturned(NotifierRef, ThreadId);

impl Drop for CallReturned {
    fn drop(&mut self) {
        let mut l = NOTIFIERS.lock();
        if let Some(i) = l.calling.iter().position(|&(c, t)| c == self.0 && t == self.1) {
            l.calling.swap_remove(i);
        }
        NOTIFIER_RETURNED.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigrationStatus::*;

    #[test]
    fn numbering_matches_qapi_7_2() {
        assert_eq!(None as u32, 0);
        assert_eq!(Active as u32, 4);
        assert_eq!(Completed as u32, 8);
        assert_eq!(Failed as u32, 9);
        assert_eq!(WaitUnplug as u32, 13);
        for v in 0..14 {
            assert_eq!(MigrationStatus::from_u32(v) as u32, v);
        }
    }

    #[test]
    fn late_cancel_cannot_overwrite_completed() {
        let s = MigrationState::new(false);
        assert!(s.cas(None, Setup));
        assert!(s.cas(Setup, Active));
        assert!(s.cas(Active, Completed));
        assert_eq!(s.cas_any(&[Setup, Active], Cancelling), Option::None);
        assert_eq!(s.status(), Completed);
    }

    #[test]
    fn failure_cannot_overwrite_cancelled() {
        let s = MigrationState::new(false);
        assert!(s.cas(None, Setup));
        assert_eq!(s.cas_any(&[Setup, Active], Cancelling), Some(Setup));
        assert!(!s.cas(Setup, Active));
        assert!(!s.cas(Active, Failed));
        assert!(s.cas(Cancelling, Cancelled));
        assert!(!s.cas(Cancelling, Failed));
        assert_eq!(s.status(), Cancelled);
        assert!(s.status().is_idle());
    }

    #[test]
    fn snapshot_is_frozen() {
        let snap = MigrationState::snapshot(Active, true);
        assert_eq!(snap.status(), Active);
        assert!(snap.is_incoming());
        assert!(Active.is_active() && Setup.is_active() && Cancelling.is_active());
        assert!(!Completed.is_active() && !Failed.is_active());
        assert_eq!(Cancelling.name(), "cancelling");
    }
}
