//! The standalone feature map of the backend API (φ and its backward for a whole tensor), one
//! (batch, head) per task, tile by tile.

use super::features::{FeatureGrads, ParamAcc, Plan, Tile};
use super::{HeadRows, TILE, load_rows};
use crate::isa::{SimdF32, SimdTask};
use crate::phases::{Phase, Span};
use favor_core::{FeatureRole, HostMut, HostRef};

/// Stabilisers of `rows` tokens for `role` given the tile's log-scales in `t.s`: `shared` is the
/// head-wide maximum (keys) and `run` the running maximum (causal keys).
#[inline(always)]
fn set_stabilisers(t: &mut Tile, rows: usize, role: FeatureRole, shared: f64, run: &mut f64) {
    for i in 0..rows {
        t.c[i] = match role {
            FeatureRole::Query => t.s[i],
            FeatureRole::Key => shared,
            FeatureRole::CausalKey => {
                *run = run.max(t.s[i]);
                *run
            }
        };
    }
}

/// Maximum log-scale over all tokens of one head (one extra projection pass; keys only).
#[inline(always)]
fn head_max<S: SimdF32>(p: &Plan, x: &HostRef<'_>, off: usize, len: usize, t: &mut Tile) -> f64 {
    let mut c = f64::NEG_INFINITY;
    let mut r = 0;
    while r < len {
        let rows = TILE.min(len - r);
        load_rows(x, HeadRows { base: off, stride: p.d }, p.d, r, rows, &mut t.x, p.dp);
        t.project::<S>(p, rows);
        c = t.s[..rows].iter().copied().fold(c, f64::max);
        r += rows;
    }
    c
}

/// φ of one head's tokens in the public layout.
pub(crate) struct FeatureMapTask<'a, 'o> {
    pub plan: &'a Plan,
    pub role: FeatureRole,
    pub x: HostRef<'a>,
    pub off: usize,
    pub len: usize,
    pub phi: HostMut<'o>,
}

impl SimdTask for FeatureMapTask<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run<S: SimdF32>(mut self) {
        let p = self.plan;
        let mut t = Tile::new(p, TILE);
        let shared =
            if self.role == FeatureRole::Key { head_max::<S>(p, &self.x, self.off, self.len, &mut t) } else { 0.0 };
        let mut run = f64::NEG_INFINITY;
        let mut ext = vec![0.0; TILE * p.mf];
        let mut r = 0;
        while r < self.len {
            let rows = TILE.min(self.len - r);
            let _span = Span::start(Phase::FeatureMap);
            load_rows(&self.x, HeadRows { base: self.off, stride: p.d }, p.d, r, rows, &mut t.x, p.dp);
            t.project::<S>(p, rows);
            set_stabilisers(&mut t, rows, self.role, shared, &mut run);
            t.features::<S>(p, rows);
            for i in 0..rows {
                p.to_external(&t.phi[i * p.mfp..(i + 1) * p.mfp], &mut ext[i * p.mf..(i + 1) * p.mf]);
            }
            store_contiguous(&mut self.phi, p.mf, r, rows, &ext, p.mf);
            r += rows;
        }
    }
}

/// ∂ℒ/∂x of one head from ∂ℒ/∂φ (public layout).
pub(crate) struct FeatureBackwardTask<'a, 'o> {
    pub plan: &'a Plan,
    pub role: FeatureRole,
    pub x: HostRef<'a>,
    pub dphi: HostRef<'a>,
    pub off: usize,
    pub phi_off: usize,
    pub len: usize,
    pub dx: HostMut<'o>,
    pub params: Option<ParamAcc>,
}

impl SimdTask for FeatureBackwardTask<'_, '_> {
    type Output = Option<ParamAcc>;
    #[inline(always)]
    fn run<S: SimdF32>(mut self) -> Option<ParamAcc> {
        let p = self.plan;
        let mut t = Tile::new(p, TILE);
        let shared =
            if self.role == FeatureRole::Key { head_max::<S>(p, &self.x, self.off, self.len, &mut t) } else { 0.0 };
        let mut run = f64::NEG_INFINITY;
        let mut ext = vec![0.0; p.mf];
        let FeatureGrads { mut dphi, mut da, mut da2, mut dx } = FeatureGrads::new(p, TILE);
        let mut r = 0;
        while r < self.len {
            let rows = TILE.min(self.len - r);
            let _span = Span::start(Phase::FeatureBackward);
            load_rows(&self.x, HeadRows { base: self.off, stride: p.d }, p.d, r, rows, &mut t.x, p.dp);
            for i in 0..rows {
                self.dphi
                    .read_f32(self.phi_off + (r + i) * p.mf, &mut ext)
                    .expect("rows lie within the tensors validated against the shape");
                p.to_internal(&ext, &mut dphi[i * p.mfp..(i + 1) * p.mfp]);
            }
            t.project::<S>(p, rows);
            set_stabilisers(&mut t, rows, self.role, shared, &mut run);
            t.features_backward::<S>(p, rows, &dphi, &mut da, &mut da2, &mut dx, self.params.as_mut());
            store_contiguous(&mut self.dx, p.d, r, rows, &dx, p.dp);
            r += rows;
        }
        self.params
    }
}

/// Rounds rows of `src` (stride ld) into rows r0.. of a contiguous `[.., row_len]` piece.
#[inline(always)]
fn store_contiguous(dst: &mut HostMut<'_>, row_len: usize, r0: usize, rows: usize, src: &[f32], ld: usize) {
    for i in 0..rows {
        dst.write_f32((r0 + i) * row_len, &src[i * ld..i * ld + row_len])
            .expect("rows lie within the tensors validated against the shape");
    }
}
