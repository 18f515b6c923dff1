//! `run`: Q, K, V (and optionally W, a key padding mask, an output gradient) from .npy files
//! through a chosen backend, feature map and direction; output (and gradients) to .npy. For
//! checking favor against one's own JAX or PyTorch code.

use std::path::{Path, PathBuf};

use favor_core::{
    AttentionOptions, AttentionShape, Direction, Grads, HostTensor, Inputs, Problem, Projection, ProjectionConfig,
};

use crate::backends;
use crate::error::{BenchError, Result};
use crate::npy;
use crate::workload;

/// Inputs and options of `run`.
#[derive(Debug, Clone)]
pub struct RunArgs {
    /// Queries: [B, H, L, d], [H, L, d] or [L, d].
    pub q: PathBuf,
    /// Keys, shaped like Q.
    pub k: PathBuf,
    /// Values: Q's leading dimensions, last d_v.
    pub v: PathBuf,
    /// Projection W [m, d] (float32); drawn from `m` and `seed` when absent.
    pub w: Option<PathBuf>,
    /// Key padding mask [B, L] (or [L]), bool, true = keep.
    pub mask: Option<PathBuf>,
    /// Output gradient, shaped like the output: the backward runs when given.
    pub dout: Option<PathBuf>,
    /// Backend id.
    pub backend: String,
    /// Feature map name.
    pub map: String,
    /// Direction.
    pub direction: Direction,
    /// Features drawn when W is absent.
    pub m: usize,
    /// Seed of the drawn projection.
    pub seed: u64,
    /// Where out.npy (dq.npy, dk.npy, dv.npy, w.npy) go.
    pub out_dir: PathBuf,
}

/// What `run` wrote.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The problem's sizes.
    pub shape: AttentionShape,
    /// The backend's name.
    pub backend: String,
    /// Files written.
    pub files: Vec<PathBuf>,
}

fn load(path: &Path) -> Result<(Vec<usize>, HostTensor)> {
    let a = npy::read(path)?;
    let shape = a.shape.clone();
    Ok((shape, a.into_tensor(path)?))
}

/// Splits [B, H, L, x] / [H, L, x] / [L, x] into (B, H, L, x).
fn dims(path: &Path, what: &str, shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match *shape {
        [b, h, l, x] => Ok((b, h, l, x)),
        [h, l, x] => Ok((1, h, l, x)),
        [l, x] => Ok((1, 1, l, x)),
        _ => Err(BenchError(format!(
            "{}: {what} must have shape [batch, heads, len, dim], [heads, len, dim] or [len, dim], got {shape:?}",
            path.display()
        ))),
    }
}

/// Runs the command.
pub fn run(a: &RunArgs) -> Result<RunReport> {
    let (qs, q) = load(&a.q)?;
    let (ks, k) = load(&a.k)?;
    let (vs, v) = load(&a.v)?;
    let (b, h, l, d) = dims(&a.q, "Q", &qs)?;
    if ks != qs {
        crate::bail!("{}: K must have Q's shape {qs:?} (from {}), got {ks:?}", a.k.display(), a.q.display());
    }
    let (vb, vh, vl, dv) = dims(&a.v, "V", &vs)?;
    if (vb, vh, vl) != (b, h, l) || vs.len() != qs.len() {
        crate::bail!(
            "{}: V must have Q's leading dimensions {:?} (from {}) and any last dimension, got {vs:?}",
            a.v.display(),
            &qs[..qs.len() - 1],
            a.q.display()
        );
    }
    for (path, t) in [(&a.k, &k), (&a.v, &v)] {
        if t.dtype() != q.dtype() {
            crate::bail!(
                "{}: dtype {} differs from Q's {} (from {})",
                path.display(),
                npy::dtype_name(t.dtype()),
                npy::dtype_name(q.dtype()),
                a.q.display()
            );
        }
    }
    let shape = AttentionShape::new(b, h, l, d).with_dv(dv);
    let mut files = Vec::new();
    std::fs::create_dir_all(&a.out_dir).map_err(|e| BenchError(format!("{}: {e}", a.out_dir.display())))?;

    let projection = match &a.w {
        Some(path) => {
            let arr = npy::read(path)?;
            let wshape = arr.shape.clone();
            let [m, wd] = wshape[..] else {
                crate::bail!("{}: W must have shape [m, d] = [m, {d}], got {wshape:?}", path.display());
            };
            if wd != d {
                crate::bail!(
                    "{}: W must have shape [m, {d}] (d from {}), got {wshape:?}",
                    path.display(),
                    a.q.display()
                );
            }
            Projection::from_matrix(m, d, arr.into_f32(path)?)
                .map_err(|e| BenchError(format!("{}: {e}", path.display())))?
        }
        None => Projection::draw(ProjectionConfig::new(a.m, d, a.seed))?,
    };
    if a.w.is_none() && workload::map_uses_projection(&a.map) {
        let path = a.out_dir.join("w.npy");
        npy::write(&path, &[projection.m(), d], &HostTensor::F32(projection.matrix().to_vec()))?;
        files.push(path);
    }
    let map = workload::make_map(&a.map, projection)?;

    let mask = match &a.mask {
        Some(path) => {
            let arr = npy::read(path)?;
            let ms = arr.shape.clone();
            let ok = ms == [b, l] || (b == 1 && ms == [l]);
            if !ok {
                crate::bail!("{}: the key mask must have shape [batch, len] = [{b}, {l}], got {ms:?}", path.display());
            }
            Some(arr.into_bool(path)?)
        }
        None => None,
    };
    let dout = match &a.dout {
        Some(path) => {
            let (gs, g) = load(path)?;
            if gs != vs {
                crate::bail!("{}: the output gradient must have V's shape {vs:?}, got {gs:?}", path.display());
            }
            if g.dtype() != q.dtype() {
                crate::bail!(
                    "{}: dtype {} differs from Q's {}",
                    path.display(),
                    npy::dtype_name(g.dtype()),
                    npy::dtype_name(q.dtype())
                );
            }
            Some(g)
        }
        None => None,
    };

    let backend = backends::open(&a.backend)?;
    let problem = Problem::new(shape, &map)
        .with_options(AttentionOptions { direction: a.direction, ..AttentionOptions::default() });
    let inputs = Inputs { q: q.view(), k: k.view(), v: v.view(), key_mask: mask.as_deref() };
    let mut out = HostTensor::zeros(q.dtype(), shape.v_len());
    backend.imp.forward(&problem, inputs, out.view_mut())?;
    let path = a.out_dir.join("out.npy");
    npy::write(&path, &vs, &out)?;
    files.push(path);
    if let Some(g) = &dout {
        let mut dq = HostTensor::zeros(q.dtype(), shape.qk_len());
        let mut dk = HostTensor::zeros(q.dtype(), shape.qk_len());
        let mut dvt = HostTensor::zeros(q.dtype(), shape.v_len());
        let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dvt.view_mut() };
        backend.imp.backward(&problem, inputs, g.view(), grads)?;
        for (name, t, s) in [("dq.npy", &dq, &qs), ("dk.npy", &dk, &qs), ("dv.npy", &dvt, &vs)] {
            let path = a.out_dir.join(name);
            npy::write(&path, s, t)?;
            files.push(path);
        }
    }
    Ok(RunReport { shape, backend: backend.name(), files })
}
