//! [`CudaHost`]: the CUDA backend on host tensors. Each call uploads its inputs, runs the device
//! path, waits, and downloads the results; the copy time is accumulated separately from the
//! whole call so benchmarks can report both.

use crate::backend::{CudaBackend, CudaState};
use crate::memory::DeviceTensor;
use favor_core::backend::{check_backward, check_finite, check_finite_args, check_output, validate_host_inputs};
use favor_core::layout::{gather, scatter};
use favor_core::{
    AttentionShape, DType, FavorBackend, FeatureMap, FeatureRole, Grads, Host, HostMut, HostRef, HostTensor, Inputs,
    Layout, ParamGrads, Problem, Result, SlotChunks, SlotState, TensorArg, TensorHandle,
};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Time spent in host↔device copies (including the waits they imply) since the last reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyTimes {
    /// Uploads.
    pub host_to_device: Duration,
    /// Downloads (wait for the kernels first, which is counted here too).
    pub device_to_host: Duration,
}

/// The CUDA backend on host memory (copies in and out around every call).
#[derive(Debug)]
pub struct CudaHost {
    device: CudaBackend,
    copies: Mutex<CopyTimes>,
}

impl CudaHost {
    /// Wraps a device backend.
    pub fn new(device: CudaBackend) -> Self {
        Self { device, copies: Mutex::new(CopyTimes::default()) }
    }

    /// The device backend.
    pub fn device(&self) -> &CudaBackend {
        &self.device
    }

    /// Copy times accumulated so far.
    pub fn copy_times(&self) -> CopyTimes {
        *self.copies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Zero the copy times.
    pub fn reset_copy_times(&self) {
        *self.copies.lock().unwrap_or_else(|e| e.into_inner()) = CopyTimes::default();
    }

    fn up(&self, t: HostRef<'_>) -> Result<DeviceTensor> {
        let start = Instant::now();
        let r = self.device.upload(t);
        self.copies.lock().unwrap_or_else(|e| e.into_inner()).host_to_device += start.elapsed();
        r
    }

    fn zeros_like(&self, t: &impl TensorHandle) -> Result<DeviceTensor> {
        self.device.alloc(t.dtype(), t.len())
    }

    fn down(&self, t: &DeviceTensor, dst: HostMut<'_>) -> Result<()> {
        let start = Instant::now();
        let r = self.device.download(t, dst);
        self.copies.lock().unwrap_or_else(|e| e.into_inner()).device_to_host += start.elapsed();
        r
    }

    /// Uploads tensor `arg` of a call contiguously: strided host tensors are gathered first (the
    /// device kernels read `[B, H, L, ·]`; the host path copies anyway).
    fn up_arg(&self, p: &Problem<'_>, arg: TensorArg, t: HostRef<'_>) -> Result<DeviceTensor> {
        match p.layout.given(arg) {
            None => self.up(t),
            Some(strides) => self.up(gather(t, p.dims(arg), strides)?.view()),
        }
    }

    /// Q, K and V uploaded contiguously.
    fn up_inputs(
        &self,
        p: &Problem<'_>,
        inputs: &Inputs<'_, Host>,
    ) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
        Ok((
            self.up_arg(p, TensorArg::Q, inputs.q)?,
            self.up_arg(p, TensorArg::K, inputs.k)?,
            self.up_arg(p, TensorArg::V, inputs.v)?,
        ))
    }

    /// A contiguous device buffer for output `arg` of a call.
    fn out_arg(&self, p: &Problem<'_>, arg: TensorArg, dtype: DType) -> Result<DeviceTensor> {
        let dims = p.dims(arg);
        self.device.alloc(dtype, dims.total_rows() * dims.width)
    }

    /// Downloads output `arg` of a call into the caller's tensor, in its layout.
    fn down_arg(&self, p: &Problem<'_>, arg: TensorArg, t: &DeviceTensor, dst: HostMut<'_>) -> Result<()> {
        match p.layout.given(arg) {
            None => self.down(t, dst),
            Some(strides) => {
                let mut staged = HostTensor::try_zeros(t.dtype(), t.len())?;
                self.down(t, staged.view_mut())?;
                scatter(staged.view(), dst, p.dims(arg), strides)
            }
        }
    }
}

/// The problem the device runs for a host call: every tensor contiguous.
fn contiguous<'a>(p: &Problem<'a>) -> Problem<'a> {
    Problem { layout: Layout::default(), ..*p }
}

impl FavorBackend for CudaHost {
    type Mem = Host;
    type State = CudaState;

    fn name(&self) -> String {
        format!("{} (host copies)", self.device.name())
    }

    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        phi: HostMut<'_>,
    ) -> Result<()> {
        check_finite(&[("x", x)])?;
        let xd = self.up(x)?;
        let mut pd = self.zeros_like(&phi)?;
        self.device.feature_map(map, role, shape, xd.as_ref(), pd.as_mut())?;
        self.down(&pd, phi)
    }

    fn feature_map_backward(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        dphi: HostRef<'_>,
        dx: HostMut<'_>,
    ) -> Result<Option<ParamGrads>> {
        check_finite(&[("x", x), ("dphi", dphi)])?;
        let xd = self.up(x)?;
        let gd = self.up(dphi)?;
        let mut dxd = self.zeros_like(&dx)?;
        let params = self.device.feature_map_backward(map, role, shape, xd.as_ref(), gd.as_ref(), dxd.as_mut())?;
        self.down(&dxd, dx)?;
        Ok(params)
    }

    fn forward(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        let dtype = validate_host_inputs(p, &inputs)?;
        check_output(p, &out, dtype)?;
        let (q, k, v) = self.up_inputs(p, &inputs)?;
        let mut o = self.out_arg(p, TensorArg::Out, dtype)?;
        let dev = Inputs { q: q.as_ref(), k: k.as_ref(), v: v.as_ref(), key_mask: inputs.key_mask };
        self.device.forward(&contiguous(p), dev, o.as_mut())?;
        self.down_arg(p, TensorArg::Out, &o, out)
    }

    fn backward(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> Result<Option<ParamGrads>> {
        let dtype = validate_host_inputs(p, &inputs)?;
        check_backward(p, &dout, &grads, dtype)?;
        check_finite_args(p, &[(TensorArg::Dout, dout)])?;
        let (q, k, v) = self.up_inputs(p, &inputs)?;
        let g = self.up_arg(p, TensorArg::Dout, dout)?;
        let Grads { dq, dk, dv } = grads;
        let mut dqd = self.out_arg(p, TensorArg::Dq, dtype)?;
        let mut dkd = self.out_arg(p, TensorArg::Dk, dtype)?;
        let mut dvd = self.out_arg(p, TensorArg::Dv, dtype)?;
        let dev = Inputs { q: q.as_ref(), k: k.as_ref(), v: v.as_ref(), key_mask: inputs.key_mask };
        let dev_grads = Grads { dq: dqd.as_mut(), dk: dkd.as_mut(), dv: dvd.as_mut() };
        let params = self.device.backward(&contiguous(p), dev, g.as_ref(), dev_grads)?;
        self.down_arg(p, TensorArg::Dq, &dqd, dq)?;
        self.down_arg(p, TensorArg::Dk, &dkd, dk)?;
        self.down_arg(p, TensorArg::Dv, &dvd, dv)?;
        Ok(params)
    }

    fn new_state(&self, p: &Problem<'_>) -> Result<CudaState> {
        self.device.new_state(p)
    }

    fn decode(&self, p: &Problem<'_>, state: &mut CudaState, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> Result<()> {
        let dtype = validate_host_inputs(p, &inputs)?;
        check_output(p, &out, dtype)?;
        let (q, k, v) = self.up_inputs(p, &inputs)?;
        let mut o = self.out_arg(p, TensorArg::Out, dtype)?;
        let dev = Inputs { q: q.as_ref(), k: k.as_ref(), v: v.as_ref(), key_mask: inputs.key_mask };
        self.device.decode(&contiguous(p), state, dev, o.as_mut())?;
        self.down_arg(p, TensorArg::Out, &o, out)
    }

    fn state_signature<'s>(&self, state: &'s CudaState) -> &'s favor_core::StateSignature {
        self.device.state_signature(state)
    }

    fn decode_slots(
        &self,
        p: &Problem<'_>,
        state: &mut CudaState,
        chunks: SlotChunks<'_>,
        inputs: Inputs<'_, Host>,
        out: HostMut<'_>,
    ) -> Result<()> {
        let dtype = validate_host_inputs(p, &inputs)?;
        check_output(p, &out, dtype)?;
        let (q, k, v) = self.up_inputs(p, &inputs)?;
        let mut o = self.out_arg(p, TensorArg::Out, dtype)?;
        let dev = Inputs { q: q.as_ref(), k: k.as_ref(), v: v.as_ref(), key_mask: inputs.key_mask };
        self.device.decode_slots(&contiguous(p), state, chunks, dev, o.as_mut())?;
        self.down_arg(p, TensorArg::Out, &o, out)
    }

    fn read_slot(&self, state: &CudaState, slot: usize) -> Result<SlotState> {
        self.device.read_slot(state, slot)
    }

    fn write_slot(&self, state: &mut CudaState, slot: usize, value: &SlotState) -> Result<()> {
        self.device.write_slot(state, slot, value)
    }

    fn synchronize(&self) -> Result<()> {
        self.device.synchronize()
    }
}
