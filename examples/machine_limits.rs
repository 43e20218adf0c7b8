//! The machine's limits, for the benchmark table: single-thread memcpy
//! bandwidth and one loopback TCP stream's throughput. Prints
//! `memcpy_GBps=X`, `loopback_tcp_GBps=Y` (a 1 MiB buffer sent again and
//! again: the source stays in cache) and `loopback_tcp_ram_GBps=Z` (1 GiB
//! sent from one buffer into another, both faulted in: memory to memory,
//! as a migration of 1 GiB of RAM), medians of 5. With the last comes
//! `loopback_tcp_ram_cpu_s=C`: the CPU seconds its sender and receiver
//! threads took together (median), what moving 1 GiB over one loopback
//! connection costs before any migration work.
//!
//! `--pin SRC,DST` runs the stream's sender on CPU SRC and its receiver on
//! CPU DST, as the benchmark pins the migration's two sides.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// Pins the calling thread to `cpu` (ignored where that fails).
fn pin(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it
    // for cpu < CPU_SETSIZE, and sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu < libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cpus: Option<(usize, usize)> = args.iter().position(|a| a == "--pin").and_then(|i| {
        let (a, b) = args.get(i + 1)?.split_once(',')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    let len = 256 << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // fault both in
    let memcpy: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            len as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();

    let total: usize = 2 << 30;
    let tcp: Vec<f64> = (0..5)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let rx = std::thread::spawn(move || {
                pin(cpus.map(|c| c.1));
                let (mut s, _) = l.accept().unwrap();
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0;
                while got < total {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0);
                    got += n;
                }
            });
            pin(cpus.map(|c| c.0));
            let mut s = TcpStream::connect(addr).unwrap();
            let buf = vec![7u8; 1 << 20];
            let t = Instant::now();
            for _ in 0..total / buf.len() {
                s.write_all(&buf).unwrap();
            }
            rx.join().unwrap();
            total as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    // The same stream moving 1 GiB from one buffer to another, faulted in
    // beforehand, as a migration of 1 GiB of RAM reads and writes memory.
    let ram: usize = 1 << 30;
    let mut from = vec![0u8; ram];
    for (i, b) in from.iter_mut().enumerate() {
        *b = (i * 7 + i / 4096) as u8;
    }
    let from = std::sync::Arc::new(from);
    let mut into_ram = Some(vec![1u8; ram]);
    let (mut tcp_ram, mut tcp_ram_cpu) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut into = into_ram.take().unwrap();
        let rx = std::thread::spawn(move || {
            pin(cpus.map(|c| c.1));
            let (mut s, _) = l.accept().unwrap();
            let cpu = thread_cpu_s();
            s.read_exact(&mut into).unwrap();
            (into, thread_cpu_s() - cpu)
        });
        pin(cpus.map(|c| c.0));
        let mut s = TcpStream::connect(addr).unwrap();
        let (t, cpu) = (Instant::now(), thread_cpu_s());
        for chunk in from.chunks(1 << 20) {
            s.write_all(chunk).unwrap();
        }
        let sender_cpu = thread_cpu_s() - cpu;
        let (into, receiver_cpu) = rx.join().unwrap();
        into_ram = Some(into);
        tcp_ram.push(ram as f64 / t.elapsed().as_secs_f64() / 1e9);
        tcp_ram_cpu.push(sender_cpu + receiver_cpu);
    }
    assert!(into_ram.unwrap()[..] == from[..]);
    println!("memcpy_GBps={:.2}", median(memcpy));
    println!("loopback_tcp_GBps={:.2}", median(tcp));
    println!("loopback_tcp_ram_GBps={:.2}", median(tcp_ram));
    println!("loopback_tcp_ram_cpu_s={:.3}", median(tcp_ram_cpu));
}
