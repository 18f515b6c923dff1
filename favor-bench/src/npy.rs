//! .npy reading and writing (npyz) with errors that name the file: not an npy file, truncated,
//! unsupported dtype, Fortran order, wrong shape.

use std::io::Cursor;
use std::path::Path;

use favor_core::{DType, HostTensor, TensorHandle};
use half::f16;
use npyz::WriterBuilder;

use crate::error::{BenchError, Result};

/// The element data of an array.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// float32.
    F32(Vec<f32>),
    /// float16.
    F16(Vec<f16>),
    /// float64 (read so that the error can say what to do with it).
    F64(Vec<f64>),
    /// bool or uint8 (masks).
    Bool(Vec<bool>),
}

/// An array read from a .npy file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Shape, C order.
    pub shape: Vec<usize>,
    /// Elements.
    pub data: NpyData,
    /// The numpy type string, e.g. "<f4".
    pub descr: String,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> BenchError {
    BenchError(format!("{}: {msg}", path.display()))
}

/// Reads a whole .npy file (C order; float32, float16, float64, bool or uint8).
pub fn read(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    parse(path, &bytes)
}

/// Parses .npy bytes; `path` only names the file in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(err(path, "not a .npy file (it does not start with the \\x93NUMPY magic string)"));
    }
    if let Some(shape) = overflowing_shape(bytes) {
        return Err(err(path, format!("corrupt header: shape {shape:?} has more elements than a usize can count")));
    }
    let mut cursor = Cursor::new(bytes);
    let header = npyz::NpyHeader::from_reader(&mut cursor).map_err(|e| err(path, format!("bad .npy header: {e}")))?;
    let data_start = cursor.position() as usize;
    if header.order() == npyz::Order::Fortran {
        return Err(err(
            path,
            "Fortran-ordered arrays are not supported; save a C-contiguous array (np.ascontiguousarray)",
        ));
    }
    let descr = match header.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => {
            return Err(err(
                path,
                format!("unsupported dtype {} (structured arrays are not supported)", other.descr()),
            ));
        }
    };
    let shape: Vec<usize> = header.shape().iter().map(|&s| s as usize).collect();
    let item = match &descr[1..] {
        "f4" => 4,
        "f2" => 2,
        "f8" => 8,
        "b1" | "u1" => 1,
        _ => {
            return Err(err(
                path,
                format!("unsupported dtype '{descr}': expected float32 ('<f4') or float16 ('<f2'), or bool for a mask"),
            ));
        }
    };
    // Checked: a header may claim any shape, and a wrapped product could pass the length check.
    let need = match crate::limits::bytes_of(&shape, item).and_then(|b| usize::try_from(b).ok()) {
        Some(n) => n,
        None => {
            return Err(err(
                path,
                format!("corrupt header: shape {shape:?} of '{descr}' has more data bytes than a usize can count"),
            ));
        }
    };
    let have = bytes.len() - data_start;
    if have < need {
        return Err(err(
            path,
            format!(
                "truncated: the header declares shape {shape:?} of '{descr}' ({need} data bytes) but the file holds {have}"
            ),
        ));
    }
    if have > need {
        return Err(err(path, format!("corrupt: {} bytes of data after the {need} the header declares", have - need)));
    }
    let body = &bytes[..data_start + need];
    let io = |e: std::io::Error| err(path, format!("cannot decode data: {e}"));
    let file = npyz::NpyFile::new(body).map_err(io)?;
    let data = match &descr[1..] {
        "f4" => NpyData::F32(file.into_vec::<f32>().map_err(io)?),
        "f2" => NpyData::F16(file.into_vec::<f16>().map_err(io)?),
        "f8" => NpyData::F64(file.into_vec::<f64>().map_err(io)?),
        _ => NpyData::Bool(body[data_start..].iter().map(|&b| b != 0).collect()),
    };
    Ok(NpyArray { shape, data, descr })
}

/// The header's shape when its element count overflows u64. npyz multiplies the dimensions
/// without a check (wrapping, or panicking in a build with overflow checks), so such a header
/// is caught here first; a malformed header is left to npyz to report.
fn overflowing_shape(bytes: &[u8]) -> Option<Vec<u64>> {
    let (len, start): (usize, usize) = match bytes.get(6)? {
        1 => (u16::from_le_bytes([*bytes.get(8)?, *bytes.get(9)?]) as usize, 10),
        _ => (u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize, 12),
    };
    let header = std::str::from_utf8(bytes.get(start..start.checked_add(len)?)?).ok()?;
    let after = &header[header.find("'shape'")? + 7..];
    let tuple = &after[after.find('(')? + 1..];
    let tuple = &tuple[..tuple.find(')')?];
    let dims: Vec<u64> =
        tuple.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| t.parse().ok()).collect::<Option<_>>()?;
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).is_none().then_some(dims)
}

impl NpyArray {
    /// The data as a favor host tensor (float32 or float16 only).
    pub fn into_tensor(self, path: &Path) -> Result<HostTensor> {
        match self.data {
            NpyData::F32(v) => Ok(HostTensor::F32(v)),
            NpyData::F16(v) => Ok(HostTensor::F16(v)),
            NpyData::F64(_) => Err(err(
                path,
                "dtype float64 is not supported: favor stores f32/f16/bf16 and computes in f32; convert with .astype(np.float32)",
            )),
            NpyData::Bool(_) => {
                Err(err(path, format!("dtype '{}' is not a float type; expected float32 or float16", self.descr)))
            }
        }
    }

    /// The data as f32 (float32 only: projections are f32).
    pub fn into_f32(self, path: &Path) -> Result<Vec<f32>> {
        match self.into_tensor(path)? {
            HostTensor::F32(v) => Ok(v),
            other => Err(err(path, format!("dtype {} is not supported here; expected float32", other.dtype()))),
        }
    }

    /// The data as booleans (bool or uint8).
    pub fn into_bool(self, path: &Path) -> Result<Vec<bool>> {
        match self.data {
            NpyData::Bool(v) => Ok(v),
            _ => Err(err(path, format!("dtype '{}' is not a mask type; expected bool ('|b1') or uint8", self.descr))),
        }
    }
}

/// Writes a tensor (float32 or float16) of `shape` to a .npy file.
pub fn write(path: &Path, shape: &[usize], t: &HostTensor) -> Result<()> {
    let n: usize = shape.iter().product();
    let len = t.view().len();
    if n != len {
        return Err(err(path, format!("internal: shape {shape:?} has {n} elements, the tensor {len}")));
    }
    let shape64: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
    let io = |e: std::io::Error| err(path, format!("cannot write: {e}"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    match t {
        HostTensor::F32(v) => {
            let mut w =
                npyz::WriteOptions::new().default_dtype().shape(&shape64).writer(&mut out).begin_nd().map_err(io)?;
            w.extend(v.iter().copied()).map_err(io)?;
            w.finish().map_err(io)?;
        }
        HostTensor::F16(v) => {
            let mut w =
                npyz::WriteOptions::new().default_dtype().shape(&shape64).writer(&mut out).begin_nd().map_err(io)?;
            w.extend(v.iter().copied()).map_err(io)?;
            w.finish().map_err(io)?;
        }
        HostTensor::Bf16(_) => {
            return Err(err(path, "bf16 has no standard .npy dtype; write f32 or f16"));
        }
    }
    std::io::Write::flush(&mut out).map_err(io)?;
    Ok(())
}

/// Element type name for messages.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::Bf16 => "bfloat16",
    }
}
