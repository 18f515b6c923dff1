//! The native half of favor's Python package (`favor._favor`): backends, feature maps, calls
//! and the slot decoder over NumPy arrays. The Python half (`python/favor`) turns keyword
//! arguments into these calls and allocates the results.
//!
//! Arrays are read and written in place through their strides (no copy) when their last
//! dimension is contiguous and no stride is negative; NumPy's borrow tracking rejects an output
//! that aliases an input. The GIL is released while favor computes.

use favor::{
    AttentionOptions, AttentionShape, Backend, BackendState, DType, Direction, FavorBackend as _, FavorError,
    FeatureMap, Grads, HostMut, HostRef, Inputs, Layout, Problem, Projection, ProjectionConfig, ProjectionKind,
    SlotChunks, SlotState, Strides, TensorArg,
};
use half::{bf16, f16};
use numpy::{
    PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::sync::{Arc, Mutex};

/// favor's errors as Python exceptions: element types → TypeError, a backend that cannot run or
/// fails → RuntimeError, everything else (shapes, strides, parameters, non-finite values) →
/// ValueError; the message is favor's.
fn py_err(e: FavorError) -> PyErr {
    match e {
        FavorError::DType { .. } => PyTypeError::new_err(e.to_string()),
        FavorError::NotAvailable { .. } | FavorError::Backend { .. } => PyRuntimeError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// Sizes and strides (in elements) of a 4-d array in its own axis order.
#[derive(Debug, Clone, Copy)]
struct Dims {
    shape: [usize; 4],
    strides: [usize; 4],
}

/// Elements from the first to one past the last addressed by `d` (0 for an empty array).
fn extent(d: &Dims) -> usize {
    if d.shape.contains(&0) {
        return 0;
    }
    1 + d.shape.iter().zip(&d.strides).map(|(n, s)| (n - 1) * s).sum::<usize>()
}

fn dims_of(arg: &str, shape: &[usize], strides: &[isize]) -> PyResult<Dims> {
    if shape.len() != 4 {
        return Err(PyValueError::new_err(format!("`{arg}` must have 4 dimensions, got {}", shape.len())));
    }
    let mut d = Dims { shape: [0; 4], strides: [0; 4] };
    for i in 0..4 {
        d.shape[i] = shape[i];
        d.strides[i] = usize::try_from(strides[i])
            .map_err(|_| PyValueError::new_err(format!("`{arg}` has a negative stride; pass a copy")))?;
    }
    if d.shape[3] > 1 && d.strides[3] != 1 {
        return Err(PyValueError::new_err(format!("`{arg}`: the last dimension must be contiguous")));
    }
    Ok(d)
}

/// A borrowed input array of one of favor's element types (uint16 holds bfloat16 bits).
enum ReadArray<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    Bf16(PyReadonlyArrayDyn<'py, u16>),
}

/// A borrowed output array.
enum WriteArray<'py> {
    F32(PyReadwriteArrayDyn<'py, f32>),
    F16(PyReadwriteArrayDyn<'py, f16>),
    Bf16(PyReadwriteArrayDyn<'py, u16>),
}

fn unsupported_dtype(arg: &str, a: &Bound<'_, PyAny>) -> PyErr {
    let dtype = a.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| "not an array".into());
    PyTypeError::new_err(format!(
        "`{arg}` must be a NumPy array of float32, float16 or uint16 (bfloat16 bits), got {dtype}"
    ))
}

fn borrow_err(arg: &str, e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("`{arg}` cannot be borrowed ({e}): outputs may not share memory with inputs"))
}

impl<'py> ReadArray<'py> {
    fn new(arg: &str, a: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(x) = a.cast::<PyArrayDyn<f32>>() {
            return x.try_readonly().map(ReadArray::F32).map_err(|e| borrow_err(arg, e));
        }
        if let Ok(x) = a.cast::<PyArrayDyn<f16>>() {
            return x.try_readonly().map(ReadArray::F16).map_err(|e| borrow_err(arg, e));
        }
        if let Ok(x) = a.cast::<PyArrayDyn<u16>>() {
            return x.try_readonly().map(ReadArray::Bf16).map_err(|e| borrow_err(arg, e));
        }
        Err(unsupported_dtype(arg, a))
    }

    /// The array as favor's view (from its first element to the last it addresses) and its
    /// sizes and strides.
    fn view(&self, arg: &str) -> PyResult<(HostRef<'_>, Dims)> {
        fn go<'a, T>(arg: &str, a: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<(&'a [T], Dims)>
        where
            T: numpy::Element,
        {
            let v = a.as_array();
            let d = dims_of(arg, v.shape(), v.strides())?;
            // SAFETY: the array holds every element its non-negative strides address up to
            // `extent`, and the read-only borrow (`a`) keeps it alive and unwritten for 'a.
            Ok((unsafe { std::slice::from_raw_parts(v.as_ptr(), extent(&d)) }, d))
        }
        Ok(match self {
            ReadArray::F32(a) => go(arg, a).map(|(s, d)| (HostRef::F32(s), d))?,
            ReadArray::F16(a) => go(arg, a).map(|(s, d)| (HostRef::F16(s), d))?,
            ReadArray::Bf16(a) => go(arg, a).map(|(s, d)| (HostRef::Bf16(bytemuck::cast_slice::<u16, bf16>(s)), d))?,
        })
    }
}

impl<'py> WriteArray<'py> {
    fn new(arg: &str, a: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(x) = a.cast::<PyArrayDyn<f32>>() {
            return x.try_readwrite().map(WriteArray::F32).map_err(|e| borrow_err(arg, e));
        }
        if let Ok(x) = a.cast::<PyArrayDyn<f16>>() {
            return x.try_readwrite().map(WriteArray::F16).map_err(|e| borrow_err(arg, e));
        }
        if let Ok(x) = a.cast::<PyArrayDyn<u16>>() {
            return x.try_readwrite().map(WriteArray::Bf16).map_err(|e| borrow_err(arg, e));
        }
        Err(unsupported_dtype(arg, a))
    }

    fn view(&mut self, arg: &str) -> PyResult<(HostMut<'_>, Dims)> {
        fn go<'a, T>(arg: &str, a: &'a mut PyReadwriteArrayDyn<'_, T>) -> PyResult<(&'a mut [T], Dims)>
        where
            T: numpy::Element,
        {
            let mut v = a.as_array_mut();
            let d = dims_of(arg, v.shape(), v.strides())?;
            let n = extent(&d);
            // SAFETY: as for `ReadArray::view`, with the exclusive borrow (`a`) for 'a.
            Ok((unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr(), n) }, d))
        }
        Ok(match self {
            WriteArray::F32(a) => go(arg, a).map(|(s, d)| (HostMut::F32(s), d))?,
            WriteArray::F16(a) => go(arg, a).map(|(s, d)| (HostMut::F16(s), d))?,
            WriteArray::Bf16(a) => {
                go(arg, a).map(|(s, d)| (HostMut::Bf16(bytemuck::cast_slice_mut::<u16, bf16>(s)), d))?
            }
        })
    }
}

/// Axis order of the 4-d arrays.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Order {
    /// `[batch, heads, len, width]`.
    Bhld,
    /// `[batch, len, heads, width]`.
    Blhd,
}

impl Order {
    fn parse(layout: &str) -> PyResult<Order> {
        match layout {
            "bhld" => Ok(Order::Bhld),
            "blhd" => Ok(Order::Blhd),
            other => Err(PyValueError::new_err(format!("layout must be \"bhld\" or \"blhd\", got {other:?}"))),
        }
    }

    /// (batch, heads, rows, width) and favor's strides of an array in this order.
    fn read(self, d: &Dims) -> ([usize; 4], Strides) {
        let [s0, s1, s2, _] = d.strides;
        match self {
            Order::Bhld => (d.shape, Strides { batch: s0, head: s1, token: s2 }),
            Order::Blhd => {
                ([d.shape[0], d.shape[2], d.shape[1], d.shape[3]], Strides { batch: s0, head: s2, token: s1 })
            }
        }
    }
}

/// A backend (`favor.backends()` lists the ids).
#[pyclass(name = "Backend", module = "favor._favor", frozen)]
struct PyBackend {
    backend: Backend,
}

#[pymethods]
impl PyBackend {
    #[new]
    fn new(id: &str) -> PyResult<Self> {
        Ok(PyBackend { backend: Backend::from_id(id).map_err(py_err)? })
    }

    /// The id `Backend(id)` opens again ("simd:avx512", "cuda:0", "reference").
    #[getter]
    fn id(&self) -> String {
        self.backend.id()
    }

    /// A descriptive name.
    #[getter]
    fn name(&self) -> String {
        self.backend.name()
    }

    /// Whether it runs on a GPU.
    #[getter]
    fn is_gpu(&self) -> bool {
        self.backend.is_gpu()
    }

    fn __repr__(&self) -> String {
        format!("favor.Backend({:?})", self.backend.id())
    }
}

/// The ids of the backends available here, fastest first.
#[pyfunction]
fn available_backends() -> Vec<String> {
    Backend::available().iter().map(Backend::id).collect()
}

/// A feature map with its projection or parameters.
#[pyclass(name = "FeatureMap", module = "favor._favor", frozen)]
struct PyMap {
    map: Arc<FeatureMap>,
}

fn map_kind(kind: &str, projection: Option<Projection>) -> PyResult<FeatureMap> {
    let need =
        |p: Option<Projection>| p.ok_or_else(|| PyValueError::new_err(format!("the {kind} map needs a projection")));
    Ok(match kind {
        "positive" => FeatureMap::positive(need(projection)?),
        "hyperbolic" => FeatureMap::hyperbolic(need(projection)?),
        "trigonometric" => FeatureMap::trigonometric(need(projection)?),
        "relu" => FeatureMap::relu(projection),
        "elu" => match projection {
            None => FeatureMap::elu_plus_one(),
            Some(_) => return Err(PyValueError::new_err("the elu map has no projection")),
        },
        other => {
            return Err(PyValueError::new_err(format!(
                "feature_map must be one of positive, hyperbolic, trigonometric, relu, elu; got {other:?}"
            )));
        }
    })
}

fn with_scale(map: FeatureMap, scale: Option<f32>) -> PyResult<FeatureMap> {
    match scale {
        Some(tau) => map.with_softmax_scale(tau).map_err(py_err),
        None => Ok(map),
    }
}

#[pymethods]
impl PyMap {
    /// Draws W (num_features × d) from `seed`: block-orthogonal rows with χ(d) norms, or iid
    /// Gaussian rows.
    #[staticmethod]
    #[pyo3(signature = (kind, num_features, d, seed, orthogonal=true, scale=None))]
    fn draw(
        kind: &str,
        num_features: usize,
        d: usize,
        seed: u64,
        orthogonal: bool,
        scale: Option<f32>,
    ) -> PyResult<Self> {
        let projection = if kind == "elu" {
            None
        } else {
            let kind = if orthogonal { ProjectionKind::Orthogonal } else { ProjectionKind::Iid };
            let config = ProjectionConfig { kind, ..ProjectionConfig::new(num_features, d, seed) };
            Some(Projection::draw(config).map_err(py_err)?)
        };
        let map = with_scale(map_kind(kind, projection)?, scale)?;
        map.validate(d).map_err(py_err)?;
        Ok(PyMap { map: Arc::new(map) })
    }

    /// A map on the caller's W (float32 [num_features, d], copied).
    #[staticmethod]
    #[pyo3(signature = (kind, w, scale=None))]
    fn from_matrix(kind: &str, w: PyReadonlyArray2<'_, f32>, scale: Option<f32>) -> PyResult<Self> {
        let v = w.as_array();
        let (m, d) = (v.shape()[0], v.shape()[1]);
        let projection = Projection::from_matrix(m, d, v.iter().copied().collect()).map_err(py_err)?;
        let map = with_scale(map_kind(kind, Some(projection))?, scale)?;
        Ok(PyMap { map: Arc::new(map) })
    }

    /// W as a new float32 array [num_features, d] (None for maps without one).
    fn matrix<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyArray2<f32>>>> {
        let p = match &*self.map {
            FeatureMap::Positive { projection, .. }
            | FeatureMap::Hyperbolic { projection, .. }
            | FeatureMap::Trigonometric { projection, .. }
            | FeatureMap::Generalized { projection: Some(projection), .. } => projection,
            _ => return Ok(None),
        };
        let rows: Vec<Vec<f32>> = p.rows().map(<[f32]>::to_vec).collect();
        Ok(Some(PyArray2::from_vec2(py, &rows).map_err(|e| PyValueError::new_err(e.to_string()))?))
    }

    /// Features φ produces for head dimension d.
    fn features(&self, d: usize) -> PyResult<usize> {
        self.map.validate(d).map_err(py_err)?;
        Ok(self.map.feature_dim(d))
    }

    /// The map's name ("positive", ...).
    #[getter]
    fn name(&self) -> &'static str {
        self.map.name()
    }
}

/// The problem of a call from its arrays: q gives batch, heads, len and d; k the key/value
/// heads and keys; v the value width.
fn problem_of<'m>(
    map: &'m FeatureMap,
    order: Order,
    causal: bool,
    q: &Dims,
    k: &Dims,
    v: &Dims,
    strides: impl Fn(TensorArg) -> Option<Strides>,
) -> Problem<'m> {
    let ([b, h, l, d], _) = order.read(q);
    let ([_, hk, lk, _], _) = order.read(k);
    let ([_, _, _, dv], _) = order.read(v);
    let mut shape = AttentionShape::new(b, h, l, d).with_dv(dv).with_kv_heads(hk);
    if lk != l {
        shape = shape.with_kv_len(lk);
    }
    let direction = if causal { Direction::Causal } else { Direction::Bidirectional };
    Problem::new(shape, map)
        .with_options(AttentionOptions { direction, ..Default::default() })
        .with_layout(Layout::from_fn(strides))
}

/// Checks that the other arrays' sizes agree with the problem (favor checks element counts; a
/// wrong size along one axis could otherwise pass).
fn check_dims(order: Order, arg: &str, got: &Dims, want: [usize; 4]) -> PyResult<()> {
    let (shape, _) = order.read(got);
    if shape != want {
        let show = |s: [usize; 4]| match order {
            Order::Bhld => format!("{s:?}"),
            Order::Blhd => format!("{:?}", [s[0], s[2], s[1], s[3]]),
        };
        return Err(PyValueError::new_err(format!("`{arg}` has shape {}, expected {}", show(shape), show(want))));
    }
    Ok(())
}

fn mask_of<'a>(mask: &'a Option<PyReadonlyArray2<'_, bool>>) -> PyResult<Option<&'a [bool]>> {
    mask.as_ref()
        .map(|m| m.as_slice().map_err(|_| PyValueError::new_err("`key_mask` must be C-contiguous")))
        .transpose()
}

/// Attention forward into `out` (same axis order as q).
#[pyfunction]
#[pyo3(signature = (backend, map, q, k, v, out, causal, layout, key_mask=None))]
#[allow(clippy::too_many_arguments)]
fn forward(
    py: Python<'_>,
    backend: &PyBackend,
    map: &PyMap,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    causal: bool,
    layout: &str,
    key_mask: Option<PyReadonlyArray2<'_, bool>>,
) -> PyResult<()> {
    let order = Order::parse(layout)?;
    let (qa, ka, va) = (ReadArray::new("q", q)?, ReadArray::new("k", k)?, ReadArray::new("v", v)?);
    let mut oa = WriteArray::new("out", out)?;
    let ((qt, qd), (kt, kd), (vt, vd)) = (qa.view("q")?, ka.view("k")?, va.view("v")?);
    let (ot, od) = oa.view("out")?;
    let p = problem_of(&map.map, order, causal, &qd, &kd, &vd, |arg| match arg {
        TensorArg::Q => Some(order.read(&qd).1),
        TensorArg::K => Some(order.read(&kd).1),
        TensorArg::V => Some(order.read(&vd).1),
        TensorArg::Out => Some(order.read(&od).1),
        _ => None,
    });
    let s = p.shape;
    check_dims(order, "out", &od, [s.batch, s.heads, s.len, s.dv])?;
    let mask = mask_of(&key_mask)?;
    let inputs = Inputs { q: qt, k: kt, v: vt, key_mask: mask };
    let b = &backend.backend;
    py.detach(|| b.forward(&p, inputs, ot)).map_err(py_err)
}

/// Attention backward into dq, dk, dv.
#[pyfunction]
#[pyo3(signature = (backend, map, q, k, v, dout, dq, dk, dv, causal, layout, key_mask=None))]
#[allow(clippy::too_many_arguments)]
fn backward(
    py: Python<'_>,
    backend: &PyBackend,
    map: &PyMap,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    dout: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    causal: bool,
    layout: &str,
    key_mask: Option<PyReadonlyArray2<'_, bool>>,
) -> PyResult<()> {
    let order = Order::parse(layout)?;
    let (qa, ka, va) = (ReadArray::new("q", q)?, ReadArray::new("k", k)?, ReadArray::new("v", v)?);
    let ga = ReadArray::new("dout", dout)?;
    let (mut dqa, mut dka, mut dva) =
        (WriteArray::new("dq", dq)?, WriteArray::new("dk", dk)?, WriteArray::new("dv", dv)?);
    let ((qt, qd), (kt, kd), (vt, vd), (gt, gd)) = (qa.view("q")?, ka.view("k")?, va.view("v")?, ga.view("dout")?);
    let ((dqt, dqd), (dkt, dkd), (dvt, dvd)) = (dqa.view("dq")?, dka.view("dk")?, dva.view("dv")?);
    let p = problem_of(&map.map, order, causal, &qd, &kd, &vd, |arg| {
        let d = match arg {
            TensorArg::Q => &qd,
            TensorArg::K => &kd,
            TensorArg::V => &vd,
            TensorArg::Out | TensorArg::Dout => &gd,
            TensorArg::Dq => &dqd,
            TensorArg::Dk => &dkd,
            TensorArg::Dv => &dvd,
        };
        Some(order.read(d).1)
    });
    let s = p.shape;
    check_dims(order, "dout", &gd, [s.batch, s.heads, s.len, s.dv])?;
    check_dims(order, "dq", &dqd, order.read(&qd).0)?;
    check_dims(order, "dk", &dkd, order.read(&kd).0)?;
    check_dims(order, "dv", &dvd, order.read(&vd).0)?;
    let mask = mask_of(&key_mask)?;
    let inputs = Inputs { q: qt, k: kt, v: vt, key_mask: mask };
    let grads = Grads { dq: dqt, dk: dkt, dv: dvt };
    let b = &backend.backend;
    py.detach(|| b.backward(&p, inputs, gt, grads)).map_err(py_err)?;
    Ok(())
}

/// A decoding state of many slots: each slot is one sequence at its own position.
#[pyclass(name = "SlotState", module = "favor._favor", frozen)]
struct PyState {
    backend: Backend,
    map: Arc<FeatureMap>,
    shape: AttentionShape,
    state: Mutex<BackendState>,
}

impl PyState {
    fn locked(&self) -> PyResult<std::sync::MutexGuard<'_, BackendState>> {
        self.state.lock().map_err(|_| PyRuntimeError::new_err("the decoder was left inconsistent by an earlier panic"))
    }

    /// A decode call's problem from its q, k, v (batch = `batch`, the chunk's tokens from q).
    fn problem<'s>(&'s self, order: Order, qd: &Dims, kd: &Dims, vd: &Dims, od: &Dims) -> PyResult<Problem<'s>> {
        let p = problem_of(&self.map, order, true, qd, kd, vd, |arg| {
            let d = match arg {
                TensorArg::Q => qd,
                TensorArg::K => kd,
                TensorArg::V => vd,
                _ => od,
            };
            Some(order.read(d).1)
        });
        let s = p.shape;
        let want = AttentionShape { batch: s.batch, len: s.len, kv_len: None, ..self.shape };
        if s != want {
            return Err(PyValueError::new_err(format!(
                "the arrays give heads = {}, kv_heads = {}, d = {}, dv = {}; the decoder has heads = {}, kv_heads = {}, d = {}, dv = {}",
                s.heads,
                s.key_heads(),
                s.d,
                s.dv,
                self.shape.heads,
                self.shape.key_heads(),
                self.shape.d,
                self.shape.dv
            )));
        }
        check_dims(order, "out", od, [s.batch, s.heads, s.len, s.dv])?;
        Ok(p)
    }
}

#[pymethods]
impl PyState {
    #[new]
    fn new(
        backend: &PyBackend,
        map: &PyMap,
        slots: usize,
        heads: usize,
        kv_heads: usize,
        d: usize,
        dv: usize,
    ) -> PyResult<Self> {
        let shape = AttentionShape::new(slots, heads, 1, d).with_dv(dv).with_kv_heads(kv_heads);
        let p = Problem::new(shape, &map.map).with_options(AttentionOptions::causal());
        let state = backend.backend.new_state(&p).map_err(py_err)?;
        Ok(PyState { backend: backend.backend.clone(), map: map.map.clone(), shape, state: Mutex::new(state) })
    }

    /// Continues every slot by the same chunk (arrays with batch = slots).
    fn decode(
        &self,
        py: Python<'_>,
        q: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        layout: &str,
    ) -> PyResult<()> {
        let order = Order::parse(layout)?;
        let (qa, ka, va) = (ReadArray::new("q", q)?, ReadArray::new("k", k)?, ReadArray::new("v", v)?);
        let mut oa = WriteArray::new("out", out)?;
        let ((qt, qd), (kt, kd), (vt, vd)) = (qa.view("q")?, ka.view("k")?, va.view("v")?);
        let (ot, od) = oa.view("out")?;
        let p = self.problem(order, &qd, &kd, &vd, &od)?;
        let inputs = Inputs { q: qt, k: kt, v: vt, key_mask: None };
        // The lock is taken without the GIL: a thread waiting for it never holds the GIL that
        // the thread holding it needs to return.
        py.detach(|| self.backend.decode(&p, &mut *self.locked()?, inputs, ot).map_err(py_err))
    }

    /// Continues the slots `slots`, sequence i by tokens offsets[i]..offsets[i + 1] of the packed
    /// arrays (batch 1).
    #[allow(clippy::too_many_arguments)]
    fn decode_slots(
        &self,
        py: Python<'_>,
        slots: PyReadonlyArray1<'_, usize>,
        offsets: PyReadonlyArray1<'_, usize>,
        q: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        layout: &str,
    ) -> PyResult<()> {
        let order = Order::parse(layout)?;
        let (qa, ka, va) = (ReadArray::new("q", q)?, ReadArray::new("k", k)?, ReadArray::new("v", v)?);
        let mut oa = WriteArray::new("out", out)?;
        let ((qt, qd), (kt, kd), (vt, vd)) = (qa.view("q")?, ka.view("k")?, va.view("v")?);
        let (ot, od) = oa.view("out")?;
        let p = self.problem(order, &qd, &kd, &vd, &od)?;
        let slot_ids = slots.as_slice().map_err(|_| PyValueError::new_err("`slots` must be contiguous"))?;
        let offs = offsets.as_slice().map_err(|_| PyValueError::new_err("`offsets` must be contiguous"))?;
        let inputs = Inputs { q: qt, k: kt, v: vt, key_mask: None };
        let chunks = SlotChunks::new(slot_ids, offs);
        py.detach(|| self.backend.decode_slots(&p, &mut *self.locked()?, chunks, inputs, ot).map_err(py_err))
    }

    /// Tokens slot `slot` has consumed.
    fn tokens(&self, slot: usize) -> PyResult<u64> {
        let st = self.locked()?;
        Ok(self.backend.read_slot(&st, slot).map_err(py_err)?.tokens())
    }

    /// Empties one slot.
    fn reset(&self, slot: usize) -> PyResult<()> {
        let mut st = self.locked()?;
        self.backend.reset_slot(&mut st, slot).map_err(py_err)
    }

    /// Copies slot `src` over slot `dst`.
    fn copy(&self, src: usize, dst: usize) -> PyResult<()> {
        let mut st = self.locked()?;
        self.backend.copy_slot(&mut st, src, dst).map_err(py_err)
    }

    /// One slot as bytes (versioned, fingerprinted; `load` takes them back).
    fn save<'py>(&self, py: Python<'py>, slot: usize) -> PyResult<Bound<'py, PyBytes>> {
        let st = self.locked()?;
        let bytes = self.backend.read_slot(&st, slot).map_err(py_err)?.to_bytes();
        Ok(PyBytes::new(py, &bytes))
    }

    /// Overwrites slot `slot` with bytes from `save` (ValueError when made for another problem).
    fn load(&self, slot: usize, data: &[u8]) -> PyResult<()> {
        let value = SlotState::from_bytes(data).map_err(py_err)?;
        let mut st = self.locked()?;
        self.backend.write_slot(&mut st, slot, &value).map_err(py_err)
    }

    /// Number of slots.
    #[getter]
    fn slots(&self) -> usize {
        self.shape.batch
    }
}

/// A tensor in CUDA device memory as Python describes it: (pointer, shape, strides in elements,
/// dtype name), 4-d in the call's axis order.
#[cfg(feature = "cuda")]
type DeviceArg = (usize, [usize; 4], [usize; 4], String);

#[cfg(feature = "cuda")]
fn device_dtype(arg: &str, name: &str) -> PyResult<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::Bf16),
        other => Err(PyTypeError::new_err(format!("`{arg}`: favor takes float32, float16 or bfloat16, got {other}"))),
    }
}

/// Sizes, strides and the element count from the first element to the last addressed.
#[cfg(feature = "cuda")]
fn device_dims(arg: &str, t: &DeviceArg) -> PyResult<(Dims, usize, DType)> {
    let strides: Vec<isize> = t.2.iter().map(|&s| s as isize).collect();
    let d = dims_of(arg, &t.1, &strides)?;
    Ok((d, extent(&d), device_dtype(arg, &t.3)?))
}

/// The CUDA backend on device tensors, enqueuing on a stream (PyTorch's current stream).
#[cfg(feature = "cuda")]
#[pyclass(name = "DeviceBackend", module = "favor._favor", frozen)]
struct PyDeviceBackend {
    backend: favor::cuda::CudaBackend,
}

#[cfg(feature = "cuda")]
#[pymethods]
impl PyDeviceBackend {
    /// `id` "cuda" or "cuda:N"; `stream` a CUstream handle (0: favor's own stream).
    #[new]
    fn new(id: &str, stream: usize) -> PyResult<Self> {
        #[cfg(feature = "cuda-emulator")]
        if id == "cuda-emulated" {
            return Ok(PyDeviceBackend { backend: favor::cuda::CudaBackend::emulated() });
        }
        let host = Backend::from_id(id).map_err(py_err)?;
        let device = host
            .cuda_device()
            .ok_or_else(|| PyValueError::new_err(format!("`{id}` is not a CUDA backend (expected cuda or cuda:N)")))?;
        let backend = match (stream, device.stream()) {
            (0, Some(own)) => device.with_stream(own.clone()),
            // SAFETY: PyTorch's stream handle of this device, alive while its tensors are used.
            _ => unsafe { device.with_borrowed_stream(stream as *mut std::ffi::c_void) },
        }
        .map_err(py_err)?;
        Ok(PyDeviceBackend { backend })
    }

    /// Waits for the queued work.
    fn synchronize(&self) -> PyResult<()> {
        self.backend.synchronize().map_err(py_err)
    }
}

/// A checked device tensor: address, elements from the first to the last addressed, dtype.
#[cfg(feature = "cuda")]
type RawDevice = (u64, usize, DType);

/// Checks the tensors of one call: their sizes and strides, and what views are made of.
#[cfg(feature = "cuda")]
fn device_args(args: &[(&str, &DeviceArg)]) -> PyResult<(Vec<Dims>, Vec<RawDevice>)> {
    let mut dims = Vec::new();
    let mut raw = Vec::new();
    for (arg, t) in args {
        let (d, n, dtype) = device_dims(arg, t)?;
        dims.push(d);
        raw.push((t.0 as u64, n, dtype));
    }
    Ok((dims, raw))
}

/// Fails when any of the first `outputs` device spans overlaps another span.
#[cfg(feature = "cuda")]
fn device_disjoint(names: &[&str], raw: &[RawDevice], outputs: std::ops::Range<usize>) -> PyResult<()> {
    let span = |i: usize| (raw[i].0, raw[i].0 + (raw[i].1 * raw[i].2.size()) as u64);
    for o in outputs.clone() {
        for j in 0..raw.len() {
            let ((a0, a1), (b0, b1)) = (span(o), span(j));
            if j != o && a0 < b1 && b0 < a1 && !(outputs.contains(&j) && j < o) {
                return Err(PyValueError::new_err(format!(
                    "`{}` overlaps `{}`: outputs may not share memory with other tensors",
                    names[o], names[j]
                )));
            }
        }
    }
    Ok(())
}

/// Attention forward on device tensors (q, k, v, out as (pointer, shape, strides, dtype)).
#[cfg(feature = "cuda")]
#[pyfunction]
#[pyo3(signature = (backend, map, q, k, v, out, causal, layout))]
#[allow(clippy::too_many_arguments)]
fn forward_device(
    py: Python<'_>,
    backend: &PyDeviceBackend,
    map: &PyMap,
    q: DeviceArg,
    k: DeviceArg,
    v: DeviceArg,
    out: DeviceArg,
    causal: bool,
    layout: &str,
) -> PyResult<()> {
    use favor::cuda::{DeviceMut, DeviceRef};
    let order = Order::parse(layout)?;
    let names = ["q", "k", "v", "out"];
    let (dims, raw) = device_args(&[("q", &q), ("k", &k), ("v", &v), ("out", &out)])?;
    device_disjoint(&names, &raw, 3..4)?;
    let [qd, kd, vd, od] = [dims[0], dims[1], dims[2], dims[3]];
    let p = problem_of(&map.map, order, causal, &qd, &kd, &vd, |arg| {
        let d = match arg {
            TensorArg::Q => &qd,
            TensorArg::K => &kd,
            TensorArg::V => &vd,
            _ => &od,
        };
        Some(order.read(d).1)
    });
    let s = p.shape;
    check_dims(order, "out", &od, [s.batch, s.heads, s.len, s.dv])?;
    // SAFETY: PyTorch's tensors: device memory of this device holding these elements, kept
    // alive by the caller until the stream has run the call (torch's stream semantics).
    let (qt, kt, vt, ot) = unsafe {
        (
            DeviceRef::from_raw(raw[0].0, raw[0].1, raw[0].2),
            DeviceRef::from_raw(raw[1].0, raw[1].1, raw[1].2),
            DeviceRef::from_raw(raw[2].0, raw[2].1, raw[2].2),
            DeviceMut::from_raw(raw[3].0, raw[3].1, raw[3].2),
        )
    };
    let inputs = Inputs { q: qt, k: kt, v: vt, key_mask: None };
    let b = &backend.backend;
    py.detach(|| b.forward(&p, inputs, ot)).map_err(py_err)
}

/// Attention backward on device tensors.
#[cfg(feature = "cuda")]
#[pyfunction]
#[pyo3(signature = (backend, map, q, k, v, dout, dq, dk, dv, causal, layout))]
#[allow(clippy::too_many_arguments)]
fn backward_device(
    py: Python<'_>,
    backend: &PyDeviceBackend,
    map: &PyMap,
    q: DeviceArg,
    k: DeviceArg,
    v: DeviceArg,
    dout: DeviceArg,
    dq: DeviceArg,
    dk: DeviceArg,
    dv: DeviceArg,
    causal: bool,
    layout: &str,
) -> PyResult<()> {
    use favor::cuda::{DeviceMut, DeviceRef};
    let order = Order::parse(layout)?;
    let names = ["q", "k", "v", "dout", "dq", "dk", "dv"];
    let all = [("q", &q), ("k", &k), ("v", &v), ("dout", &dout), ("dq", &dq), ("dk", &dk), ("dv", &dv)];
    let (d, raw) = device_args(&all)?;
    device_disjoint(&names, &raw, 4..7)?;
    let p = problem_of(&map.map, order, causal, &d[0], &d[1], &d[2], |arg| {
        let i = match arg {
            TensorArg::Q => 0,
            TensorArg::K => 1,
            TensorArg::V => 2,
            TensorArg::Out | TensorArg::Dout => 3,
            TensorArg::Dq => 4,
            TensorArg::Dk => 5,
            TensorArg::Dv => 6,
        };
        Some(order.read(&d[i]).1)
    });
    let s = p.shape;
    check_dims(order, "dout", &d[3], [s.batch, s.heads, s.len, s.dv])?;
    for (i, want) in [(4, 0), (5, 1), (6, 2)] {
        check_dims(order, names[i], &d[i], order.read(&d[want]).0)?;
    }
    // SAFETY: as in `forward_device`.
    let (r, m) = unsafe {
        (
            [0, 1, 2, 3].map(|i| DeviceRef::from_raw(raw[i].0, raw[i].1, raw[i].2)),
            [4, 5, 6].map(|i| DeviceMut::from_raw(raw[i].0, raw[i].1, raw[i].2)),
        )
    };
    let [dqt, dkt, dvt] = m;
    let inputs = Inputs { q: r[0], k: r[1], v: r[2], key_mask: None };
    let b = &backend.backend;
    py.detach(|| b.backward(&p, inputs, r[3], Grads { dq: dqt, dk: dkt, dv: dvt })).map_err(py_err)?;
    Ok(())
}

#[pymodule]
fn _favor(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBackend>()?;
    m.add_class::<PyMap>()?;
    m.add_class::<PyState>()?;
    m.add_function(wrap_pyfunction!(available_backends, m)?)?;
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    #[cfg(feature = "cuda")]
    {
        m.add_class::<PyDeviceBackend>()?;
        m.add_function(wrap_pyfunction!(forward_device, m)?)?;
        m.add_function(wrap_pyfunction!(backward_device, m)?)?;
    }
    Ok(())
}
