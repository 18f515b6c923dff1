//! The CUDA backend checks decoding states with favor-core's one check: every mismatched state
//! is rejected with the same error as on the reference (cases of maps without a CUDA kernel are
//! skipped), and matching states decode. Runs on the GPU when there is one and on the CPU
//! emulator of the kernel sources with the `emulator` feature.

use favor_core::testing::assert_states_checked;
use favor_core::{FavorBackend, FavorError, ReferenceBackend};
use favor_cuda::{CudaBackend, CudaHost};

#[test]
fn mismatched_states_are_rejected_like_on_the_reference() {
    let mut backends = Vec::new();
    match CudaBackend::new(0) {
        Ok(b) => backends.push(CudaHost::new(b)),
        Err(FavorError::NotAvailable { reason, .. }) => eprintln!("GPU skipped: {reason}"),
        Err(e) => panic!("CudaBackend::new: {e}"),
    }
    #[cfg(feature = "emulator")]
    backends.push(CudaHost::new(CudaBackend::emulated()));
    let want = assert_states_checked(&ReferenceBackend);
    for backend in &backends {
        let got = assert_states_checked(backend);
        assert!(!got.is_empty(), "{}: every case skipped", backend.name());
        // The same error wherever both ran the case.
        for (i, e) in &got {
            let want = want.iter().find(|(j, _)| j == i).map(|(_, e)| e);
            assert_eq!(Some(e), want, "{} case {i}", backend.name());
        }
    }
}
