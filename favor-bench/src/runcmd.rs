//! `run`: Q, K, V (and optionally W, a key padding mask, an output gradient) from .npy files
//! through a chosen backend, feature map and direction; output (and gradients) to .npy. For
//! checking favor against one's own JAX or PyTorch code.

use std::io::Write as _;
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

/// The files `run` may write, in the order they are placed.
const OUTPUT_NAMES: [&str; 5] = ["out.npy", "dq.npy", "dk.npy", "dv.npy", "w.npy"];

/// Heap the run will allocate beyond the inputs it has read: the output and gradients, a drawn
/// projection (built in f64, then copied to f32) and the feature maps of Q and K of every head
/// (up to 2m features, f64 on the reference backend), checked before any of it is allocated.
fn check_sizes(a: &RunArgs, shape: AttentionShape, elem: usize, m: usize) -> Result<()> {
    let (b, h, l, d, dv) = (shape.batch, shape.heads, shape.len, shape.d, shape.dv);
    if a.w.is_none() && workload::map_uses_projection(&a.map) {
        crate::limits::check_available(
            format!("the drawn projection W [m = {}, d = {d}]", a.m),
            crate::limits::bytes_of(&[a.m, d], 8 + 4),
        )?;
    }
    let grads = a.dout.is_some();
    let parts = [
        crate::limits::bytes_of(&[b, h, l, dv], elem),
        if grads { crate::limits::bytes_of(&[2, b, h, l, d], elem) } else { Some(0) },
        if grads { crate::limits::bytes_of(&[b, h, l, dv], elem) } else { Some(0) },
        crate::limits::bytes_of(&[2, b, h, l, 2, m.max(d)], 8),
    ];
    crate::limits::check_available(
        format!("run: the output{}, features of shape {shape:?} with m = {m}", if grads { ", gradients" } else { "" }),
        crate::limits::total(&parts),
    )?;
    Ok(())
}

/// Runs the command. Every input is read and checked and every result computed before anything
/// is written; the files are then placed all together (see [`write_all_or_nothing`]), so a run
/// that fails leaves the output folder as it was.
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
    let elem = match q.dtype() {
        favor_core::DType::F32 => 4,
        _ => 2,
    };
    // W from a file first: its m sizes the feature maps checked next, before W is drawn.
    let w_file = match &a.w {
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
            Some((m, arr.into_f32(path)?))
        }
        None => None,
    };
    check_sizes(a, shape, elem, w_file.as_ref().map_or(a.m, |(m, _)| *m))?;
    let projection = match w_file {
        Some((m, w)) => Projection::from_matrix(m, d, w).map_err(|e| {
            let path = a.w.as_deref().unwrap_or(Path::new("W"));
            BenchError(format!("{}: {e}", path.display()))
        })?,
        None => Projection::draw(ProjectionConfig::new(a.m, d, a.seed))?,
    };
    let drawn_w =
        (a.w.is_none() && workload::map_uses_projection(&a.map)).then(|| HostTensor::F32(projection.matrix().to_vec()));
    let m = projection.m();
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
    let mut results: Vec<(&'static str, Vec<usize>, HostTensor)> = vec![("out.npy", vs.clone(), out)];
    if let Some(g) = &dout {
        let mut dq = HostTensor::zeros(q.dtype(), shape.qk_len());
        let mut dk = HostTensor::zeros(q.dtype(), shape.qk_len());
        let mut dvt = HostTensor::zeros(q.dtype(), shape.v_len());
        let grads = Grads { dq: dq.view_mut(), dk: dk.view_mut(), dv: dvt.view_mut() };
        backend.imp.backward(&problem, inputs, g.view(), grads)?;
        results.push(("dq.npy", qs.clone(), dq));
        results.push(("dk.npy", qs.clone(), dk));
        results.push(("dv.npy", vs.clone(), dvt));
    }
    if let Some(w) = drawn_w {
        results.push(("w.npy", vec![m, d], w));
    }

    let pending: Vec<Pending<'_>> = results
        .iter()
        .map(|(name, s, t)| Pending { name, write: Box::new(move |p: &Path| npy::write(p, s, t)) })
        .collect();
    // Outputs of an earlier run that this one does not produce would read as this run's.
    let stale: Vec<&str> = OUTPUT_NAMES.iter().copied().filter(|n| results.iter().all(|(r, _, _)| r != n)).collect();
    let mut keep: Vec<&Path> = vec![&a.q, &a.k, &a.v];
    keep.extend(a.w.as_deref());
    keep.extend(a.mask.as_deref());
    keep.extend(a.dout.as_deref());
    let files = write_all_or_nothing(&a.out_dir, pending, &stale, &keep)?;
    Ok(RunReport { shape, backend: backend.name(), files })
}

/// Writes one whole file at the given path.
pub type FileWriter<'a> = Box<dyn Fn(&Path) -> Result<()> + 'a>;

/// A file to be written by [`write_all_or_nothing`]: its name in the folder and what writes it.
pub struct Pending<'a> {
    /// File name inside the folder.
    pub name: &'a str,
    /// Writes the whole file at the given (temporary) path.
    pub write: FileWriter<'a>,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> BenchError {
    BenchError(format!("{}: cannot {what}: {e}", path.display()))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Writes `files` into `dir` so that either all of them end up in place or the folder is left as
/// it was: each is written and synced under a hidden temporary name first; only when all are
/// written are the files they replace and the `stale` ones (names of an earlier run's outputs
/// that this run does not produce) moved aside, and the new ones renamed into place; any failure
/// undoes every step done so far. Files in `keep` (the run's inputs) are never removed as stale.
/// A folder that did not exist is created, and removed again on failure.
pub fn write_all_or_nothing(
    dir: &Path,
    files: Vec<Pending<'_>>,
    stale: &[&str],
    keep: &[&Path],
) -> Result<Vec<PathBuf>> {
    // Refuse targets that a rename could not replace before touching anything.
    for name in files.iter().map(|f| f.name).chain(stale.iter().copied()) {
        let p = dir.join(name);
        if let Ok(md) = std::fs::symlink_metadata(&p)
            && md.is_dir()
        {
            crate::bail!("{}: is a folder; the output file cannot replace it", p.display());
        }
    }
    let created = create_dirs(dir)?;
    let tag = format!("{}.{}", std::process::id(), unique());
    let tmp_of = |name: &str| dir.join(format!(".{name}.{tag}.tmp"));
    let old_of = |name: &str| dir.join(format!(".{name}.{tag}.old"));
    let mut undo = Undo { temps: Vec::new(), moved: Vec::new(), placed: Vec::new(), created };

    // 1. Every file under its temporary name.
    for f in &files {
        let tmp = tmp_of(f.name);
        undo.temps.push(tmp.clone());
        let synced = (f.write)(&tmp).and_then(|()| {
            let file = std::fs::OpenOptions::new().write(true).open(&tmp).map_err(|e| io_err(&tmp, "reopen", e))?;
            file.sync_all().map_err(|e| io_err(&tmp, "sync", e))?;
            drop(file);
            Ok(())
        });
        if let Err(e) = synced {
            undo.run();
            return Err(e);
        }
    }
    // 2. What they replace, and stale outputs, moved aside (kept until the end to roll back).
    let targets: Vec<&str> = files.iter().map(|f| f.name).collect();
    let stale_here: Vec<&str> = stale
        .iter()
        .copied()
        .filter(|n| !targets.contains(n))
        .filter(|n| !keep.iter().any(|k| same_file(k, &dir.join(n))))
        .collect();
    for name in targets.iter().chain(&stale_here) {
        let p = dir.join(name);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        let old = old_of(name);
        if let Err(e) = std::fs::rename(&p, &old) {
            undo.run();
            return Err(io_err(&p, "move the earlier file aside", e));
        }
        undo.moved.push((p, old));
    }
    // 3. The new files into place.
    let mut written = Vec::new();
    for name in &targets {
        let (tmp, p) = (tmp_of(name), dir.join(name));
        if let Err(e) = std::fs::rename(&tmp, &p) {
            undo.run();
            return Err(io_err(&p, "rename the new file into place", e));
        }
        undo.temps.retain(|t| t != &tmp);
        undo.placed.push(p.clone());
        written.push(p);
    }
    // 4. Done: the earlier files go.
    for (_, old) in &undo.moved {
        let _ = std::fs::remove_file(old);
    }
    Ok(written)
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Creates `dir` and any missing parents; returns the folders created, deepest first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "create the folder", e))?;
    Ok(missing)
}

/// The steps of [`write_all_or_nothing`] done so far, undone in reverse on failure.
struct Undo {
    temps: Vec<PathBuf>,
    moved: Vec<(PathBuf, PathBuf)>,
    placed: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

impl Undo {
    fn run(&mut self) {
        for p in self.placed.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        for (p, old) in self.moved.drain(..).rev() {
            let _ = std::fs::rename(old, p);
        }
        for t in self.temps.drain(..) {
            let _ = std::fs::remove_file(t);
        }
        // Only folders this call created, and only if empty.
        for d in self.created.drain(..) {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Test hook: a writer that writes a few bytes and then fails, as a full disk would.
#[doc(hidden)]
pub fn failing_writer(path: &Path) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| io_err(path, "create", e))?;
    f.write_all(b"\x93NUMPY partial").map_err(|e| io_err(path, "write", e))?;
    Err(BenchError(format!("{}: cannot write: no space left on device (simulated)", path.display())))
}
