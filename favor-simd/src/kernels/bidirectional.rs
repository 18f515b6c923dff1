//! Bidirectional attention, fused: out = Q'(K'ᵀV) / Q'(K'ᵀ1) without ever holding φ(Q) or φ(K)
//! beyond one tile.
//!
//! **Keys, one pass.** The sequence is cut into segments (a function of the length only, so
//! results do not depend on the thread count). A segment walks its key tiles once: project,
//! take the tile's maximum log-scale, raise the segment's running maximum c_s (rescaling the
//! partial sums by exp(c_old − c_s)), compute φ against c_s (its ε floor scales with c like the
//! rest, see favor-core's `features`) and accumulate S_s = Σ φ(k)vᵀ and z_s = Σ φ(k). Segments
//! are then combined in order: K'ᵀV = Σ_s exp(c_s − c)S_s with c = max_s c_s, the same value as
//! with one global maximum. **Queries**: each tile computes φ(q) against its own log-scale and
//! multiplies by the combined M × d_v state.
//!
//! Backward: with x̄ = G/R and ḡ = −⟨G, out⟩/R, query tiles give dq' = x̄(K'ᵀV)ᵀ + ḡ(K'ᵀ1)ᵀ and
//! per-segment partials of dKV = Σ q'x̄ᵀ and ds = Σ q'ḡ (summed in segment order); key tiles then
//! recompute φ(k) and give dk' = V dKVᵀ + 1dsᵀ and dv = K' dKV.

use super::features::{FeatureGrads, ParamAcc, Plan, Tile};
use super::gemm::{axpy, dot, gemm, scale};
use super::{HeadIn, KeptScratch, OutRows, ScratchKey, TILE, load_rows, scratch_key, store_rows, zeroed};
use crate::isa::{SimdF32, SimdTask};
use crate::phases::{Phase, Span};
use favor_core::HostRef;
use favor_core::saturate_f32;
use std::cell::RefCell;

/// The sums of one sequence segment: of a key segment (forward), S = Σ φ(k) vᵀ (mfp × dvp) and
/// z = Σ φ(k) (mfp) relative to the segment's own maximum `c`; of a query segment (backward),
/// its partials of the key gradients, S = Σ q' x̄ᵀ and z = Σ q' ḡ. One kind of buffer for both,
/// so that the backward reuses the forward's (kept by the calling thread between calls).
#[derive(Default)]
pub(crate) struct SegmentSums {
    pub c: f64,
    pub s: Vec<f32>,
    pub z: Vec<f32>,
}

/// The combined key state of one head: K'ᵀV (mfp × dvp), K'ᵀ1 (mfp) and the key stabiliser.
#[derive(Default)]
pub(crate) struct KeyState {
    pub kv: Vec<f32>,
    pub ks: Vec<f32>,
    pub c: f64,
}

/// A tile and one more tile-sized buffer (values or numerators): the scratch of a key-segment
/// or query-forward task.
struct TileScratch {
    t: Tile,
    rows: Vec<f32>,
    key: ScratchKey,
}

thread_local! {
    static TILE_SCRATCH: RefCell<Vec<(ScratchKey, TileScratch)>> = const { RefCell::new(Vec::new()) };
}

/// Drops this thread's kept tile and gradient scratch.
pub(crate) fn release_scratch() {
    KeptScratch(&TILE_SCRATCH).clear();
    KeptScratch(&GRAD_SCRATCH).clear();
}

impl TileScratch {
    fn take(p: &Plan, dv: usize) -> TileScratch {
        let key = scratch_key(p, dv, TILE);
        let made = || TileScratch { t: Tile::new(p, TILE), rows: vec![0.0; TILE * crate::isa::pad(dv)], key };
        KeptScratch(&TILE_SCRATCH).take(key, made)
    }

    fn give_back(self) {
        KeptScratch(&TILE_SCRATCH).give_back(self.key, self);
    }
}

/// Summarises keys r0..r1 of one head into `out`.
pub(crate) struct KeySegment<'a> {
    pub plan: &'a Plan,
    pub io: HeadIn<'a>,
    pub r0: usize,
    pub r1: usize,
    pub out: &'a mut SegmentSums,
}

impl SimdTask for KeySegment<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: SimdF32>(self) {
        let (p, io) = (self.plan, self.io);
        let dvp = crate::isa::pad(io.dv);
        let st = self.out;
        st.c = f64::NEG_INFINITY;
        zeroed(&mut st.s, p.mfp * dvp);
        zeroed(&mut st.z, p.mfp);
        let mut scratch = TileScratch::take(p, io.dv);
        let TileScratch { t, rows: vt, .. } = &mut scratch;
        // Its padding columns must be zero: the same buffer serves query tasks as numerators.
        vt.fill(0.0);
        let mut r = self.r0;
        while r < self.r1 {
            let rows = TILE.min(self.r1 - r);
            let mut kept = [false; TILE];
            kept.iter_mut().take(rows).enumerate().for_each(|(i, k)| *k = io.keep(r + i));
            let kept = &kept[..rows];
            if kept.iter().any(|&k| k) {
                let span = Span::start(Phase::Io);
                load_rows(&io.k, io.k_at, io.d, r, rows, &mut t.x, p.dp);
                load_rows(&io.v, io.v_at, io.dv, r, rows, vt, dvp);
                let span = span.next(Phase::FeatureMap);
                t.project::<S>(p, rows);
                let tile_max = (0..rows).filter(|&i| kept[i]).map(|i| t.s[i]).fold(f64::NEG_INFINITY, f64::max);
                if tile_max > st.c {
                    if st.c > f64::NEG_INFINITY {
                        let f = crate::math::exp::decay::<S>(st.c, tile_max);
                        scale::<S>(f, &mut st.s);
                        scale::<S>(f, &mut st.z);
                    }
                    st.c = tile_max;
                }
                t.c[..rows].fill(st.c);
                t.features::<S>(p, rows);
                let span = span.next(Phase::StateBuild);
                for (i, &k) in kept.iter().enumerate() {
                    if k {
                        axpy::<S>(1.0, &t.phi[i * p.mfp..(i + 1) * p.mfp], &mut st.z);
                    } else {
                        t.phi[i * p.mfp..(i + 1) * p.mfp].fill(0.0);
                    }
                }
                gemm::<S>(p.mfp, rows, dvp, &t.phi, 1, p.mfp, vt, dvp, &mut st.s, dvp, false);
                span.end();
            }
            r += rows;
        }
        scratch.give_back();
    }
}

/// Combines segment summaries (in order) into the key state of one head (`out`, resized).
pub(crate) fn combine(p: &Plan, dv: usize, parts: &[SegmentSums], out: &mut KeyState) {
    let dvp = crate::isa::pad(dv);
    let c = parts.iter().map(|s| s.c).fold(f64::NEG_INFINITY, f64::max);
    let KeyState { kv, ks, .. } = out;
    zeroed(kv, p.mfp * dvp);
    zeroed(ks, p.mfp);
    for part in parts {
        let f = if part.c == c { 1.0 } else { (part.c - c).exp() as f32 };
        for (x, &y) in kv.iter_mut().zip(&part.s) {
            *x += f * y;
        }
        for (x, &y) in ks.iter_mut().zip(&part.z) {
            *x += f * y;
        }
    }
    out.c = c;
}

/// The guarded denominator (favor-core's rule): |R| ≤ δ becomes R + 2δ.
#[inline(always)]
pub(crate) fn guard(r: f32, delta: f32) -> f32 {
    if guard_fires(r, delta) { r + 2.0 * delta } else { r }
}

/// Whether the guard changes R; a query row whose guard does not fire is scale-invariant.
#[inline(always)]
pub(crate) fn guard_fires(r: f32, delta: f32) -> bool {
    delta > 0.0 && r.abs() <= delta
}

/// Denominators below 2^-40 (zero included, for a query that sees kept keys) are *at risk*:
/// their cotangents G/R could leave f32's range, and R itself may have lost its precision to
/// underflow, while the true gradient is finite (favor-core's reference differentiates such rows
/// pair by pair in f64). The f32 kernels flag them and the backend recomputes the head with the
/// reference; only extreme inputs get there (ε = 0 with features that do not overlap, ReLU
/// features without κ, trigonometric features without a guard). Above it, with features ≤ 2^24
/// and cotangents ≤ 2^24, every product of the backward stays far inside f32's range.
pub(crate) const RISK_DEN: f32 = 1.0 / 1_099_511_627_776.0;

/// Whether a row with denominator `den` is at risk; `sees_keys`: the query sees a kept key
/// (otherwise R = 0 is exact and its output row is zero by definition).
#[inline(always)]
pub(crate) fn at_risk(den: f32, sees_keys: bool) -> bool {
    sees_keys && den.abs() < RISK_DEN
}

/// Divides numerator rows by their denominators (zero rows for a zero denominator); rows at
/// risk are divided in f64, element by element, so that a tiny R does not overflow 1/R.
#[inline(always)]
pub(crate) fn normalise<S: SimdF32>(rows: usize, num: &mut [f32], ld: usize, den: &[f32]) {
    for i in 0..rows {
        let row = &mut num[i * ld..(i + 1) * ld];
        if den[i] == 0.0 {
            row.fill(0.0);
        } else if den[i].abs() < RISK_DEN {
            for x in row.iter_mut() {
                *x = saturate_f32(*x as f64 / den[i] as f64);
            }
        } else {
            scale::<S>(1.0 / den[i], row);
        }
    }
}

/// Output rows r0..r1 of one head (`out` holds exactly those rows).
pub(crate) struct QueryForward<'a, 'o> {
    pub plan: &'a Plan,
    pub io: HeadIn<'a>,
    pub keys: &'a KeyState,
    pub delta: f32,
    pub r0: usize,
    pub r1: usize,
    pub out: OutRows<'o>,
}

impl SimdTask for QueryForward<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run<S: SimdF32>(mut self) {
        let (p, io) = (self.plan, self.io);
        let dvp = crate::isa::pad(io.dv);
        let mut scratch = TileScratch::take(p, io.dv);
        let TileScratch { t, rows: num, .. } = &mut scratch;
        let mut den = [0.0f32; TILE];
        let mut r = self.r0;
        while r < self.r1 {
            let rows = TILE.min(self.r1 - r);
            let span = Span::start(Phase::Io);
            load_rows(&io.q, io.q_at, io.d, r, rows, &mut t.x, p.dp);
            let span = span.next(Phase::FeatureMap);
            t.project::<S>(p, rows);
            t.features::<S>(p, rows);
            let span = span.next(Phase::Apply);
            gemm::<S>(rows, p.mfp, dvp, &t.phi, p.mfp, 1, &self.keys.kv, dvp, num, dvp, true);
            let sees_keys = self.keys.c > f64::NEG_INFINITY;
            for (i, dn) in den.iter_mut().enumerate().take(rows) {
                *dn = guard(dot::<S>(&t.phi[i * p.mfp..(i + 1) * p.mfp], &self.keys.ks), self.delta);
                if at_risk(*dn, sees_keys) {
                    io.flag_risk();
                }
            }
            normalise::<S>(rows, num, dvp, &den);
            let span = span.next(Phase::Io);
            store_rows(&mut self.out, r - self.r0, rows, num, dvp);
            span.end();
            r += rows;
        }
        scratch.give_back();
    }
}

/// Row cotangents x̄ = G/R (in place over `g`) and ḡ = −⟨G, out⟩/R; zero for R = 0 and for
/// rows at risk (whose head is recomputed in f64).
#[inline(always)]
pub(crate) fn cotangents<S: SimdF32>(
    rows: usize,
    g: &mut [f32],
    out: &[f32],
    ld: usize,
    den: &[f32],
    gbar: &mut [f32],
) {
    for i in 0..rows {
        let gi = &mut g[i * ld..(i + 1) * ld];
        if den[i].abs() < RISK_DEN {
            gi.fill(0.0);
            gbar[i] = 0.0;
        } else {
            gbar[i] = -dot::<S>(gi, &out[i * ld..(i + 1) * ld]) / den[i];
            scale::<S>(1.0 / den[i], gi);
        }
    }
}

/// The scratch of one backward task (queries or keys): a tile and its products.
struct GradScratch {
    t: Tile,
    /// Two value-width tiles: numerators and cotangents, or values and their gradients.
    a: Vec<f32>,
    b: Vec<f32>,
    grads: FeatureGrads,
    key: ScratchKey,
}

thread_local! {
    static GRAD_SCRATCH: RefCell<Vec<(ScratchKey, GradScratch)>> = const { RefCell::new(Vec::new()) };
}

impl GradScratch {
    fn take(p: &Plan, dv: usize) -> GradScratch {
        let key = scratch_key(p, dv, TILE);
        let dvp = crate::isa::pad(dv);
        let mut s = KeptScratch(&GRAD_SCRATCH).take(key, || GradScratch {
            t: Tile::new(p, TILE),
            a: vec![0.0; TILE * dvp],
            b: vec![0.0; TILE * dvp],
            grads: FeatureGrads::new(p, TILE),
            key,
        });
        // Value-width rows are read over their padding (which loads never write): zero, as new.
        s.a.fill(0.0);
        s.b.fill(0.0);
        s
    }

    fn give_back(self) {
        KeptScratch(&GRAD_SCRATCH).give_back(self.key, self);
    }
}

/// Backward of query rows r0..r1: writes dq and the key-gradient partials into `out`; returns
/// `params` with its parameter-gradient partials.
pub(crate) struct QueryBackward<'a, 'o> {
    pub plan: &'a Plan,
    pub io: HeadIn<'a>,
    pub dout: HostRef<'a>,
    pub keys: &'a KeyState,
    /// (K'ᵀV)ᵀ, dvp × mfp.
    pub kvt: &'a [f32],
    pub delta: f32,
    pub r0: usize,
    pub r1: usize,
    pub dq: OutRows<'o>,
    pub out: &'a mut SegmentSums,
    pub params: Option<ParamAcc>,
}

impl SimdTask for QueryBackward<'_, '_> {
    type Output = Option<ParamAcc>;
    #[inline(always)]
    fn run<S: SimdF32>(mut self) -> Option<ParamAcc> {
        let (p, io) = (self.plan, self.io);
        let dvp = crate::isa::pad(io.dv);
        let mut scratch = GradScratch::take(p, io.dv);
        let GradScratch { t, a: num, b: g, grads: FeatureGrads { dphi, da, da2, dx }, .. } = &mut scratch;
        let mut den = [0.0f32; TILE];
        let mut gbar = [0.0f32; TILE];
        let out = &mut *self.out;
        zeroed(&mut out.s, p.mfp * dvp);
        zeroed(&mut out.z, p.mfp);
        let mut r = self.r0;
        while r < self.r1 {
            let rows = TILE.min(self.r1 - r);
            let span = Span::start(Phase::Io);
            load_rows(&io.q, io.q_at, io.d, r, rows, &mut t.x, p.dp);
            load_rows(&self.dout, io.dout_at, io.dv, r, rows, g, dvp);
            let span = span.next(Phase::FeatureMap);
            t.project::<S>(p, rows);
            t.features::<S>(p, rows);
            let span = span.next(Phase::Apply);
            gemm::<S>(rows, p.mfp, dvp, &t.phi, p.mfp, 1, &self.keys.kv, dvp, num, dvp, true);
            for (i, dn) in den.iter_mut().enumerate().take(rows) {
                let raw = dot::<S>(&t.phi[i * p.mfp..(i + 1) * p.mfp], &self.keys.ks);
                t.scale_free[i] = !guard_fires(raw, self.delta);
                *dn = guard(raw, self.delta);
                if at_risk(*dn, self.keys.c > f64::NEG_INFINITY) {
                    io.flag_risk();
                }
            }
            normalise::<S>(rows, num, dvp, &den);
            let span = span.next(Phase::BackwardSweep);
            cotangents::<S>(rows, g, num, dvp, &den, &mut gbar);
            // dq' = x̄ KVᵀ + ḡ ksᵀ
            gemm::<S>(rows, io.dv, p.mfp, g, dvp, 1, self.kvt, p.mfp, dphi, p.mfp, true);
            for i in 0..rows {
                axpy::<S>(gbar[i], &self.keys.ks, &mut dphi[i * p.mfp..(i + 1) * p.mfp]);
                axpy::<S>(gbar[i], &t.phi[i * p.mfp..(i + 1) * p.mfp], &mut out.z);
            }
            gemm::<S>(p.mfp, rows, dvp, &t.phi, 1, p.mfp, g, dvp, &mut out.s, dvp, false);
            let span = span.next(Phase::FeatureBackward);
            t.features_backward::<S>(p, rows, dphi, da, da2, dx, self.params.as_mut());
            let span = span.next(Phase::Io);
            store_rows(&mut self.dq, r - self.r0, rows, dx, p.dp);
            span.end();
            r += rows;
        }
        scratch.give_back();
        self.params
    }
}

/// Backward of key rows r0..r1: writes dk and dv.
pub(crate) struct KeyBackward<'a, 'o> {
    pub plan: &'a Plan,
    pub io: HeadIn<'a>,
    pub c: f64,
    /// dKV (mfp × dvp) and its transpose (dvp × mfp), ds (mfp).
    pub dkv: &'a [f32],
    pub dkvt: &'a [f32],
    pub ds: &'a [f32],
    pub r0: usize,
    pub r1: usize,
    pub dk: OutRows<'o>,
    pub dv: OutRows<'o>,
    pub params: Option<ParamAcc>,
}

impl SimdTask for KeyBackward<'_, '_> {
    type Output = Option<ParamAcc>;
    #[inline(always)]
    fn run<S: SimdF32>(mut self) -> Option<ParamAcc> {
        let (p, io) = (self.plan, self.io);
        let dvp = crate::isa::pad(io.dv);
        let mut scratch = GradScratch::take(p, io.dv);
        let GradScratch { t, a: vt, b: dvt, grads: FeatureGrads { dphi, da, da2, dx }, .. } = &mut scratch;
        let mut r = self.r0;
        while r < self.r1 {
            let rows = TILE.min(self.r1 - r);
            let span = Span::start(Phase::Io);
            load_rows(&io.k, io.k_at, io.d, r, rows, &mut t.x, p.dp);
            load_rows(&io.v, io.v_at, io.dv, r, rows, vt, dvp);
            let span = span.next(Phase::FeatureMap);
            t.project::<S>(p, rows);
            t.c[..rows].fill(self.c);
            t.features::<S>(p, rows);
            let span = span.next(Phase::BackwardSweep);
            gemm::<S>(rows, io.dv, p.mfp, vt, dvp, 1, self.dkvt, p.mfp, dphi, p.mfp, true);
            for i in 0..rows {
                if io.keep(r + i) {
                    axpy::<S>(1.0, self.ds, &mut dphi[i * p.mfp..(i + 1) * p.mfp]);
                } else {
                    t.phi[i * p.mfp..(i + 1) * p.mfp].fill(0.0);
                    dphi[i * p.mfp..(i + 1) * p.mfp].fill(0.0);
                }
            }
            gemm::<S>(rows, p.mfp, dvp, &t.phi, p.mfp, 1, self.dkv, dvp, dvt, dvp, true);
            let span = span.next(Phase::FeatureBackward);
            t.features_backward::<S>(p, rows, dphi, da, da2, dx, self.params.as_mut());
            for i in (0..rows).filter(|&i| !io.keep(r + i)) {
                dx[i * p.dp..(i + 1) * p.dp].fill(0.0);
            }
            let span = span.next(Phase::Io);
            store_rows(&mut self.dk, r - self.r0, rows, dx, p.dp);
            store_rows(&mut self.dv, r - self.r0, rows, dvt, dvp);
            span.end();
            r += rows;
        }
        scratch.give_back();
        self.params
    }
}
