//! Element types and host tensor views.
//!
//! Tensors are row-major and contiguous. Storage may be f32, f16 or bf16; every backend
//! computes and accumulates in f32 (the reference in f64) and rounds once on the way out.

use crate::validate::try_zeroed;
use crate::{FavorError, Result};
use half::{bf16, f16};
use std::fmt;

/// Storage element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// The largest finite value the storage type holds (f16: 65504, bf16: ≈ 3.3895e38): where
    /// values beyond it saturate (see [`saturate_f32`] and the storage policy).
    pub fn largest_finite(self) -> f64 {
        match self {
            DType::F32 => f32::MAX as f64,
            DType::F16 => F16_MAX as f64,
            DType::Bf16 => BF16_MAX as f64,
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    /// Unit roundoff of the storage type (half an ulp at 1.0), used to scale test tolerances.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64 / 2.0,
            DType::F16 => 2f64.powi(-11),
            DType::Bf16 => 2f64.powi(-8),
        }
    }

    /// All dtypes, for sweeps.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::Bf16];
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        })
    }
}

/// A storage element. Conversions go through f32, which represents f16 and bf16 exactly.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + Default + 'static {
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Widen to f32 (exact).
    fn to_f32(self) -> f32;
    /// Round from f32 (round-to-nearest-even).
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Read-only host tensor of any supported dtype.
#[derive(Debug, Clone, Copy)]
pub enum HostRef<'a> {
    /// f32 storage.
    F32(&'a [f32]),
    /// f16 storage.
    F16(&'a [f16]),
    /// bf16 storage.
    Bf16(&'a [bf16]),
}

/// Writable host tensor of any supported dtype.
#[derive(Debug)]
pub enum HostMut<'a> {
    /// f32 storage.
    F32(&'a mut [f32]),
    /// f16 storage.
    F16(&'a mut [f16]),
    /// bf16 storage.
    Bf16(&'a mut [bf16]),
}

/// Shared queries over tensor handles, implemented by host views and by device buffers.
pub trait TensorHandle {
    /// Element type.
    fn dtype(&self) -> DType;
    /// Number of elements.
    fn len(&self) -> usize;
    /// True when the tensor holds no element.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TensorHandle for HostRef<'_> {
    fn dtype(&self) -> DType {
        match self {
            HostRef::F32(_) => DType::F32,
            HostRef::F16(_) => DType::F16,
            HostRef::Bf16(_) => DType::Bf16,
        }
    }
    fn len(&self) -> usize {
        match self {
            HostRef::F32(s) => s.len(),
            HostRef::F16(s) => s.len(),
            HostRef::Bf16(s) => s.len(),
        }
    }
}

impl TensorHandle for HostMut<'_> {
    fn dtype(&self) -> DType {
        match self {
            HostMut::F32(_) => DType::F32,
            HostMut::F16(_) => DType::F16,
            HostMut::Bf16(_) => DType::Bf16,
        }
    }
    fn len(&self) -> usize {
        match self {
            HostMut::F32(s) => s.len(),
            HostMut::F16(s) => s.len(),
            HostMut::Bf16(s) => s.len(),
        }
    }
}

impl<'a, T: Element> From<&'a [T]> for HostRef<'a> {
    fn from(s: &'a [T]) -> Self {
        // The match on the runtime tag picks the variant whose slice type equals T, so the
        // casts below are identity casts between equal types.
        match T::DTYPE {
            DType::F32 => HostRef::F32(bytemuck::cast_slice(s)),
            DType::F16 => HostRef::F16(bytemuck::cast_slice(s)),
            DType::Bf16 => HostRef::Bf16(bytemuck::cast_slice(s)),
        }
    }
}

impl<'a, T: Element> From<&'a mut [T]> for HostMut<'a> {
    fn from(s: &'a mut [T]) -> Self {
        match T::DTYPE {
            DType::F32 => HostMut::F32(bytemuck::cast_slice_mut(s)),
            DType::F16 => HostMut::F16(bytemuck::cast_slice_mut(s)),
            DType::Bf16 => HostMut::Bf16(bytemuck::cast_slice_mut(s)),
        }
    }
}

impl<'a, T: Element> From<&'a Vec<T>> for HostRef<'a> {
    fn from(s: &'a Vec<T>) -> Self {
        HostRef::from(s.as_slice())
    }
}

impl<'a, T: Element> From<&'a mut Vec<T>> for HostMut<'a> {
    fn from(s: &'a mut Vec<T>) -> Self {
        HostMut::from(s.as_mut_slice())
    }
}

/// `start..start + count` when it lies within a tensor of `len` elements.
fn range_in(start: usize, count: usize, len: usize) -> Result<std::ops::Range<usize>> {
    match start.checked_add(count) {
        Some(end) if end <= len => Ok(start..end),
        _ => Err(FavorError::OutOfRange { start, count, len }),
    }
}

impl<'a> HostRef<'a> {
    /// Element `i` widened to f32, `None` past the end.
    #[inline]
    pub fn get(&self, i: usize) -> Option<f32> {
        match self {
            HostRef::F32(s) => s.get(i).copied(),
            HostRef::F16(s) => s.get(i).map(|x| x.to_f32()),
            HostRef::Bf16(s) => s.get(i).map(|x| x.to_f32()),
        }
    }

    /// Copy elements `start..start + dst.len()` widened to f32 into `dst`;
    /// [`FavorError::OutOfRange`] (and `dst` untouched) when they are not all in the tensor.
    pub fn read_f32(&self, start: usize, dst: &mut [f32]) -> Result<()> {
        let r = range_in(start, dst.len(), self.len())?;
        match self {
            HostRef::F32(s) => dst.copy_from_slice(&s[r]),
            HostRef::F16(s) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&s[r], dst),
            HostRef::Bf16(s) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&s[r], dst),
        }
        Ok(())
    }

    /// The whole tensor widened to f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self {
            HostRef::F32(s) => s.iter().map(|&x| x as f64).collect(),
            HostRef::F16(s) => s.iter().map(|x| x.to_f64()).collect(),
            HostRef::Bf16(s) => s.iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// The whole tensor widened to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            HostRef::F32(s) => s.to_vec(),
            HostRef::F16(s) => half::slice::HalfFloatSliceExt::to_f32_vec(*s),
            HostRef::Bf16(s) => half::slice::HalfFloatSliceExt::to_f32_vec(*s),
        }
    }

    /// The first non-finite element of `start..start + count` (which must lie in the tensor), if
    /// any: `(index from start, value)`.
    pub fn first_non_finite_in(&self, start: usize, count: usize) -> Option<(usize, f32)> {
        let r = start..start + count;
        match self {
            HostRef::F32(s) => HostRef::F32(&s[r]).first_non_finite(),
            HostRef::F16(s) => HostRef::F16(&s[r]).first_non_finite(),
            HostRef::Bf16(s) => HostRef::Bf16(&s[r]).first_non_finite(),
        }
    }

    /// The first non-finite element, if any: `(flat index, value)`.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        match self {
            HostRef::F32(s) => s.iter().position(|x| !x.is_finite()).map(|i| (i, s[i])),
            HostRef::F16(s) => s.iter().position(|x| !x.is_finite()).map(|i| (i, s[i].to_f32())),
            HostRef::Bf16(s) => s.iter().position(|x| !x.is_finite()).map(|i| (i, s[i].to_f32())),
        }
    }
}

// Storage policy: a finite value beyond the storage type's range is stored as the largest finite
// value of its sign (saturation), never as ±∞; outputs and gradients stay finite for every
// finite input. NaN (which validated inputs never produce) stays NaN.
const F16_MAX: f32 = 65504.0;
const BF16_MAX: f32 = 3.389_531_4e38;

/// f64 → f32, saturating at ±f32::MAX (the storage policy above; backends use it for their own
/// f64 → f32 narrowing too).
#[inline]
pub fn saturate_f32(x: f64) -> f32 {
    x.clamp(-(f32::MAX as f64), f32::MAX as f64) as f32
}

/// Rounds `src` into 16-bit `dst`, saturating at ±`max` (in chunks, to keep the vectorised
/// conversion of `half`).
fn convert_saturating<T>(dst: &mut [T], src: &[f32], max: f32)
where
    [T]: half::slice::HalfFloatSliceExt,
{
    let mut buf = [0.0f32; 256];
    for (d, s) in dst.chunks_mut(buf.len()).zip(src.chunks(buf.len())) {
        let b = &mut buf[..s.len()];
        for (o, &x) in b.iter_mut().zip(s) {
            *o = x.clamp(-max, max);
        }
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(d, b);
    }
}

impl<'a> HostMut<'a> {
    /// Round `src` into elements `start..start + src.len()` (beyond a 16-bit type's range: its
    /// largest finite value of that sign); [`FavorError::OutOfRange`] (and
    /// nothing written) when they are not all in the tensor.
    pub fn write_f32(&mut self, start: usize, src: &[f32]) -> Result<()> {
        let r = range_in(start, src.len(), self.len())?;
        match self {
            HostMut::F32(s) => s[r].copy_from_slice(src),
            HostMut::F16(s) => convert_saturating(&mut s[r], src, f16::MAX.to_f32()),
            HostMut::Bf16(s) => convert_saturating(&mut s[r], src, bf16::MAX.to_f32()),
        }
        Ok(())
    }

    /// Round f64 values into elements `start..start + src.len()` (through f32); fails like
    /// [`HostMut::write_f32`].
    pub fn write_f64(&mut self, start: usize, src: &[f64]) -> Result<()> {
        let r = range_in(start, src.len(), self.len())?;
        match self {
            HostMut::F32(s) => s[r].iter_mut().zip(src).for_each(|(d, &x)| *d = saturate_f32(x)),
            HostMut::F16(s) => s[r]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &x)| *d = f16::from_f32(saturate_f32(x).clamp(-F16_MAX, F16_MAX))),
            HostMut::Bf16(s) => s[r]
                .iter_mut()
                .zip(src)
                .for_each(|(d, &x)| *d = bf16::from_f32(saturate_f32(x).clamp(-BF16_MAX, BF16_MAX))),
        }
        Ok(())
    }

    /// Reborrow as a read-only view.
    pub fn as_ref(&self) -> HostRef<'_> {
        match self {
            HostMut::F32(s) => HostRef::F32(s),
            HostMut::F16(s) => HostRef::F16(s),
            HostMut::Bf16(s) => HostRef::Bf16(s),
        }
    }

    /// Reborrow mutably for a shorter lifetime.
    pub fn reborrow(&mut self) -> HostMut<'_> {
        match self {
            HostMut::F32(s) => HostMut::F32(s),
            HostMut::F16(s) => HostMut::F16(s),
            HostMut::Bf16(s) => HostMut::Bf16(s),
        }
    }
}

/// A dtype-tagged owned host buffer: handy for tests, benches and the npy front end.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    /// f32 storage.
    F32(Vec<f32>),
    /// f16 storage.
    F16(Vec<f16>),
    /// bf16 storage.
    Bf16(Vec<bf16>),
}

impl HostTensor {
    /// Round f32 values into storage of `dtype`.
    pub fn from_f32(dtype: DType, v: &[f32]) -> Self {
        match dtype {
            DType::F32 => HostTensor::F32(v.to_vec()),
            DType::F16 => HostTensor::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => HostTensor::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    /// `n` zeros of `dtype`, or [`FavorError::OutOfMemory`] when they cannot be allocated
    /// (never an abort).
    pub fn try_zeros(dtype: DType, n: usize) -> Result<Self> {
        const ARG: &str = "tensor";
        Ok(match dtype {
            DType::F32 => HostTensor::F32(try_zeroed(ARG, n)?),
            DType::F16 => HostTensor::F16(try_zeroed(ARG, n)?),
            DType::Bf16 => HostTensor::Bf16(try_zeroed(ARG, n)?),
        })
    }

    /// `n` zeros of `dtype`: a shorthand for tests and tools whose sizes are known to fit.
    ///
    /// # Panics
    ///
    /// When the buffer cannot be allocated; [`HostTensor::try_zeros`] returns that as an error.
    pub fn zeros(dtype: DType, n: usize) -> Self {
        Self::try_zeros(dtype, n).unwrap_or_else(|e| panic!("HostTensor::zeros: {e}"))
    }

    /// Read-only view.
    pub fn view(&self) -> HostRef<'_> {
        match self {
            HostTensor::F32(v) => HostRef::F32(v),
            HostTensor::F16(v) => HostRef::F16(v),
            HostTensor::Bf16(v) => HostRef::Bf16(v),
        }
    }

    /// Writable view.
    pub fn view_mut(&mut self) -> HostMut<'_> {
        match self {
            HostTensor::F32(v) => HostMut::F32(v),
            HostTensor::F16(v) => HostMut::F16(v),
            HostTensor::Bf16(v) => HostMut::Bf16(v),
        }
    }

    /// Widened copy.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.view().to_f64_vec()
    }

    /// Widened copy.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.view().dtype()
    }
}

#[cfg(test)]
mod saturation_tests {
    use super::*;

    #[test]
    fn values_beyond_the_storage_range_saturate() {
        let src = [1e5f32, -1e5, 65504.0, 3.4e38, -3.4e38, 1.5];
        let mut h = vec![f16::ZERO; src.len()];
        HostMut::F16(&mut h).write_f32(0, &src).unwrap();
        let want = [65504.0, -65504.0, 65504.0, 65504.0, -65504.0, 1.5];
        assert_eq!(h.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), want);
        let mut b = vec![bf16::ZERO; src.len()];
        HostMut::Bf16(&mut b).write_f32(0, &src).unwrap();
        assert!(b.iter().all(|x| x.is_finite()));
        assert_eq!(b[3], bf16::MAX);
        assert_eq!(b[4], -bf16::MAX);
        let wide = [1e300f64, -1e300, 1e5, 2.0];
        let mut f = vec![0.0f32; 4];
        HostMut::F32(&mut f).write_f64(0, &wide).unwrap();
        assert_eq!(f, [f32::MAX, -f32::MAX, 1e5, 2.0]);
        HostMut::F16(&mut h[..4]).write_f64(0, &wide).unwrap();
        assert_eq!(h[..4].iter().map(|x| x.to_f32()).collect::<Vec<_>>(), [65504.0, -65504.0, 65504.0, 2.0]);
        HostMut::Bf16(&mut b[..4]).write_f64(0, &wide).unwrap();
        assert_eq!((b[0], b[1]), (bf16::MAX, -bf16::MAX));
    }
}
