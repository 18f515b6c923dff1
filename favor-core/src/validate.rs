//! Size arithmetic and allocation of user-sized buffers.
//!
//! Every element count that depends on a caller's sizes is formed here with checked arithmetic,
//! and every buffer of such a size is allocated fallibly, so a size that wraps or cannot be
//! allocated becomes a [`FavorError`] instead of a wrapped length, a panic or an abort.

use crate::{FavorError, Result};

/// Bytes of the widest element any backend keeps per counted element (the reference's f64).
/// Counts are capped so that a buffer of that many f64 is still a valid allocation request.
const WIDEST_ELEMENT: usize = 8;

/// The product of `dims`, the element count of argument `arg`; an error naming the dims when it
/// overflows `usize` or when that many f64 would exceed `isize::MAX` bytes.
pub fn checked_len(arg: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &x| acc.checked_mul(x))
        .filter(|n| n.checked_mul(WIDEST_ELEMENT).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| FavorError::SizeOverflow { arg, dims: dims_text(dims) })
}

fn dims_text(dims: &[usize]) -> String {
    dims.iter().map(usize::to_string).collect::<Vec<_>>().join("×")
}

/// An empty vector with room for `n` elements, or [`FavorError::OutOfMemory`] naming `arg` and
/// the size when the allocator refuses (never an abort).
pub fn try_with_capacity<T>(arg: &'static str, n: usize) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| FavorError::OutOfMemory {
        arg,
        elements: n,
        bytes: n.saturating_mul(size_of::<T>()),
    })?;
    Ok(v)
}

/// Asks once, fallibly, for a buffer of `dims` elements of `T` and frees it at once: the check
/// for buffers that code without an error path (a kernel, a per-head f64 function) allocates
/// later. It catches sizes no allocation of this process can hold; it reserves nothing.
pub fn check_allocatable<T>(arg: &'static str, dims: &[usize]) -> Result<()> {
    try_with_capacity::<T>(arg, checked_len(arg, dims)?).map(drop)
}

/// `n` zeros, allocated fallibly (see [`try_with_capacity`]).
pub fn try_zeroed<T: Copy + Default>(arg: &'static str, n: usize) -> Result<Vec<T>> {
    let mut v = try_with_capacity(arg, n)?;
    v.resize(n, T::default());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_wrap_or_exceed_isize_are_errors() {
        assert_eq!(checked_len("w", &[3, 4]), Ok(12));
        assert_eq!(checked_len("w", &[]), Ok(1));
        assert_eq!(
            checked_len("w", &[1 << 62, 4]),
            Err(FavorError::SizeOverflow { arg: "w", dims: "4611686018427387904×4".into() })
        );
        // Fits in usize, but not as f64 bytes.
        assert!(checked_len("w", &[1 << 61]).is_err());
        assert!(checked_len("w", &[1 << 59]).is_ok());
    }

    #[test]
    fn refused_allocations_are_errors() {
        // More bytes than isize::MAX: refused by the capacity check, before the allocator.
        let e = try_with_capacity::<f64>("w", usize::MAX / 4).unwrap_err();
        assert!(matches!(e, FavorError::OutOfMemory { arg: "w", elements, .. } if elements == usize::MAX / 4));
        assert_eq!(try_zeroed::<f32>("w", 3), Ok(vec![0.0; 3]));
    }
}
