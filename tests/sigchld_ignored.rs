//! `exec:` in a host that ignores SIGCHLD (SIG_IGN, as daemons do to leave
//! no zombies): the kernel reaps the command as it exits, so its status is
//! gone. A migration whose command took the whole stream completes, as in
//! QEMU, and a cancel still kills a command that never reads. Its own test
//! process: the disposition is process-wide.

mod common;

use std::ptr::null_mut;
use std::sync::atomic::Ordering;

use common::*;
use livemig::ffi::migration as api;
use livemig::host::RunState;
use livemig::state::MigrationStatus;

#[test]
fn exec_migrations_work_when_the_host_ignores_sigchld() {
    let (_g, ram) = host();
    ram.fill_pattern();
    let stream = valid_stream();
    let d = tmpdir("sigchld");
    // SAFETY: sets a signal disposition; no handler runs.
    let old = unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // A command that takes the whole stream: COMPLETED, the file whole.
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    let out = d.join("a.bin");
    assert_eq!(migrate(&format!("exec:cat > {}", out.display())), "");
    assert_eq!(wait_final(false, 60), MigrationStatus::Completed, "{:?}", livemig::outgoing::stats().error);
    assert!(std::fs::metadata(&out).unwrap().len() > RAM_SIZE as u64 / 2);
    // A command that exits early still fails the migration, the VM running.
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
    assert_eq!(migrate("exec:exit 3"), "");
    assert_eq!(wait_final(false, 60), MigrationStatus::Failed);
    assert_eq!(STATE.load(Ordering::SeqCst), RunState::Running as u32);
    // A cancel kills a command that never reads; no process is left.
    let before = counts();
    assert_eq!(migrate("exec:sleep 60"), "");
    wait_until(10, "the migration active", || livemig::state::OUTGOING.status() == MigrationStatus::Active);
    api::qmp_migrate_cancel(null_mut());
    assert_eq!(wait_final(false, 10), MigrationStatus::Cancelled);
    assert_no_leak(before, "cancelled exec:");
    let mut children = String::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        children += &std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
    }
    assert_eq!(children.trim(), "", "no command left");
    // The destination side: a command that gives the whole stream.
    STATE.store(RunState::Inmigrate as u32, Ordering::SeqCst);
    let s = d.join("s.bin");
    std::fs::write(&s, stream).unwrap();
    livemig::incoming::start_uri(&format!("exec:cat {}", s.display())).unwrap();
    assert_eq!(wait_final(true, 30), MigrationStatus::Completed, "{:?}", livemig::incoming::error());
    // SAFETY: restores the disposition read above.
    unsafe { libc::signal(libc::SIGCHLD, old) };
    STATE.store(RunState::Running as u32, Ordering::SeqCst);
}
