//! Test-only CPU execution of the real kernel sources (`cuda/emu`, feature `emulator`): host
//! buffers stand in for device memory and each launch runs synchronously.

use crate::kernels::LaunchConfigExt;
use cudarc::driver::LaunchConfig;
use favor_core::{FavorError, Result};
use std::ffi::{CString, c_char, c_void};

unsafe extern "C" {
    fn favor_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: usize,
        params: *mut *mut c_void,
    ) -> i32;
}

/// Runs kernel `name` on the CPU.
///
/// # Safety
/// `params` must point to the kernel's arguments in order and type, and every pointer argument
/// must address host memory holding what the kernel reads or writes for `cfg`.
pub(crate) unsafe fn launch(name: &str, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
    let fail = |reason: String| FavorError::Backend { backend: "cuda-emulator", reason };
    let cname = CString::new(name).map_err(|e| fail(e.to_string()))?;
    let (grid, block) = cfg.dims();
    // SAFETY: forwarded from this function's contract; grid and block are 3-element arrays that
    // outlive the synchronous call.
    let rc = unsafe {
        favor_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            cfg.shared_mem_bytes as usize,
            params.as_mut_ptr(),
        )
    };
    match rc {
        0 => Ok(()),
        1 => Err(fail(format!("unknown kernel {name}"))),
        2 => Err(fail(format!("{name}: unsupported block shape {block:?}"))),
        _ => Err(fail(format!("{name}: threads of a block passed different numbers of __syncthreads"))),
    }
}

/// Guard elements on each side of an emulated buffer, filled with 0xFF bytes (NaN for the float
/// types): a kernel reading past a tail gets NaN into its results, one writing past it is
/// reported when the buffer is dropped.
const GUARD: usize = 64;

/// A host allocation standing in for device memory. Held as a raw pointer so that the emulated
/// kernels may write through addresses handed out by shared references.
pub(crate) struct HostBuf<T> {
    /// Start of the allocation (GUARD + len + GUARD elements).
    base: *mut T,
    len: usize,
}

// SAFETY: HostBuf owns its allocation like a Box<[T]>; the kernels that write through it run
// synchronously inside calls that hold the owning backend objects.
unsafe impl<T: Send> Send for HostBuf<T> {}
// SAFETY: as above; shared access only reads the address.
unsafe impl<T: Sync> Sync for HostBuf<T> {}

impl<T> std::fmt::Debug for HostBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBuf({} elements)", self.len)
    }
}

impl<T: bytemuck::Pod> HostBuf<T> {
    pub(crate) fn from_slice(v: &[T]) -> Self {
        let mut all = vec![T::zeroed(); v.len() + 2 * GUARD];
        bytemuck::cast_slice_mut::<T, u8>(&mut all).fill(0xFF);
        all[GUARD..GUARD + v.len()].copy_from_slice(v);
        let len = v.len();
        Self { base: Box::into_raw(all.into_boxed_slice()) as *mut T, len }
    }

    pub(crate) fn copy_to(&self, dst: &mut [T]) {
        dst.copy_from_slice(&self.all()[GUARD..GUARD + dst.len()]);
    }

    fn all(&self) -> &[T] {
        // SAFETY: base owns GUARD + len + GUARD initialised elements (from_slice); no kernel runs
        // concurrently (emulated launches are synchronous).
        unsafe { std::slice::from_raw_parts(self.base, self.len + 2 * GUARD) }
    }
}

impl<T> HostBuf<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn addr(&self) -> u64 {
        // GUARD elements into the allocation (in bounds: the allocation has 2·GUARD + len).
        self.base.wrapping_add(GUARD) as u64
    }
}

impl<T> Drop for HostBuf<T> {
    fn drop(&mut self) {
        let n = self.len + 2 * GUARD;
        // SAFETY: base/n came from Box::into_raw of a boxed slice of exactly n elements.
        let all = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.base, n)) };
        let bytes_ok = |s: &[T]| {
            // SAFETY: the elements are Pod-initialised memory (every HostBuf is built by
            // from_slice with T: Pod), so viewing them as bytes is sound.
            let b = unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) };
            b.iter().all(|&x| x == 0xFF)
        };
        let intact = bytes_ok(&all[..GUARD]) && bytes_ok(&all[GUARD + self.len..]);
        if !intact && !std::thread::panicking() {
            panic!("emulated kernel wrote outside a buffer of {} elements", self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "wrote outside a buffer of 5 elements")]
    fn guard_catches_a_write_past_the_end() {
        let b = HostBuf::from_slice(&[0.0f32; 5]);
        // SAFETY: index 5 is inside the trailing guard zone of the allocation.
        unsafe { (b.addr() as *mut f32).add(5).write(1.0) };
        drop(b);
    }

    #[test]
    fn guards_read_as_nan_and_data_round_trips() {
        let b = HostBuf::from_slice(&[1.0f32, 2.0, 3.0]);
        // SAFETY: index −1 is inside the leading guard zone of the allocation.
        let before = unsafe { (b.addr() as *const f32).sub(1).read() };
        assert!(before.is_nan());
        let mut out = [0.0f32; 3];
        b.copy_to(&mut out);
        assert_eq!(out, [1.0, 2.0, 3.0]);
    }
}
