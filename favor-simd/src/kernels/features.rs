//! Feature maps on tiles of tokens, in f32, with the projection as a register-blocked product.
//!
//! A tile is `rows` tokens of one (batch, head), row-major with padded rows: x is rows × dp,
//! the projections a = x·W̃ᵀ are rows × mp, the features φ rows × mfp (all padded to the widest
//! vector with zeros). W̃ is the projection with every constant scale folded in (√τ for the
//! softmax maps, τ the softmax scale, so d^{-1/4} by default; scale·√τ or scale for generalized
//! maps), stored transposed (dp × mp) for the forward product and as is (mp × dp) for the
//! backward one.
//!
//! Internal feature layout: the maps with 2m features (hyperbolic, trigonometric) keep their two
//! halves at columns [0, m) and [mp, mp + m), so both halves are whole vectors. Attention never
//! depends on the order of features; only [`Plan::to_external`] maps back to the public layout.
//!
//! The stabiliser of each row is passed in (`c`); see favor-core's `features` docs for the
//! formulas, which these follow term by term. Padded columns are always written as zero.
//!
//! # Large, tiny and ordinary rows
//! Per-row scalars that decide which features are kept are formed in f64: h = ‖x̃‖²/2 (from the
//! f32 inputs, exactly widened), the log-scale s and the stabiliser c. A query's shift is its own
//! largest projection (h cancels and is never formed); a key's is h + c rounded *up* to f32 and
//! at least the row's largest projection, so every exp argument a − shift is ≤ 0 by
//! construction, and it is accurate however large h is.
//!
//! Rows the f32 path cannot carry — an input entry beyond [`WIDE_INPUT`] (the projection or
//! the gradient could overflow), or, for the maps without a built-in stabiliser (ReLU, ELU+1,
//! softplus, learned), largest feature outside [`FEATURE_LO`]..[`FEATURE_HI`] — are *wide*:
//! their features and gradients are computed in f64 by favor-core's per-token map, exactly like
//! the reference. The generic maps then get a log-scale too, s = ln(max φ) (0 for the other
//! rows), and every row's features are stored as φ·e^{−c} like the exponential maps', so that
//! huge or tiny (subnormal) features neither overflow nor lose their precision. The factor
//! cancels like any stabiliser. Ordinary rows never take that path.

use super::gemm::{axpy, gemm, sum};
use crate::isa::{SimdF32, pad};
use crate::math::exp::exp_nonpositive;
use favor_core::saturate_f32;
use favor_core::{Elementwise, FeatureMap};
use std::sync::{Arc, Mutex};

pub(crate) use favor_core::limits::{FEATURE_HI, FEATURE_LO, WIDE_INPUT};

/// Which formula a plan evaluates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Positive,
    Hyperbolic,
    Trigonometric,
    Generalized { f: Elementwise, kappa: f32, projected: bool, scale: f32 },
    Softplus,
    GatedSoftplus,
}

/// A feature map prepared for f32 tiles (built once per call).
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub kind: Kind,
    pub d: usize,
    pub dp: usize,
    /// Projection outputs per token (m, or d without a projection).
    pub m: usize,
    pub mp: usize,
    /// Public feature count M.
    pub mf: usize,
    /// Internal padded feature count.
    pub mfp: usize,
    /// W̃ᵀ, dp × mp.
    wt: Vec<f32>,
    /// W̃, mp × dp.
    ws: Vec<f32>,
    /// Gate branch of the gated map.
    wt_gate: Vec<f32>,
    ws_gate: Vec<f32>,
    /// Bias of the learned softplus map (mp).
    bias: Option<Vec<f32>>,
    /// h = hcoef·‖x‖² (= ‖x̃‖²/2), in f64.
    hcoef: f64,
    /// m^{-1/2} or (2m)^{-1/2}.
    ratio: f32,
    /// ratio·ε: the ε floor of a token at its own log-scale (0 for maps without ε).
    beta: f64,
    /// The map itself, for the wide rows (favor-core's f64 per-token functions).
    map: FeatureMap,
}

fn transposed(m: usize, d: usize, w: &[f32], s: f32, mp: usize, dp: usize) -> (Vec<f32>, Vec<f32>) {
    let mut wt = vec![0.0; dp * mp];
    let mut ws = vec![0.0; mp * dp];
    for j in 0..m {
        for t in 0..d {
            let x = w[j * d + t] * s;
            wt[t * mp + j] = x;
            ws[j * dp + t] = x;
        }
    }
    (wt, ws)
}

/// Maps prepared by recent calls, most recent first: repeated calls with the same map (every
/// decoding step, every layer call of an engine) reuse W̃ instead of transposing and padding it
/// again. A few entries, so that alternating maps (layers, training steps) only cost a lookup;
/// each keeps its map's W and W̃ alive until pushed out.
static PREPARED: Mutex<Vec<Arc<Plan>>> = Mutex::new(Vec::new());
const PREPARED_ENTRIES: usize = 8;

impl Plan {
    /// [`Plan::new`], reused from an earlier call with an equal map and `d` when there was one.
    pub(crate) fn prepared(map: &FeatureMap, d: usize) -> Arc<Plan> {
        let mut cache = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.iter().position(|p| p.d == d && p.map == *map) {
            let plan = cache.remove(i);
            cache.insert(0, plan.clone());
            return plan;
        }
        // Preparing holds the lock: concurrent first calls with a new map wait for one
        // preparation instead of each doing it.
        let plan = Arc::new(Plan::new(map, d));
        cache.insert(0, plan.clone());
        cache.truncate(PREPARED_ENTRIES);
        plan
    }

    /// Prepares `map` for inputs of dimension `d` (already validated).
    pub(crate) fn new(map: &FeatureMap, d: usize) -> Plan {
        let dp = pad(d);
        // x̃ = nrm·x with nrm = √τ (d^{-1/4} by default); h = ‖x̃‖²/2 = (τ/2)·‖x‖².
        let nrm = map.data_normalizer(d);
        let hcoef = map.softmax_scale(d).unwrap_or(0.0) / 2.0;
        let mut plan = Plan {
            kind: Kind::Softplus,
            d,
            dp,
            m: 0,
            mp: 0,
            mf: map.feature_dim(d),
            mfp: 0,
            wt: Vec::new(),
            ws: Vec::new(),
            wt_gate: Vec::new(),
            ws_gate: Vec::new(),
            bias: None,
            hcoef,
            ratio: 1.0,
            beta: 0.0,
            map: map.clone(),
        };
        let (m, w, s): (usize, &[f32], f64) = match map {
            FeatureMap::Positive { projection, epsilon, .. } => {
                plan.kind = Kind::Positive;
                plan.ratio = (1.0 / (projection.m() as f64).sqrt()) as f32;
                plan.beta = *epsilon as f64 / (projection.m() as f64).sqrt();
                (projection.m(), projection.matrix(), nrm)
            }
            FeatureMap::Hyperbolic { projection, epsilon, .. } => {
                plan.kind = Kind::Hyperbolic;
                plan.ratio = (1.0 / (2.0 * projection.m() as f64).sqrt()) as f32;
                plan.beta = *epsilon as f64 / (2.0 * projection.m() as f64).sqrt();
                (projection.m(), projection.matrix(), nrm)
            }
            FeatureMap::Trigonometric { projection, .. } => {
                plan.kind = Kind::Trigonometric;
                plan.ratio = (1.0 / (projection.m() as f64).sqrt()) as f32;
                (projection.m(), projection.matrix(), nrm)
            }
            FeatureMap::Generalized { f, projection, scale, kappa, .. } => {
                let s = *scale as f64 * nrm;
                match projection {
                    Some(p) => {
                        plan.kind = Kind::Generalized { f: *f, kappa: *kappa, projected: true, scale: s as f32 };
                        (p.m(), p.matrix(), s)
                    }
                    None => {
                        plan.kind = Kind::Generalized { f: *f, kappa: *kappa, projected: false, scale: s as f32 };
                        (d, &[][..], s)
                    }
                }
            }
            FeatureMap::Softplus(l) => {
                plan.kind = Kind::Softplus;
                (l.m, &l.w[..], 1.0)
            }
            FeatureMap::GatedSoftplus(g) => {
                plan.kind = Kind::GatedSoftplus;
                (g.filter.m, &g.filter.w[..], 1.0)
            }
        };
        plan.m = m;
        plan.mp = pad(m);
        plan.mfp = match plan.kind {
            Kind::Hyperbolic | Kind::Trigonometric => 2 * plan.mp,
            _ => plan.mp,
        };
        if !w.is_empty() {
            (plan.wt, plan.ws) = transposed(m, d, w, s as f32, plan.mp, dp);
        }
        if let FeatureMap::Softplus(l) = map
            && let Some(b) = &l.bias
        {
            let mut bp = vec![0.0; plan.mp];
            bp[..m].copy_from_slice(b);
            plan.bias = Some(bp);
        }
        if let FeatureMap::GatedSoftplus(g) = map {
            (plan.wt_gate, plan.ws_gate) = transposed(m, d, &g.gate.w, 1.0, plan.mp, dp);
        }
        plan
    }

    /// True for the exponential maps, whose log-scale stabiliser matters.
    pub(crate) fn is_stabilised(&self) -> bool {
        matches!(self.kind, Kind::Positive | Kind::Hyperbolic | Kind::Trigonometric)
    }

    /// True for maps with two halves of m features.
    fn split(&self) -> bool {
        matches!(self.kind, Kind::Hyperbolic | Kind::Trigonometric)
    }

    /// Internal column of public feature `j`.
    pub(crate) fn internal_col(&self, j: usize) -> usize {
        if self.split() && j >= self.m { self.mp + j - self.m } else { j }
    }

    /// Copies an internal feature row to the public layout (`out` has `mf` entries).
    pub(crate) fn to_external(&self, row: &[f32], out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = row[self.internal_col(j)];
        }
    }

    /// Copies a public feature row into the internal layout (padding zeroed).
    pub(crate) fn to_internal(&self, row: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        for (j, &x) in row.iter().enumerate() {
            out[self.internal_col(j)] = x;
        }
    }
}

/// The buffers of a tile's feature-map backward ([`Tile::features_backward`]) for `rows`
/// tokens: dφ in, the projection cotangents and dx out.
pub(crate) struct FeatureGrads {
    pub dphi: Vec<f32>,
    pub da: Vec<f32>,
    pub da2: Vec<f32>,
    pub dx: Vec<f32>,
}

impl FeatureGrads {
    pub(crate) fn new(p: &Plan, rows: usize) -> FeatureGrads {
        FeatureGrads {
            dphi: vec![0.0; rows * p.mfp],
            da: vec![0.0; rows * p.mp],
            da2: vec![0.0; rows * p.mp],
            dx: vec![0.0; rows * p.dp],
        }
    }
}

/// Scratch buffers of one tile of `t` tokens.
pub(crate) struct Tile {
    pub x: Vec<f32>,
    pub a: Vec<f32>,
    pub a2: Vec<f32>,
    /// h = ‖x̃‖²/2 of each row, in f64 (exponential maps).
    h: Vec<f64>,
    /// Each row's largest projection (|projection| for hyperbolic features), exactly as in `a`.
    amax: Vec<f32>,
    /// Each row's own log-scale s (module docs of favor-core's `features`).
    pub s: Vec<f64>,
    /// Each row's stabiliser c ≥ s. [`Tile::project`] sets c = s (a query's); callers set the
    /// keys' before [`Tile::features`].
    pub c: Vec<f64>,
    /// Rows computed in f64 (module docs).
    wide: Vec<bool>,
    /// Rows whose use does not depend on the scale of their own features: queries whose
    /// denominator guard did not fire. Their backward leaves out ∂ℒ/∂h, which is exactly zero
    /// (favor-core's `features_backward_scale_invariant`). Cleared by [`Tile::project`].
    pub scale_free: Vec<bool>,
    pub phi: Vec<f32>,
    /// True while `phi` holds exactly what [`Tile::features`] wrote for the current projections
    /// and stabilisers, so that the backward can reuse the exponentials instead of recomputing
    /// them; whoever changes `phi` in place must clear it. Rows zeroed for padded keys may keep
    /// it: the backward zeroes their dφ too, so they contribute nothing.
    pub phi_current: bool,
    /// f64 scratch of the wide rows (allocated on first use).
    wide_buf: Vec<f64>,
}

/// The exp shift and ε floor of one row of an exponential map.
#[derive(Clone, Copy)]
struct RowExp {
    /// −T with T ≥ every projection of the row: exp(a − T) ≤ 1.
    neg_shift: f32,
    /// ratio·ε·e^{s − c}.
    floor: f32,
}

/// The smallest f32 ≥ x (x finite or +∞).
fn round_up(x: f64) -> f32 {
    let f = x as f32;
    if (f as f64) < x { f.next_up() } else { f }
}

impl Tile {
    pub(crate) fn new(p: &Plan, t: usize) -> Tile {
        let gated = matches!(p.kind, Kind::GatedSoftplus);
        Tile {
            x: vec![0.0; t * p.dp],
            a: vec![0.0; t * p.mp],
            a2: if gated { vec![0.0; t * p.mp] } else { Vec::new() },
            h: vec![0.0; t],
            amax: vec![0.0; t],
            s: vec![0.0; t],
            c: vec![0.0; t],
            wide: vec![false; t],
            scale_free: vec![false; t],
            phi: vec![0.0; t * p.mfp],
            phi_current: false,
            wide_buf: Vec::new(),
        }
    }

    /// Projections a (and the gate's), h, and the log-scales `s` (copied into `c`) for `rows`
    /// tokens in `x`; decides which rows are wide.
    #[inline(always)]
    pub(crate) fn project<S: SimdF32>(&mut self, p: &Plan, rows: usize) {
        let (dp, mp) = (p.dp, p.mp);
        self.phi_current = false;
        match p.kind {
            Kind::Generalized { projected: false, scale, .. } => {
                for i in 0..rows * dp {
                    self.a[i] = self.x[i] * scale;
                }
            }
            _ => gemm::<S>(rows, p.d, mp, &self.x, dp, 1, &p.wt, mp, &mut self.a, mp, true),
        }
        if let Some(b) = &p.bias {
            for i in 0..rows {
                for (x, &bb) in self.a[i * mp..(i + 1) * mp].iter_mut().zip(b) {
                    *x += bb;
                }
            }
        }
        if matches!(p.kind, Kind::GatedSoftplus) {
            gemm::<S>(rows, p.d, mp, &self.x, dp, 1, &p.wt_gate, mp, &mut self.a2, mp, true);
        }
        for i in 0..rows {
            let xr = &self.x[i * dp..i * dp + p.d];
            self.wide[i] = row_max::<S>(xr, true) > WIDE_INPUT;
            self.scale_free[i] = false;
            self.s[i] = match p.kind {
                Kind::Positive | Kind::Hyperbolic | Kind::Trigonometric => {
                    self.h[i] = p.hcoef * xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
                    self.amax[i] = row_max::<S>(&self.a[i * mp..i * mp + p.m], p.kind == Kind::Hyperbolic);
                    match p.kind {
                        Kind::Trigonometric => self.h[i],
                        _ => self.amax[i] as f64 - self.h[i],
                    }
                }
                _ => {
                    let top = self.generic_max(p, i);
                    if !(top == 0.0 || (FEATURE_LO..=FEATURE_HI).contains(&top)) {
                        self.wide[i] = true;
                    }
                    0.0
                }
            };
            if self.wide[i] {
                self.s[i] = self.wide_log_scale(p, i);
            }
            self.c[i] = self.s[i];
        }
    }

    /// The largest feature of row `i` of a generic map (its f32 value; +∞ or NaN when the
    /// projection overflowed). The maps are monotone in their projection except the gated one.
    #[inline(always)]
    fn generic_max(&self, p: &Plan, i: usize) -> f32 {
        let a = &self.a[i * p.mp..i * p.mp + p.m];
        let top = a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let bad = |x: f32| if x.is_nan() { f32::INFINITY } else { x };
        match p.kind {
            Kind::Generalized { f, kappa, .. } => bad(apply(f, top) + kappa),
            Kind::Softplus => bad(softplus(top)),
            Kind::GatedSoftplus => {
                let g = &self.a2[i * p.mp..i * p.mp + p.m];
                a.iter().zip(g).fold(0.0f32, |m, (&y, &z)| m.max(bad(softplus(y) * sigmoid(z))))
            }
            _ => 0.0,
        }
    }

    /// Row `i` of `x` widened to f64, in `wide_buf[..d]`.
    fn widen_row(&mut self, p: &Plan, i: usize) {
        let need = p.d + 2 * p.mf.max(p.d);
        if self.wide_buf.len() < need {
            self.wide_buf.resize(need, 0.0);
        }
        for t in 0..p.d {
            self.wide_buf[t] = self.x[i * p.dp + t] as f64;
        }
    }

    /// The log-scale of a wide row: favor-core's for the exponential maps, ln(max φ) (0 for a
    /// row of zeros) for the generic maps.
    fn wide_log_scale(&mut self, p: &Plan, i: usize) -> f64 {
        self.widen_row(p, i);
        let (x, rest) = self.wide_buf.split_at_mut(p.d);
        if p.is_stabilised() {
            return p.map.log_scale(x);
        }
        let phi = &mut rest[..p.mf];
        p.map.features(x, 0.0, phi);
        let top = phi.iter().fold(0.0f64, |m, &v| m.max(v));
        if top > 0.0 { top.ln() } else { 0.0 }
    }

    /// Shift and floor of row `i` of an exponential map against its stabiliser.
    #[inline(always)]
    fn row_exp(&self, p: &Plan, i: usize) -> RowExp {
        let (s, c) = (self.s[i], self.c[i]);
        let amax = self.amax[i];
        // A query (c = s) is shifted by its own largest projection: h cancels.
        let shift = if c == s { amax } else { round_up((self.h[i] + c).max(amax as f64)) };
        RowExp { neg_shift: -shift, floor: (p.beta * (s - c).min(0.0).exp()) as f32 }
    }

    /// e^{s − c} (= e^{−c}: s = 0 on the f32 path) for the generic maps and ratio·e^{h − c} for
    /// trigonometric features.
    #[inline(always)]
    fn row_factor(&self, p: &Plan, i: usize) -> f32 {
        match p.kind {
            Kind::Trigonometric => (p.ratio as f64 * (self.h[i] - self.c[i]).min(0.0).exp()) as f32,
            _ if self.s[i] == self.c[i] => 1.0,
            _ => (self.s[i] - self.c[i]).min(0.0).exp() as f32,
        }
    }

    /// φ of `rows` tokens against the stabilisers in `c`, into `phi`.
    #[inline(always)]
    pub(crate) fn features<S: SimdF32>(&mut self, p: &Plan, rows: usize) {
        let (mp, mfp, m) = (p.mp, p.mfp, p.m);
        let ratio = S::splat(p.ratio);
        for i in 0..rows {
            if self.wide[i] {
                self.wide_features(p, i);
                continue;
            }
            let (e, sc) = match p.kind {
                Kind::Positive | Kind::Hyperbolic => (self.row_exp(p, i), 1.0),
                _ => (RowExp { neg_shift: 0.0, floor: 0.0 }, self.row_factor(p, i)),
            };
            let a = &self.a[i * mp..(i + 1) * mp];
            let phi = &mut self.phi[i * mfp..(i + 1) * mfp];
            match p.kind {
                Kind::Positive | Kind::Hyperbolic => {
                    let (shift, floor) = (S::splat(e.neg_shift), S::splat(e.floor));
                    for v in 0..mp / S::LANES {
                        // SAFETY: (v + 1)·LANES ≤ mp = a.len(), and phi has mfp ≥ 2·mp or mp.
                        unsafe {
                            let av = S::load(a.as_ptr().add(v * S::LANES));
                            exp_nonpositive(av.add(shift))
                                .mul_add(ratio, floor)
                                .store(phi.as_mut_ptr().add(v * S::LANES));
                            if p.kind == Kind::Hyperbolic {
                                exp_nonpositive(shift.sub(av))
                                    .mul_add(ratio, floor)
                                    .store(phi.as_mut_ptr().add(mp + v * S::LANES));
                            }
                        }
                    }
                }
                Kind::Trigonometric => {
                    for j in 0..m {
                        let (s, co) = a[j].sin_cos();
                        phi[j] = sc * co;
                        phi[mp + j] = sc * s;
                    }
                }
                Kind::Generalized { f, kappa, .. } => {
                    for j in 0..m {
                        phi[j] = (apply(f, a[j]) + kappa) * sc;
                    }
                }
                Kind::Softplus => {
                    for j in 0..m {
                        phi[j] = softplus(a[j]) * sc;
                    }
                }
                Kind::GatedSoftplus => {
                    let g = &self.a2[i * mp..(i + 1) * mp];
                    for j in 0..m {
                        phi[j] = softplus(a[j]) * sigmoid(g[j]) * sc;
                    }
                }
            }
            phi[m..mp].fill(0.0);
            if p.split() {
                phi[mp + m..].fill(0.0);
            }
        }
        self.phi_current = true;
    }

    /// φ of wide row `i` in f64 by favor-core, rounded into `phi`.
    fn wide_features(&mut self, p: &Plan, i: usize) {
        self.widen_row(p, i);
        let (x, rest) = self.wide_buf.split_at_mut(p.d);
        let out = &mut rest[..p.mf];
        p.map.features(x, self.c[i], out);
        // Exponential maps evaluate against c themselves; the generic ones return φ, stored as
        // φ·e^{−c} (for a query, c = s = ln max φ: its largest feature becomes 1).
        let sc = if p.is_stabilised() { 1.0 } else { (-self.c[i]).exp() };
        let phi = &mut self.phi[i * p.mfp..(i + 1) * p.mfp];
        phi.fill(0.0);
        for (j, &v) in out.iter().enumerate() {
            phi[p.internal_col(j)] = (v * sc) as f32;
        }
    }

    /// dx (rows × dp, overwritten) from dφ (rows × mfp, internal layout) with the stabilisers in
    /// `c` held constant, the ε floor differentiated through each row's own log-scale; adds
    /// parameter gradients to `acc`. Needs `project` to have run on the same tokens. `da`, `da2`
    /// are rows × mp scratch.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn features_backward<S: SimdF32>(
        &mut self,
        p: &Plan,
        rows: usize,
        dphi: &[f32],
        da: &mut [f32],
        da2: &mut [f32],
        dx: &mut [f32],
        mut acc: Option<&mut ParamAcc>,
    ) {
        let (mp, mfp, m, dp) = (p.mp, p.mfp, p.m, p.dp);
        let ratio = S::splat(p.ratio);
        let mut dh = [0.0f32; 256];
        assert!(rows <= dh.len());
        for i in 0..rows {
            let a = &self.a[i * mp..(i + 1) * mp];
            let g = &dphi[i * mfp..(i + 1) * mfp];
            let dai = &mut da[i * mp..(i + 1) * mp];
            if self.wide[i] {
                // Handled in f64 below; nothing from this row in the f32 products.
                dai.fill(0.0);
                if matches!(p.kind, Kind::GatedSoftplus | Kind::Hyperbolic) {
                    da2[i * mp..(i + 1) * mp].fill(0.0);
                }
                dh[i] = 0.0;
                continue;
            }
            match p.kind {
                Kind::Positive | Kind::Hyperbolic => {
                    let hyper = p.kind == Kind::Hyperbolic;
                    let e = self.row_exp(p, i);
                    let (shift, floor) = (S::splat(e.neg_shift), S::splat(e.floor));
                    let reuse = self.phi_current;
                    let phi = &self.phi[i * mfp..(i + 1) * mfp];
                    for v in 0..mp / S::LANES {
                        // SAFETY: (v + 1)·LANES ≤ mp; g and phi have mfp ≥ mp (2·mp for
                        // hyperbolic) floats.
                        unsafe {
                            let off = v * S::LANES;
                            // ratio·e^{±a − T}: φ − floor when φ is current, else recomputed.
                            let (ep, em) = if reuse {
                                (
                                    S::load(phi.as_ptr().add(off)).sub(floor),
                                    if hyper { S::load(phi.as_ptr().add(mp + off)).sub(floor) } else { floor },
                                )
                            } else {
                                let av = S::load(a.as_ptr().add(off));
                                (
                                    exp_nonpositive(av.add(shift)).mul(ratio),
                                    if hyper { exp_nonpositive(shift.sub(av)).mul(ratio) } else { ratio },
                                )
                            };
                            let plus = S::load(g.as_ptr().add(off)).mul(ep);
                            let d = if hyper {
                                let minus = S::load(g.as_ptr().add(mp + off)).mul(em);
                                // Store plus − minus; dh needs plus + minus: keep it in da2.
                                plus.add(minus).store(da2.as_mut_ptr().add(i * mp + off));
                                plus.sub(minus)
                            } else {
                                plus
                            };
                            d.store(dai.as_mut_ptr().add(off));
                        }
                    }
                    dai[m..].fill(0.0);
                    dh[i] = if hyper {
                        let s = &mut da2[i * mp..(i + 1) * mp];
                        s[m..].fill(0.0);
                        -sum::<S>(s)
                    } else {
                        -sum::<S>(dai)
                    };
                    // The ε floor ratio·ε·e^{s − c}: ∂ℒ/∂s to the arg-max projection and to −h.
                    if e.floor != 0.0 {
                        let gsum =
                            if hyper { sum::<S>(&g[..mp]) + sum::<S>(&g[mp..2 * mp]) } else { sum::<S>(&g[..mp]) };
                        let ds = e.floor * gsum;
                        let amax = self.amax[i];
                        let key = |x: f32| if hyper { x.abs() } else { x };
                        if let Some(star) = a[..m].iter().position(|&x| key(x) == amax) {
                            dai[star] += if a[star] < 0.0 { -ds } else { ds };
                        }
                        dh[i] -= ds;
                    }
                }
                Kind::Trigonometric => {
                    let sc = self.row_factor(p, i);
                    let mut s_dh = 0.0;
                    for j in 0..m {
                        let (s, co) = a[j].sin_cos();
                        dai[j] = sc * (g[mp + j] * co - g[j] * s);
                        s_dh += g[j] * co + g[mp + j] * s;
                    }
                    dai[m..].fill(0.0);
                    dh[i] = sc * s_dh;
                }
                Kind::Generalized { f, .. } => {
                    let sc = self.row_factor(p, i);
                    for j in 0..m {
                        dai[j] = g[j] * derivative(f, a[j]) * sc;
                    }
                    dai[m..].fill(0.0);
                }
                Kind::Softplus => {
                    let sc = self.row_factor(p, i);
                    for j in 0..m {
                        dai[j] = g[j] * sigmoid(a[j]) * sc;
                    }
                    dai[m..].fill(0.0);
                }
                Kind::GatedSoftplus => {
                    let sc = self.row_factor(p, i);
                    let yg = &self.a2[i * mp..(i + 1) * mp];
                    let dgi = &mut da2[i * mp..(i + 1) * mp];
                    for j in 0..m {
                        let sg = sigmoid(yg[j]);
                        dai[j] = g[j] * sg * sigmoid(a[j]) * sc;
                        dgi[j] = g[j] * softplus(a[j]) * sg * (1.0 - sg) * sc;
                    }
                    dai[m..].fill(0.0);
                    dgi[m..].fill(0.0);
                }
            }
            if self.scale_free[i] {
                dh[i] = 0.0;
            }
        }
        match p.kind {
            Kind::Generalized { projected: false, scale, .. } => {
                for i in 0..rows * dp {
                    dx[i] = da[i] * scale;
                }
            }
            _ => gemm::<S>(rows, m, dp, da, mp, 1, &p.ws, dp, dx, dp, true),
        }
        if matches!(p.kind, Kind::GatedSoftplus) {
            gemm::<S>(rows, m, dp, da2, mp, 1, &p.ws_gate, dp, dx, dp, false);
        }
        if p.is_stabilised() {
            for i in (0..rows).filter(|&i| dh[i] != 0.0) {
                axpy::<S>((2.0 * p.hcoef) as f32 * dh[i], &self.x[i * dp..(i + 1) * dp], &mut dx[i * dp..(i + 1) * dp]);
            }
        }
        if let Some(acc) = acc.as_deref_mut() {
            // dW += daᵀ x (m × dp), db += Σ da, dW_g += da2ᵀ x.
            gemm::<S>(m, rows, dp, da, 1, mp, &self.x, dp, &mut acc.w, dp, false);
            if let Some(b) = acc.bias.as_mut() {
                for i in 0..rows {
                    for (x, &y) in b.iter_mut().zip(&da[i * mp..(i + 1) * mp]) {
                        *x += y;
                    }
                }
            }
            if let Some(wg) = acc.w_gate.as_mut() {
                gemm::<S>(m, rows, dp, da2, 1, mp, &self.x, dp, wg, dp, false);
            }
        }
        for i in 0..rows {
            if !self.wide[i] {
                continue;
            }
            self.wide_backward(p, i, &dphi[i * mfp..(i + 1) * mfp], &mut dx[i * dp..(i + 1) * dp], acc.as_deref_mut());
        }
    }

    /// dx of wide row `i` (overwritten) and its parameter gradients, in f64 by favor-core.
    fn wide_backward(&mut self, p: &Plan, i: usize, g: &[f32], dx: &mut [f32], acc: Option<&mut ParamAcc>) {
        self.widen_row(p, i);
        let (x, rest) = self.wide_buf.split_at_mut(p.d);
        let (dphi, rest) = rest.split_at_mut(p.mf.max(p.d));
        let dx64 = &mut rest[..p.d];
        // The generic maps' stored features are φ·e^{−c}; so ∂ℒ/∂φ = e^{−c}·∂ℒ/∂(stored).
        let sc = if p.is_stabilised() { 1.0 } else { (-self.c[i]).exp() };
        for j in 0..p.mf {
            dphi[j] = g[p.internal_col(j)] as f64 * sc;
        }
        dx64.fill(0.0);
        let mut grads = acc.as_ref().and_then(|_| p.map.param_grads_f64());
        let (dphi, c) = (&dphi[..p.mf], self.c[i]);
        if self.scale_free[i] {
            p.map.features_backward_scale_invariant(x, c, dphi, dx64, grads.as_mut());
        } else {
            p.map.features_backward(x, c, dphi, dx64, grads.as_mut());
        }
        dx.fill(0.0);
        for (o, &v) in dx.iter_mut().zip(dx64.iter()) {
            *o = saturate_f32(v);
        }
        if let (Some(acc), Some(gr)) = (acc, grads) {
            let (m, d, dp) = (p.m, p.d, p.dp);
            for j in 0..m {
                for t in 0..d {
                    acc.w[j * dp + t] += saturate_f32(gr.w[j * d + t]);
                }
            }
            if let (Some(b), Some(gb)) = (acc.bias.as_mut(), gr.bias.as_ref()) {
                for (o, &v) in b.iter_mut().zip(gb) {
                    *o += saturate_f32(v);
                }
            }
            if let (Some(wg), Some(gw)) = (acc.w_gate.as_mut(), gr.w_gate.as_ref()) {
                for j in 0..m {
                    for t in 0..d {
                        wg[j * dp + t] += saturate_f32(gw[j * d + t]);
                    }
                }
            }
        }
    }
}

/// Max of a row (of |a| when `abs`), over exactly the real columns.
#[inline(always)]
fn row_max<S: SimdF32>(a: &[f32], abs: bool) -> f32 {
    let full = a.len() / S::LANES;
    let mut best = f32::NEG_INFINITY;
    if full > 0 {
        let mut acc = S::splat(f32::NEG_INFINITY);
        for v in 0..full {
            // SAFETY: (v + 1)·LANES ≤ a.len().
            let x = unsafe { S::load(a.as_ptr().add(v * S::LANES)) };
            acc = acc.max(if abs { x.abs() } else { x });
        }
        best = acc.reduce_max();
    }
    for &x in &a[full * S::LANES..] {
        best = best.max(if abs { x.abs() } else { x });
    }
    best
}

/// Parameter-gradient accumulators of learned maps (padded m × dp).
#[derive(Debug, Clone)]
pub(crate) struct ParamAcc {
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub w_gate: Option<Vec<f32>>,
}

impl ParamAcc {
    pub(crate) fn new(p: &Plan, map: &FeatureMap) -> Option<ParamAcc> {
        match map {
            FeatureMap::Softplus(l) => Some(ParamAcc {
                w: vec![0.0; p.mp * p.dp],
                bias: l.bias.as_ref().map(|_| vec![0.0; p.mp]),
                w_gate: None,
            }),
            FeatureMap::GatedSoftplus(_) => {
                Some(ParamAcc { w: vec![0.0; p.mp * p.dp], bias: None, w_gate: Some(vec![0.0; p.mp * p.dp]) })
            }
            _ => None,
        }
    }
}

impl ParamAcc {
    /// The padded accumulator holding f64 parameter gradients (of a head recomputed in f64).
    pub(crate) fn from_f64(p: &Plan, g: &favor_core::features::ParamGradsF64) -> ParamAcc {
        let (m, d, dp) = (p.m, p.d, p.dp);
        let pad_w = |w: &[f64]| {
            let mut out = vec![0.0f32; p.mp * dp];
            for j in 0..m {
                for t in 0..d {
                    out[j * dp + t] = saturate_f32(w[j * d + t]);
                }
            }
            out
        };
        ParamAcc {
            w: pad_w(&g.w),
            bias: g.bias.as_ref().map(|b| {
                let mut out = vec![0.0f32; p.mp];
                for (o, &x) in out.iter_mut().zip(b) {
                    *o = saturate_f32(x);
                }
                out
            }),
            w_gate: g.w_gate.as_deref().map(pad_w),
        }
    }
}

/// Sums partial accumulators in the given (fixed) order, in f64, into the public form.
pub(crate) fn reduce_params(p: &Plan, parts: &[ParamAcc]) -> Option<favor_core::ParamGrads> {
    let first = parts.first()?;
    let (m, d, dp) = (p.m, p.d, p.dp);
    let sum_w = |get: &dyn Fn(&ParamAcc) -> &Vec<f32>| {
        let mut out = vec![0.0f64; m * d];
        for part in parts {
            let w = get(part);
            for j in 0..m {
                for t in 0..d {
                    out[j * d + t] += w[j * dp + t] as f64;
                }
            }
        }
        out.into_iter().map(|x| x as f32).collect::<Vec<f32>>()
    };
    let w = sum_w(&|a: &ParamAcc| &a.w);
    let bias = first.bias.as_ref().map(|_| {
        let mut out = vec![0.0f64; m];
        for part in parts {
            for (o, &x) in out.iter_mut().zip(part.bias.as_ref().unwrap_or(&Vec::new())) {
                *o += x as f64;
            }
        }
        out.into_iter().map(|x| x as f32).collect()
    });
    let w_gate = first.w_gate.as_ref().map(|_| sum_w(&|a: &ParamAcc| a.w_gate.as_ref().unwrap_or(&a.w)));
    Some(favor_core::ParamGrads { w, bias, w_gate })
}

fn apply(f: Elementwise, y: f32) -> f32 {
    match f {
        Elementwise::Relu => y.max(0.0),
        Elementwise::EluPlusOne => {
            if y > 0.0 {
                y + 1.0
            } else {
                y.exp()
            }
        }
        Elementwise::Softplus => softplus(y),
    }
}

fn derivative(f: Elementwise, y: f32) -> f32 {
    match f {
        Elementwise::Relu => {
            if y > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Elementwise::EluPlusOne => {
            if y > 0.0 {
                1.0
            } else {
                y.exp()
            }
        }
        Elementwise::Softplus => sigmoid(y),
    }
}

/// ln(1 + e^y) without overflow.
fn softplus(y: f32) -> f32 {
    y.max(0.0) + (-y.abs()).exp().ln_1p()
}

/// 1/(1 + e^{−y}) without overflow.
fn sigmoid(y: f32) -> f32 {
    if y >= 0.0 {
        1.0 / (1.0 + (-y).exp())
    } else {
        let e = y.exp();
        e / (1.0 + e)
    }
}
