//! `profile` on the CPU SIMD backend reports the time of each phase of the kernel it runs.

use favor_bench::backends;
use favor_bench::profile::{self, ProfileConfig, ProfilePass};
use favor_core::{AttentionShape, DType, Direction};

fn profile(direction: Direction, pass: ProfilePass, phases: bool) -> profile::ProfileReport {
    let cfg = ProfileConfig {
        backend: backends::open("simd").unwrap(),
        direction,
        pass,
        shape: AttentionShape::new(1, 2, 200, 16),
        dtype: DType::F32,
        map: "positive".into(),
        m: 32,
        iters: 2,
        warmup: 1,
        verbose: false,
        phases,
    };
    profile::run(&cfg).unwrap()
}

fn names(r: &profile::ProfileReport) -> Vec<&'static str> {
    r.phases.as_ref().expect("phase timers were on").iter().map(|p| p.name).collect()
}

/// Every phase a pass goes through is reported with a positive time, shares add up to one,
/// and phases a pass does not have are absent. (One test: the counters are process-wide.)
#[test]
fn simd_profile_reports_the_phases_of_each_pass() {
    for direction in [Direction::Bidirectional, Direction::Causal] {
        let fwd = profile(direction, ProfilePass::Forward, true);
        let fwd_names = names(&fwd);
        for want in ["io", "feature-map", "state-build", "apply"] {
            assert!(fwd_names.contains(&want), "{direction:?} forward lacks {want}: {fwd_names:?}");
        }
        assert!(!fwd_names.contains(&"backward-sweep") && !fwd_names.contains(&"feature-backward"));

        let both = profile(direction, ProfilePass::ForwardBackward, true);
        let ph = both.phases.as_ref().unwrap();
        for want in ["feature-map", "state-build", "apply", "backward-sweep", "feature-backward"] {
            let p = ph.iter().find(|p| p.name == want).unwrap_or_else(|| panic!("{direction:?} lacks {want}"));
            assert!(p.cpu_s > 0.0 && p.share > 0.0, "{want}: {p:?}");
        }
        let total: f64 = ph.iter().map(|p| p.share).sum();
        assert!((total - 1.0).abs() < 1e-9, "shares sum to {total}");
        // Phase CPU time cannot exceed the wall time of the threads that did the work.
        let wall: f64 = both.times.iter().sum::<f64>() / both.times.len() as f64;
        let cpu: f64 = ph.iter().map(|p| p.cpu_s).sum();
        assert!(cpu <= wall * rayon::current_num_threads() as f64 * 1.05 + 1e-3, "cpu {cpu} vs wall {wall}");
    }
    assert!(profile(Direction::Causal, ProfilePass::Forward, false).phases.is_none());
}
