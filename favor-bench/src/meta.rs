//! What every result file records: machine, ISA, GPU and driver, commit, date and the exact
//! command line.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::backends::Backend;
use crate::records::{Json, JsonExt};

/// Provenance of a result.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    /// CPU model from /proc/cpuinfo (or the architecture when unknown).
    pub cpu: String,
    /// Logical CPUs available to this process.
    pub cpus: usize,
    /// Threads of the rayon pool used by the backends.
    pub threads: usize,
    /// Backends (with their ISA) used by the run.
    pub backends: Vec<String>,
    /// The devices of the run's GPU backends: name and driver.
    pub gpus: Vec<String>,
    /// `git rev-parse HEAD`, or "unknown".
    pub commit: String,
    /// UTC date and time, ISO 8601.
    pub date: String,
    /// The command line, shell-quoted.
    pub command: String,
    /// CPU time used over wall time × threads during the measurements (set at the end).
    pub cpu_share: Option<f64>,
}

impl RunInfo {
    /// Collects the information for a run using `backends`.
    pub fn collect(backends: Vec<String>) -> Self {
        Self {
            cpu: cpu_model(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: rayon::current_num_threads(),
            backends,
            gpus: Vec::new(),
            commit: git_commit(),
            date: utc_now(),
            command: command_line(),
            cpu_share: None,
        }
    }

    /// Collects the information for a run using `backends`, with the device and driver of each
    /// backend that has its own (GPU) memory.
    pub fn collect_for(backends: &[Backend]) -> Self {
        let mut info = Self::collect(backends.iter().map(Backend::name).collect());
        info.gpus = backends.iter().filter_map(|b| b.imp.resident()).map(|d| d.device().to_string()).collect();
        info.gpus.dedup();
        info
    }

    /// As `# key: value` comment lines for the top of a CSV file.
    pub fn csv_comment(&self) -> String {
        self.pairs().into_iter().map(|(k, v)| format!("# {k}: {v}\n")).collect()
    }

    /// As a JSON object.
    pub fn json(&self) -> Json {
        Json::obj(self.pairs().into_iter().map(|(k, v)| (k, Json::str(v))).collect())
    }

    /// A one-line summary for plot captions.
    pub fn caption(&self) -> String {
        let gpus = if self.gpus.is_empty() { String::new() } else { format!("{}; ", self.gpus.join("; ")) };
        format!("{gpus}{} ({} threads), {} - {}", self.cpu, self.threads, self.backends.join(", "), self.date)
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("machine", self.cpu.clone()),
            ("cpus", self.cpus.to_string()),
            ("threads", self.threads.to_string()),
            ("backends", self.backends.join(", ")),
            ("commit", self.commit.clone()),
            ("date", self.date.clone()),
            ("command", self.command.clone()),
        ];
        if !self.gpus.is_empty() {
            v.insert(1, ("gpu", self.gpus.join("; ")));
        }
        if let Some(s) = self.cpu_share {
            v.push(("cpu_share", format!("{s:.2}")));
        }
        v
    }
}

/// CPU seconds (user + system, all threads) this process has used, at nanosecond resolution
/// (`CLOCK_PROCESS_CPUTIME_ID`; 0 where the clock is missing). The tick counts of
/// /proc/self/stat (10 ms) are too coarse for a short measurement.
pub fn process_cpu_seconds() -> f64 {
    process_cpu_time().unwrap_or(0.0)
}

#[cfg(unix)]
fn process_cpu_time() -> Option<f64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call, which is all
    // clock_gettime needs; the clock id is a constant the platform defines.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

#[cfg(not(unix))]
fn process_cpu_time() -> Option<f64> {
    None
}

/// Wall and CPU nanoseconds spent inside timed regions so far ([`timed`]), process-wide.
static TIMED_WALL_NS: AtomicU64 = AtomicU64::new(0);
static TIMED_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// Runs `f` as a timed region: its wall time and the process CPU time used meanwhile are added
/// to the totals [`CpuShare`] reads, so that setup, plotting and single-threaded probes between
/// measurements do not count.
pub fn timed<T>(f: impl FnOnce() -> T) -> T {
    let (wall, cpu) = (std::time::Instant::now(), process_cpu_seconds());
    let out = f();
    let dw = wall.elapsed().as_secs_f64();
    let dc = (process_cpu_seconds() - cpu).max(0.0);
    TIMED_WALL_NS.fetch_add((dw * 1e9) as u64, Ordering::Relaxed);
    TIMED_CPU_NS.fetch_add((dc * 1e9) as u64, Ordering::Relaxed);
    out
}

fn timed_totals() -> (u64, u64) {
    (TIMED_WALL_NS.load(Ordering::Relaxed), TIMED_CPU_NS.load(Ordering::Relaxed))
}

/// Watches how much CPU the process gets while it measures: on a shared or oversubscribed
/// machine the share drops below 1 and timings are disturbed by other load.
#[derive(Debug, Clone, Copy)]
pub struct CpuShare {
    wall_ns: u64,
    cpu_ns: u64,
}

impl CpuShare {
    /// Starts watching.
    pub fn start() -> Self {
        let (wall_ns, cpu_ns) = timed_totals();
        Self { wall_ns, cpu_ns }
    }

    /// CPU time used over (wall time × rayon threads), both summed over the timed regions run
    /// since the start; about 1 when the process had its threads' CPUs to itself and kept them
    /// busy. `None` when nothing was timed.
    pub fn share(&self) -> Option<f64> {
        let (wall, cpu) = timed_totals();
        let wall = wall.saturating_sub(self.wall_ns) as f64;
        let cpu = cpu.saturating_sub(self.cpu_ns) as f64;
        (wall > 0.0).then(|| cpu / (wall * rayon::current_num_threads() as f64))
    }

    /// A warning line when the share is low.
    pub fn warning(&self) -> Option<String> {
        let s = self.share()?;
        (s < 0.75).then(|| {
            format!(
                "warning: the process used only {:.0}% of its {} threads' CPU time while timing: other load on \
                 this machine (or idle waiting) disturbs these timings",
                100.0 * s,
                rayon::current_num_threads()
            )
        })
    }
}

/// The CPU model name from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model") || l.starts_with("CPU part"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The commit of the working tree the tool runs in (or was built from), or "unknown".
pub fn git_commit() -> String {
    let try_in = |dir: &str| {
        std::process::Command::new("git")
            .args(["-C", dir, "rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    try_in(".").or_else(|| try_in(env!("CARGO_MANIFEST_DIR"))).unwrap_or_else(|| "unknown".into())
}

/// The command line, each argument quoted when it holds shell-special characters.
pub fn command_line() -> String {
    std::env::args().map(|a| shell_quote(&a)).collect::<Vec<_>>().join(" ")
}

fn shell_quote(a: &str) -> String {
    let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain { a.to_string() } else { format!("'{}'", a.replace('\'', "'\\''")) }
}

/// Now, UTC, as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Seconds since the Unix epoch as an ISO 8601 UTC timestamp (proleptic Gregorian calendar).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for all dates after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_400_000), "2026-11-23T02:13:20Z");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--lens=512,1024"), "--lens=512,1024");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
