//! The embedded kernels: fatbins from `cuda/*.cu`, their entry points, and one `launch_*`
//! function per kernel. Each launch function checks that every buffer holds the elements the
//! kernel will touch, then holds the crate's only kind of `unsafe` launch.

// Kernel signatures are long; the launch functions mirror them one to one on purpose.
#![allow(clippy::too_many_arguments)]

use crate::memory::DevPtr;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use favor_core::{DType, FavorError, Result};
use std::collections::HashMap;
use std::sync::Arc;

include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));

/// True when the crate was compiled with nvcc (the fatbins are real).
pub fn kernels_built() -> bool {
    !cfg!(favor_no_kernels)
}

/// Every `extern "C"` entry point of `cuda/*.cu`, by file.
pub const KERNEL_NAMES: &[(&str, &[&str])] = &[
    (
        "convert",
        &[
            "favor_pack_f32",
            "favor_pack_f16",
            "favor_pack_bf16",
            "favor_unpack_f32",
            "favor_unpack_f16",
            "favor_unpack_bf16",
            "favor_normalize_f32",
            "favor_normalize_f16",
            "favor_normalize_bf16",
            "favor_cotangent_f32",
            "favor_flag_wide_f32",
        ],
    ),
    ("features", &["favor_features_f32", "favor_features_bwd_f32", "favor_stabiliser_f32"]),
    ("bidirectional", &["favor_kv_reduce_f32", "favor_kv_combine_f32", "favor_kv_apply_f32"]),
    ("causal", &["favor_causal_scan_f32", "favor_state_c_update_f32"]),
];

/// Rows per block of the feature kernels (`TOK` in features.cu).
pub(crate) const FEATURE_ROWS: usize = 8;
/// Threads per block of the feature kernels.
pub(crate) const FEATURE_THREADS: usize = 128;
/// Rows per chunk of the causal scan (`CHUNK` in causal.cu).
pub(crate) const SCAN_CHUNK: usize = 32;
/// Threads per block of the causal scan (`SCAN_THREADS` in causal.cu).
pub(crate) const SCAN_THREADS: usize = 256;
/// Threads of the stabiliser kernel (`STAB_THREADS` in features.cu).
const STAB_THREADS: u32 = 256;
/// Rows per block of `favor_kv_apply_f32` (`APPLY_ROWS` in bidirectional.cu).
const APPLY_ROWS: usize = 16;
/// Dynamic shared memory available without opting in (sm_80 and sm_90 both allow 48 KB).
pub(crate) const SMEM_LIMIT: usize = 48 * 1024;

pub(crate) fn driver_err(e: cudarc::driver::DriverError) -> FavorError {
    FavorError::Backend { backend: "cuda", reason: e.to_string() }
}

fn internal(what: String) -> FavorError {
    FavorError::Backend { backend: "cuda", reason: format!("internal size check failed: {what}") }
}

/// Where the rows of a caller's tensor lie for the kernels that read or write it (pack, unpack,
/// normalize): row r = (b·heads + h)·len + t starts at element b·batch + (h / group)·head +
/// t·token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowMap {
    pub len: usize,
    pub heads: usize,
    /// Query heads per key/value head when packing K or V for every query head (1 otherwise):
    /// row head h reads the tensor's head h / group.
    pub group: usize,
    pub strides: favor_core::Strides,
    /// Elements the rows span (one past the last addressed element).
    pub extent: usize,
}

impl RowMap {
    /// `rows` contiguous rows of `n` elements.
    pub(crate) fn contiguous(rows: usize, n: usize) -> RowMap {
        let whole = rows * n;
        RowMap {
            len: rows.max(1),
            heads: 1,
            group: 1,
            strides: favor_core::Strides { batch: whole, head: whole, token: n },
            extent: whole,
        }
    }

    /// Tensor `arg` of a validated call, in its layout.
    pub(crate) fn of(p: &favor_core::Problem<'_>, arg: favor_core::TensorArg) -> Result<RowMap> {
        let (dims, strides) = (p.dims(arg), p.strides(arg));
        let extent = favor_core::layout::extent(arg.name(), dims, strides)?;
        Ok(RowMap { len: dims.rows, heads: dims.heads, group: 1, strides, extent })
    }

    /// K or V of a validated call read once per query head: a grouped key/value head is
    /// packed for each query head of its group.
    pub(crate) fn per_query_head(p: &favor_core::Problem<'_>, arg: favor_core::TensorArg) -> Result<RowMap> {
        let m = RowMap::of(p, arg)?;
        Ok(RowMap { heads: p.shape.heads, group: p.shape.group(), ..m })
    }

    /// The rows of head `bh` alone (for writing one head): its base offset and map.
    pub(crate) fn head(&self, bh: usize, width: usize) -> (usize, RowMap) {
        let base = self.strides.head_base(self.heads, bh);
        let extent = (self.len - 1) * self.strides.token + width;
        let strides = favor_core::Strides { batch: 0, head: 0, token: self.strides.token };
        (base, RowMap { len: self.len, heads: 1, group: 1, strides, extent })
    }

    fn args(&self) -> Result<[i64; 6]> {
        let i = |x: usize| i64::try_from(x).map_err(|_| internal(format!("row map value {x} exceeds i64")));
        let s = self.strides;
        Ok([i(self.len)?, i(self.heads)?, i(self.group.max(1))?, i(s.batch)?, i(s.head)?, i(s.token)?])
    }
}

/// Fails unless `buf` holds at least `n` elements.
fn need(buf: DevPtr, n: usize, name: &str) -> Result<u64> {
    if buf.len < n {
        return Err(internal(format!("{name} holds {} elements, the kernel needs {n}", buf.len)));
    }
    Ok(buf.ptr)
}

fn opt(buf: Option<DevPtr>, n: usize, name: &str) -> Result<u64> {
    buf.map_or(Ok(0), |b| need(b, n, name))
}

fn int(x: usize, name: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| internal(format!("{name} = {x} exceeds i32")))
}

fn grid_1d(total: usize, threads: u32) -> LaunchConfig {
    let blocks = total.div_ceil(threads as usize).clamp(1, 65_535 * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Grid and block sizes as arrays (for the emulator).
#[cfg(feature = "emulator")]
pub(crate) trait LaunchConfigExt {
    fn dims(&self) -> ([u32; 3], [u32; 3]);
}

#[cfg(feature = "emulator")]
impl LaunchConfigExt for LaunchConfig {
    fn dims(&self) -> ([u32; 3], [u32; 3]) {
        let (g, b) = (self.grid_dim, self.block_dim);
        ([g.0, g.1, g.2], [b.0, b.1, b.2])
    }
}

/// Feature-map kinds, mirrored from `FeatureKind` in cuda/common.cuh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FeatureKind {
    Positive = 0,
    Hyperbolic = 1,
    Trigonometric = 2,
    Relu = 3,
    EluPlusOne = 4,
    Softplus = 5,
}

impl FeatureKind {
    pub(crate) fn is_exp(self) -> bool {
        matches!(self, FeatureKind::Positive | FeatureKind::Hyperbolic | FeatureKind::Trigonometric)
    }
    /// Features per projection row (2 for the ± / sin-cos maps).
    pub(crate) fn per_row(self) -> usize {
        if matches!(self, FeatureKind::Hyperbolic | FeatureKind::Trigonometric) { 2 } else { 1 }
    }
}

/// How `favor_features_f32` obtains the stabiliser c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StabMode {
    /// c = the row's own log-scale (queries).
    Own = 0,
    /// c read from `c_in` (keys).
    Given = 1,
    /// Only write the log-scales to `c_out`.
    LogScaleOnly = 2,
}

/// The feature map's parameters as the kernels take them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MapArgs {
    pub kind: FeatureKind,
    /// Projection W (m×d), or `None` for the identity (then m = d).
    pub w: Option<DevPtr>,
    pub m: usize,
    pub d: usize,
    pub in_scale: f32,
    /// h = hcoef·‖x‖² (= ‖x̃‖²/2) for the exponential maps, in f64.
    pub hcoef: f64,
    /// ε for the exponential maps, κ for the generalized ones.
    pub eps: f32,
}

/// Shared memory of the per-row scalars of a feature block (`RowScalars` in features.cu):
/// TOK doubles and 3·TOK floats.
const ROW_SCALARS_SMEM: usize = 8 * FEATURE_ROWS + 4 * 3 * FEATURE_ROWS;

impl MapArgs {
    pub(crate) fn features(&self) -> usize {
        self.m * self.kind.per_row()
    }
    pub(crate) fn forward_smem(&self) -> usize {
        ROW_SCALARS_SMEM + 4 * (FEATURE_ROWS * self.d + FEATURE_ROWS * FEATURE_THREADS)
    }
    pub(crate) fn backward_smem(&self) -> usize {
        ROW_SCALARS_SMEM
            + 4 * (FEATURE_ROWS * self.d + FEATURE_ROWS * self.m + FEATURE_ROWS * FEATURE_THREADS + 3 * FEATURE_ROWS)
    }
}

/// Tiny-denominator tracking of one call: per (batch, head), the first row that sees a kept key
/// (`len` where none does) and the flag the kernels set when a row's denominator is at risk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RiskArgs {
    pub first_seen: DevPtr,
    pub len: usize,
    pub flags: DevPtr,
}

/// (first_seen, len, flags) kernel arguments; null pointers (no tracking) without `risk`.
fn risk_args(risk: Option<RiskArgs>, rows: usize) -> Result<(u64, i32, u64)> {
    let Some(r) = risk else { return Ok((0, 1, 0)) };
    if r.len == 0 || !rows.is_multiple_of(r.len) {
        return Err(internal(format!("risk tracking: len {} does not divide {rows} rows", r.len)));
    }
    let heads = rows / r.len;
    Ok((need(r.first_seen, heads, "risk first_seen")?, int(r.len, "len")?, need(r.flags, heads, "risk flags")?))
}

/// Key padding mask as the kernels read it: `[B, L]` bytes, with the head count to map rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaskArgs {
    pub keep: DevPtr,
    pub heads: usize,
}

/// The loaded entry points of one context, by name.
#[derive(Debug, Clone)]
pub(crate) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    /// Loads every fatbin into `ctx` and looks up every entry point.
    pub(crate) fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let mut functions = HashMap::new();
        for (unit, bytes) in FATBINS {
            if bytes.is_empty() {
                return Err(FavorError::NotAvailable {
                    backend: "cuda",
                    reason: format!("kernel file {unit}.cu was not compiled (favor-cuda built without nvcc)"),
                });
            }
            let module = ctx.load_module(Ptx::from_binary(bytes.to_vec())).map_err(driver_err)?;
            let names = KERNEL_NAMES
                .iter()
                .find(|(u, _)| u == unit)
                .map(|(_, n)| *n)
                .ok_or_else(|| internal(format!("{unit}.cu is not listed in KERNEL_NAMES")))?;
            for name in names {
                functions.insert(*name, module.load_function(name).map_err(driver_err)?);
            }
        }
        Ok(Self { functions })
    }
}

fn per_dtype_name(op: &str, dtype: DType) -> &'static str {
    match (op, dtype) {
        ("pack", DType::F32) => "favor_pack_f32",
        ("pack", DType::F16) => "favor_pack_f16",
        ("pack", DType::Bf16) => "favor_pack_bf16",
        ("unpack", DType::F32) => "favor_unpack_f32",
        ("unpack", DType::F16) => "favor_unpack_f16",
        ("unpack", DType::Bf16) => "favor_unpack_bf16",
        ("normalize", DType::F32) => "favor_normalize_f32",
        ("normalize", DType::F16) => "favor_normalize_f16",
        _ => "favor_normalize_bf16",
    }
}

/// Where kernels run: a CUDA stream, or (tests only) the CPU emulator of `cuda/emu`, which runs
/// the same `.cu` sources with one OS thread per CUDA thread.
pub(crate) enum Exec {
    Cuda {
        stream: Arc<CudaStream>,
        kernels: Kernels,
    },
    #[cfg(feature = "emulator")]
    Emulator,
}

/// One kernel argument, as the kernel's C signature takes it.
#[derive(Debug, Clone, Copy)]
enum Arg {
    U64(u64),
    I64(i64),
    I32(i32),
    F32(f32),
    F64(f64),
}

trait KernelArg {
    fn to_arg(&self) -> Arg;
}
impl KernelArg for u64 {
    fn to_arg(&self) -> Arg {
        Arg::U64(*self)
    }
}
impl KernelArg for i64 {
    fn to_arg(&self) -> Arg {
        Arg::I64(*self)
    }
}
impl KernelArg for i32 {
    fn to_arg(&self) -> Arg {
        Arg::I32(*self)
    }
}
impl KernelArg for f32 {
    fn to_arg(&self) -> Arg {
        Arg::F32(*self)
    }
}
impl KernelArg for f64 {
    fn to_arg(&self) -> Arg {
        Arg::F64(*self)
    }
}

/// Arguments of one launch, collected in the kernel's parameter order.
struct Launch<'a> {
    exec: &'a Exec,
    name: &'static str,
    args: Vec<Arg>,
}

impl Launch<'_> {
    fn arg<T: KernelArg>(&mut self, v: &T) -> &mut Self {
        self.args.push(v.to_arg());
        self
    }

    /// Enqueues the kernel.
    ///
    /// # Safety
    /// The arguments must match the kernel's C signature in order and type, every pointer must
    /// address memory of this context holding what the kernel reads or writes for `cfg`, and the
    /// dynamic shared memory must be what the kernel carves.
    unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        match self.exec {
            Exec::Cuda { stream, kernels } => {
                let f = kernels
                    .functions
                    .get(self.name)
                    .ok_or_else(|| internal(format!("kernel {} not loaded", self.name)))?;
                let mut b = stream.launch_builder(f);
                for a in &self.args {
                    match a {
                        Arg::U64(v) => b.arg(v),
                        Arg::I64(v) => b.arg(v),
                        Arg::I32(v) => b.arg(v),
                        Arg::F32(v) => b.arg(v),
                        Arg::F64(v) => b.arg(v),
                    };
                }
                // SAFETY: forwarded from this function's contract.
                unsafe { b.launch(cfg) }.map_err(driver_err)?;
                Ok(())
            }
            #[cfg(feature = "emulator")]
            Exec::Emulator => {
                let mut params: Vec<*mut std::ffi::c_void> = self
                    .args
                    .iter_mut()
                    .map(|a| match a {
                        Arg::U64(v) => v as *mut u64 as *mut std::ffi::c_void,
                        Arg::I64(v) => v as *mut i64 as *mut std::ffi::c_void,
                        Arg::I32(v) => v as *mut i32 as *mut std::ffi::c_void,
                        Arg::F32(v) => v as *mut f32 as *mut std::ffi::c_void,
                        Arg::F64(v) => v as *mut f64 as *mut std::ffi::c_void,
                    })
                    .collect();
                // SAFETY: forwarded from this function's contract; in emulation every pointer is
                // a host address owned by the caller for the duration of the (synchronous) call.
                unsafe { crate::emulator::launch(self.name, cfg, &mut params) }
            }
        }
    }
}

impl Exec {
    fn builder(&self, name: &'static str) -> Launch<'_> {
        Launch { exec: self, name, args: Vec::with_capacity(16) }
    }

    /// `favor_pack_<dtype>(src, rows, n, dst, ld, ones, map…)`: dst (fp32, rows × ld) ← the rows
    /// of src (dtype, n per row, where `map` puts them), plus a ones column at n when `ones`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_pack(
        &self,
        dtype: DType,
        src: DevPtr,
        map: RowMap,
        rows: usize,
        n: usize,
        dst: DevPtr,
        ld: usize,
        ones: bool,
    ) -> Result<()> {
        let width = n + usize::from(ones);
        if ld < width || map.len * map.heads == 0 || !rows.is_multiple_of(map.len * map.heads) {
            return Err(internal(format!("pack ld {ld} < width {width} or rows {rows} not whole heads of {map:?}")));
        }
        let src = need(src, map.extent, "pack src")?;
        let dst = need(dst, rows * ld, "pack dst")?;
        let (rows_i, n_i, ld_i, ones_i) = (rows as i64, int(n, "n")?, int(ld, "ld")?, i32::from(ones));
        let mut b = self.builder(per_dtype_name("pack", dtype));
        b.arg(&src).arg(&rows_i).arg(&n_i).arg(&dst).arg(&ld_i).arg(&ones_i);
        for a in map.args()? {
            b.arg(&a);
        }
        // SAFETY: (const T* src, i64 rows, int n, float* dst [rows·ld], int ld, int ones, i64 len,
        // i64 heads, i64 group, i64 bs, i64 hs, i64 ts); the rows `map` addresses end within its
        // extent (validated by the layout checks; a group reads heads below heads / group), which
        // src holds; dst's size was checked above; T matches `dtype` (the caller's tensor dtype).
        unsafe { b.launch(grid_1d(rows * width, 256)) }?;
        Ok(())
    }

    /// `favor_unpack_<dtype>(src, ld, rows, n, dst, sums, map…)`: the rows of dst (dtype, n per
    /// row, where `map` puts them) ← src (fp32, rows·sums × ld), each the sum of `sums`
    /// consecutive heads' rows (a key/value head's gradient over its query heads; 1: a copy).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_unpack(
        &self,
        dtype: DType,
        src: DevPtr,
        ld: usize,
        rows: usize,
        n: usize,
        dst: DevPtr,
        map: RowMap,
        sums: usize,
    ) -> Result<()> {
        if ld < n
            || sums == 0
            || map.group != 1
            || map.len * map.heads == 0
            || !rows.is_multiple_of(map.len * map.heads)
        {
            return Err(internal(format!(
                "unpack ld {ld} < n {n}, sums {sums} or rows {rows} not whole heads of {map:?}"
            )));
        }
        let src = need(src, rows * sums * ld, "unpack src")?;
        let dst = need(dst, map.extent, "unpack dst")?;
        let (ld_i, rows_i, n_i, sums_i) = (int(ld, "ld")?, rows as i64, int(n, "n")?, int(sums, "sums")?);
        let mut b = self.builder(per_dtype_name("unpack", dtype));
        b.arg(&src).arg(&ld_i).arg(&rows_i).arg(&n_i).arg(&dst).arg(&sums_i);
        for a in map.args()? {
            b.arg(&a);
        }
        // SAFETY: (const float* src [rows·sums·ld], int ld, i64 rows, int n, T* dst, int sums,
        // i64 len, i64 heads, i64 group = 1, i64 bs, i64 hs, i64 ts); src's size was checked
        // above, the rows `map` addresses end within its extent, which dst holds; T matches
        // `dtype`.
        unsafe { b.launch(grid_1d(rows * n, 256)) }?;
        Ok(())
    }

    /// `favor_normalize_<dtype>(o1, rows, dv, delta, out, r_out, first_seen, len, risk)`:
    /// out = N / guard(R); with `risk`, heads with a row at risk are flagged (see [`RiskArgs`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_normalize(
        &self,
        dtype: DType,
        o1: DevPtr,
        rows: usize,
        dv: usize,
        delta: f32,
        out: DevPtr,
        out_map: RowMap,
        r_out: Option<DevPtr>,
        risk: Option<RiskArgs>,
    ) -> Result<()> {
        if out_map.len * out_map.heads == 0 || !rows.is_multiple_of(out_map.len * out_map.heads) {
            return Err(internal(format!("normalize rows {rows} not whole heads of {out_map:?}")));
        }
        let o1 = need(o1, rows * (dv + 1), "normalize o1")?;
        let out = need(out, out_map.extent, "normalize out")?;
        let r_out = opt(r_out, rows, "normalize r_out")?;
        let (first_seen, len, flags) = risk_args(risk, rows)?;
        let (rows_i, dv_i) = (rows as i64, int(dv, "dv")?);
        let mut b = self.builder(per_dtype_name("normalize", dtype));
        b.arg(&o1).arg(&rows_i).arg(&dv_i).arg(&delta).arg(&out).arg(&r_out);
        b.arg(&first_seen).arg(&len).arg(&flags);
        for a in out_map.args()? {
            b.arg(&a);
        }
        // SAFETY: (const float* o1 [rows·(dv+1)], i64 rows, int dv, float delta, T* out, float*
        // r_out [rows] or null, const int* first_seen [rows/len] or null, int len ≥ 1 dividing
        // rows, int* risk [rows/len] or null, i64 out_len, i64 heads, i64 group, i64 bs, i64 hs,
        // i64 ts);
        // sizes checked above (out: the extent of the rows `out_map` addresses), T matches `dtype`.
        unsafe { b.launch(grid_1d(rows * dv, 256)) }?;
        Ok(())
    }

    /// `favor_flag_wide_f32(x, rows, n, len, lo, hi, flags)`: flags the heads of `risk` with a
    /// row of `x` (rows × n, contiguous) whose largest |x| is non-finite, beyond `hi`, or
    /// non-zero and below `lo`.
    pub(crate) fn launch_flag_wide(
        &self,
        x: DevPtr,
        rows: usize,
        n: usize,
        (lo, hi): (f32, f32),
        risk: RiskArgs,
    ) -> Result<()> {
        let x = need(x, rows * n, "flag_wide x")?;
        let (_, len, flags) = risk_args(Some(risk), rows)?;
        let (rows_i, n_i) = (rows as i64, int(n, "n")?);
        let mut b = self.builder("favor_flag_wide_f32");
        b.arg(&x).arg(&rows_i).arg(&n_i).arg(&len).arg(&lo).arg(&hi).arg(&flags);
        // SAFETY: (const float* x [rows·n], i64 rows, int n, int len ≥ 1 dividing rows, float lo,
        // float hi, int* flags [rows/len]); sizes checked above.
        unsafe { b.launch(grid_1d(rows, 128)) }?;
        Ok(())
    }

    /// `favor_cotangent_f32(g, o1, rows, dv, delta, g1, invariant, first_seen, len, risk)`:
    /// G1 = [G/R, −<G, out>/R], (when given) one byte per row: 1 where the guard did not fire,
    /// and (with `risk`) the heads with a row at risk flagged.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_cotangent(
        &self,
        g: DevPtr,
        o1: DevPtr,
        rows: usize,
        dv: usize,
        delta: f32,
        g1: DevPtr,
        invariant: Option<DevPtr>,
        risk: Option<RiskArgs>,
    ) -> Result<()> {
        let g = need(g, rows * dv, "cotangent g")?;
        let o1 = need(o1, rows * (dv + 1), "cotangent o1")?;
        let g1 = need(g1, rows * (dv + 1), "cotangent g1")?;
        let invariant = opt(invariant, rows, "cotangent invariant")?;
        let (first_seen, len, flags) = risk_args(risk, rows)?;
        let (rows_i, dv_i) = (rows as i64, int(dv, "dv")?);
        let mut b = self.builder("favor_cotangent_f32");
        b.arg(&g).arg(&o1).arg(&rows_i).arg(&dv_i).arg(&delta).arg(&g1).arg(&invariant);
        b.arg(&first_seen).arg(&len).arg(&flags);
        // One warp per row, 8 warps per block (the kernel also handles a partial last warp).
        let cfg = grid_1d(rows * 32, 256);
        // SAFETY: (const float* g [rows·dv], const float* o1 [rows·(dv+1)], i64 rows, int dv,
        // float delta, float* g1 [rows·(dv+1)], u8* invariant [rows] or null, const int*
        // first_seen [rows/len] or null, int len ≥ 1 dividing rows, int* risk [rows/len] or
        // null); sizes checked above; the kernel strides rows by the block's warps and columns by
        // the warp's live lanes.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `favor_features_f32`: φ (fp32 rows, `ld_phi` apart) of `rows` fp32 tokens.
    pub(crate) fn launch_features(
        &self,
        x: DevPtr,
        rows: usize,
        map: &MapArgs,
        mode: StabMode,
        c_in: Option<DevPtr>,
        c_out: Option<DevPtr>,
        mask: Option<MaskArgs>,
        len: usize,
        phi: Option<(DevPtr, usize)>,
    ) -> Result<()> {
        let smem = map.forward_smem();
        if smem > SMEM_LIMIT {
            return Err(internal(format!("features smem {smem} B")));
        }
        let x = need(x, rows * map.d, "features x")?;
        let w = opt(map.w, map.m * map.d, "features w")?;
        let c_in = if mode == StabMode::Given && map.kind.is_exp() {
            need(c_in.ok_or_else(|| internal("features c_in missing".into()))?, rows, "features c_in")?
        } else {
            0
        };
        let c_out = opt(c_out, rows, "features c_out")?;
        if mode == StabMode::LogScaleOnly && c_out == 0 {
            return Err(internal("log-scale mode without c_out".into()));
        }
        let (keep, heads) = match mask {
            Some(mk) => (need(mk.keep, rows / len.max(1) / mk.heads.max(1) * len, "features keep")?, mk.heads),
            None => (0, 1),
        };
        let (phi, ld_phi) = match phi {
            Some((p, ld)) if ld >= map.features() => (need(p, rows * ld, "features phi")?, ld),
            Some((_, ld)) => return Err(internal(format!("features ld_phi {ld}"))),
            None if mode == StabMode::LogScaleOnly => (0, 0),
            None => return Err(internal("features phi missing".into())),
        };
        let args = (
            rows as i64,
            int(map.d, "d")?,
            int(map.m, "m")?,
            map.kind as i32,
            mode as i32,
            int(heads, "heads")?,
            int(len, "len")?,
            int(ld_phi, "ld_phi")?,
        );
        let mut b = self.builder("favor_features_f32");
        b.arg(&x).arg(&args.0).arg(&args.1).arg(&w).arg(&args.2).arg(&args.3).arg(&map.in_scale).arg(&map.hcoef);
        b.arg(&map.eps).arg(&args.4).arg(&c_in).arg(&c_out).arg(&keep).arg(&args.5).arg(&args.6).arg(&phi);
        b.arg(&args.7);
        let cfg = LaunchConfig {
            grid_dim: (int(rows.div_ceil(FEATURE_ROWS), "blocks")? as u32, 1, 1),
            block_dim: (FEATURE_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: (const float* x [rows·d], i64 rows, int d, const float* w [m·d] or null, int m,
        // int kind, float in_scale, double hcoef, float eps, int mode, const double* c_in [rows]
        // or null, double* c_out [rows] or null, const u8* keep [B·L] or null, int heads, int len,
        // float* phi [rows·ld_phi] (null only in log-scale mode), int ld_phi ≥ features);
        // sizes checked above; shared memory = forward_smem() ≤ 48 KB, as the kernel carves it.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `favor_features_bwd_f32`: dx (fp32 rows × d) from dφ (fp32 rows, `ld_dphi` apart).
    pub(crate) fn launch_features_bwd(
        &self,
        x: DevPtr,
        rows: usize,
        map: &MapArgs,
        c: Option<DevPtr>,
        invariant: Option<DevPtr>,
        dphi: DevPtr,
        ld_dphi: usize,
        mask: Option<MaskArgs>,
        len: usize,
        dx: DevPtr,
    ) -> Result<()> {
        let smem = map.backward_smem();
        if smem > SMEM_LIMIT {
            return Err(internal(format!("features_bwd smem {smem} B")));
        }
        if ld_dphi < map.features() {
            return Err(internal(format!("features_bwd ld_dphi {ld_dphi}")));
        }
        let x = need(x, rows * map.d, "features_bwd x")?;
        let w = opt(map.w, map.m * map.d, "features_bwd w")?;
        let c = if map.kind.is_exp() {
            need(c.ok_or_else(|| internal("features_bwd c missing".into()))?, rows, "features_bwd c")?
        } else {
            0
        };
        let invariant = opt(invariant, rows, "features_bwd invariant")?;
        let dphi = need(dphi, rows * ld_dphi, "features_bwd dphi")?;
        let (keep, heads) = match mask {
            Some(mk) => (need(mk.keep, rows / len.max(1) / mk.heads.max(1) * len, "features_bwd keep")?, mk.heads),
            None => (0, 1),
        };
        let dx = need(dx, rows * map.d, "features_bwd dx")?;
        let args = (
            rows as i64,
            int(map.d, "d")?,
            int(map.m, "m")?,
            map.kind as i32,
            int(ld_dphi, "ld_dphi")?,
            int(heads, "heads")?,
            int(len, "len")?,
        );
        let mut b = self.builder("favor_features_bwd_f32");
        b.arg(&x).arg(&args.0).arg(&args.1).arg(&w).arg(&args.2).arg(&args.3).arg(&map.in_scale).arg(&map.hcoef);
        b.arg(&map.eps).arg(&c).arg(&invariant).arg(&dphi).arg(&args.4).arg(&keep).arg(&args.5).arg(&args.6);
        b.arg(&dx);
        let cfg = LaunchConfig {
            grid_dim: (int(rows.div_ceil(FEATURE_ROWS), "blocks")? as u32, 1, 1),
            block_dim: (FEATURE_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: (const float* x [rows·d], i64 rows, int d, const float* w [m·d] or null, int m,
        // int kind, float in_scale, double hcoef, float eps, const double* c [rows] (null for
        // non-exponential maps), const u8* invariant [rows] or null, const float* dphi
        // [rows·ld_dphi], int ld_dphi, const u8* keep or null, int heads, int len, float* dx
        // [rows·d]); sizes checked above; smem = backward_smem() ≤ 48 KB.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `favor_stabiliser_f32`: per-(batch, head) shared (bidirectional) or running (causal)
    /// maximum of the unpadded log-scales `s`, starting from `c_init` when given.
    pub(crate) fn launch_stabiliser(
        &self,
        s: DevPtr,
        mask: Option<MaskArgs>,
        problems: usize,
        len: usize,
        c_init: Option<DevPtr>,
        causal: bool,
        c_out: DevPtr,
    ) -> Result<()> {
        let rows = problems * len;
        let s = need(s, rows, "stabiliser s")?;
        let (keep, heads) = match mask {
            Some(mk) => (need(mk.keep, problems / mk.heads.max(1) * len, "stabiliser keep")?, mk.heads),
            None => (0, 1),
        };
        let c_init = opt(c_init, problems, "stabiliser c_init")?;
        let c_out = need(c_out, rows, "stabiliser c_out")?;
        let (heads_i, len_i, causal_i) = (int(heads, "heads")?, int(len, "len")?, i32::from(causal));
        let mut b = self.builder("favor_stabiliser_f32");
        b.arg(&s).arg(&keep).arg(&heads_i).arg(&len_i).arg(&c_init).arg(&causal_i).arg(&c_out);
        let cfg = LaunchConfig {
            grid_dim: (int(problems, "problems")? as u32, 1, 1),
            block_dim: (STAB_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (const double* s [problems·len], const u8* keep [B·L] or null, int heads,
        // int len, const double* c_init [problems] or null, int causal, double* c_out
        // [problems·len]);
        // one block per problem, STAB_THREADS threads as the kernel's static arrays assume.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Bidirectional KV = Σ_l B_l V_lᵀ per problem (na × nv, fp32), split over `segments`
    /// sequence segments and combined in a fixed order (deterministic).
    pub(crate) fn launch_kv_reduce(
        &self,
        b_rows: (DevPtr, usize, usize),
        v_rows: (DevPtr, usize, usize),
        problems: usize,
        len: usize,
        segments: usize,
        partial: DevPtr,
        kv: DevPtr,
    ) -> Result<()> {
        let ((bp, ldb, na), (vp, ldv, nv)) = (b_rows, v_rows);
        let rows = problems * len;
        let seg_len = len.div_ceil(segments);
        let segments = len.div_ceil(seg_len);
        let bp = need(bp, rows * ldb, "kv_reduce b")?;
        let vp = need(vp, rows * ldv, "kv_reduce v")?;
        let n = na * nv;
        let partial = need(partial, problems * segments * n, "kv_reduce partial")?;
        let kv = need(kv, problems * n, "kv_reduce kv")?;
        let ints = (int(ldb, "ldb")?, int(na, "na")?, int(ldv, "ldv")?, int(nv, "nv")?, int(len, "len")?);
        let seg_len_i = int(seg_len, "seg_len")?;
        let grid_y = int(problems, "problems")? as u32;
        let mut b = self.builder("favor_kv_reduce_f32");
        b.arg(&bp).arg(&ints.0).arg(&ints.1).arg(&vp).arg(&ints.2).arg(&ints.3).arg(&ints.4).arg(&seg_len_i);
        b.arg(&partial);
        let cfg = LaunchConfig { grid_dim: (segments as u32, grid_y, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: (const float* b [rows·ldb], int ldb, int na ≤ ldb, const float* v [rows·ldv],
        // int ldv, int nv ≤ ldv, int len, int seg_len, float* partial [problems·segments·na·nv]);
        // grid = (segments, problems) with segments·seg_len ≥ len; sizes checked above.
        unsafe { b.launch(cfg) }?;

        let (segs_i, n_i) = (int(segments, "segments")?, n as i64);
        let mut b = self.builder("favor_kv_combine_f32");
        b.arg(&partial).arg(&segs_i).arg(&n_i).arg(&kv);
        let cfg = LaunchConfig {
            grid_dim: (int(n.div_ceil(256), "blocks")? as u32, grid_y, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (const float* partial [problems·segments·n], int segments, i64 n,
        // float* kv [problems·n]); grid covers n per problem, the kernel bounds-checks idx < n.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// out_t = A_tᵀ·KV for every row (`out` columns 0..nv, `ldo` apart).
    pub(crate) fn launch_kv_apply(
        &self,
        a_rows: (DevPtr, usize, usize),
        kv: DevPtr,
        nv: usize,
        problems: usize,
        len: usize,
        out: (DevPtr, usize),
    ) -> Result<()> {
        let ((ap, lda, na), (op, ldo)) = (a_rows, out);
        let rows = problems * len;
        let ap = need(ap, rows * lda, "kv_apply a")?;
        let kv = need(kv, problems * na * nv, "kv_apply kv")?;
        let op = need(op, rows * ldo, "kv_apply out")?;
        if ldo < nv || lda < na {
            return Err(internal("kv_apply leading dimensions".into()));
        }
        let ints = (int(lda, "lda")?, int(na, "na")?, int(nv, "nv")?, int(len, "len")?, int(ldo, "ldo")?);
        let mut b = self.builder("favor_kv_apply_f32");
        b.arg(&ap).arg(&ints.0).arg(&ints.1).arg(&kv).arg(&ints.2).arg(&ints.3).arg(&op).arg(&ints.4);
        let cfg = LaunchConfig {
            grid_dim: (int(len.div_ceil(APPLY_ROWS), "blocks")? as u32, int(problems, "problems")? as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: (const float* a [rows·lda], int lda, int na, const float* kv [problems·na·nv],
        // int nv, int len, float* out [rows·ldo], int ldo ≥ nv); sizes checked above; the kernel
        // bounds-checks t < len.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// The chunked causal scan (see cuda/causal.cu). `state` = (S [problems·na·nv], c0
    /// [problems]) continues from and updates a recurrent state (forward only).
    pub(crate) fn launch_causal_scan(
        &self,
        a_rows: (DevPtr, usize),
        b_rows: (DevPtr, usize),
        na: usize,
        v_rows: (DevPtr, usize),
        nv: usize,
        c: DevPtr,
        problems: usize,
        len: usize,
        reverse: bool,
        out: (DevPtr, usize),
        state: Option<(DevPtr, DevPtr)>,
    ) -> Result<()> {
        let ((ap, lda), (bp, ldb), (vp, ldv), (op, ldo)) = (a_rows, b_rows, v_rows, out);
        if lda < na || ldb < na || ldv < nv || ldo < nv {
            return Err(internal("causal_scan leading dimensions".into()));
        }
        if reverse && state.is_some() {
            return Err(internal("causal_scan: a state is only carried forward".into()));
        }
        let rows = problems * len;
        let nvt = scan_value_tile(na, nv)?;
        let smem = scan_smem(na, nvt);
        let ap = need(ap, rows * lda, "causal_scan a")?;
        let bp = need(bp, rows * ldb, "causal_scan b")?;
        let vp = need(vp, rows * ldv, "causal_scan v")?;
        let cp = need(c, rows, "causal_scan c")?;
        let op = need(op, rows * ldo, "causal_scan out")?;
        let (sp, c0) = match state {
            Some((st, c0)) => {
                (need(st, problems * na * nv, "causal_scan state")?, need(c0, problems, "causal_scan c0")?)
            }
            None => (0, 0),
        };
        let ints = (
            int(lda, "lda")?,
            int(ldb, "ldb")?,
            int(na, "na")?,
            int(ldv, "ldv")?,
            int(nv, "nv")?,
            int(len, "len")?,
            i32::from(reverse),
            int(ldo, "ldo")?,
            int(nvt, "nvt")?,
        );
        let mut b = self.builder("favor_causal_scan_f32");
        b.arg(&ap).arg(&ints.0).arg(&bp).arg(&ints.1).arg(&ints.2).arg(&vp).arg(&ints.3).arg(&ints.4);
        b.arg(&cp).arg(&ints.5).arg(&ints.6).arg(&op).arg(&ints.7).arg(&sp).arg(&c0).arg(&ints.8);
        let cfg = LaunchConfig {
            grid_dim: (int(nv.div_ceil(nvt), "tiles")? as u32, int(problems, "problems")? as u32, 1),
            block_dim: (SCAN_THREADS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: (const float* a [rows·lda], int lda, const float* b [rows·ldb], int ldb, int na,
        // const float* v [rows·ldv], int ldv, int nv, const double* c [rows], int len,
        // int reverse, float* out [rows·ldo], int ldo, float* state [problems·na·nv] or null,
        // const double* c0 [problems] or null, int nvt); sizes checked above; shared memory
        // scan_smem(na, nvt) ≤ 48 KB by scan_value_tile; grid = (⌈nv/nvt⌉, problems).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `favor_state_c_update_f32`: state_c[bh] = c[bh, len − 1].
    pub(crate) fn launch_state_c_update(&self, c: DevPtr, len: usize, problems: usize, state_c: DevPtr) -> Result<()> {
        let c = need(c, problems * len, "state_c_update c")?;
        let state_c = need(state_c, problems, "state_c_update state_c")?;
        let (len_i, problems_i) = (int(len, "len")?, int(problems, "problems")?);
        let mut b = self.builder("favor_state_c_update_f32");
        b.arg(&c).arg(&len_i).arg(&problems_i).arg(&state_c);
        // SAFETY: (const double* c [problems·len], int len, int problems, double* state_c
        // [problems]); sizes checked above; the kernel bounds-checks bh < problems.
        unsafe { b.launch(grid_1d(problems, 128)) }?;
        Ok(())
    }
}

/// Dynamic shared memory of the causal scan: the chunk's stabilisers (doubles), the state tile
/// (na × nvt fp32) and the chunk scores (CHUNK² fp32).
pub(crate) fn scan_smem(na: usize, nvt: usize) -> usize {
    8 * SCAN_CHUNK + 4 * (na * nvt + SCAN_CHUNK * SCAN_CHUNK)
}

/// Value columns per block of the causal scan: the widest power of two ≤ 32 whose scan fits
/// the 48 KB of shared memory.
pub(crate) fn scan_value_tile(na: usize, nv: usize) -> Result<usize> {
    let mut nvt = 32;
    while nvt > 1 && (scan_smem(na, nvt) > SMEM_LIMIT || nvt / 2 >= nv) {
        nvt /= 2;
    }
    if scan_smem(na, nvt) > SMEM_LIMIT {
        return Err(FavorError::Unsupported(format!(
            "{na} features per causal state row exceed the CUDA kernel's limit"
        )));
    }
    Ok(nvt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_tiles_fit_shared_memory() {
        for na in 1..=4096 {
            for nv in [1, 2, 7, 31, 32, 33, 65, 129, 257, 1024] {
                match scan_value_tile(na, nv) {
                    Ok(nvt) => {
                        assert!(nvt.is_power_of_two() && nvt <= 32, "na {na} nv {nv}: nvt {nvt}");
                        assert!(scan_smem(na, nvt) <= SMEM_LIMIT);
                        // No tile wider than needed: half of it would not cover nv.
                        assert!(nvt == 1 || nvt / 2 < nv, "na {na} nv {nv}: nvt {nvt}");
                    }
                    Err(e) => {
                        assert!(matches!(e, FavorError::Unsupported(_)));
                        assert!(scan_smem(na, 1) > SMEM_LIMIT, "na {na} rejected");
                    }
                }
            }
        }
    }

    #[test]
    fn feature_kernel_limits_cover_the_documented_sizes() {
        // d ≤ 256 with m ≤ 1024 projections must fit (the crate docs promise it).
        for (d, m) in [(256, 1024), (128, 512), (64, 256), (1, 1)] {
            let map = MapArgs { kind: FeatureKind::Hyperbolic, w: None, m, d, in_scale: 1.0, hcoef: 0.5, eps: 0.0 };
            assert!(map.forward_smem() <= SMEM_LIMIT && map.backward_smem() <= SMEM_LIMIT, "d {d} m {m}");
        }
    }
}
