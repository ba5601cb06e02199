//! The processes a benchmark runs, and what they cost: CPU time and resident
//! memory read from `/proc`, the way `top` would.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A `ticketpay` child process, killed when dropped; its stderr goes to a log file.
pub struct Spawned {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Spawned {
    /// Starts this binary with `args` and waits for a stdout line starting with each of `expect`; returns the rest of each.
    pub fn start(args: &[&str], log: &Path, expect: &[&str]) -> Result<(Spawned, Vec<String>)> {
        let exe = std::env::current_exe().context("cannot find this binary")?;
        let stderr = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start ticketpay {}", args.join(" ")))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut spawned = Spawned { child, lines };
        let found = expect.iter().map(|p| spawned.wait_for(p, args, log)).collect::<Result<_>>()?;
        Ok((spawned, found))
    }

    fn wait_for(&mut self, prefix: &str, args: &[&str], log: &Path) -> Result<String> {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(_) => bail!("`ticketpay {}` did not print `{prefix}` (see {})", args.join(" "), log.display()),
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM, then wait for it to finish.
    pub fn stop(mut self) {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The direct children of a process.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
    }
    out
}

/// A process and all its descendants.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(children(out[i]));
        i += 1;
    }
    out
}

/// User plus system CPU time a live process has used, in seconds.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces; utime and stime are the 12th and 13th fields after it.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    ticks as f64 / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Resident memory of a live process, in bytes.
pub fn rss_bytes(pid: i32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// CPU time the calling thread has used, in seconds.
pub fn thread_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Samples the resident memory of some processes (each with its descendants)
/// every 50 ms, and keeps the peak of their sum and of each.
pub struct PeakRss {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<(u64, Vec<u64>)>,
}

impl PeakRss {
    /// `roots`: each process, and whether its descendants count with it.
    pub fn start(roots: Vec<(i32, bool)>) -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            let (mut peak, mut each) = (0, vec![0; roots.len()]);
            while !flag.load(Ordering::Relaxed) {
                let now: Vec<u64> = roots
                    .iter()
                    .map(|&(pid, descendants)| if descendants { tree(pid).into_iter().map(rss_bytes).sum() } else { rss_bytes(pid) })
                    .collect();
                peak = peak.max(now.iter().sum());
                for (e, n) in each.iter_mut().zip(now) {
                    *e = (*e).max(n);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (peak, each)
        });
        PeakRss { stop, sampler }
    }

    /// The peak of the sum, and each root's own peak, in bytes.
    pub fn finish(self) -> (u64, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_its_thread_uses_cpu() {
        let me = std::process::id() as i32;
        assert!(rss_bytes(me) > 1 << 20);
        let before = thread_cpu_seconds();
        let mut x = 0u64;
        // /proc counts in clock ticks: spin long enough for them to show.
        while thread_cpu_seconds() - before < 0.3 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_seconds(me) >= 0.2, "{}", cpu_seconds(me));
        assert!(tree(me).contains(&me));
    }
}
