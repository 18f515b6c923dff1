//! Feature maps on tiles of tokens, in f32, with the projection as a register-blocked product.
//!
//! A tile is `rows` tokens of one (batch, head), row-major with padded rows: x is rows × dp,
//! the projections a = x·W̃ᵀ are rows × mp, the features φ rows × mfp (all padded to the widest
//! vector with zeros). W̃ is the projection with every constant scale folded in (d^{-1/4} for the
//! softmax maps, scale·d^{-1/4}/1 for generalized maps), stored transposed (dp × mp) for the
//! forward product and as is (mp × dp) for the backward one.
//!
//! Internal feature layout: the maps with 2m features (hyperbolic, trigonometric) keep their two
//! halves at columns [0, m) and [mp, mp + m), so both halves are whole vectors. Attention never
//! depends on the order of features; only [`Plan::to_external`] maps back to the public layout.
//!
//! The stabiliser of each row is passed in (`c`); see favor-core's `features` docs for the
//! formulas, which these follow term by term. Padded columns are always written as zero.

use super::gemm::{axpy, dot, gemm, sum};
use crate::isa::{SimdF32, pad};
use crate::math::exp::{exp_nonpositive, exp1};
use favor_core::{Elementwise, FeatureMap};

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
    /// h = hcoef·‖x‖² (= ‖x̃‖²/2).
    hcoef: f32,
    /// m^{-1/2} or (2m)^{-1/2}.
    ratio: f32,
    /// The ε part of every feature, ratio·ε (0 for maps without ε).
    pub beta: f32,
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

impl Plan {
    /// Prepares `map` for inputs of dimension `d` (already validated).
    pub(crate) fn new(map: &FeatureMap, d: usize) -> Plan {
        let dp = pad(d);
        let nrm = (d as f64).powf(-0.25);
        let hcoef = ((d as f64).powf(-0.5) / 2.0) as f32;
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
        };
        let (m, w, s): (usize, &[f32], f64) = match map {
            FeatureMap::Positive { projection, epsilon } => {
                plan.kind = Kind::Positive;
                plan.ratio = (1.0 / (projection.m() as f64).sqrt()) as f32;
                plan.beta = (*epsilon as f64 / (projection.m() as f64).sqrt()) as f32;
                (projection.m(), projection.matrix(), nrm)
            }
            FeatureMap::Hyperbolic { projection, epsilon } => {
                plan.kind = Kind::Hyperbolic;
                plan.ratio = (1.0 / (2.0 * projection.m() as f64).sqrt()) as f32;
                plan.beta = (*epsilon as f64 / (2.0 * projection.m() as f64).sqrt()) as f32;
                (projection.m(), projection.matrix(), nrm)
            }
            FeatureMap::Trigonometric { projection } => {
                plan.kind = Kind::Trigonometric;
                plan.ratio = (1.0 / (projection.m() as f64).sqrt()) as f32;
                (projection.m(), projection.matrix(), nrm)
            }
            FeatureMap::Generalized { f, projection, normalize_data, scale, kappa } => {
                let s = *scale as f64 * if *normalize_data { nrm } else { 1.0 };
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

    /// True when internal column `f` holds a real feature (not padding).
    pub(crate) fn is_real(&self, f: usize) -> bool {
        if self.split() { f % self.mp < self.m } else { f < self.mf }
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

/// Scratch buffers of one tile of `t` tokens.
pub(crate) struct Tile {
    pub x: Vec<f32>,
    pub a: Vec<f32>,
    pub a2: Vec<f32>,
    pub h: Vec<f32>,
    /// Per-row log-scales, then stabilisers.
    pub c: Vec<f32>,
    pub phi: Vec<f32>,
    /// Some(β) while `phi` holds exactly what [`Tile::features`] wrote (with ε part β) for the
    /// current projections, so that the backward can reuse the exponentials instead of
    /// recomputing them; whoever changes `phi` in place must reset it. Rows zeroed for padded
    /// keys may keep it: the backward zeroes their dφ too, so they contribute nothing.
    pub phi_beta: Option<f32>,
}

impl Tile {
    pub(crate) fn new(p: &Plan, t: usize) -> Tile {
        let gated = matches!(p.kind, Kind::GatedSoftplus);
        Tile {
            x: vec![0.0; t * p.dp],
            a: vec![0.0; t * p.mp],
            a2: if gated { vec![0.0; t * p.mp] } else { Vec::new() },
            h: vec![0.0; t],
            c: vec![0.0; t],
            phi: vec![0.0; t * p.mfp],
            phi_beta: None,
        }
    }

    /// Projections a (and the gate's), h, and the log-scales into `c` for `rows` tokens in `x`.
    #[inline(always)]
    pub(crate) fn project<S: SimdF32>(&mut self, p: &Plan, rows: usize) {
        let (dp, mp) = (p.dp, p.mp);
        self.phi_beta = None;
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
        if p.is_stabilised() {
            for i in 0..rows {
                let xr = &self.x[i * dp..(i + 1) * dp];
                self.h[i] = p.hcoef * dot::<S>(xr, xr);
                let ar = &self.a[i * mp..i * mp + p.m];
                self.c[i] = match p.kind {
                    Kind::Positive => row_max::<S>(ar, false) - self.h[i],
                    Kind::Hyperbolic => row_max::<S>(ar, true) - self.h[i],
                    _ => self.h[i],
                };
            }
        } else {
            self.c[..rows].fill(0.0);
        }
    }

    /// φ of `rows` tokens against the stabilisers in `c`, into `phi`. Without `with_beta` the
    /// constant ε part (`Plan::beta`) is left out.
    #[inline(always)]
    pub(crate) fn features<S: SimdF32>(&mut self, p: &Plan, rows: usize, with_beta: bool) {
        let (mp, mfp, m) = (p.mp, p.mfp, p.m);
        let beta_f = if with_beta { p.beta } else { 0.0 };
        self.phi_beta = Some(beta_f);
        let beta = S::splat(beta_f);
        let ratio = S::splat(p.ratio);
        for i in 0..rows {
            let a = &self.a[i * mp..(i + 1) * mp];
            let phi = &mut self.phi[i * mfp..(i + 1) * mfp];
            let shift = S::splat(-self.h[i] - self.c[i]);
            match p.kind {
                Kind::Positive | Kind::Hyperbolic => {
                    for v in 0..mp / S::LANES {
                        // SAFETY: (v + 1)·LANES ≤ mp = a.len(), and phi has mfp ≥ 2·mp or mp.
                        unsafe {
                            let av = S::load(a.as_ptr().add(v * S::LANES));
                            exp_nonpositive(av.add(shift))
                                .mul_add(ratio, beta)
                                .store(phi.as_mut_ptr().add(v * S::LANES));
                            if p.kind == Kind::Hyperbolic {
                                exp_nonpositive(shift.sub(av))
                                    .mul_add(ratio, beta)
                                    .store(phi.as_mut_ptr().add(mp + v * S::LANES));
                            }
                        }
                    }
                }
                Kind::Trigonometric => {
                    let sc = p.ratio * exp1::<S>(self.h[i] - self.c[i]);
                    for j in 0..m {
                        let (s, co) = a[j].sin_cos();
                        phi[j] = sc * co;
                        phi[mp + j] = sc * s;
                    }
                }
                Kind::Generalized { f, kappa, .. } => {
                    for j in 0..m {
                        phi[j] = apply(f, a[j]) + kappa;
                    }
                }
                Kind::Softplus => {
                    for j in 0..m {
                        phi[j] = softplus(a[j]);
                    }
                }
                Kind::GatedSoftplus => {
                    let g = &self.a2[i * mp..(i + 1) * mp];
                    for j in 0..m {
                        phi[j] = softplus(a[j]) * sigmoid(g[j]);
                    }
                }
            }
            phi[m..mp].fill(0.0);
            if p.split() {
                phi[mp + m..].fill(0.0);
            }
        }
    }

    /// dx (rows × dp, overwritten) from dφ (rows × mfp, internal layout) with the stabilisers in
    /// `c` held constant; adds parameter gradients to `acc`. Needs `project` to have run on the
    /// same tokens. `da`, `da2` are rows × mp scratch.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn features_backward<S: SimdF32>(
        &self,
        p: &Plan,
        rows: usize,
        dphi: &[f32],
        da: &mut [f32],
        da2: &mut [f32],
        dx: &mut [f32],
        acc: Option<&mut ParamAcc>,
    ) {
        let (mp, mfp, m, dp) = (p.mp, p.mfp, p.m, p.dp);
        let ratio = S::splat(p.ratio);
        let phi_beta = self.phi_beta.map(S::splat);
        let mut dh = [0.0f32; 256];
        assert!(rows <= dh.len());
        for i in 0..rows {
            let a = &self.a[i * mp..(i + 1) * mp];
            let g = &dphi[i * mfp..(i + 1) * mfp];
            let dai = &mut da[i * mp..(i + 1) * mp];
            let shift = S::splat(-self.h[i] - self.c[i]);
            match p.kind {
                Kind::Positive | Kind::Hyperbolic => {
                    let hyper = p.kind == Kind::Hyperbolic;
                    let phi = &self.phi[i * mfp..(i + 1) * mfp];
                    for v in 0..mp / S::LANES {
                        // SAFETY: (v + 1)·LANES ≤ mp; g and phi have mfp ≥ mp (2·mp for
                        // hyperbolic) floats.
                        unsafe {
                            let off = v * S::LANES;
                            // ratio·e^{±a − h − c}: φ − β when φ is current, else recomputed.
                            let (ep, em) = match phi_beta {
                                Some(b) => (
                                    S::load(phi.as_ptr().add(off)).sub(b),
                                    if hyper { S::load(phi.as_ptr().add(mp + off)).sub(b) } else { b },
                                ),
                                None => {
                                    let av = S::load(a.as_ptr().add(off));
                                    (
                                        exp_nonpositive(av.add(shift)).mul(ratio),
                                        if hyper { exp_nonpositive(shift.sub(av)).mul(ratio) } else { ratio },
                                    )
                                }
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
                }
                Kind::Trigonometric => {
                    let sc = p.ratio * exp1::<S>(self.h[i] - self.c[i]);
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
                    for j in 0..m {
                        dai[j] = g[j] * derivative(f, a[j]);
                    }
                    dai[m..].fill(0.0);
                }
                Kind::Softplus => {
                    for j in 0..m {
                        dai[j] = g[j] * sigmoid(a[j]);
                    }
                    dai[m..].fill(0.0);
                }
                Kind::GatedSoftplus => {
                    let yg = &self.a2[i * mp..(i + 1) * mp];
                    let dgi = &mut da2[i * mp..(i + 1) * mp];
                    for j in 0..m {
                        let sg = sigmoid(yg[j]);
                        dai[j] = g[j] * sg * sigmoid(a[j]);
                        dgi[j] = g[j] * softplus(a[j]) * sg * (1.0 - sg);
                    }
                    dai[m..].fill(0.0);
                    dgi[m..].fill(0.0);
                }
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
            for i in 0..rows {
                axpy::<S>(2.0 * p.hcoef * dh[i], &self.x[i * dp..(i + 1) * dp], &mut dx[i * dp..(i + 1) * dp]);
            }
        }
        if let Some(acc) = acc {
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
