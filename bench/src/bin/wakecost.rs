//! What this machine charges for sleeping and waking, apart from any proxy: two processes
//! pass a byte back and forth over a pair of pipes, and the first one's CPU time per round
//! trip is printed for each way of placing and waiting. A proxy faster than its load
//! generator sleeps between messages, so these costs show up in its CPU per round trip.
//!
//!     bench/target/release/wakecost [round trips]

use std::time::Instant;

/// How the two processes wait and where they run.
struct Case {
    label: &'static str,
    peer_cpu: usize,
    me_spins: bool,
    peer_spins: bool,
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(100_000, |s| s.parse().expect("round trips: a number"));
    let cases = [
        Case {
            label: "same CPU, both block",
            peer_cpu: 0,
            me_spins: false,
            peer_spins: false,
        },
        Case {
            label: "other CPU, both block (each wake-up finds an idle CPU)",
            peer_cpu: 1,
            me_spins: false,
            peer_spins: false,
        },
        Case {
            label: "other CPU, peer spins (only this side sleeps and is woken)",
            peer_cpu: 1,
            me_spins: false,
            peer_spins: true,
        },
        Case {
            label: "other CPU, this side spins (only the peer sleeps; this side wakes it)",
            peer_cpu: 1,
            me_spins: true,
            peer_spins: false,
        },
        Case {
            label: "other CPU, both spin (no sleeping at all)",
            peer_cpu: 1,
            me_spins: true,
            peer_spins: true,
        },
    ];
    println!("| case | wall µs per round trip | CPU µs per round trip, this side |");
    println!("| --- | --- | --- |");
    for c in &cases {
        let (wall, cpu) = run(c, n);
        println!("| {} | {wall:.2} | {cpu:.2} |", c.label);
    }
}

/// One case: returns wall and this side's CPU microseconds per round trip.
fn run(c: &Case, n: u64) -> (f64, f64) {
    // SAFETY: plain libc calls on descriptors this function owns; the child only reads,
    // writes and exits, so forking a process with no other threads is sound.
    unsafe {
        let (mut to_peer, mut to_me) = ([0i32; 2], [0i32; 2]);
        assert_eq!(libc::pipe(to_peer.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(to_me.as_mut_ptr()), 0);
        if c.peer_spins {
            libc::fcntl(to_peer[0], libc::F_SETFL, libc::O_NONBLOCK);
        }
        if c.me_spins {
            libc::fcntl(to_me[0], libc::F_SETFL, libc::O_NONBLOCK);
        }
        let pid = libc::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            pin(c.peer_cpu);
            for _ in 0..n {
                byte_in(to_peer[0]);
                byte_out(to_me[1]);
            }
            libc::_exit(0);
        }
        pin(0);
        let started = Instant::now();
        let cpu0 = cpu_us();
        for _ in 0..n {
            byte_out(to_peer[1]);
            byte_in(to_me[0]);
        }
        let cpu = cpu_us() - cpu0;
        let wall = started.elapsed().as_secs_f64() * 1e6;
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        for fd in to_peer.into_iter().chain(to_me) {
            libc::close(fd);
        }
        (wall / n as f64, cpu / n as f64)
    }
}

/// Reads one byte, spinning through `EAGAIN` on a non-blocking pipe.
unsafe fn byte_in(fd: i32) {
    let mut b = 0u8;
    // SAFETY: one byte into a local.
    while unsafe { libc::read(fd, (&raw mut b).cast(), 1) } != 1 {}
}

unsafe fn byte_out(fd: i32) {
    let b = 0u8;
    // SAFETY: one byte from a local.
    assert_eq!(unsafe { libc::write(fd, (&raw const b).cast(), 1) }, 1);
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; the kernel reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// User plus system CPU of this process so far, in microseconds.
fn cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct.
    unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut r);
        let t = |v: libc::timeval| v.tv_sec as f64 * 1e6 + v.tv_usec as f64;
        t(r.ru_utime) + t(r.ru_stime)
    }
}
