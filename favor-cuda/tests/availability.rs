//! Tests that run everywhere: the backend reports unavailability as a typed error (never a
//! panic), and the embedded fatbins hold every kernel when the crate was built with nvcc.

use favor_core::FavorError;
use favor_cuda::{CudaBackend, FATBINS, KERNEL_NAMES, kernels_built};

fn require_nvcc() -> bool {
    std::env::var("FAVOR_REQUIRE_NVCC").is_ok_and(|v| v == "1")
}

#[test]
fn new_reports_unavailability_without_panicking() {
    // SAFETY: only dlopen()s the candidate driver library names.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    match CudaBackend::new(0) {
        Ok(b) => {
            assert!(kernels_built() && driver, "a backend without kernels or driver must not open");
            eprintln!("CUDA backend available: {} (driver {})", b.device_name(), b.driver_version());
        }
        Err(FavorError::NotAvailable { backend, reason }) => {
            assert!(
                !std::env::var("FAVOR_REQUIRE_GPU").is_ok_and(|v| v == "1"),
                "FAVOR_REQUIRE_GPU=1 but the CUDA backend is not available: {reason}"
            );
            assert_eq!(backend, "cuda");
            assert!(!reason.is_empty());
            if !kernels_built() {
                assert!(reason.contains("without nvcc"), "{reason}");
            } else if !driver {
                assert!(reason.contains("libcuda"), "{reason}");
            }
            eprintln!("CUDA backend not available (as expected here): {reason}");
        }
        Err(e) => panic!("expected NotAvailable, got {e:?}"),
    }
}

#[test]
fn absent_device_is_not_available() {
    // No machine has 10 000 GPUs: with or without a driver this is NotAvailable.
    let r = CudaBackend::new(10_000);
    assert!(matches!(r, Err(FavorError::NotAvailable { .. })), "{r:?}");
}

#[test]
fn fatbins_hold_every_kernel() {
    if require_nvcc() {
        assert!(kernels_built(), "FAVOR_REQUIRE_NVCC=1 but the crate was built without kernels");
    }
    let units: Vec<&str> = FATBINS.iter().map(|(u, _)| *u).collect();
    for (unit, _) in KERNEL_NAMES {
        assert!(units.contains(unit), "no fatbin for cuda/{unit}.cu");
    }
    if !kernels_built() {
        assert!(FATBINS.iter().all(|(_, b)| b.is_empty()));
        eprintln!("built without nvcc: fatbins are empty (skipping the symbol check)");
        return;
    }
    for (unit, names) in KERNEL_NAMES {
        let bytes = FATBINS.iter().find(|(u, _)| u == unit).map(|(_, b)| *b).expect("listed above");
        assert!(!bytes.is_empty(), "{unit}.fatbin is empty");
        // A fatbin starts with the magic 0xBA55ED50 (little endian).
        assert_eq!(&bytes[..4], &[0x50, 0xed, 0x55, 0xba], "{unit}.fatbin has no fatbin header");
        for name in *names {
            let found = bytes.windows(name.len()).any(|w| w == name.as_bytes());
            assert!(found, "kernel {name} missing from {unit}.fatbin");
        }
    }
}
