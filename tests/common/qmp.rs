//! A QMP client for tests that drive a QEMU 7.2: every reply within 30 s,
//! every wait bounded.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Qmp(BufReader<UnixStream>);

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("QMP connect {path:?}: {e}"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp(BufReader::new(s));
        q.line();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }
    pub fn line(&mut self) -> serde_json::Value {
        let mut l = String::new();
        self.0.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP reply {l:?}: {e}"))
    }
    pub fn cmd(&mut self, c: &str) -> serde_json::Value {
        self.try_cmd(c).unwrap_or_else(|e| panic!("QMP {c}: {e}"))
    }
    /// `cmd`, or the error of a QMP connection QEMU has closed (it exited).
    pub fn try_cmd(&mut self, c: &str) -> std::io::Result<serde_json::Value> {
        let v = self.raw(c)?;
        assert!(v.get("error").is_none(), "QMP {c}: {v}");
        Ok(v["return"].clone())
    }
    /// The reply to `c`: its return value, or QEMU's error text.
    pub fn reply(&mut self, c: &str) -> Result<serde_json::Value, String> {
        let v = self.raw(c).unwrap_or_else(|e| panic!("QMP {c}: {e}"));
        match v.get("error") {
            Some(e) => Err(e["desc"].as_str().unwrap_or_default().to_string()),
            None => Ok(v["return"].clone()),
        }
    }
    /// Sends `c` and returns the whole reply (events before it skipped).
    fn raw(&mut self, c: &str) -> std::io::Result<serde_json::Value> {
        self.0.get_mut().write_all(format!("{c}\n").as_bytes())?;
        loop {
            let mut l = String::new();
            if self.0.read_line(&mut l)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP reply {l:?}: {e}"));
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }
    pub fn wait_migration(&mut self) -> serde_json::Value {
        self.try_wait_migration().unwrap_or_else(|e| panic!("QMP query-migrate: {e}"))
    }
    /// `wait_migration`, or the error of a QMP connection QEMU has closed.
    pub fn try_wait_migration(&mut self) -> std::io::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = self.try_cmd(r#"{"execute":"query-migrate"}"#)?;
            match r["status"].as_str() {
                Some("completed") | Some("failed") | Some("cancelled") => return Ok(r),
                _ => assert!(Instant::now() < deadline, "QEMU migration did not finish: {r}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
