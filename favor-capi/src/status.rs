//! Status codes, the thread-local last-error message, and the guard every exported function
//! runs its body in: errors become a status plus a message, and a panic is caught here so that
//! it never unwinds into C.

use favor::FavorError;
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// What a favor call returns. `FAVOR_STATUS_OK` is 0; every other value is an error, and
/// `favor_last_error()` then names the argument and the problem.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FavorStatus {
    /// Success.
    Ok = 0,
    /// A tensor has the wrong number of elements for the problem.
    Shape = 1,
    /// A tensor's strides overlap or run past its buffer, or output buffers overlap.
    Strides = 2,
    /// A tensor's element type differs from the call's (taken from q), or is unknown.
    Dtype = 3,
    /// A size that must be positive is zero.
    ZeroSize = 4,
    /// Sizes whose element counts overflow the address space.
    SizeOverflow = 5,
    /// A buffer could not be allocated.
    OutOfMemory = 6,
    /// An element range past the end of a tensor.
    OutOfRange = 7,
    /// A decoding state or slot made for another problem.
    StateMismatch = 8,
    /// A parameter outside its valid range (including unknown enum values).
    InvalidParameter = 9,
    /// An input holds a NaN or an infinity.
    NonFinite = 10,
    /// A valid request this backend does not support.
    Unsupported = 11,
    /// The backend cannot run here (no GPU, no driver, ISA missing).
    NotAvailable = 12,
    /// A failure inside a backend (driver error, launch failure).
    Backend = 13,
    /// A required pointer is null.
    NullPointer = 14,
    /// A handle of another kind (a map where a backend belongs, say) or not a live handle.
    WrongHandle = 15,
    /// An output buffer is too small; the size needed was written where the call says.
    BufferTooSmall = 16,
    /// An internal error (a bug in favor) was caught before it could reach the caller.
    Internal = 17,
}

impl FavorStatus {
    /// The status's name as the header spells it.
    pub(crate) fn name(self) -> &'static std::ffi::CStr {
        match self {
            FavorStatus::Ok => c"FAVOR_STATUS_OK",
            FavorStatus::Shape => c"FAVOR_STATUS_SHAPE",
            FavorStatus::Strides => c"FAVOR_STATUS_STRIDES",
            FavorStatus::Dtype => c"FAVOR_STATUS_DTYPE",
            FavorStatus::ZeroSize => c"FAVOR_STATUS_ZERO_SIZE",
            FavorStatus::SizeOverflow => c"FAVOR_STATUS_SIZE_OVERFLOW",
            FavorStatus::OutOfMemory => c"FAVOR_STATUS_OUT_OF_MEMORY",
            FavorStatus::OutOfRange => c"FAVOR_STATUS_OUT_OF_RANGE",
            FavorStatus::StateMismatch => c"FAVOR_STATUS_STATE_MISMATCH",
            FavorStatus::InvalidParameter => c"FAVOR_STATUS_INVALID_PARAMETER",
            FavorStatus::NonFinite => c"FAVOR_STATUS_NON_FINITE",
            FavorStatus::Unsupported => c"FAVOR_STATUS_UNSUPPORTED",
            FavorStatus::NotAvailable => c"FAVOR_STATUS_NOT_AVAILABLE",
            FavorStatus::Backend => c"FAVOR_STATUS_BACKEND",
            FavorStatus::NullPointer => c"FAVOR_STATUS_NULL_POINTER",
            FavorStatus::WrongHandle => c"FAVOR_STATUS_WRONG_HANDLE",
            FavorStatus::BufferTooSmall => c"FAVOR_STATUS_BUFFER_TOO_SMALL",
            FavorStatus::Internal => c"FAVOR_STATUS_INTERNAL",
        }
    }

    /// Every status, for the name lookup.
    const ALL: [FavorStatus; 18] = [
        FavorStatus::Ok,
        FavorStatus::Shape,
        FavorStatus::Strides,
        FavorStatus::Dtype,
        FavorStatus::ZeroSize,
        FavorStatus::SizeOverflow,
        FavorStatus::OutOfMemory,
        FavorStatus::OutOfRange,
        FavorStatus::StateMismatch,
        FavorStatus::InvalidParameter,
        FavorStatus::NonFinite,
        FavorStatus::Unsupported,
        FavorStatus::NotAvailable,
        FavorStatus::Backend,
        FavorStatus::NullPointer,
        FavorStatus::WrongHandle,
        FavorStatus::BufferTooSmall,
        FavorStatus::Internal,
    ];
}

/// A failed call: its status and the message `favor_last_error` returns.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: FavorStatus,
    pub message: String,
}

impl Failure {
    pub fn new(status: FavorStatus, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into() }
    }

    pub fn null(arg: &str) -> Failure {
        Failure::new(FavorStatus::NullPointer, format!("argument `{arg}` is a null pointer"))
    }

    pub fn param(arg: &str, why: impl std::fmt::Display) -> Failure {
        Failure::new(FavorStatus::InvalidParameter, format!("parameter `{arg}`: {why}"))
    }
}

impl From<FavorError> for Failure {
    fn from(e: FavorError) -> Failure {
        let status = match &e {
            FavorError::Shape { .. } => FavorStatus::Shape,
            FavorError::Strides { .. } => FavorStatus::Strides,
            FavorError::DType { .. } => FavorStatus::Dtype,
            FavorError::ZeroSize { .. } => FavorStatus::ZeroSize,
            FavorError::SizeOverflow { .. } => FavorStatus::SizeOverflow,
            FavorError::OutOfMemory { .. } => FavorStatus::OutOfMemory,
            FavorError::OutOfRange { .. } => FavorStatus::OutOfRange,
            FavorError::StateMismatch { .. } => FavorStatus::StateMismatch,
            FavorError::InvalidParameter { .. } => FavorStatus::InvalidParameter,
            FavorError::NonFinite { .. } => FavorStatus::NonFinite,
            FavorError::Unsupported(_) => FavorStatus::Unsupported,
            FavorError::NotAvailable { .. } => FavorStatus::NotAvailable,
            FavorError::Backend { .. } => FavorStatus::Backend,
        };
        Failure::new(status, e.to_string())
    }
}

pub(crate) type CallResult<T = ()> = Result<T, Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // An interior NUL would end the C string early; none of favor's messages has one.
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs one exported function's body: clears the thread's last error, maps a failure to its
/// status and message, and catches a panic (a favor bug) as `FAVOR_STATUS_INTERNAL`.
pub(crate) fn guard(body: impl FnOnce() -> CallResult) -> FavorStatus {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => FavorStatus::Ok,
        Ok(Err(f)) => {
            set_last_error(&f.message);
            f.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error in favor (please report it): {what}"));
            FavorStatus::Internal
        }
    }
}

/// The message of the last failed favor call on this thread ("" after a successful one).
/// The pointer stays valid until the next favor call on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn favor_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The name of a status code ("FAVOR_STATUS_SHAPE", ...); "FAVOR_STATUS_UNKNOWN" for a value
/// that is none. The string is static.
#[unsafe(no_mangle)]
pub extern "C" fn favor_status_name(status: i32) -> *const c_char {
    FavorStatus::ALL
        .iter()
        .find(|s| **s as i32 == status)
        .map_or(c"FAVOR_STATUS_UNKNOWN".as_ptr(), |s| s.name().as_ptr())
}

/// Writes `text` NUL-terminated into `buf` (capacity `cap` bytes) and its size with the NUL into
/// `*needed` (when not null); `BufferTooSmall` when it does not fit (nothing written to `buf`).
///
/// # Safety
/// `buf` is null or valid for `cap` bytes; `needed` is null or valid for one write.
pub(crate) unsafe fn write_string(text: &str, buf: *mut c_char, cap: usize, needed: *mut usize) -> CallResult {
    let n = text.len() + 1;
    if !needed.is_null() {
        // SAFETY: non-null, valid for one write (the caller's contract).
        unsafe { needed.write(n) };
    }
    if buf.is_null() || cap < n {
        return Err(Failure::new(
            FavorStatus::BufferTooSmall,
            format!("the text needs {n} bytes, the buffer holds {cap}"),
        ));
    }
    // SAFETY: `buf` holds `cap ≥ n` bytes and does not overlap `text` (Rust memory).
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len());
        buf.add(text.len()).write(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: favor_last_error returns a valid NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(favor_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_an_internal_status_with_its_message() {
        let status = guard(|| panic!("boom {}", 7));
        assert_eq!(status, FavorStatus::Internal);
        assert!(last_error().contains("boom 7"), "{}", last_error());
        assert_eq!(guard(|| Ok(())), FavorStatus::Ok);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn every_favor_error_has_its_status_and_message() {
        let e = FavorError::ZeroSize { arg: "len" };
        let f = Failure::from(e.clone());
        assert_eq!((f.status, f.message), (FavorStatus::ZeroSize, e.to_string()));
        for s in FavorStatus::ALL {
            // SAFETY: static NUL-terminated strings.
            let name = unsafe { std::ffi::CStr::from_ptr(favor_status_name(s as i32)) };
            assert_eq!(name, s.name());
        }
    }

    #[test]
    fn the_last_error_is_per_thread() {
        assert_eq!(guard(|| Err(Failure::null("x"))), FavorStatus::NullPointer);
        std::thread::spawn(|| assert_eq!(last_error(), "")).join().unwrap();
        assert!(last_error().contains("`x`"));
    }
}
