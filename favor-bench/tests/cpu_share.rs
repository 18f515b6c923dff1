//! The CPU share recorded with curves and roofline results: a short measurement that keeps every
//! rayon thread busy must read as a high share (it used to read 0 % below the 10 ms tick of
//! /proc/self/stat, and counted untimed single-threaded setup).

use std::time::{Duration, Instant};

use favor_bench::meta::CpuShare;

/// Spins every rayon thread for `d` of wall time.
fn busy_all_threads(d: Duration) {
    let n = rayon::current_num_threads();
    rayon::scope(|s| {
        for _ in 0..n {
            s.spawn(move |_| {
                let end = Instant::now() + d;
                let mut x = 0u64;
                while Instant::now() < end {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
        }
    });
}

#[test]
fn a_short_run_that_keeps_all_threads_busy_has_a_high_share() {
    let cpu = CpuShare::start();
    assert_eq!(cpu.share(), None, "nothing timed yet");
    // Untimed single-threaded work between measurements does not dilute the share.
    let idle_until = Instant::now() + Duration::from_millis(30);
    while Instant::now() < idle_until {
        std::hint::spin_loop();
    }
    let sample = favor_bench::measure::time_point(
        || Ok(()),
        |_| {
            busy_all_threads(Duration::from_millis(20));
            Ok(())
        },
        3,
        10.0,
    )
    .unwrap();
    assert!(sample.median >= 0.02);
    let share = cpu.share().expect("timed calls were recorded");
    assert!(share > 0.5 && share < 1.2, "share {share} on {} threads", rayon::current_num_threads());
}
