//! The "globalstate" section: the source's run state, which decides the
//! destination's final run state (QEMU 7.2 `migration/global_state.c`).
//!
//! Payload (version 1, 104 bytes): `be32 size` = strlen(name) + 1, then the
//! run state name NUL-padded to 100 bytes.

use parking_lot::Mutex;

use crate::error::{MigError, Result};
use crate::host::RunState;
use crate::qemu_file::QemuFile;
use crate::savevm::{SaveVmHandler, SectionKind};

const RUNSTATE_FIELD: usize = 100;

/// What was stored at the switchover (source) or received (destination).
static STORED: Mutex<Option<RunState>> = Mutex::new(None);

/// Records the run state to send (called just before the VM stops).
pub fn store(state: RunState) {
    *STORED.lock() = Some(state);
}

/// Forgets any received state (before a load).
pub fn reset() {
    *STORED.lock() = None;
}

/// The received run state, if the stream carried one.
pub fn received() -> Option<RunState> {
    *STORED.lock()
}

/// The handler registered by livemig as "globalstate" instance 0, version 1.
pub struct GlobalState;

impl SaveVmHandler for GlobalState {
    fn is_live(&self) -> bool {
        false
    }

    fn save_state(&mut self, f: &mut QemuFile) -> Result<()> {
        let name = STORED.lock().unwrap_or(RunState::Running).name();
        let mut field = [0u8; RUNSTATE_FIELD];
        field[..name.len()].copy_from_slice(name.as_bytes());
        f.put_be32(name.len() as u32 + 1);
        f.put_buffer(&field);
        Ok(())
    }

    fn load_begin(&mut self) {
        reset();
    }

    fn load(&mut self, f: &mut QemuFile, version_id: u32, _kind: SectionKind) -> Result<()> {
        if version_id < 1 {
            return Err(MigError::new(format!("globalstate: incoming version_id {version_id} is too old for local minimum version_id  1")));
        }
        // `size` is loaded and never used, as in 7.2 (a plain uint32
        // field): the name ends at the first NUL.
        let _size = f.get_be32();
        let mut field = [0u8; RUNSTATE_FIELD];
        f.get_buffer(&mut field);
        f.check()?;
        // Without a NUL, 7.2 puts one in the field's last byte.
        let end = field.iter().position(|&b| b == 0).unwrap_or(RUNSTATE_FIELD - 1);
        let name = String::from_utf8_lossy(&field[..end]).into_owned();
        let state = RunState::from_name(&name).ok_or_else(|| MigError::new(format!("invalid parameter value: {name}")))?;
        if !enterable_from_inmigrate(state) {
            // 7.2 takes the name here and aborts (the whole process) when
            // it later sets that state. Refused while loading instead, so
            // that the host is never put in it and a source with a return
            // path is told the load failed (7.2's abort drops the
            // connection, which fails the source too).
            return Err(MigError::new(format!("invalid runstate transition: 'inmigrate' -> '{name}'")));
        }
        *STORED.lock() = Some(state);
        Ok(())
    }
}

/// Whether a destination in `inmigrate` may be put in `state` once the
/// load is over: QEMU 7.2's `runstate_transitions_def` from inmigrate,
/// and inmigrate itself (setting the current state is no transition).
fn enterable_from_inmigrate(state: RunState) -> bool {
    !matches!(state, RunState::Debug | RunState::RestoreVm | RunState::SaveVm)
}

/// Registers the "globalstate" section (once).
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::savevm::register("globalstate", 0, 1, Box::new(GlobalState), crate::savevm::builtin_owner(), crate::savevm::Priority::Late)
            .expect("globalstate registers once");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_file::Direction;
    use crate::transport::mem::MemChannel;

    #[test]
    fn layout_matches_capture() {
        // From qemu72_none_m64_S_zero.bin at 0x240b4: size 10, "prelaunch".
        store(RunState::Prelaunch);
        let (chan, out) = MemChannel::sink();
        let mut f = QemuFile::new(Box::new(chan), Direction::Write);
        GlobalState.save_state(&mut f).unwrap();
        f.flush().unwrap();
        let out = out.lock().clone();
        assert_eq!(out.len(), 104);
        assert_eq!(&out[..4], &[0, 0, 0, 10]);
        assert_eq!(&out[4..13], b"prelaunch");
        assert!(out[13..].iter().all(|&b| b == 0));

        let mut f = QemuFile::new(Box::new(MemChannel::source(out)), Direction::Read);
        reset();
        GlobalState.load(&mut f, 1, SectionKind::Full).unwrap();
        assert_eq!(received(), Some(RunState::Prelaunch));

        let mut bogus = vec![0, 0, 0, 6];
        bogus.extend_from_slice(b"bogus");
        bogus.resize(104, 0);
        let mut f = QemuFile::new(Box::new(MemChannel::source(bogus)), Direction::Read);
        let e = GlobalState.load(&mut f, 1, SectionKind::Full).unwrap_err();
        assert_eq!(e.to_string(), "invalid parameter value: bogus");

        // A field without a NUL: its last byte is dropped, as 7.2 does
        // (its message shows 99 bytes).
        let mut s = vec![0, 0, 0, 8];
        s.extend_from_slice(&[b'r'; 100]);
        let mut f = QemuFile::new(Box::new(MemChannel::source(s)), Direction::Read);
        let e = GlobalState.load(&mut f, 1, SectionKind::Full).unwrap_err();
        assert_eq!(e.to_string(), format!("invalid parameter value: {}", "r".repeat(99)));

        // The size field is not checked (7.2 loads it into a plain uint32
        // and never uses it): only the NUL-terminated name counts. (Here,
        // not in a test of its own: STORED is shared.)
        for size in [0u32, 3, 101, u32::MAX] {
            let mut s = size.to_be_bytes().to_vec();
            s.extend_from_slice(b"paused");
            s.resize(104, 0);
            s.push(0xee);
            let mut f = QemuFile::new(Box::new(MemChannel::source(s)), Direction::Read);
            reset();
            GlobalState.load(&mut f, 1, SectionKind::Full).unwrap_or_else(|e| panic!("size {size}: {e}"));
            assert_eq!(received(), Some(RunState::Paused), "size {size}");
            assert_eq!(f.get_u8(), 0xee, "size {size}: 104 bytes read");
        }
    }
}
