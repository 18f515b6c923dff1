//! Causal attention in chunks of [`CHUNK`] tokens (the same function as favor-core's prefix sums
//! with the running-maximum key stabiliser, evaluated at matrix-multiply speed).
//!
//! State of one head: S = Σ_j exp(c_j − c)k'_j v_jᵀ (M × d_v), z = Σ_j exp(c_j − c)k'_j, and the
//! running key maximum c. For a chunk with key maxima c_j (running, so nondecreasing) and the
//! mask M_ij = exp(c_j − c_i)·[j ≤ i] (all 1 below the diagonal when c is constant in the chunk):
//!
//! * num_i = exp(c_prev − c_i)·q'_i S_prev + Σ_j (Q'K'ᵀ ⊙ M)_ij v_j, den_i likewise with z and 1;
//! * S ← exp(c_prev − c_end)S + Σ_j exp(c_j − c_end) k'_j v_jᵀ (z likewise), c ← c_end.
//!
//! Every exp argument is ≤ 0. Decoding is the same loop started from a saved state.
//!
//! Backward, two sweeps, never rebuilding a state by subtraction:
//! * forward sweep (recomputes the states): with B = (X̄Vᵀ + ḡ1ᵀ) ⊙ M,
//!   dQ' = exp(c_prev − c_i)(X̄Sᵀ + ḡzᵀ) + B K'; it leaves R_i, ḡ_i and c_i in a [`Stash`]
//!   (the caller's dv or dk row of token i, not yet written);
//! * reverse sweep with the decayed suffix sums P = Σ_{i later} exp(c_ref − c_i) q'_i x̄_iᵀ
//!   (and p with ḡ): dK' = w_j(VPᵀ + 1pᵀ) + BᵀQ', dV = w_j K'P + (Q'K'ᵀ ⊙ M)ᵀX̄ with
//!   w_j = exp(c_j − c_end).
//!
//! Split across the sequence, segment k's forward sweep starts from its incoming state (from the
//! segment summaries, as in the forward) and also returns its own share of P relative to its
//! incoming maximum; the backend chains those shares from the last segment back, so every
//! segment's reverse sweep starts from the exact suffix sums of the queries after it.

use super::bidirectional::{RISK_DEN, at_risk, cotangents, guard, guard_fires, normalise};
use super::features::{FeatureGrads, ParamAcc, Plan, Tile};
use super::gemm::{axpy, dot, gemm, scale, sum, transpose};
use super::{HeadIn, KeptScratch, OutRows, ScratchKey, load_rows, scratch_key, store_rows, zeroed};
use crate::isa::{SimdF32, SimdTask, pad};
use crate::math::exp::{decay, exp_nonpositive};
use crate::phases::{Phase, Span};
use favor_core::backend::{checked_len, try_zeroed};
use favor_core::{HostMut, HostRef, Result};
use std::cell::RefCell;

/// Tokens per causal chunk. The intra-chunk products cost O(CHUNK) per token (about a quarter
/// of the forward + backward work at 64) while the state products do not depend on it; 32 halves
/// the former and keeps every product long enough to run near the microkernel's peak (measured
/// 6 % faster forward + backward than 64 on the roofline shape: B = 1, H = 8, d = 64, m = 256).
pub(crate) const CHUNK: usize = 32;

/// The recurrent state of one (batch, head), in the internal feature layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadState {
    /// S, mfp × dvp.
    pub(crate) s: Vec<f32>,
    /// z, mfp.
    pub(crate) z: Vec<f32>,
    /// Running key maximum (−∞ before the first key), in f64 like every stabiliser.
    pub(crate) c: f64,
}

/// An empty state of no size (nothing allocated), for [`HeadState::reset`] to size.
impl Default for HeadState {
    fn default() -> Self {
        HeadState { s: Vec::new(), z: Vec::new(), c: f64::NEG_INFINITY }
    }
}

impl HeadState {
    /// The empty state of the plan in place: no allocation once the buffers have the size.
    pub(crate) fn reset(&mut self, p: &Plan, dv: usize) {
        zeroed(&mut self.s, p.mfp * pad(dv));
        zeroed(&mut self.z, p.mfp);
        self.c = f64::NEG_INFINITY;
    }

    /// A new empty state for decoding, whose size nothing the caller allocated bounds:
    /// a size that overflows or cannot be allocated is an error, not an abort.
    pub(crate) fn try_new(p: &Plan, dv: usize) -> Result<Self> {
        let s = try_zeroed("state", checked_len("state", &[p.mfp, pad(dv)])?)?;
        Ok(HeadState { s, z: try_zeroed("state", p.mfp)?, c: f64::NEG_INFINITY })
    }
}

/// Per-chunk scratch shared by the forward and backward kernels.
struct Chunk {
    tq: Tile,
    tk: Tile,
    vt: Vec<f32>,
    /// φ(K)ᵀ, mfp × CHUNK (columns past the chunk zeroed).
    phikt: Vec<f32>,
    /// Decay mask M, CHUNK × CHUNK.
    mask: Vec<f32>,
    /// (Q'K'ᵀ) ⊙ M, CHUNK × CHUNK.
    att: Vec<f32>,
    /// Running key maxima of the chunk.
    cj: [f64; CHUNK],
    kept: [bool; CHUNK],
    dvp: usize,
}

impl Chunk {
    fn new(p: &Plan, dv: usize) -> Chunk {
        Chunk::with_rows(p, dv, CHUNK)
    }

    /// A chunk for at most `rows` ≤ [`CHUNK`] tokens at a time: a short decoding call (one token
    /// per step) allocates and clears tiles of its own size, not of a whole chunk.
    fn with_rows(p: &Plan, dv: usize, rows: usize) -> Chunk {
        let (dvp, rows) = (pad(dv), rows.clamp(1, CHUNK));
        Chunk {
            tq: Tile::new(p, rows),
            tk: Tile::new(p, rows),
            vt: vec![0.0; rows * dvp],
            phikt: vec![0.0; p.mfp * CHUNK],
            mask: vec![0.0; CHUNK * CHUNK],
            att: vec![0.0; CHUNK * CHUNK],
            cj: [0.0; CHUNK],
            kept: [false; CHUNK],
            dvp,
        }
    }

    /// φ(K)ᵀ and the decay mask of the chunk whose keys [`Chunk::prepare_keys`] loaded: what
    /// every query head reading these keys shares.
    #[inline(always)]
    fn finish_keys<S: SimdF32>(&mut self, p: &Plan, rows: usize) {
        let _t = Span::start(Phase::Apply);
        self.phikt.fill(0.0);
        transpose::<S>(rows, p.mfp, &self.tk.phi, p.mfp, &mut self.phikt, CHUNK);
        let constant = self.cj[0] == self.cj[rows - 1];
        for i in 0..rows {
            let mrow = &mut self.mask[i * CHUNK..(i + 1) * CHUNK];
            if constant {
                mrow[..=i].fill(1.0);
            } else {
                decay_row::<S>(&self.cj, self.cj[i], mrow);
            }
            mrow[i + 1..].fill(0.0);
        }
    }

    /// Loads the queries of rows r..r+rows of one head reading the chunk's keys, computes φ(Q)
    /// and Q'K'ᵀ ⊙ M (after [`Chunk::finish_keys`]).
    #[inline(always)]
    fn prepare_queries<S: SimdF32>(&mut self, p: &Plan, io: &HeadIn<'_>, r: usize, rows: usize) {
        let t = Span::start(Phase::Io);
        load_rows(&io.q, io.q_at, io.d, r, rows, &mut self.tq.x, p.dp);
        let t = t.next(Phase::FeatureMap);
        self.tq.project::<S>(p, rows);
        self.tq.features::<S>(p, rows);
        let t = t.next(Phase::Apply);
        gemm::<S>(rows, p.mfp, CHUNK, &self.tq.phi, p.mfp, 1, &self.phikt, CHUNK, &mut self.att, CHUNK, true);
        let constant = self.cj[0] == self.cj[rows - 1];
        for i in 0..rows {
            let arow = &mut self.att[i * CHUNK..(i + 1) * CHUNK];
            if !constant {
                for (a, &m) in arow[..=i].iter_mut().zip(&self.mask[i * CHUNK..(i + 1) * CHUNK]) {
                    *a *= m;
                }
            }
            arow[i + 1..].fill(0.0);
        }
        t.end();
    }

    /// Loads keys and values of rows r..r+rows and computes φ(K) against the running maxima
    /// (continuing from `c_run`, or `given`); padded keys get zero rows.
    #[inline(always)]
    fn prepare_keys<S: SimdF32>(
        &mut self,
        p: &Plan,
        io: &HeadIn<'_>,
        r: usize,
        rows: usize,
        c_run: f64,
        given: Option<&[f64]>,
    ) {
        let dvp = self.dvp;
        let t = Span::start(Phase::Io);
        load_rows(&io.k, io.k_at, io.d, r, rows, &mut self.tk.x, p.dp);
        load_rows(&io.v, io.v_at, io.dv, r, rows, &mut self.vt, dvp);
        let t = t.next(Phase::FeatureMap);
        self.tk.project::<S>(p, rows);
        let mut c = c_run;
        for i in 0..rows {
            self.kept[i] = io.keep(r + i);
            if self.kept[i] && self.tk.s[i] > c {
                c = self.tk.s[i];
            }
            self.cj[i] = match given {
                Some(g) => g[i],
                None => c,
            };
        }
        self.tk.c[..rows].copy_from_slice(&self.cj[..rows]);
        self.tk.features::<S>(p, rows);
        for i in (0..rows).filter(|&i| !self.kept[i]) {
            self.tk.phi[i * p.mfp..(i + 1) * p.mfp].fill(0.0);
        }
        t.end();
    }

    /// num (rows × dvp) and den of the chunk given the incoming state; marks the query rows
    /// whose guard did not fire as scale-free.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn outputs<S: SimdF32>(
        &mut self,
        p: &Plan,
        io: &HeadIn<'_>,
        rows: usize,
        st: &HeadState,
        delta: f32,
        num: &mut [f32],
        den: &mut [f32],
    ) {
        let dvp = self.dvp;
        let _t = Span::start(Phase::Apply);
        gemm::<S>(rows, p.mfp, dvp, &self.tq.phi, p.mfp, 1, &st.s, dvp, num, dvp, true);
        for i in 0..rows {
            let w = decay::<S>(st.c, self.cj[i]);
            let qi = &self.tq.phi[i * p.mfp..(i + 1) * p.mfp];
            scale::<S>(w, &mut num[i * dvp..(i + 1) * dvp]);
            let intra = sum::<S>(&self.att[i * CHUNK..(i + 1) * CHUNK]);
            let raw = intra + w * dot::<S>(qi, &st.z);
            self.tq.scale_free[i] = !guard_fires(raw, delta);
            den[i] = guard(raw, delta);
            if at_risk(den[i], self.cj[i] > f64::NEG_INFINITY) {
                io.flag_risk();
            }
        }
        gemm::<S>(rows, rows, dvp, &self.att, CHUNK, 1, &self.vt, dvp, num, dvp, false);
    }

    /// Moves the state past this chunk (consumes φ(K), which it rescales in place).
    #[inline(always)]
    fn advance<S: SimdF32>(&mut self, p: &Plan, rows: usize, st: &mut HeadState) {
        let _t = Span::start(Phase::StateBuild);
        self.tk.phi_current = false;
        let c_end = self.cj[rows - 1];
        let f = decay::<S>(st.c, c_end);
        if f != 1.0 {
            scale::<S>(f, &mut st.s);
            scale::<S>(f, &mut st.z);
        }
        for i in 0..rows {
            let u = decay::<S>(self.cj[i], c_end);
            let row = &mut self.tk.phi[i * p.mfp..(i + 1) * p.mfp];
            if u != 1.0 {
                scale::<S>(u, row);
            }
            axpy::<S>(1.0, row, &mut st.z);
        }
        gemm::<S>(p.mfp, rows, self.dvp, &self.tk.phi, 1, p.mfp, &self.vt, self.dvp, &mut st.s, self.dvp, false);
        st.c = c_end;
    }
}

/// m_j = exp(c_j − c_i) for every column of a mask row (1 where c_j = c_i, −∞ included); the
/// caller zeroes j > i. Arguments are ≤ 0 for j ≤ i because the maxima are running; the
/// differences are taken in f64 (the maxima are), the exponentials in f32 vectors.
#[inline(always)]
fn decay_row<S: SimdF32>(cj: &[f64; CHUNK], ci: f64, mrow: &mut [f32]) {
    let mut diff = [0.0f32; CHUNK];
    for (d, &c) in diff.iter_mut().zip(cj) {
        *d = (c - ci) as f32;
    }
    for v in 0..CHUNK / S::LANES {
        // SAFETY: (v + 1)·LANES ≤ CHUNK = diff.len() = mrow.len().
        unsafe {
            let x = S::load(diff.as_ptr().add(v * S::LANES));
            let e = S::select(x.is_nan(), S::splat(1.0), exp_nonpositive(x));
            e.store(mrow.as_mut_ptr().add(v * S::LANES));
        }
    }
}

/// B = (X̄Vᵀ + ḡ1ᵀ) ⊙ M into `bm` (a function, not a closure: closures inside the
/// `#[target_feature]` entry points would be compiled without the ISA).
#[inline(always)]
fn build_b<S: SimdF32>(ch: &Chunk, rows: usize, dv: usize, g: &[f32], gbar: &[f32], vtt: &mut [f32], bm: &mut [f32]) {
    let dvp = ch.dvp;
    let _t = Span::start(Phase::BackwardSweep);
    vtt.fill(0.0);
    transpose::<S>(rows, dv, &ch.vt, dvp, vtt, CHUNK);
    gemm::<S>(rows, dv, CHUNK, g, dvp, 1, vtt, CHUNK, bm, CHUNK, true);
    for i in 0..rows {
        for (b, &m) in bm[i * CHUNK..(i + 1) * CHUNK].iter_mut().zip(&ch.mask[i * CHUNK..(i + 1) * CHUNK]) {
            *b = (*b + gbar[i]) * m;
        }
    }
}

/// The `count` query heads of one key/value head, each with its output rows, made on demand by
/// `make(i)` (once per chunk, each dropped before the next is made): no allocation.
pub(crate) struct GroupHeads<'a, 'o, 'm> {
    pub count: usize,
    pub make: &'m (dyn Fn(usize) -> (HeadIn<'a>, OutRows<'o>) + Sync),
}

/// Causal forward (or prefill/decode) of rows r0..r1 of one key/value head and the query
/// heads reading it, from `state` (the state after row r0 − 1), writing each query head's rows
/// to its output. φ(K), the mask and the state update are computed once for the group.
pub(crate) struct CausalForward<'a, 'o, 'm> {
    pub plan: &'a Plan,
    /// The query heads (with their outputs) of one key/value head; their K and V rows agree.
    pub heads: GroupHeads<'a, 'o, 'm>,
    pub r0: usize,
    pub r1: usize,
    pub state: &'a mut HeadState,
    pub delta: f32,
}

/// The scratch of one forward task: a chunk and the numerators.
struct ForwardScratch {
    ch: Chunk,
    num: Vec<f32>,
    key: ScratchKey,
}

thread_local! {
    /// This thread's scratch of recent forward, decoding and summary tasks.
    static FORWARD_SCRATCH: RefCell<Vec<(ScratchKey, ForwardScratch)>> = const { RefCell::new(Vec::new()) };
}

/// Drops this thread's kept chunk scratch.
pub(crate) fn release_scratch() {
    KeptScratch(&FORWARD_SCRATCH).clear();
    KeptScratch(&SWEEP_SCRATCH).clear();
}

impl ForwardScratch {
    fn take(p: &Plan, dv: usize, rows: usize) -> ForwardScratch {
        let key = scratch_key(p, dv, rows);
        KeptScratch(&FORWARD_SCRATCH).take(key, || {
            let ch = Chunk::with_rows(p, dv, rows);
            let num = vec![0.0; rows * ch.dvp];
            ForwardScratch { ch, num, key }
        })
    }

    fn give_back(self) {
        KeptScratch(&FORWARD_SCRATCH).give_back(self.key, self);
    }
}

impl SimdTask for CausalForward<'_, '_, '_> {
    type Output = ();
    #[inline(always)]
    fn run<S: SimdF32>(self) {
        let p = self.plan;
        let GroupHeads { count, make } = self.heads;
        // The keys and values of the group, as every query head reads them.
        let Some(keys) = (count > 0).then(|| make(0).0) else { return };
        let cap = CHUNK.min(self.r1 - self.r0);
        let mut scratch = ForwardScratch::take(p, keys.dv, cap);
        let ForwardScratch { ch, num, .. } = &mut scratch;
        let dvp = ch.dvp;
        let mut den = [0.0f32; CHUNK];
        let mut r = self.r0;
        while r < self.r1 {
            let rows = CHUNK.min(self.r1 - r);
            ch.prepare_keys::<S>(p, &keys, r, rows, self.state.c, None);
            ch.finish_keys::<S>(p, rows);
            for i in 0..count {
                let (io, mut out) = make(i);
                ch.prepare_queries::<S>(p, &io, r, rows);
                ch.outputs::<S>(p, &io, rows, self.state, self.delta, num, &mut den);
                normalise::<S>(rows, num, dvp, &den);
                store_rows(&mut out, r - self.r0, rows, num, dvp);
            }
            ch.advance::<S>(p, rows, self.state);
            r += rows;
        }
        scratch.give_back();
    }
}

/// The backward's forward sweep leaves R_i, ḡ_i and the running key maximum c_i (16 bytes per
/// token, c in f64) for the reverse sweep in a [`Stash`]: the caller's dv rows of the same token,
/// or its dk rows when dv rows are narrower, which the reverse sweep reads before it overwrites
/// them; a side buffer only for heads too narrow for both (d and d_v ≤ 3 in f32, ≤ 7 in 16-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StashPlace {
    Dv,
    Dk,
    Side,
}

impl StashPlace {
    /// Where the entries of `group` query heads per token go.
    pub(crate) fn choose(d: usize, dv: usize, elem_size: usize, group: usize) -> StashPlace {
        if Stash::fits(dv, elem_size, group) {
            StashPlace::Dv
        } else if Stash::fits(d, elem_size, group) {
            StashPlace::Dk
        } else {
            StashPlace::Side
        }
    }
}

/// What the causal backward's forward sweep leaves per token for the reverse sweep.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct StashEntry {
    /// The guarded denominator R_i.
    pub den: f32,
    /// ḡ_i = −⟨G_i, out_i⟩ / R_i.
    pub gbar: f32,
    /// The running key maximum c_i.
    pub c: f64,
}

impl StashEntry {
    const BYTES: usize = 16;

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&self.den.to_ne_bytes());
        b[4..8].copy_from_slice(&self.gbar.to_ne_bytes());
        b[8..].copy_from_slice(&self.c.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> StashEntry {
        let f4 = |o: usize| f32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[8..16]);
        StashEntry { den: f4(0), gbar: f4(4), c: f64::from_ne_bytes(c) }
    }
}

/// The bytes of a row.
fn row_bytes<'t>(row: &'t mut HostMut<'_>) -> &'t mut [u8] {
    match row {
        HostMut::F32(s) => bytemuck::cast_slice_mut(s),
        HostMut::F16(s) => bytemuck::cast_slice_mut(s),
        HostMut::Bf16(s) => bytemuck::cast_slice_mut(s),
    }
}

/// One [`StashEntry`] per token and query head of a group, kept in the key/value head's rows of
/// a caller's tensor that are not written yet (so the kernels need no per-token memory of their
/// own; entry `gi` of a token at bytes 16·gi..16·gi + 16 of its row), or, for rows too narrow
/// for the group's entries, in a side buffer (token-major).
pub(crate) enum Stash<'o> {
    Rows(OutRows<'o>),
    Side { entries: &'o mut [StashEntry], group: usize },
}

impl<'o> Stash<'o> {
    /// Whether rows of `row_len` elements of `elem_size` bytes can hold `group` entries.
    fn fits(row_len: usize, elem_size: usize, group: usize) -> bool {
        row_len * elem_size >= StashEntry::BYTES * group
    }

    /// In `rows` (the rows [`StashPlace::choose`] found wide enough for the group), else in
    /// `side` (resized to n · group: no allocation once it has the size).
    pub(crate) fn new(rows: Option<OutRows<'o>>, n: usize, group: usize, side: &'o mut Vec<StashEntry>) -> Self {
        match rows {
            Some(t) => Stash::Rows(t),
            None => {
                side.clear();
                side.resize(n * group, StashEntry::default());
                Stash::Side { entries: side, group }
            }
        }
    }

    fn put(&mut self, row: usize, gi: usize, e: StashEntry) {
        match self {
            Stash::Rows(t) => row_bytes(&mut t.row(row))[gi * StashEntry::BYTES..(gi + 1) * StashEntry::BYTES]
                .copy_from_slice(&e.to_bytes()),
            Stash::Side { entries, group } => entries[row * *group + gi] = e,
        }
    }
}

/// The decayed suffix sums of the reverse sweep: P = Σ_i exp(c_ref − c_i) q'_i x̄_iᵀ (mfp × dvp)
/// and p = Σ_i exp(c_ref − c_i) ḡ_i q'_i (mfp), over the queries after some row, relative to
/// the running key maximum `c_ref` at that row.
#[derive(Debug, Clone, Default)]
pub(crate) struct Suffix {
    pub pm: Vec<f32>,
    pub pv: Vec<f32>,
}

impl Suffix {
    /// Zero sums of the plan's size, in place (no allocation once sized).
    pub(crate) fn reset(&mut self, p: &Plan, dv: usize) {
        zeroed(&mut self.pm, p.mfp * pad(dv));
        zeroed(&mut self.pv, p.mfp);
    }

    /// Adds the queries of a chunk, weighted by exp(c_ref − c_i): consumes φ(Q) (rescaled in
    /// place) and needs x̄ in `g`.
    #[inline(always)]
    fn add_queries<S: SimdF32>(&mut self, p: &Plan, ch: &mut Chunk, rows: usize, c_ref: f64, g: &[f32], gbar: &[f32]) {
        let _t = Span::start(Phase::StateBuild);
        let mfp = p.mfp;
        ch.tq.phi_current = false;
        for ((row, &cj), &gb) in ch.tq.phi.chunks_exact_mut(mfp).zip(&ch.cj).zip(gbar).take(rows) {
            let u = decay::<S>(c_ref, cj);
            if u != 1.0 {
                scale::<S>(u, row);
            }
            axpy::<S>(gb, row, &mut self.pv);
        }
        gemm::<S>(mfp, rows, ch.dvp, &ch.tq.phi, 1, mfp, g, ch.dvp, &mut self.pm, ch.dvp, false);
    }

    /// Re-references to `c_new` ≤ the current reference.
    #[inline(always)]
    fn rescale<S: SimdF32>(&mut self, c_new: f64, c_old: f64) {
        let f = decay::<S>(c_new, c_old);
        if f != 1.0 {
            scale::<S>(f, &mut self.pm);
            scale::<S>(f, &mut self.pv);
        }
    }

    /// The suffix entering the segment before (`self`): `later` (relative to the end of the
    /// segment it enters, `c_later`) re-referenced to `c_here` and plus `seg`, the next segment's
    /// own contribution (already relative to `c_here`).
    pub(crate) fn chain(&mut self, later: &Suffix, c_here: f64, c_later: f64, seg: &Suffix) {
        let f = if c_here == c_later { 1.0 } else { (c_here - c_later).exp() as f32 };
        let mix = |out: &mut [f32], a: &[f32], b: &[f32]| {
            out.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = f * a + b);
        };
        mix(&mut self.pm, &later.pm, &seg.pm);
        mix(&mut self.pv, &later.pv, &seg.pv);
    }
}

/// Entry `gi` of segment row `row` of a stash kept in the rows of `t`.
fn stash_get(t: &mut OutRows<'_>, row: usize, gi: usize) -> StashEntry {
    StashEntry::from_bytes(&row_bytes(&mut t.row(row))[gi * StashEntry::BYTES..])
}

/// What a forward sweep of the causal backward leaves for the rest of the backward (kept by the
/// calling thread between calls, like the other per-segment sums).
#[derive(Default)]
pub(crate) struct SweepOut {
    pub params: Option<ParamAcc>,
    /// The running key maximum entering the segment (the reference of `suffix`).
    pub c_in: f64,
    /// The segment's own suffix sums relative to its incoming maximum (not kept for the first
    /// segment, which has none before it).
    pub suffix: Suffix,
    /// The stash, when it could not live in the gradient rows.
    pub side: Vec<StashEntry>,
}

/// The `count` query heads of one key/value head for the causal backward, made on demand by
/// `make(i)` (with its dq rows in the forward sweep): no allocation.
pub(crate) struct BackwardHeads<'a, 'm, T> {
    pub count: usize,
    pub make: &'m (dyn Fn(usize) -> T + Sync + 'a),
}

/// Causal backward, first sweep over rows r0..r1 of one key/value head and the query heads
/// reading it, from the incoming `state`: recomputes the outputs, writes each query head's dq
/// (rows r0..r1 only) and the stash, and with `suffix` also the segment's contribution (summed
/// over the group) to the suffix sums of the segments before it. φ(K), the mask and the state
/// are computed once for the group.
pub(crate) struct BackwardForwardSweep<'a, 'o, 'm> {
    pub plan: &'a Plan,
    pub heads: BackwardHeads<'a, 'm, (HeadIn<'a>, OutRows<'o>)>,
    pub dout: HostRef<'a>,
    pub delta: f32,
    pub r0: usize,
    pub r1: usize,
    /// The incoming state; left at the state after r1 − 1.
    pub state: &'a mut HeadState,
    /// Whether the segment's share of the suffix sums is wanted (all but the first segment).
    pub suffix: bool,
    pub stash: Stash<'o>,
    pub params: Option<ParamAcc>,
    /// Where the sweep leaves the segment's share of the suffix sums (untouched without
    /// `suffix`) and the running key maximum entering it.
    pub suffix_out: &'a mut Suffix,
    pub c_in_out: &'a mut f64,
}

/// The scratch of one causal backward sweep (either direction): a chunk and its products.
struct SweepScratch {
    ch: Chunk,
    num: Vec<f32>,
    g: Vec<f32>,
    bm: Vec<f32>,
    vtt: Vec<f32>,
    /// Sᵀ (forward sweep) or Pᵀ (reverse sweep), dvp × mfp.
    state_t: Vec<f32>,
    grads: FeatureGrads,
    key: ScratchKey,
}

thread_local! {
    static SWEEP_SCRATCH: RefCell<Vec<(ScratchKey, SweepScratch)>> = const { RefCell::new(Vec::new()) };
}

impl SweepScratch {
    fn take(p: &Plan, dv: usize) -> SweepScratch {
        let key = scratch_key(p, dv, CHUNK);
        let mut s = KeptScratch(&SWEEP_SCRATCH).take(key, || {
            let (dvp, mfp) = (pad(dv), p.mfp);
            SweepScratch {
                ch: Chunk::new(p, dv),
                num: vec![0.0; CHUNK * dvp],
                g: vec![0.0; CHUNK * dvp],
                bm: vec![0.0; CHUNK * CHUNK],
                vtt: vec![0.0; dvp * CHUNK],
                state_t: vec![0.0; dvp * mfp],
                grads: FeatureGrads::new(p, CHUNK),
                key,
            }
        });
        // Value-width rows are read over their padding (which loads never write): zero, as new.
        s.num.fill(0.0);
        s.g.fill(0.0);
        s
    }

    fn give_back(self) {
        KeptScratch(&SWEEP_SCRATCH).give_back(self.key, self);
    }
}

impl SimdTask for BackwardForwardSweep<'_, '_, '_> {
    type Output = Option<ParamAcc>;
    #[inline(always)]
    fn run<S: SimdF32>(mut self) -> Option<ParamAcc> {
        let p = self.plan;
        let BackwardHeads { count, make } = self.heads;
        // The keys and values of the group, as every query head reads them.
        let io = make(0).0;
        let mfp = p.mfp;
        let mut scratch = SweepScratch::take(p, io.dv);
        let SweepScratch { ch, num, g, bm, vtt, state_t: st_t, grads: FeatureGrads { dphi, da, da2, dx }, .. } =
            &mut scratch;
        let dvp = ch.dvp;
        let mut den = [0.0f32; CHUNK];
        let mut gbar = [0.0f32; CHUNK];
        let c_in = self.state.c;
        // The first segment has no segment before it: its share is never read (nor sized).
        let mut suffix = self.suffix.then(|| {
            self.suffix_out.reset(p, io.dv);
            &mut *self.suffix_out
        });
        let st = &mut *self.state;
        let mut r = self.r0;
        while r < self.r1 {
            let rows = CHUNK.min(self.r1 - r);
            ch.prepare_keys::<S>(p, &io, r, rows, st.c, None);
            ch.finish_keys::<S>(p, rows);
            // The per-chunk state transposes run faster on the 8-wide path than through
            // AVX-512's in-register 16 × 16 blocks (measured: causal forward + backward 1.07–1.13×).
            transpose::<wide::f32x8>(mfp, dvp, &st.s, dvp, st_t, mfp);
            for gi in 0..count {
                let (io, mut dq) = make(gi);
                ch.prepare_queries::<S>(p, &io, r, rows);
                ch.outputs::<S>(p, &io, rows, st, self.delta, num, &mut den);
                let t = Span::start(Phase::Apply);
                normalise::<S>(rows, num, dvp, &den);
                let t = t.next(Phase::Io);
                load_rows(&self.dout, io.dout_at, io.dv, r, rows, g, dvp);
                let t = t.next(Phase::BackwardSweep);
                cotangents::<S>(rows, g, num, dvp, &den, &mut gbar);
                for i in 0..rows {
                    self.stash.put(r - self.r0 + i, gi, StashEntry { den: den[i], gbar: gbar[i], c: ch.cj[i] });
                }
                t.end();
                build_b::<S>(ch, rows, io.dv, g, &gbar, vtt, bm);
                let t = Span::start(Phase::BackwardSweep);
                // dq' = w_i (x̄ Sᵀ + ḡ zᵀ) + B K'
                gemm::<S>(rows, io.dv, mfp, g, dvp, 1, st_t, mfp, dphi, mfp, true);
                for i in 0..rows {
                    let row = &mut dphi[i * mfp..(i + 1) * mfp];
                    axpy::<S>(gbar[i], &st.z, row);
                    scale::<S>(decay::<S>(st.c, ch.cj[i]), row);
                }
                gemm::<S>(rows, rows, mfp, bm, CHUNK, 1, &ch.tk.phi, mfp, dphi, mfp, false);
                let t = t.next(Phase::FeatureBackward);
                ch.tq.features_backward::<S>(p, rows, dphi, da, da2, dx, self.params.as_mut());
                let t = t.next(Phase::Io);
                store_rows(&mut dq, r - self.r0, rows, dx, p.dp);
                t.end();
                if let Some(sfx) = suffix.as_mut() {
                    sfx.add_queries::<S>(p, ch, rows, c_in, g, &gbar);
                }
            }
            ch.advance::<S>(p, rows, st);
            r += rows;
        }
        scratch.give_back();
        *self.c_in_out = c_in;
        self.params
    }
}

/// Causal backward, second sweep over rows r0..r1 of one key/value head, last chunk first:
/// writes dk and dv (rows r0..r1 only, summed over the query heads reading it) from the suffix
/// sums of the queries after r1 (`suffix`, relative to the running maximum at row r1 − 1,
/// summed over the group) and the stash the first sweep left.
pub(crate) struct BackwardReverseSweep<'a, 'o, 'm> {
    pub plan: &'a Plan,
    pub heads: BackwardHeads<'a, 'm, HeadIn<'a>>,
    pub dout: HostRef<'a>,
    pub r0: usize,
    pub r1: usize,
    /// The suffix sums entering from r1 (consumed).
    pub suffix: &'a mut Suffix,
    pub place: StashPlace,
    pub side: &'a [StashEntry],
    pub dk: OutRows<'o>,
    pub dv: OutRows<'o>,
    pub params: Option<ParamAcc>,
}

/// Entry `gi` of the stash at segment row `row` (the group has `group` query heads).
fn stashed(
    place: StashPlace,
    (dk, dv): (&mut OutRows<'_>, &mut OutRows<'_>),
    side: &[StashEntry],
    group: usize,
    row: usize,
    gi: usize,
) -> StashEntry {
    match place {
        StashPlace::Dv => stash_get(dv, row, gi),
        StashPlace::Dk => stash_get(dk, row, gi),
        StashPlace::Side => side[row * group + gi],
    }
}

impl SimdTask for BackwardReverseSweep<'_, '_, '_> {
    type Output = Option<ParamAcc>;
    #[inline(always)]
    fn run<S: SimdF32>(self) -> Option<ParamAcc> {
        let BackwardReverseSweep { plan: p, heads, dout, r0, r1, suffix: sfx, place, side, mut dk, mut dv, mut params } =
            self;
        let BackwardHeads { count, make } = heads;
        let io = make(0);
        let mfp = p.mfp;
        let mut scratch = SweepScratch::take(p, io.dv);
        let SweepScratch { ch, num: dvo, g, bm, vtt, state_t: pm_t, grads: FeatureGrads { dphi, da, da2, dx }, .. } =
            &mut scratch;
        let dvp = ch.dvp;
        let mut gbar = [0.0f32; CHUNK];
        let mut den = [0.0f32; CHUNK];
        let mut cj = [0.0f64; CHUNK];
        let nchunks = (r1 - r0).div_ceil(CHUNK);
        for ci in (0..nchunks).rev() {
            let r = r0 + ci * CHUNK;
            let rows = CHUNK.min(r1 - r);
            // The running key maxima depend on the keys alone: every head stashed the same.
            for (i, c) in cj.iter_mut().enumerate().take(rows) {
                *c = stashed(place, (&mut dk, &mut dv), side, count, r - r0 + i, 0).c;
            }
            ch.prepare_keys::<S>(p, &io, r, rows, 0.0, Some(&cj[..rows]));
            ch.finish_keys::<S>(p, rows);
            let t = Span::start(Phase::BackwardSweep);
            let c_end = ch.cj[rows - 1];
            // dk' = w_j (V Pᵀ + 1 pᵀ) + Bᵀ Q'
            // 8-wide for the same reason as the forward sweep's state transpose.
            transpose::<wide::f32x8>(mfp, dvp, &sfx.pm, dvp, pm_t, mfp);
            gemm::<S>(rows, io.dv, mfp, &ch.vt, dvp, 1, pm_t, mfp, dphi, mfp, true);
            // dv = w_j K' P + (Q'K'ᵀ ⊙ M)ᵀ X̄
            gemm::<S>(rows, mfp, dvp, &ch.tk.phi, mfp, 1, &sfx.pm, dvp, dvo, dvp, true);
            for j in 0..rows {
                let w = decay::<S>(ch.cj[j], c_end);
                let row = &mut dphi[j * mfp..(j + 1) * mfp];
                axpy::<S>(1.0, &sfx.pv, row);
                scale::<S>(w, row);
                scale::<S>(w, &mut dvo[j * dvp..(j + 1) * dvp]);
            }
            t.end();
            // The previous row's stash must be read before this chunk's rows are overwritten
            // (it lies in the chunk before, which is still intact).
            let c_prev =
                if ci > 0 { Some(stashed(place, (&mut dk, &mut dv), side, count, r - r0 - 1, 0).c) } else { None };
            if let Some(c_prev) = c_prev {
                // Re-reference the suffix sums to the last key maximum before this chunk (the
                // terms above used them as they were), then add each head's queries below.
                let t = Span::start(Phase::StateBuild);
                sfx.rescale::<S>(c_prev, c_end);
                t.end();
            }
            for gi in 0..count {
                for i in 0..rows {
                    let e = stashed(place, (&mut dk, &mut dv), side, count, r - r0 + i, gi);
                    (den[i], gbar[i]) = (e.den, e.gbar);
                }
                let qio = make(gi);
                ch.prepare_queries::<S>(p, &qio, r, rows);
                let t = Span::start(Phase::Io);
                load_rows(&dout, qio.dout_at, qio.dv, r, rows, g, dvp);
                let t = t.next(Phase::BackwardSweep);
                for i in 0..rows {
                    let row = &mut g[i * dvp..(i + 1) * dvp];
                    // As in `cotangents`: rows at risk (their head is recomputed) contribute nothing.
                    if den[i].abs() < RISK_DEN {
                        row.fill(0.0);
                    } else {
                        scale::<S>(1.0 / den[i], row);
                    }
                }
                t.end();
                build_b::<S>(ch, rows, io.dv, g, &gbar, vtt, bm);
                let t = Span::start(Phase::BackwardSweep);
                gemm::<S>(rows, rows, mfp, bm, 1, CHUNK, &ch.tq.phi, mfp, dphi, mfp, false);
                gemm::<S>(rows, rows, dvp, &ch.att, 1, CHUNK, g, dvp, dvo, dvp, false);
                t.end();
                if let Some(c_prev) = c_prev {
                    sfx.add_queries::<S>(p, ch, rows, c_prev, g, &gbar);
                }
            }
            let t = Span::start(Phase::BackwardSweep);
            for j in (0..rows).filter(|&j| !ch.kept[j]) {
                dphi[j * mfp..(j + 1) * mfp].fill(0.0);
                dvo[j * dvp..(j + 1) * dvp].fill(0.0);
            }
            let t = t.next(Phase::FeatureBackward);
            ch.tk.features_backward::<S>(p, rows, dphi, da, da2, dx, params.as_mut());
            for j in (0..rows).filter(|&j| !ch.kept[j]) {
                dx[j * p.dp..(j + 1) * p.dp].fill(0.0);
            }
            let t = t.next(Phase::Io);
            store_rows(&mut dk, r - r0, rows, dx, p.dp);
            store_rows(&mut dv, r - r0, rows, dvo, dvp);
            t.end();
        }
        scratch.give_back();
        params
    }
}

/// What keys r0..r1 of one head add to a causal state, computed from an empty state: φ(K)ᵀV and
/// φ(K)ᵀ1 relative to the segment's own final running maximum `c` (the first pass of the
/// sequence-parallel causal forward). Exact: the features scale with the stabiliser as a whole,
/// ε floor included, so only a rescale is needed to continue from another state.
pub(crate) struct CausalSummary<'a> {
    pub plan: &'a Plan,
    pub io: HeadIn<'a>,
    pub r0: usize,
    pub r1: usize,
    /// An empty state ([`HeadState::reset`]), left holding the segment's summary.
    pub state: &'a mut HeadState,
}

impl SimdTask for CausalSummary<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: SimdF32>(self) {
        let (p, io) = (self.plan, self.io);
        let mut scratch = ForwardScratch::take(p, io.dv, CHUNK.min(self.r1 - self.r0));
        let st = self.state;
        let mut r = self.r0;
        while r < self.r1 {
            let rows = CHUNK.min(self.r1 - r);
            scratch.ch.prepare_keys::<S>(p, &io, r, rows, st.c, None);
            scratch.ch.advance::<S>(p, rows, st);
            r += rows;
        }
        scratch.give_back();
    }
}

/// The state after a segment (`out`) given the state before it and the segment's summary.
pub(crate) fn combine_summary(before: &HeadState, seg: &HeadState, out: &mut HeadState) {
    let c_out = before.c.max(seg.c);
    let w = |a: f64| if a == c_out { 1.0 } else { (a - c_out).exp() as f32 };
    let (fa, fb) = (w(before.c), w(seg.c));
    let mix = |out: &mut [f32], a: &[f32], b: &[f32]| {
        out.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = fa * a + fb * b);
    };
    mix(&mut out.s, &before.s, &seg.s);
    mix(&mut out.z, &before.z, &seg.z);
    out.c = c_out;
}
