//! [`CudaBackend`]: context, stream, loaded kernels, allocation counters, and the
//! [`FavorBackend`] implementation on device memory ([`CudaMem`]).

use crate::kernels::{Exec, Kernels, driver_err, kernels_built};
use crate::memory::{
    Buf, CudaMem, DevPtr, DeviceMut, DeviceRef, DeviceTensor, MemCounters, MemoryUsage, Scratch, TensorData,
};
use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, ValidAsZeroBits, sys};
use favor_core::{
    AttentionShape, DType, FavorBackend, FavorError, FeatureMap, FeatureRole, Grads, HostMut, HostRef, Inputs,
    ParamGrads, Problem, Result, SlotChunks, SlotState, TensorHandle,
};
use std::sync::Arc;

/// CUDA 13.0 as `cuDriverGetVersion` reports it: the fatbin comes from nvcc 13.0 (PTX ISA 9.0),
/// which needs an r580+ driver.
pub const REQUIRED_DRIVER_VERSION: i32 = 13000;

fn not_available(reason: impl Into<String>) -> FavorError {
    FavorError::NotAvailable { backend: "cuda", reason: reason.into() }
}

/// The CUDA backend: one device, one stream, kernels loaded once.
///
/// Calls enqueue work on the stream and return without synchronising (except for the host
/// copies of [`CudaBackend::upload`] / [`CudaBackend::download`]); call
/// [`FavorBackend::synchronize`] before reading results on the host by other means.
pub struct CudaBackend {
    ctx: Option<Arc<CudaContext>>,
    pub(crate) exec: Exec,
    pub(crate) counters: Arc<MemCounters>,
    device_name: String,
    driver_version: i32,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device_name)
            .field("ordinal", &self.ctx.as_ref().map(|c| c.ordinal()))
            .field("driver_version", &self.driver_version)
            .finish()
    }
}

/// The driver's CUDA version (e.g. 13000), or `NotAvailable` when no driver library is present.
pub fn driver_version() -> Result<i32> {
    // SAFETY: only dlopen()s the candidate libcuda names; no CUDA function is called.
    if !unsafe { sys::is_culib_present() } {
        return Err(not_available("the NVIDIA driver library (libcuda.so) was not found"));
    }
    let mut version = 0i32;
    // SAFETY: libcuda is loaded (checked above); cuDriverGetVersion writes one int and needs no
    // cuInit.
    let status = unsafe { sys::cuDriverGetVersion(&mut version) };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(not_available(format!("cuDriverGetVersion failed: {status:?}")));
    }
    Ok(version)
}

/// Number of CUDA devices the driver reports: 0 when favor-cuda has no kernels, or
/// `NotAvailable` when there is no usable driver (checked before cudarc is asked for anything,
/// since cudarc panics on a missing libcuda).
pub fn device_count() -> Result<usize> {
    if !kernels_built() {
        return Ok(0);
    }
    let version = driver_version()?;
    if version < REQUIRED_DRIVER_VERSION {
        return Ok(0);
    }
    let n = CudaContext::device_count().map_err(|e| not_available(format!("cannot count CUDA devices: {e}")))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

impl CudaBackend {
    /// Opens device `ordinal` on its default stream. Returns [`FavorError::NotAvailable`] when
    /// the crate was built without kernels, when there is no NVIDIA driver or it is older than
    /// CUDA 13.0, or when the device does not exist. Never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !kernels_built() {
            return Err(not_available(
                "favor-cuda was built without nvcc, so it has no kernels (set NVCC or CUDA_HOME and rebuild)",
            ));
        }
        let version = driver_version()?;
        if version < REQUIRED_DRIVER_VERSION {
            return Err(not_available(format!(
                "the driver supports CUDA {}.{}, the kernels were built with CUDA 13.0 and need an r580+ driver",
                version / 1000,
                (version % 1000) / 10
            )));
        }
        let open =
            || CudaContext::new(ordinal).map_err(|e| not_available(format!("cannot open CUDA device {ordinal}: {e}")));
        // Two handles on the device's primary context: `ctx` is handed out (context()) and keeps
        // cudarc's event tracking, which makes cudarc's safe API sound across streams; `own`
        // is never handed out and allocates the backend's buffers without per-buffer events
        // (two event creations per scratch buffer otherwise). The backend orders its streams
        // itself (StreamJoin).
        let ctx = open()?;
        let own = open()?;
        // SAFETY: `own` is private to this backend. Every buffer it allocates lives in a
        // DeviceTensor, Scratch or CudaState, whose only uses are kernel launches and copies on a
        // backend's stream, joined with the buffer's home stream when the two differ.
        unsafe { own.disable_event_tracking() };
        let stream = own.default_stream();
        let kernels = Kernels::load(&ctx)?;
        let device_name = ctx.name().map_err(driver_err)?;
        Ok(Self {
            ctx: Some(ctx),
            exec: Exec::Cuda { stream, kernels },
            counters: Arc::default(),
            device_name,
            driver_version: version,
        })
    }

    /// The kernels run on the CPU by the test emulator of `cuda/emu` (one OS thread per CUDA
    /// thread): slow, for validating the kernels on machines without a GPU. "Device" buffers
    /// are host allocations.
    #[cfg(feature = "emulator")]
    #[doc(hidden)]
    pub fn emulated() -> Self {
        Self {
            ctx: None,
            exec: Exec::Emulator,
            counters: Arc::default(),
            device_name: "cpu-emulator".into(),
            driver_version: 0,
        }
    }

    /// The same backend enqueuing on `stream` (an engine's own stream on this device's context).
    pub fn with_stream(&self, stream: Arc<CudaStream>) -> Result<Self> {
        let (Some(ctx), Exec::Cuda { kernels, .. }) = (&self.ctx, &self.exec) else {
            return Err(FavorError::Unsupported("streams on an emulated backend".into()));
        };
        if stream.context().cu_ctx() != ctx.cu_ctx() {
            return Err(FavorError::Unsupported("a stream of another CUDA context".into()));
        }
        Ok(Self {
            ctx: Some(ctx.clone()),
            exec: Exec::Cuda { stream, kernels: kernels.clone() },
            counters: self.counters.clone(),
            device_name: self.device_name.clone(),
            driver_version: self.driver_version,
        })
    }

    /// The same backend enqueuing on a stream that another library owns and keeps alive: an
    /// engine's `CUstream` / `cudaStream_t` (from C, or PyTorch's current stream). The backend
    /// orders its work on that stream like any other call on it; dropping the backend does not
    /// destroy the stream.
    ///
    /// # Safety
    /// `stream` is a valid stream of this device's primary context (the context favor opened),
    /// and stays valid while the returned backend, or any call's work it enqueued, may use it.
    pub unsafe fn with_borrowed_stream(&self, stream: *mut std::ffi::c_void) -> Result<Self> {
        let Some(ctx) = &self.ctx else {
            return Err(FavorError::Unsupported("streams on an emulated backend".into()));
        };
        // SAFETY: the caller's contract: a live stream of this context that outlives its uses.
        let borrowed = unsafe { ctx.wrap_borrowed_stream(stream.cast()) };
        self.with_stream(borrowed)
    }

    /// Orders this backend's stream after the home streams of the buffers a call uses (those
    /// that differ from it), and those streams after the call's work when finished or dropped.
    pub(crate) fn join<'a>(&'a self, homes: &[Option<&'a CudaStream>]) -> Result<StreamJoin<'a>> {
        let mut join = StreamJoin { own: None, homes: Vec::new() };
        let stream = match &self.exec {
            Exec::Cuda { stream, .. } => stream,
            #[cfg(feature = "emulator")]
            Exec::Emulator => return Ok(join),
        };
        join.own = Some(stream);
        for home in homes.iter().flatten() {
            // Checked first: every context's legacy default stream is the same null handle.
            if home.context().cu_ctx() != stream.context().cu_ctx() {
                return Err(FavorError::Unsupported("a device buffer of another CUDA context".into()));
            }
            if home.cu_stream() == stream.cu_stream() || join.homes.iter().any(|h| h.cu_stream() == home.cu_stream()) {
                continue;
            }
            stream.join(home).map_err(driver_err)?;
            join.homes.push(home);
        }
        Ok(join)
    }

    /// The context (`None` only for the test emulator).
    pub fn context(&self) -> Option<&Arc<CudaContext>> {
        self.ctx.as_ref()
    }

    /// The stream work is enqueued on (`None` only for the test emulator).
    pub fn stream(&self) -> Option<&Arc<CudaStream>> {
        match &self.exec {
            Exec::Cuda { stream, .. } => Some(stream),
            #[cfg(feature = "emulator")]
            Exec::Emulator => None,
        }
    }

    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// Driver CUDA version (e.g. 13000).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// Bytes allocated through this backend (tensors, scratch, states) now and at the peak.
    pub fn memory_usage(&self) -> MemoryUsage {
        self.counters.usage()
    }

    /// Restart the peak at the current usage.
    pub fn reset_peak_memory(&self) {
        self.counters.reset_peak();
    }

    fn buf_zeros<T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod>(&self, len: usize) -> Result<Buf<T>> {
        match &self.exec {
            Exec::Cuda { stream, .. } => Ok(Buf::Device(stream.alloc_zeros::<T>(len).map_err(driver_err)?)),
            #[cfg(feature = "emulator")]
            Exec::Emulator => Ok(Buf::Host(crate::emulator::HostBuf::from_slice(&vec![T::zeroed(); len]))),
        }
    }

    fn buf_from<T: DeviceRepr + bytemuck::Pod>(&self, host: &[T]) -> Result<Buf<T>> {
        match &self.exec {
            Exec::Cuda { stream, .. } => Ok(Buf::Device(stream.clone_htod(host).map_err(driver_err)?)),
            #[cfg(feature = "emulator")]
            Exec::Emulator => Ok(Buf::Host(crate::emulator::HostBuf::from_slice(host))),
        }
    }

    /// Copies `buf` into `dst` (same length) and waits for the stream.
    fn buf_to_host<T: DeviceRepr + bytemuck::Pod>(&self, buf: &Buf<T>, dst: &mut [T]) -> Result<()> {
        match (buf, &self.exec) {
            (Buf::Device(b), Exec::Cuda { stream, .. }) => {
                let join = self.join(&[Some(b.stream())])?;
                stream.memcpy_dtoh(b, dst).map_err(driver_err)?;
                stream.synchronize().map_err(driver_err)?;
                join.finish()
            }
            #[cfg(feature = "emulator")]
            (Buf::Host(h), Exec::Emulator) => {
                h.copy_to(dst);
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(FavorError::Backend { backend: "cuda", reason: "buffer of another backend kind".into() }),
        }
    }

    /// Copies elements `start..start + dst.len()` of `buf` into `dst` and waits for the stream.
    pub(crate) fn buf_range_to_host<T: DeviceRepr + bytemuck::Pod>(
        &self,
        buf: &Buf<T>,
        start: usize,
        dst: &mut [T],
    ) -> Result<()> {
        let range = start..start + dst.len();
        if range.end > buf.len() {
            return Err(FavorError::OutOfRange { start, count: dst.len(), len: buf.len() });
        }
        match (buf, &self.exec) {
            (Buf::Device(b), Exec::Cuda { stream, .. }) => {
                stream.memcpy_dtoh(&b.slice(range), dst).map_err(driver_err)?;
                stream.synchronize().map_err(driver_err)
            }
            #[cfg(feature = "emulator")]
            (Buf::Host(h), Exec::Emulator) => {
                h.copy_range_to(start, dst);
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(FavorError::Backend { backend: "cuda", reason: "buffer of another backend kind".into() }),
        }
    }

    /// Copies `src` into elements `start..start + src.len()` of `buf` (ordered on the stream
    /// before later launches; `src` is read before this returns).
    pub(crate) fn buf_range_from_host<T: DeviceRepr + bytemuck::Pod>(
        &self,
        buf: &mut Buf<T>,
        start: usize,
        src: &[T],
    ) -> Result<()> {
        let range = start..start + src.len();
        if range.end > buf.len() {
            return Err(FavorError::OutOfRange { start, count: src.len(), len: buf.len() });
        }
        match (buf, &self.exec) {
            (Buf::Device(b), Exec::Cuda { stream, .. }) => {
                stream.memcpy_htod(src, &mut b.slice_mut(range)).map_err(driver_err)?;
                // Pageable host memory: wait so that the copy has read `src`.
                stream.synchronize().map_err(driver_err)
            }
            #[cfg(feature = "emulator")]
            (Buf::Host(h), Exec::Emulator) => {
                h.copy_range_from(start, src);
                Ok(())
            }
            #[allow(unreachable_patterns)]
            _ => Err(FavorError::Backend { backend: "cuda", reason: "buffer of another backend kind".into() }),
        }
    }

    /// A zeroed device tensor.
    pub fn alloc(&self, dtype: DType, len: usize) -> Result<DeviceTensor> {
        let data = match dtype {
            DType::F32 => TensorData::F32(self.buf_zeros(len)?),
            DType::F16 => TensorData::F16(self.buf_zeros(len)?),
            DType::Bf16 => TensorData::Bf16(self.buf_zeros(len)?),
        };
        Ok(DeviceTensor::new(data, &self.counters))
    }

    /// Copies a host tensor to a new device tensor.
    pub fn upload(&self, t: HostRef<'_>) -> Result<DeviceTensor> {
        let data = match t {
            HostRef::F32(v) => TensorData::F32(self.buf_from(v)?),
            HostRef::F16(v) => TensorData::F16(self.buf_from(v)?),
            HostRef::Bf16(v) => TensorData::Bf16(self.buf_from(v)?),
        };
        Ok(DeviceTensor::new(data, &self.counters))
    }

    /// Copies a device tensor into host memory (waits for the stream).
    pub fn download(&self, t: &DeviceTensor, dst: HostMut<'_>) -> Result<()> {
        favor_core::backend::check_tensor("dst", &dst, t.len(), t.dtype(), "the device tensor's size")?;
        match (&t.data, dst) {
            (TensorData::F32(b), HostMut::F32(h)) => self.buf_to_host(b, h),
            (TensorData::F16(b), HostMut::F16(h)) => self.buf_to_host(b, h),
            (TensorData::Bf16(b), HostMut::Bf16(h)) => self.buf_to_host(b, h),
            _ => Err(FavorError::Backend { backend: "cuda", reason: "device tensor dtype mismatch".into() }),
        }
    }

    pub(crate) fn scratch(&self, len: usize) -> Result<Scratch<f32>> {
        Ok(Scratch::new(self.buf_zeros(len.max(1))?, &self.counters))
    }

    pub(crate) fn scratch_from(&self, host: &[f32]) -> Result<Scratch<f32>> {
        Ok(Scratch::new(self.buf_from(host)?, &self.counters))
    }

    /// Per-row stabilisers and log-scales (doubles: see cuda/features.cu).
    pub(crate) fn scratch_f64(&self, len: usize) -> Result<Scratch<f64>> {
        Ok(Scratch::new(self.buf_zeros(len.max(1))?, &self.counters))
    }

    pub(crate) fn scratch_f64_from(&self, host: &[f64]) -> Result<Scratch<f64>> {
        Ok(Scratch::new(self.buf_from(host)?, &self.counters))
    }

    /// 32-bit integers (per-head indices and flags).
    pub(crate) fn scratch_i32_from(&self, host: &[i32]) -> Result<Scratch<i32>> {
        Ok(Scratch::new(self.buf_from(host)?, &self.counters))
    }

    /// A copy of a scratch buffer on the host (waits for the stream).
    pub(crate) fn scratch_to_host<T: DeviceRepr + bytemuck::Pod>(&self, s: &Scratch<T>) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); s.buf.len()];
        self.buf_to_host(&s.buf, &mut host)?;
        Ok(host)
    }

    /// One byte per row (flags).
    pub(crate) fn scratch_bytes(&self, len: usize) -> Result<Scratch<u8>> {
        Ok(Scratch::new(self.buf_zeros(len.max(1))?, &self.counters))
    }

    pub(crate) fn scratch_mask(&self, mask: &[bool]) -> Result<Scratch<u8>> {
        let bytes: Vec<u8> = mask.iter().map(|&k| u8::from(k)).collect();
        Ok(Scratch::new(self.buf_from(&bytes)?, &self.counters))
    }
}

/// The stream ordering of one call (see [`CudaBackend::join`]): on [`StreamJoin::finish`], or
/// on drop when a call fails part way, every joined home stream waits for the backend's stream,
/// so freeing or reusing a buffer there is ordered after the kernels that used it.
pub(crate) struct StreamJoin<'a> {
    own: Option<&'a CudaStream>,
    homes: Vec<&'a CudaStream>,
}

impl StreamJoin<'_> {
    pub(crate) fn finish(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        let mut result = Ok(());
        if let Some(own) = self.own {
            for home in self.homes.drain(..) {
                if let Err(e) = home.join(own) {
                    // Nothing is known about the ordering any more: wait for the work instead.
                    let _ = own.synchronize();
                    result = Err(driver_err(e));
                }
            }
        }
        result
    }
}

impl Drop for StreamJoin<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// Recurrent decoding state on the device: S (M × (d_v + 1), the last column is z, fp32) and the
/// running key maximum c (f64), per (batch, head).
#[derive(Debug)]
pub struct CudaState {
    pub(crate) made_for: favor_core::StateSignature,
    pub(crate) s: Scratch<f32>,
    pub(crate) c: Scratch<f64>,
    /// Tokens each slot (batch element) has consumed.
    pub(crate) tokens: Vec<usize>,
}

/// The (S, c) rows of the (batch, head) problems a launch continues.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StateRows {
    pub(crate) s: DevPtr,
    pub(crate) c: DevPtr,
}

impl CudaState {
    /// What the state was made for (its batch is its number of slots).
    pub fn signature(&self) -> &favor_core::StateSignature {
        &self.made_for
    }

    /// Tokens each slot (batch element) has consumed so far.
    pub fn tokens(&self) -> &[usize] {
        &self.tokens
    }

    /// Every row of the state.
    pub(crate) fn rows(&self) -> StateRows {
        StateRows { s: self.s.ptr(), c: self.c.ptr() }
    }

    /// The rows of one slot (`slot` checked by the caller).
    pub(crate) fn slot_rows(&self, slot: usize) -> StateRows {
        let heads = self.made_for.shape().heads;
        let per = self.s.buf.len() / self.tokens.len();
        let all = self.rows();
        StateRows {
            s: all.s.slice(slot * per, per, size_of::<f32>()).expect("slot in range"),
            c: all.c.slice(slot * heads, heads, size_of::<f64>()).expect("slot in range"),
        }
    }

    /// Copies (S, c) to the host: S is `[B·H, M, d_v + 1]` (the last column is z), c is `[B·H]`.
    pub fn to_host(&self, backend: &CudaBackend) -> Result<(Vec<f32>, Vec<f64>)> {
        let mut s = vec![0.0; self.s.buf.len()];
        let mut c = vec![0.0; self.c.buf.len()];
        backend.buf_to_host(&self.s.buf, &mut s)?;
        backend.buf_to_host(&self.c.buf, &mut c)?;
        Ok((s, c))
    }
}

impl FavorBackend for CudaBackend {
    type Mem = CudaMem;
    type State = CudaState;

    fn name(&self) -> String {
        format!("cuda:{}", self.device_name)
    }

    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: DeviceRef<'_>,
        phi: DeviceMut<'_>,
    ) -> Result<()> {
        let join = self.join(&[x.home(), phi.home()])?;
        self.feature_map_device(map, role, shape, x, phi)?;
        join.finish()
    }

    fn feature_map_backward(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: DeviceRef<'_>,
        dphi: DeviceRef<'_>,
        dx: DeviceMut<'_>,
    ) -> Result<Option<ParamGrads>> {
        let join = self.join(&[x.home(), dphi.home(), dx.home()])?;
        let params = self.feature_map_backward_device(map, role, shape, x, dphi, dx)?;
        join.finish()?;
        Ok(params)
    }

    fn forward(&self, problem: &Problem<'_>, inputs: Inputs<'_, CudaMem>, out: DeviceMut<'_>) -> Result<()> {
        let join = self.join(&[inputs.q.home(), inputs.k.home(), inputs.v.home(), out.home()])?;
        self.forward_device(problem, inputs, out)?;
        join.finish()
    }

    fn backward(
        &self,
        problem: &Problem<'_>,
        inputs: Inputs<'_, CudaMem>,
        dout: DeviceRef<'_>,
        grads: Grads<'_, CudaMem>,
    ) -> Result<Option<ParamGrads>> {
        let homes = [inputs.q.home(), inputs.k.home(), inputs.v.home(), dout.home()];
        let join = self.join(&[&homes[..], &[grads.dq.home(), grads.dk.home(), grads.dv.home()]].concat())?;
        let params = self.backward_device(problem, inputs, dout, grads)?;
        join.finish()?;
        Ok(params)
    }

    fn new_state(&self, problem: &Problem<'_>) -> Result<CudaState> {
        self.new_state_device(problem)
    }

    fn decode(
        &self,
        problem: &Problem<'_>,
        state: &mut CudaState,
        inputs: Inputs<'_, CudaMem>,
        out: DeviceMut<'_>,
    ) -> Result<()> {
        let homes = [inputs.q.home(), inputs.k.home(), inputs.v.home(), out.home()];
        let (st_s, st_c) = (state.s.buf.home().cloned(), state.c.buf.home().cloned());
        let join = self.join(&[&homes[..], &[st_s.as_deref(), st_c.as_deref()]].concat())?;
        self.decode_device(problem, state, inputs, out)?;
        join.finish()
    }

    fn state_signature<'s>(&self, state: &'s CudaState) -> &'s favor_core::StateSignature {
        &state.made_for
    }

    fn decode_slots(
        &self,
        problem: &Problem<'_>,
        state: &mut CudaState,
        chunks: SlotChunks<'_>,
        inputs: Inputs<'_, CudaMem>,
        out: DeviceMut<'_>,
    ) -> Result<()> {
        let homes = [inputs.q.home(), inputs.k.home(), inputs.v.home(), out.home()];
        let (st_s, st_c) = (state.s.buf.home().cloned(), state.c.buf.home().cloned());
        let join = self.join(&[&homes[..], &[st_s.as_deref(), st_c.as_deref()]].concat())?;
        self.decode_slots_device(problem, state, chunks, inputs, out)?;
        join.finish()
    }

    fn read_slot(&self, state: &CudaState, slot: usize) -> Result<SlotState> {
        self.read_slot_device(state, slot)
    }

    fn write_slot(&self, state: &mut CudaState, slot: usize, value: &SlotState) -> Result<()> {
        self.write_slot_device(state, slot, value)
    }

    fn synchronize(&self) -> Result<()> {
        match &self.exec {
            Exec::Cuda { stream, .. } => stream.synchronize().map_err(driver_err),
            #[cfg(feature = "emulator")]
            Exec::Emulator => Ok(()),
        }
    }
}

/// Checks a device tensor's length and dtype (favor-core's rule, on device handles).
pub(crate) fn check(arg: &'static str, t: &impl TensorHandle, len: usize, dtype: DType, dims: &str) -> Result<()> {
    favor_core::backend::check_tensor(arg, t, len, dtype, dims)
}
