//! Device memory: the [`CudaMem`] memory space (tensor handles over device buffers, yours or
//! ours), owned [`DeviceTensor`]s, and the allocation counters behind
//! [`crate::CudaBackend::memory_usage`].

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, sys};
use favor_core::{DType, Element, MemorySpace, TensorHandle};
use half::{bf16, f16};
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An element type the CUDA kernels accept: f32, f16 or bf16.
pub trait CudaElement: Element + DeviceRepr {}
impl<T: Element + DeviceRepr> CudaElement for T {}

/// A device pointer and its length in elements (internal currency of the launch functions).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DevPtr {
    pub ptr: u64,
    pub len: usize,
}

impl DevPtr {
    /// Elements `start..start + len` of a buffer of `elem_bytes`-byte elements; `None` when
    /// they are not all inside it.
    pub(crate) fn slice(self, start: usize, len: usize, elem_bytes: usize) -> Option<DevPtr> {
        let end = start.checked_add(len)?;
        (end <= self.len).then(|| DevPtr { ptr: self.ptr + (start * elem_bytes) as u64, len })
    }
}

/// Device memory: tensors are [`DeviceRef`] / [`DeviceMut`] handles on device buffers.
///
/// Work is enqueued on the backend's stream without synchronising. A handle knows its buffer's
/// home stream (where it was allocated and is freed); when that is not the backend's stream, the
/// call orders its work after the home stream's earlier work and the home stream after its own
/// work. Handles from raw pointers or cudarc buffers (`unsafe` constructors) leave any other
/// stream to the caller, as with any CUDA library.
#[derive(Debug, Clone, Copy, Default)]
pub struct CudaMem;

impl MemorySpace for CudaMem {
    type Ref<'a> = DeviceRef<'a>;
    type Mut<'a> = DeviceMut<'a>;

    fn skip<'t>(t: Self::Ref<'t>, start: usize) -> Option<Self::Ref<'t>> {
        t.skip(start)
    }

    fn skip_mut<'s>(t: &'s mut Self::Mut<'_>, start: usize) -> Option<Self::Mut<'s>> {
        let DevPtr { ptr, len } = t.raw().slice(start, t.len.checked_sub(start)?, t.dtype.size())?;
        Some(DeviceMut { ptr, len, dtype: t.dtype, home: t.home, _borrow: PhantomData })
    }
}

/// Read-only device tensor handle: pointer, element count and dtype, borrowed for `'a`.
///
/// `home` is the stream of the buffer's owner (a [`DeviceTensor`] or a cudarc buffer): a
/// backend on another stream orders its work after what was enqueued there before the call,
/// and the home stream after the backend's work, so the owner may drop (free, stream-ordered)
/// or reuse the buffer as soon as the call returns.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRef<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    home: Option<&'a CudaStream>,
    _borrow: PhantomData<&'a ()>,
}

/// Writable device tensor handle, borrowed mutably for `'a` (see [`DeviceRef`] for `home`).
#[derive(Debug)]
pub struct DeviceMut<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    home: Option<&'a CudaStream>,
    _borrow: PhantomData<&'a mut ()>,
}

impl<'a> DeviceRef<'a> {
    /// A handle on a whole cudarc buffer, used on the buffer's own stream.
    ///
    /// The backend orders its work after earlier work on `s.stream()` and `s.stream()` after
    /// its work (stream joins), so dropping `s` right after the call is fine. It does not update
    /// cudarc's per-buffer events and the backend enqueues asynchronously, so other streams are
    /// the caller's to order, hence `unsafe` (a safe call does not compile):
    ///
    /// ```compile_fail
    /// # fn f(s: &cudarc::driver::CudaSlice<f32>) {
    /// let handle = favor_cuda::DeviceRef::from_slice(s); // error: unsafe function
    /// # }
    /// ```
    ///
    /// # Safety
    /// `s` must belong to the backend's CUDA context. Until the backend's stream has finished
    /// the work of every call that uses the handle (an event recorded on it, or
    /// [`favor_core::FavorBackend::synchronize`]), no stream other than `s.stream()` and the
    /// backend's may write the buffer, and writes made on such other streams before the call
    /// must be ordered before it by the caller (events).
    pub unsafe fn from_slice<T: CudaElement>(s: &'a CudaSlice<T>) -> Self {
        let (ptr, _sync) = s.device_ptr(s.stream());
        Self { ptr, len: s.len(), dtype: T::DTYPE, home: Some(s.stream()), _borrow: PhantomData }
    }

    /// A handle on a cudarc view; `stream` is the stream the view's buffer is used (and freed) on.
    ///
    /// ```compile_fail
    /// # fn f(v: &cudarc::driver::CudaView<'_, f32>, st: &cudarc::driver::CudaStream) {
    /// let handle = favor_cuda::DeviceRef::from_view(v, st); // error: unsafe function
    /// # }
    /// ```
    ///
    /// # Safety
    /// As [`DeviceRef::from_slice`], with `stream` in place of the buffer's own stream: it must
    /// be the stream the buffer is freed on.
    pub unsafe fn from_view<T: CudaElement>(v: &'a CudaView<'_, T>, stream: &'a CudaStream) -> Self {
        let (ptr, _sync) = v.device_ptr(stream);
        Self { ptr, len: v.len(), dtype: T::DTYPE, home: Some(stream), _borrow: PhantomData }
    }

    /// A handle on memory the caller manages (an engine's own buffers).
    ///
    /// # Safety
    /// `ptr` must point to at least `len` elements of `dtype` in device memory of the backend's
    /// context, readable by the backend's stream, and stay allocated and unwritten by other
    /// streams until the backend's stream has finished the work of every call using the handle.
    pub unsafe fn from_raw(ptr: sys::CUdeviceptr, len: usize, dtype: DType) -> Self {
        Self { ptr, len, dtype, home: None, _borrow: PhantomData }
    }

    /// The raw device address.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// The elements from `start` on, with the same home stream: K and V of a packed QKV
    /// buffer are `qkv.skip(heads·d)` and `qkv.skip(2·heads·d)`. `None` past the end.
    pub fn skip(self, start: usize) -> Option<DeviceRef<'a>> {
        let DevPtr { ptr, len } = self.raw().slice(start, self.len.checked_sub(start)?, self.dtype.size())?;
        Some(DeviceRef { ptr, len, ..self })
    }

    pub(crate) fn raw(&self) -> DevPtr {
        DevPtr { ptr: self.ptr, len: self.len }
    }

    pub(crate) fn home(&self) -> Option<&'a CudaStream> {
        self.home
    }
}

impl<'a> DeviceMut<'a> {
    /// A handle on a whole cudarc buffer, used on the buffer's own stream.
    ///
    /// ```compile_fail
    /// # fn f(s: &mut cudarc::driver::CudaSlice<f32>) {
    /// let handle = favor_cuda::DeviceMut::from_slice(s); // error: unsafe function
    /// # }
    /// ```
    ///
    /// # Safety
    /// As [`DeviceRef::from_slice`]; in addition no stream other than `s.stream()` and the
    /// backend's may read the buffer until the backend's work on it has finished.
    pub unsafe fn from_slice<T: CudaElement>(s: &'a mut CudaSlice<T>) -> Self {
        let len = s.len();
        let ptr = {
            let stream = s.stream().clone();
            s.device_ptr_mut(&stream).0
        };
        // The mutable borrow is done with; the handle keeps `s` (and its stream) borrowed for 'a.
        let s: &'a CudaSlice<T> = s;
        let home: &'a CudaStream = s.stream();
        Self { ptr, len, dtype: T::DTYPE, home: Some(home), _borrow: PhantomData }
    }

    /// A handle on a mutable cudarc view; `stream` is the stream the buffer is used (and freed) on.
    ///
    /// ```compile_fail
    /// # fn f(v: &mut cudarc::driver::CudaViewMut<'_, f32>, st: &cudarc::driver::CudaStream) {
    /// let handle = favor_cuda::DeviceMut::from_view(v, st); // error: unsafe function
    /// # }
    /// ```
    ///
    /// # Safety
    /// As [`DeviceMut::from_slice`], with `stream` in place of the buffer's own stream.
    pub unsafe fn from_view<T: CudaElement>(v: &'a mut CudaViewMut<'_, T>, stream: &'a CudaStream) -> Self {
        let len = v.len();
        let (ptr, _sync) = v.device_ptr_mut(stream);
        Self { ptr, len, dtype: T::DTYPE, home: Some(stream), _borrow: PhantomData }
    }

    /// A handle on memory the caller manages.
    ///
    /// # Safety
    /// `ptr` must point to at least `len` elements of `dtype` in device memory of the backend's
    /// context, readable and writable by the backend's stream, stay allocated, and not be
    /// accessed by any other stream until the backend's stream has finished the work of every
    /// call using the handle.
    pub unsafe fn from_raw(ptr: sys::CUdeviceptr, len: usize, dtype: DType) -> Self {
        Self { ptr, len, dtype, home: None, _borrow: PhantomData }
    }

    /// Read-only reborrow.
    pub fn as_ref(&self) -> DeviceRef<'_> {
        DeviceRef { ptr: self.ptr, len: self.len, dtype: self.dtype, home: self.home, _borrow: PhantomData }
    }

    /// The raw device address.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    pub(crate) fn raw(&self) -> DevPtr {
        DevPtr { ptr: self.ptr, len: self.len }
    }

    pub(crate) fn home(&self) -> Option<&'a CudaStream> {
        self.home
    }
}

impl TensorHandle for DeviceRef<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl TensorHandle for DeviceMut<'_> {
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// Bytes currently allocated through a backend and the peak since the last reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryUsage {
    /// Live bytes (tensors, scratch, decoding states).
    pub current_bytes: usize,
    /// Highest `current_bytes` seen.
    pub peak_bytes: usize,
}

#[derive(Debug, Default)]
pub(crate) struct MemCounters {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl MemCounters {
    pub(crate) fn usage(&self) -> MemoryUsage {
        MemoryUsage {
            current_bytes: self.current.load(Ordering::Relaxed),
            peak_bytes: self.peak.load(Ordering::Relaxed),
        }
    }
    pub(crate) fn reset_peak(&self) {
        self.peak.store(self.current.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// Counts `bytes` as live until dropped.
#[derive(Debug)]
pub(crate) struct Tracked {
    counters: Arc<MemCounters>,
    bytes: usize,
}

impl Tracked {
    pub(crate) fn new(counters: &Arc<MemCounters>, bytes: usize) -> Self {
        let now = counters.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        counters.peak.fetch_max(now, Ordering::Relaxed);
        Self { counters: counters.clone(), bytes }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.counters.current.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Storage of a buffer: device memory, or (emulator tests only) a host allocation that the
/// emulated kernels address directly.
#[derive(Debug)]
pub(crate) enum Buf<T> {
    Device(CudaSlice<T>),
    #[cfg(feature = "emulator")]
    Host(crate::emulator::HostBuf<T>),
}

impl<T: DeviceRepr> Buf<T> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Buf::Device(s) => s.len(),
            #[cfg(feature = "emulator")]
            Buf::Host(h) => h.len(),
        }
    }

    pub(crate) fn ptr(&self) -> DevPtr {
        match self {
            Buf::Device(s) => {
                let (ptr, _sync) = s.device_ptr(s.stream());
                DevPtr { ptr, len: s.len() }
            }
            #[cfg(feature = "emulator")]
            Buf::Host(h) => DevPtr { ptr: h.addr(), len: h.len() },
        }
    }

    /// The stream the buffer was allocated on and is freed on (`None` in emulation).
    pub(crate) fn home(&self) -> Option<&Arc<CudaStream>> {
        match self {
            Buf::Device(s) => Some(s.stream()),
            #[cfg(feature = "emulator")]
            Buf::Host(_) => None,
        }
    }
}

/// A counted buffer used inside one call (freed stream-ordered when dropped).
#[derive(Debug)]
pub(crate) struct Scratch<T> {
    pub(crate) buf: Buf<T>,
    _track: Tracked,
}

impl<T: DeviceRepr> Scratch<T> {
    pub(crate) fn new(buf: Buf<T>, counters: &Arc<MemCounters>) -> Self {
        let bytes = buf.len() * std::mem::size_of::<T>();
        Self { buf, _track: Tracked::new(counters, bytes) }
    }

    pub(crate) fn ptr(&self) -> DevPtr {
        self.buf.ptr()
    }
}

/// An owned device tensor allocated by a backend (counted in its memory usage).
#[derive(Debug)]
pub struct DeviceTensor {
    pub(crate) data: TensorData,
    _track: Tracked,
}

#[derive(Debug)]
pub(crate) enum TensorData {
    F32(Buf<f32>),
    F16(Buf<f16>),
    Bf16(Buf<bf16>),
}

impl DeviceTensor {
    pub(crate) fn new(data: TensorData, counters: &Arc<MemCounters>) -> Self {
        let bytes = match &data {
            TensorData::F32(b) => b.len() * 4,
            TensorData::F16(b) => b.len() * 2,
            TensorData::Bf16(b) => b.len() * 2,
        };
        Self { data, _track: Tracked::new(counters, bytes) }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match &self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::Bf16(_) => DType::Bf16,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.raw().len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn raw(&self) -> DevPtr {
        match &self.data {
            TensorData::F32(b) => b.ptr(),
            TensorData::F16(b) => b.ptr(),
            TensorData::Bf16(b) => b.ptr(),
        }
    }

    fn home(&self) -> Option<&CudaStream> {
        match &self.data {
            TensorData::F32(b) => b.home(),
            TensorData::F16(b) => b.home(),
            TensorData::Bf16(b) => b.home(),
        }
        .map(|s| &**s)
    }

    /// Read-only handle.
    pub fn as_ref(&self) -> DeviceRef<'_> {
        let p = self.raw();
        DeviceRef { ptr: p.ptr, len: p.len, dtype: self.dtype(), home: self.home(), _borrow: PhantomData }
    }

    /// Writable handle.
    pub fn as_mut(&mut self) -> DeviceMut<'_> {
        let p = self.raw();
        let (dtype, home) = (self.dtype(), self.home());
        DeviceMut { ptr: p.ptr, len: p.len, dtype, home, _borrow: PhantomData }
    }
}
