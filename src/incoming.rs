//! The destination side: listen or spawn, accept, load, hand over.
//!
//! `qemu_start_incoming_migration` sets the transport up on the caller's
//! thread (so a bad URI or a busy port is reported at once) and returns; the
//! "livemig-in" thread accepts the source, loads the stream into the
//! registered handlers and then, per the received globalstate and the
//! host's autostart choice, starts the VM or sets its run state. A stream
//! that cannot be loaded ends in FAILED with the reason; the VM is not
//! started and nothing exits. The VM, checked stopped at the start, is
//! checked again when the source connects: one the host started meanwhile
//! fails the migration before anything is loaded, and is left running.

use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::error::{MigError, Result};
use crate::host::{self, Host, RunState};
use crate::qemu_file::{Direction, QemuFile};
use crate::state::{notify, MigrationStatus as S, INCOMING, OUTGOING};
use crate::transport::{Aborter, Listener, Uri};

struct Incoming {
    error: Option<String>,
    port: Option<u16>,
    aborter: Option<Aborter>,
    thread: Option<JoinHandle<()>>,
    final_runstate: Option<RunState>,
}

static IN: Mutex<Incoming> = Mutex::new(Incoming { error: None, port: None, aborter: None, thread: None, final_runstate: None });

/// Held by an incoming start from its first check to its last, so that
/// two starts never overlap. IN is not held meanwhile: setting up the
/// source (a host name's lookup, binding, spawning a command) must not
/// hold up a query or a cancel made on another thread.
static START: Mutex<()> = Mutex::new(());

enum Source {
    Listener(Listener),
    File(QemuFile),
}

/// How an incoming migration is started.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// `qemu_start_incoming_migration`: any VM that is not running.
    Any,
    /// QEMU 7.2's `migrate-incoming` (a VM started with `-incoming defer`):
    /// only a VM in the inmigrate run state, with 7.2's texts.
    Deferred,
}

/// Starts an incoming migration from `uri` (`qemu_start_incoming_migration`).
pub fn start_uri(uri: &str) -> Result<()> {
    start_uri_as(uri, Start::Any)
}

/// Starts an incoming migration from `uri`, as `how` says.
pub fn start_uri_as(uri: &str, how: Start) -> Result<()> {
    let parsed = Uri::parse(uri)?;
    if let Uri::FdNum(_) = parsed {
        // Taken by the call, as `qmp_migrate` takes it: a bad N is refused
        // at once, and N is closed if the start is refused. A cancel fires
        // the channel's own aborter.
        let chan = crate::transport::fd_channel(&parsed, uri)?;
        return start(how, chan.aborter(), move |_| Ok(Source::Listener(Listener::Ready(chan))));
    }
    start(how, None, |abort| Ok(Source::Listener(Listener::open(&parsed, uri, abort)?)))
}

/// Starts loading from a stream the host opened (`process_incoming_migration`).
/// A cancel fires the stream's own aborter, which wakes its reads.
pub fn start_file(f: QemuFile) -> Result<()> {
    start(Start::Any, f.aborter(), move |_| Ok(Source::File(f)))
}

/// Starts the incoming thread on what `open` sets up with the aborter a
/// cancel fires (`aborter`, or a new one).
fn start(how: Start, aborter: Option<Aborter>, open: impl FnOnce(&Aborter) -> Result<Source>) -> Result<()> {
    // Asked before START and IN are taken: the incoming thread takes IN
    // while it holds the host lock, which a host's run-state callback may want.
    let h = host::get()?;
    if how == Start::Deferred {
        if !INCOMING.status().is_idle() {
            return Err(MigError::new("The incoming migration has already been started"));
        }
        // (A host without runstate_get tells only whether the VM runs,
        // which is checked below.)
        if h.has_runstate_get() && h.runstate()? != RunState::Inmigrate {
            return Err(MigError::new("'-incoming' was not specified on the command line"));
        }
    }
    if h.runstate_is_running() {
        // Loading writes guest RAM and device state under running vCPUs.
        return Err(MigError::new("cannot start an incoming migration while the VM is running"));
    }
    let _one = START.lock();
    // Until this side has left idle, the other cannot (see STARTING).
    let refused = || {
        if OUTGOING.status().is_active() {
            return Err(MigError::new("an outgoing migration is in progress"));
        }
        let prev = INCOMING.status();
        if !prev.is_idle() {
            return Err(MigError::new("an incoming migration is already in progress"));
        }
        Ok(prev)
    };
    refused()?;
    // Set up before the state leaves idle (START keeps another incoming
    // start out), so that a start refused here (a bad URI, a port in
    // use) never shows as a migration in progress to calls made meanwhile
    // on other threads; and out of STARTING and IN, so that spawning a
    // command or looking up a host name does not hold up a `qmp_migrate`,
    // a query or a cancel.
    let aborter = match aborter {
        Some(a) => a,
        None => Aborter::new()?,
    };
    let source = open(&aborter)?;
    // Held from here, so that a query or a cancel never sees this start
    // out of idle with the last migration's error, port or aborter.
    let mut g = IN.lock();
    let prev = {
        let _starting = crate::state::STARTING.lock();
        // An outgoing migration that started meanwhile wins: the source
        // set up is dropped (closed, its command ended).
        let prev = refused()?;
        if !INCOMING.cas(prev, S::Setup) {
            return Err(MigError::new("an incoming migration is already in progress"));
        }
        prev
    };
    // Out of idle, the host table can no longer change: take it now (one
    // was registered: it was asked for the run state above).
    let host = match host::get() {
        Ok(h) => h,
        Err(e) => {
            INCOMING.cas(S::Setup, prev);
            return Err(e);
        }
    };
    if let Some(t) = g.thread.take() {
        // Never wait for it (see outgoing::start): it only notifies after
        // its final transition.
        if t.is_finished() {
            let _ = t.join();
        }
    }
    g.error = None;
    g.final_runstate = None;
    g.port = match &source {
        Source::Listener(l) => l.local_port(),
        Source::File(_) => None,
    };
    g.aborter = Some(aborter);
    let spawned = std::thread::Builder::new().name("livemig-in".into()).spawn(move || {
        crate::block_sigpipe();
        run(host, source);
        log::info!("incoming migration thread done: {} ms CPU", crate::thread_cpu_time().as_millis());
    });
    match spawned {
        Ok(t) => {
            g.thread = Some(t);
            Ok(())
        }
        Err(e) => {
            INCOMING.cas(S::Setup, prev);
            Err(MigError::io("cannot start the incoming migration thread", e))
        }
    }
}

/// The TCP port the incoming side listens on (for `tcp:HOST:0`).
pub fn local_port() -> Option<u16> {
    IN.lock().port
}

/// The reason the last incoming migration failed.
pub fn error() -> Option<String> {
    IN.lock().error.clone()
}

/// The incoming status and the reason it failed, read together under IN,
/// where `start` leaves idle and clears the reason for the next migration:
/// a query racing that start sees a FAILED with its reason, or the next
/// migration, never a FAILED without one.
pub fn status_and_error() -> (crate::state::MigrationStatus, Option<String>) {
    let g = IN.lock();
    (INCOMING.status(), g.error.clone())
}

/// The run state the host was put in after the last successful load.
pub fn final_runstate() -> Option<RunState> {
    IN.lock().final_runstate
}

/// Stops an incoming migration that has not finished (it ends FAILED).
pub fn cancel() -> bool {
    let g = IN.lock();
    if INCOMING.status().is_active() {
        if let Some(a) = &g.aborter {
            a.abort();
            return true;
        }
    }
    false
}

/// The load's outcome, counting a cancel that came too late to interrupt
/// a read (after the last one, or while a device section waited for the
/// host lock) as a cancel: `cancel` returned true for it, which promises
/// that the VM is not started. From here on a cancel is refused.
fn settle_cancel(r: Result<()>) -> Result<()> {
    let mut g = IN.lock();
    let cancelled = g.aborter.take().is_some_and(|a| a.is_aborted());
    match r {
        Ok(()) if cancelled => Err(MigError::with_errno("after the whole stream was read", libc::ECANCELED)),
        r => r,
    }
}

fn run(host: Host, source: Source) {
    {
        let _l = host.lock();
        notify(S::Setup, true);
    }
    let file = match source {
        // Waited for without the io timeout (see `Listener::accept`).
        Source::File(f) => f.wait_for_source().map(|()| f),
        Source::Listener(l) => l.accept().map(|c| QemuFile::new(c, Direction::Read)),
    };
    // The listener is closed once the source is accepted (or the wait for
    // it failed): no port is listened on any more.
    IN.lock().port = None;
    let (mut result, mut file) = match file {
        Ok(mut f) => {
            // The VM was checked stopped when the migration started, but
            // the source may come much later: the host may have started
            // its VM meanwhile (its run state stays what it was until
            // here). Checked again under the host lock, where the run
            // state becomes inmigrate: nothing is loaded under running
            // vCPUs, and a running VM is never started again.
            let running = {
                let _l = host.lock();
                let running = host.runstate_is_running();
                if !running && INCOMING.cas(S::Setup, S::Active) {
                    host.runstate_set(RunState::Inmigrate);
                    notify(S::Active, true);
                }
                running
            };
            let r = if running {
                Err(MigError::new("the VM was started while waiting for the incoming migration: the stream is not loaded"))
            } else {
                crate::contain_panic("incoming migration", || crate::loadvm::load_stream(&mut f, Some(&host))).map_err(|e| {
                    if e.errno() != libc::ETIMEDOUT {
                        return e;
                    }
                    // The stream stalled. QEMU's destination waits for its
                    // source indefinitely; this one fails after the io
                    // timeout, which a source told to pause before its
                    // switchover may well outlast.
                    let hint = "a source paused before its switchover sends nothing until it is continued; livemig_set_io_timeout sets how long to wait";
                    MigError::with_errno(format!("{e} ({hint})"), libc::ETIMEDOUT)
                })
            };
            (settle_cancel(r), Some(f))
        }
        Err(e) => (Err(e), None),
    };
    // With a return path, tell the source how the load went. The VM starts
    // only once the source has been told: if the confirmation cannot be
    // sent, the source will restart its VM, so this side must not run it.
    if let Some(f) = file.as_mut().filter(|f| f.return_path) {
        if result.is_ok() && f.peer_closed() {
            // The source gave up waiting (and runs its VM again) before
            // this side could confirm: a confirmation now might still be
            // written into the closed connection, so this VM must not run.
            result = Err(MigError::new("the source closed the connection before the load could be confirmed"));
        }
        let status: u32 = if result.is_ok() { 0 } else { 1 };
        if let Err(e) = f.rp_send(crate::savevm::MIG_RP_MSG_SHUT, &status.to_be_bytes()) {
            if result.is_ok() {
                result = Err(e.context("could not confirm the load to the source"));
            }
        }
    }
    drop(file);
    let _l = host.lock();
    match result {
        Ok(()) => {
            let state = match crate::globalstate::received() {
                None | Some(RunState::Running) if host.autostart() => RunState::Running,
                None | Some(RunState::Running) => RunState::Paused,
                Some(s) => s,
            };
            host.announce_self();
            let started = if state == RunState::Running {
                host.vm_start()
            } else {
                host.runstate_set(state);
                Ok(())
            };
            let mut g = IN.lock();
            g.aborter = None;
            g.port = None;
            match started {
                Ok(()) => {
                    g.final_runstate = Some(state);
                    drop(g);
                    INCOMING.cas(S::Active, S::Completed);
                    log::info!("incoming migration completed; run state {}", state.name());
                    notify(S::Completed, true);
                }
                Err(e) => {
                    // Said in full, and logged as a failed load is: the
                    // host's own words do not tell that the stream was
                    // loaded and only the start failed.
                    let e = e.context("the incoming migration was loaded, but the VM could not be started");
                    log::error!("{e}");
                    g.error = Some(e.to_string());
                    drop(g);
                    INCOMING.cas(S::Active, S::Failed);
                    notify(S::Failed, true);
                }
            }
        }
        Err(e) => {
            let msg = if e.errno() == libc::ECANCELED { format!("incoming migration cancelled: {e}") } else { e.to_string() };
            log::error!("load of migration failed: {msg}");
            let mut g = IN.lock();
            g.error = Some(msg);
            g.aborter = None;
            g.port = None;
            drop(g);
            INCOMING.cas_any(&[S::Setup, S::Active], S::Failed);
            notify(S::Failed, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;
    use std::os::raw::c_int;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::ffi::types::{LivemigHostOps, LIVEMIG_HOST_OPS_VERSION};

    unsafe extern "C" fn nop(_: *mut c_void) {}
    unsafe extern "C" fn stop(_: *mut c_void, _: RunState) -> c_int {
        0
    }
    unsafe extern "C" fn vm_start(_: *mut c_void) -> c_int {
        0
    }
    unsafe extern "C" fn stopped(_: *mut c_void) -> bool {
        false
    }
    unsafe extern "C" fn set_state(_: *mut c_void, _: RunState) {}

    /// Setting up the source (looking up a host name, which may take the
    /// resolver's time) holds up neither a query nor a cancel made on
    /// another thread meanwhile; the start refused in the end leaves the
    /// state idle.
    #[test]
    fn setting_up_the_source_holds_up_no_query() {
        let ops = LivemigHostOps {
            version: LIVEMIG_HOST_OPS_VERSION,
            size: std::mem::size_of::<LivemigHostOps>() as u32,
            iothread_lock: Some(nop),
            iothread_unlock: Some(nop),
            vm_stop_force_state: Some(stop),
            vm_start: Some(vm_start),
            runstate_is_running: Some(stopped),
            runstate_set: Some(set_state),
            runstate_get: None,
            system_wakeup_request: None,
            announce_self: None,
            dirty_log_start: None,
            dirty_log_sync: None,
            dirty_log_stop: None,
            autostart: false,
        };
        host::set(ops, std::ptr::null_mut()).expect("host");
        let (entered_tx, entered) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let starter = std::thread::spawn(move || {
            start(Start::Any, None, move |_| {
                entered_tx.send(()).unwrap();
                let _ = go_rx.recv_timeout(Duration::from_secs(20));
                Err(MigError::new("refused by the test"))
            })
        });
        entered.recv_timeout(Duration::from_secs(20)).expect("the source is being set up");
        let (answer_tx, answer) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = answer_tx.send((status_and_error(), cancel(), local_port()));
        });
        let answered = answer.recv_timeout(Duration::from_secs(2));
        go.send(()).unwrap();
        let e = starter.join().unwrap().expect_err("refused");
        assert_eq!(e.to_string(), "refused by the test");
        let ((status, error), cancelled, port) = answered.expect("a query and a cancel answer while the source is set up");
        assert!(status.is_idle(), "{status:?}");
        assert_eq!((error, cancelled, port), (None, false, None));
        assert!(INCOMING.status().is_idle());
    }
}
