//! The CUDA backend (favor-cuda) in the tool: host calls go through its host adapter (copies
//! included, for `run` and `accuracy`); the timing subcommands use the device-resident path.

use std::sync::Arc;
use std::time::Instant;

use favor_core::{
    AttentionShape, FavorBackend, FeatureMap, FeatureRole, Grads, Host, HostMut, HostRef, Inputs, ParamGrads, Problem,
    TensorHandle,
};
use favor_cuda::{CudaBackend, CudaHost, DeviceTensor};

use super::{DeviceInfo, HostAttention, PointInputs, PointTensor, ResidentAttention, ResidentPoint};

/// The CUDA backend with both interfaces.
#[derive(Debug)]
pub struct CudaBench {
    host: Arc<CudaHost>,
}

impl CudaBench {
    /// The CUDA backend the entry point opened (a GPU or, in tests, the emulator).
    pub fn new(host: Arc<CudaHost>) -> Self {
        Self { host }
    }

    fn dev(&self) -> &CudaBackend {
        self.host.device()
    }
}

impl HostAttention for CudaBench {
    fn name(&self) -> String {
        FavorBackend::name(self.dev())
    }
    fn forward(&self, p: &Problem<'_>, inputs: Inputs<'_, Host>, out: HostMut<'_>) -> favor_core::Result<()> {
        // The host adapter downloads the results, which waits for the device.
        FavorBackend::forward(&*self.host, p, inputs, out)
    }
    fn backward(
        &self,
        p: &Problem<'_>,
        inputs: Inputs<'_, Host>,
        dout: HostRef<'_>,
        grads: Grads<'_, Host>,
    ) -> favor_core::Result<Option<ParamGrads>> {
        FavorBackend::backward(&*self.host, p, inputs, dout, grads)
    }
    fn feature_map(
        &self,
        map: &FeatureMap,
        role: FeatureRole,
        shape: AttentionShape,
        x: HostRef<'_>,
        phi: HostMut<'_>,
    ) -> favor_core::Result<()> {
        FavorBackend::feature_map(&*self.host, map, role, shape, x, phi)
    }
    fn resident(&self) -> Option<&dyn ResidentAttention> {
        Some(self)
    }
}

/// The kernel module's release from `/proc/driver/nvidia/version` (Linux), e.g. "580.65.06".
fn driver_release() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..."
    let line = text.lines().next()?;
    line.split_whitespace()
        .find(|w| {
            w.split('.').count() >= 2 && w.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

impl ResidentAttention for CudaBench {
    fn device(&self) -> DeviceInfo {
        let d = self.dev();
        let v = d.driver_version();
        let driver = if d.stream().is_none() {
            "none (CPU emulator of the kernels)".to_string()
        } else {
            let cuda = format!("CUDA {}.{}", v / 1000, (v % 1000) / 10);
            match driver_release() {
                Some(r) => format!("{r} ({cuda})"),
                None => cuda,
            }
        };
        DeviceInfo { name: d.device_name().to_string(), driver }
    }

    fn upload<'a>(&'a self, inputs: PointInputs<'_>) -> favor_core::Result<Box<dyn ResidentPoint + 'a>> {
        let dev = self.dev();
        let (q, k, v) = (dev.upload(inputs.q)?, dev.upload(inputs.k)?, dev.upload(inputs.v)?);
        let out = dev.alloc(inputs.v.dtype(), inputs.v.len())?;
        let grads = match inputs.dout {
            None => None,
            Some(g) => Some(DeviceGrads {
                dout: dev.upload(g)?,
                dq: dev.alloc(inputs.q.dtype(), inputs.q.len())?,
                dk: dev.alloc(inputs.k.dtype(), inputs.k.len())?,
                dv: dev.alloc(inputs.v.dtype(), inputs.v.len())?,
            }),
        };
        dev.synchronize()?;
        Ok(Box::new(DevicePoint { dev, q, k, v, out, grads, phi: None }))
    }

    fn memory_in_use(&self) -> usize {
        self.dev().memory_usage().current_bytes
    }

    fn peak_memory(&self) -> usize {
        self.dev().memory_usage().peak_bytes
    }

    fn reset_peak_memory(&self) {
        self.dev().reset_peak_memory();
    }

    fn copy_gbs(&self, bytes: usize) -> Result<f64, String> {
        let Some(stream) = self.dev().stream() else {
            return Err("the CPU emulator has no device memory".into());
        };
        let err = |e: cudarc::driver::DriverError| format!("device copy failed: {e}");
        let n = bytes.max(1 << 20);
        let src = stream.alloc_zeros::<u8>(n).map_err(err)?;
        let mut dst = stream.alloc_zeros::<u8>(n).map_err(err)?;
        stream.memcpy_dtod(&src, &mut dst).map_err(err)?;
        stream.synchronize().map_err(err)?;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..4 {
                stream.memcpy_dtod(&src, &mut dst).map_err(err)?;
            }
            stream.synchronize().map_err(err)?;
            best = best.min(t.elapsed().as_secs_f64() / 4.0);
        }
        Ok(2.0 * n as f64 / best / 1e9)
    }

    fn matrix_gflops(&self, n: usize) -> Result<f64, String> {
        let Some(stream) = self.dev().stream() else {
            return Err("the CPU emulator has no tensor cores".into());
        };
        bf16_gemm_gflops(stream, n)
    }
}

/// cuBLAS bf16 GEMM (fp32 accumulation) GFLOP/s, best of a few runs; an error when libcublas is
/// not installed (it comes with the CUDA toolkit or the `nvidia-cublas` wheel, not the driver).
fn bf16_gemm_gflops(stream: &std::sync::Arc<cudarc::driver::CudaStream>, n: usize) -> Result<f64, String> {
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
    use half::bf16;
    // SAFETY: only dlopen()s the candidate library names; without this check cudarc panics on
    // first use of a missing library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(
            "libcublas was not found (install the CUDA toolkit or the nvidia-cublas wheel to measure it)".into()
        );
    }
    let err = |e: cudarc::driver::DriverError| format!("device allocation failed: {e}");
    let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e:?}"))?;
    let a = stream.clone_htod(&vec![bf16::from_f32(0.5); n * n]).map_err(err)?;
    let b = stream.clone_htod(&vec![bf16::from_f32(0.25); n * n]).map_err(err)?;
    let mut c = stream.alloc_zeros::<bf16>(n * n).map_err(err)?;
    let dim = i32::try_from(n).map_err(|_| format!("GEMM size {n} exceeds i32"))?;
    let cfg = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: dim,
        n: dim,
        k: dim,
        alpha: bf16::ONE,
        lda: dim,
        ldb: dim,
        beta: bf16::ZERO,
        ldc: dim,
    };
    let mut best = f64::INFINITY;
    for run in 0..6 {
        let t = Instant::now();
        // SAFETY: a, b and c each hold n·n elements, which an n×n×n product with leading
        // dimensions n reads and writes; all three live on `stream`, cuBLAS's stream.
        unsafe { blas.gemm(cfg, &a, &b, &mut c) }.map_err(|e| format!("cuBLAS GEMM: {e:?}"))?;
        stream.synchronize().map_err(err)?;
        // The first run loads the kernel: not a sample.
        if run > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

struct DeviceGrads {
    dout: DeviceTensor,
    dq: DeviceTensor,
    dk: DeviceTensor,
    dv: DeviceTensor,
}

/// One point's device tensors.
struct DevicePoint<'a> {
    dev: &'a CudaBackend,
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    out: DeviceTensor,
    grads: Option<DeviceGrads>,
    /// Feature-map scratch, allocated by the first `feature_maps` call.
    phi: Option<DeviceTensor>,
}

fn no_grads() -> favor_core::FavorError {
    favor_core::FavorError::Unsupported("backward on a resident point uploaded without an output gradient".into())
}

impl ResidentPoint for DevicePoint<'_> {
    fn forward(&mut self, p: &Problem<'_>) -> favor_core::Result<()> {
        let inputs = Inputs { q: self.q.as_ref(), k: self.k.as_ref(), v: self.v.as_ref(), key_mask: None };
        self.dev.forward(p, inputs, self.out.as_mut())?;
        self.dev.synchronize()
    }

    fn backward(&mut self, p: &Problem<'_>) -> favor_core::Result<Option<ParamGrads>> {
        let g = self.grads.as_mut().ok_or_else(no_grads)?;
        let inputs = Inputs { q: self.q.as_ref(), k: self.k.as_ref(), v: self.v.as_ref(), key_mask: None };
        let grads = Grads { dq: g.dq.as_mut(), dk: g.dk.as_mut(), dv: g.dv.as_mut() };
        let params = self.dev.backward(p, inputs, g.dout.as_ref(), grads)?;
        self.dev.synchronize()?;
        Ok(params)
    }

    fn feature_maps(
        &mut self,
        map: &FeatureMap,
        key_role: FeatureRole,
        shape: AttentionShape,
    ) -> favor_core::Result<()> {
        let len = shape.problems() * shape.len * map.feature_dim(shape.d);
        let phi = match &mut self.phi {
            Some(t) if t.len() == len => t,
            slot => {
                *slot = None;
                slot.insert(self.dev.alloc(self.q.dtype(), len)?)
            }
        };
        self.dev.feature_map(map, FeatureRole::Query, shape, self.q.as_ref(), phi.as_mut())?;
        self.dev.feature_map(map, key_role, shape, self.k.as_ref(), phi.as_mut())?;
        self.dev.synchronize()
    }

    fn download(&self, which: PointTensor, dst: HostMut<'_>) -> favor_core::Result<()> {
        let t = match which {
            PointTensor::Out => &self.out,
            PointTensor::Dq => &self.grads.as_ref().ok_or_else(no_grads)?.dq,
            PointTensor::Dk => &self.grads.as_ref().ok_or_else(no_grads)?.dk,
            PointTensor::Dv => &self.grads.as_ref().ok_or_else(no_grads)?.dv,
        };
        self.dev.download(t, dst)
    }
}
