//! Size checks made before allocating: a shape read from a file or given on the command line can
//! describe more memory than the machine has (or more than a `usize` holds), and allocating it
//! would abort the process instead of reporting the mistake.

use std::fmt;

use crate::error::BenchError;

/// A buffer (or set of buffers) that would not fit: what it is, how many bytes it needs (`None`
/// when the count overflows 128 bits) and the limit it was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    /// What needs the memory.
    pub what: String,
    /// Bytes needed, `None` when not even representable.
    pub bytes: Option<u128>,
    /// The limit in bytes.
    pub limit: usize,
    /// Where the limit comes from ("available memory", "memory budget", ...).
    pub limit_name: &'static str,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let need = match self.bytes {
            Some(b) => format!("{} ({b} bytes)", human(b)),
            None => "more than 2^128 bytes".into(),
        };
        write!(
            f,
            "{} needs {need}, more than the {} of {} ({} bytes)",
            self.what,
            self.limit_name,
            human(self.limit as u128),
            self.limit
        )
    }
}

impl std::error::Error for TooLarge {}

impl From<TooLarge> for BenchError {
    fn from(e: TooLarge) -> Self {
        BenchError(e.to_string())
    }
}

fn human(b: u128) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut x = b as f64 / 1024.0;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    format!("{x:.2} {}", UNITS[unit])
}

/// `elem_bytes` × the product of `dims`, or `None` when it overflows.
pub fn bytes_of(dims: &[usize], elem_bytes: usize) -> Option<u128> {
    dims.iter().try_fold(elem_bytes as u128, |acc, &d| acc.checked_mul(d as u128))
}

/// Sum of byte counts (`None` when any is `None` or the sum overflows).
pub fn total(parts: &[Option<u128>]) -> Option<u128> {
    parts.iter().try_fold(0u128, |acc, p| acc.checked_add((*p)?))
}

/// The memory this process may plan to use: what the kernel reports as available now
/// (`MemAvailable`), or 16 GiB where that is unknown.
pub fn memory_limit() -> usize {
    let avail_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<usize>().ok())
    });
    avail_kib.map_or(16usize << 30, |k| k.saturating_mul(1024))
}

/// Ok when `bytes` is known and at most `limit`.
pub fn check(
    what: impl Into<String>,
    bytes: Option<u128>,
    limit: usize,
    limit_name: &'static str,
) -> Result<usize, TooLarge> {
    match bytes {
        Some(b) if b <= limit as u128 => Ok(b as usize),
        _ => Err(TooLarge { what: what.into(), bytes, limit, limit_name }),
    }
}

/// [`check`] against [`memory_limit`].
pub fn check_available(what: impl Into<String>, bytes: Option<u128>) -> Result<usize, TooLarge> {
    check(what, bytes, memory_limit(), "memory available")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_reported_not_wrapped() {
        // 2^61 × 8 × 4 bytes wraps to 0 in usize arithmetic.
        let b = bytes_of(&[1 << 61, 8], 4);
        assert_eq!(b, Some(1u128 << 66));
        assert_eq!(bytes_of(&[usize::MAX, usize::MAX, usize::MAX], 4), None);
        let e = check("W", b, 1 << 30, "memory available").unwrap_err().to_string();
        assert!(e.contains("W needs 64.00 EiB") && e.contains("1.00 GiB"), "{e}");
        assert_eq!(check("x", Some(10), 10, "limit"), Ok(10));
        assert_eq!(total(&[Some(1), None]), None);
    }
}
