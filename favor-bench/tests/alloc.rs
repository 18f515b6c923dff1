//! The counting allocator's peak measurement.

use favor_bench::alloc;

#[global_allocator]
static ALLOC: alloc::CountingAlloc = alloc::CountingAlloc;

#[test]
fn peak_is_exact_and_resettable() {
    assert!(alloc::is_installed());
    const MIB: usize = 1 << 20;
    let (_, big) = alloc::measure_peak(|| {
        let v = std::hint::black_box(vec![1u8; 64 * MIB]);
        v.len()
    });
    // The test harness may allocate a little on other threads; allow 1 MiB of slack.
    assert!((64 * MIB..65 * MIB).contains(&big), "peak {big}");
    let (_, small) = alloc::measure_peak(|| std::hint::black_box(vec![1u8; 8 * MIB]).len());
    assert!((8 * MIB..9 * MIB).contains(&small), "peak after reset {small}");
    // Growing a vector by realloc counts the larger block.
    let (_, grown) = alloc::measure_peak(|| {
        let mut v: Vec<u8> = Vec::with_capacity(MIB);
        v.resize(16 * MIB, 0);
        std::hint::black_box(v).len()
    });
    assert!(grown >= 16 * MIB, "realloc peak {grown}");
}
