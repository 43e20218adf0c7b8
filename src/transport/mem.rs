//! In-memory channels, for tests and for saving a stream to memory.

use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::Channel;

/// A channel over a byte vector: a sink that collects what is written, a
/// source that yields fixed bytes, or a broken one that fails every write.
pub struct MemChannel {
    out: Option<Arc<Mutex<Vec<u8>>>>,
    input: Vec<u8>,
    rpos: usize,
    broken: bool,
}

impl MemChannel {
    /// A sink; the returned handle sees everything written.
    pub fn sink() -> (MemChannel, Arc<Mutex<Vec<u8>>>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        (MemChannel { out: Some(out.clone()), input: Vec::new(), rpos: 0, broken: false }, out)
    }

    /// A source that yields `data`, then the end of the stream.
    pub fn source(data: Vec<u8>) -> MemChannel {
        MemChannel { out: None, input: data, rpos: 0, broken: false }
    }

    /// A channel whose writes fail with `EPIPE`.
    pub fn broken() -> MemChannel {
        MemChannel { out: None, input: Vec::new(), rpos: 0, broken: true }
    }
}

impl Channel for MemChannel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.rpos);
        buf[..n].copy_from_slice(&self.input[self.rpos..self.rpos + n]);
        self.rpos += n;
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::from_raw_os_error(libc::EPIPE));
        }
        match &self.out {
            Some(o) => {
                o.lock().extend_from_slice(buf);
                Ok(buf.len())
            }
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "mem".to_string()
    }
}
