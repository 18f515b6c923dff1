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
        3 => Err(fail(format!("{name}: threads of a block passed different numbers of __syncthreads"))),
        4 => Err(fail(format!("{name}: a warp shuffle named or read a lane outside the block or its mask"))),
        5 => Err(fail(format!("{name}: {} threads per block exceed the kernel's __launch_bounds__", block[0]))),
        6 => Err(fail(format!(
            "{name}: {} bytes of dynamic shared memory plus the kernel's static shared memory exceed 48 KB",
            cfg.shared_mem_bytes
        ))),
        _ => Err(fail(format!("{name}: unknown emulator result {rc}"))),
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

    /// Elements `start..start + dst.len()` (the caller checked the range).
    pub(crate) fn copy_range_to(&self, start: usize, dst: &mut [T]) {
        dst.copy_from_slice(&self.all()[GUARD + start..GUARD + start + dst.len()]);
    }

    /// Overwrites elements `start..start + src.len()` (the caller checked the range).
    pub(crate) fn copy_range_from(&mut self, start: usize, src: &[T]) {
        let n = self.len + 2 * GUARD;
        // SAFETY: base owns n initialised elements (from_slice) and `&mut self` excludes other
        // access; no kernel runs concurrently (emulated launches are synchronous).
        let all = unsafe { std::slice::from_raw_parts_mut(self.base, n) };
        all[GUARD + start..GUARD + start + src.len()].copy_from_slice(src);
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

    fn cfg(blocks: u32, threads: u32, smem: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
    }

    /// Launches a kernel whose arguments are all buffer addresses.
    fn run_on(name: &str, c: LaunchConfig, bufs: &[u64]) -> Result<()> {
        let mut addrs = bufs.to_vec();
        let mut params: Vec<*mut c_void> = addrs.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        // SAFETY: the test kernels take only pointers, one per buffer, and each buffer holds an
        // element per block (or per thread for the inputs), as the callers size them. The real
        // kernels get no arguments only in launches that are rejected before the kernel runs
        // (the launcher checks the shape, bounds and shared memory first).
        unsafe { launch(name, c, &mut params) }
    }

    fn message(r: Result<()>) -> String {
        match r {
            Err(FavorError::Backend { reason, .. }) => reason,
            other => panic!("expected a backend error, got {other:?}"),
        }
    }

    #[test]
    fn static_shared_memory_is_poisoned_before_every_block() {
        let out = HostBuf::from_slice(&[0.0f32; 6]);
        run_on("favor_emu_test_static_smem", cfg(6, 32, 0), &[out.addr()]).expect("launch");
        let mut got = [0.0f32; 6];
        out.copy_to(&mut got);
        // Without poisoning the blocks after the first would read the 1.0 a previous one left.
        assert!(got.iter().all(|x| x.is_nan()), "{got:?}");
    }

    #[test]
    fn blocks_run_in_a_seeded_random_order() {
        let order = || {
            let out = HostBuf::from_slice(&[u32::MAX; 64]);
            let counter = HostBuf::from_slice(&[0u32]);
            run_on("favor_emu_test_block_order", cfg(64, 32, 0), &[out.addr(), counter.addr()]).expect("launch");
            let mut got = [0u32; 64];
            out.copy_to(&mut got);
            got
        };
        let first = order();
        let mut sorted = first;
        sorted.sort_unstable();
        assert_eq!(sorted.to_vec(), (0..64).collect::<Vec<u32>>(), "every block runs once");
        assert_ne!(first, sorted, "blocks ran in index order");
        assert_eq!(first, order(), "the same launch runs in the same order");
    }

    #[test]
    fn launch_bounds_are_enforced() {
        let out = HostBuf::from_slice(&[0.0f32; 2]);
        run_on("favor_emu_test_bounded", cfg(2, 64, 0), &[out.addr()]).expect("within the bound");
        let e = message(run_on("favor_emu_test_bounded", cfg(2, 96, 0), &[out.addr()]));
        assert!(e.contains("__launch_bounds__"), "{e}");
        // A real kernel: the causal scan is bounded to 256 threads.
        let e = message(run_on("favor_causal_scan_f32", cfg(1, 512, 0), &[]));
        assert!(e.contains("__launch_bounds__"), "{e}");
    }

    #[test]
    fn shared_memory_limit_counts_static_and_dynamic() {
        let out = HostBuf::from_slice(&[0.0f32; 1]);
        run_on("favor_emu_test_big_static", cfg(1, 64, 16 * 1024), &[out.addr()]).expect("32 + 16 KB fit");
        let e = message(run_on("favor_emu_test_big_static", cfg(1, 64, 16 * 1024 + 4), &[out.addr()]));
        assert!(e.contains("exceed 48 KB"), "{e}");
        // Real kernels: the stabiliser's static arrays plus 48 KB of dynamic memory, and a
        // dynamic request above the limit alone.
        let e = message(run_on("favor_stabiliser_f32", cfg(1, 256, 48 * 1024), &[]));
        assert!(e.contains("exceed 48 KB"), "{e}");
        let e = message(run_on("favor_features_f32", cfg(1, 128, 48 * 1024 + 4), &[]));
        assert!(e.contains("exceed 48 KB"), "{e}");
    }

    #[test]
    fn shuffle_past_the_end_of_a_partial_warp_is_caught() {
        // 48 threads: the second warp has 16 lanes, and the xor butterfly reads lanes 16..31.
        let x = HostBuf::from_slice(&[1.0f32; 48]);
        let out = HostBuf::from_slice(&[0.0f32; 2]);
        let e = message(run_on("favor_emu_test_xor_reduce", cfg(1, 48, 0), &[x.addr(), out.addr()]));
        assert!(e.contains("shuffle"), "{e}");
        // Whole warps are fine.
        let x = HostBuf::from_slice(&[1.0f32; 64]);
        run_on("favor_emu_test_xor_reduce", cfg(1, 64, 0), &[x.addr(), out.addr()]).expect("whole warps");
        let mut got = [0.0f32; 2];
        out.copy_to(&mut got);
        assert_eq!(got, [32.0, 32.0]);
    }

    #[test]
    fn cotangent_is_exact_on_partial_warps() {
        // favor_cotangent_f32 with blocks that end in a partial warp (and several rows per
        // warp): before its reduction used live-lane masks it read lanes past the block.
        let (rows, dv) = (7usize, 45usize);
        let g: Vec<f32> = (0..rows * dv).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect();
        let o1: Vec<f32> = (0..rows * (dv + 1)).map(|i| ((i * 104_729) % 31) as f32 / 13.0 + 0.5).collect();
        for threads in [48u32, 80, 33, 1] {
            let (gb, ob) = (HostBuf::from_slice(&g), HostBuf::from_slice(&o1));
            let g1 = HostBuf::from_slice(&vec![0.0f32; rows * (dv + 1)]);
            let (mut rows_i, mut dv_i, mut delta) = (rows as i64, dv as i32, 0.0f32);
            let (mut gp, mut op, mut g1p, mut invariant) = (gb.addr(), ob.addr(), g1.addr(), 0u64);
            let (mut first_seen, mut len_i, mut risk) = (0u64, rows as i32, 0u64);
            let mut params: Vec<*mut c_void> = vec![
                &mut gp as *mut u64 as *mut c_void,
                &mut op as *mut u64 as *mut c_void,
                &mut rows_i as *mut i64 as *mut c_void,
                &mut dv_i as *mut i32 as *mut c_void,
                &mut delta as *mut f32 as *mut c_void,
                &mut g1p as *mut u64 as *mut c_void,
                &mut invariant as *mut u64 as *mut c_void,
                &mut first_seen as *mut u64 as *mut c_void,
                &mut len_i as *mut i32 as *mut c_void,
                &mut risk as *mut u64 as *mut c_void,
            ];
            // SAFETY: (const float* g [rows·dv], const float* o1 [rows·(dv+1)], i64 rows, int dv,
            // float delta, float* g1 [rows·(dv+1)], u8* invariant = null, const int* first_seen =
            // null, int len, int* risk = null), all buffers of those sizes.
            unsafe { launch("favor_cotangent_f32", cfg(2, threads, 0), &mut params) }
                .unwrap_or_else(|e| panic!("{threads} threads: {e}"));
            let mut got = vec![0.0f32; rows * (dv + 1)];
            g1.copy_to(&mut got);
            for r in 0..rows {
                let den = o1[r * (dv + 1) + dv] as f64;
                let dot: f64 = (0..dv).map(|e| g[r * dv + e] as f64 * (o1[r * (dv + 1) + e] as f64 / den)).sum();
                let want = -dot / den;
                let have = got[r * (dv + 1) + dv] as f64;
                assert!(
                    (have - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{threads} threads row {r}: {have} vs {want}"
                );
                for e in 0..dv {
                    let w = g[r * dv + e] as f64 / den;
                    assert!((got[r * (dv + 1) + e] as f64 - w).abs() <= 1e-6 * w.abs().max(1.0));
                }
            }
        }
    }

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
