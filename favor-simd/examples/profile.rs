//! Times the favor-simd kernels on the shape of the CPU roofline benchmark (`favor-bench roofline`,
//! BENCHMARKS.md; not a test):
//! positive features, B = 1, H = 8, d = d_v = 64, m = 256, f32, every ISA.
//!
//! `cargo run --release -p favor-simd --example profile -- [L] [reps] [isa] [case]`
//!
//! `FAVOR_PHASES=1` also prints the CPU time of each phase (`favor_simd::phases`).
//!
//! Prints wall time and the process CPU time (all threads; /proc/self/stat), so that the
//! per-core throughput can be read even on a loaded machine. `RAYON_NUM_THREADS=1` for one core.
//!
//! Flop counts (multiply-adds count 2): bidirectional forward 8·B·H·L·d·m (projections of Q and
//! K: 2·2·L·d·m, K'ᵀV and Q'·KV: 2·2·L·m·d_v with d_v = d). The same nominal count is used for
//! causal forward, and 3× it for forward + backward, so the figures are comparable.

use favor_core::{
    AttentionOptions, AttentionShape, FavorBackend, FeatureMap, Grads, Inputs, Problem, Projection, ProjectionConfig,
};
use favor_simd::{Isa, SimdBackend};
use std::time::Instant;

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<usize> = raw.iter().filter_map(|a| a.parse().ok()).collect();
    let words: Vec<&String> = raw.iter().filter(|a| a.parse::<usize>().is_err()).collect();
    let l = args.first().copied().unwrap_or(4096);
    let reps = args.get(1).copied().unwrap_or(5);
    let (b, h, d, m) = (1, 8, 64, 256);
    let shape = AttentionShape::new(b, h, l, d);
    let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(m, d, 1)).unwrap());
    let data = |n: usize, s: u32| -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32 / 16777216.0 - 0.5).collect()
    };
    let (q, k, v) = (data(shape.qk_len(), 1), data(shape.qk_len(), 2), data(shape.v_len(), 3));
    let dout = data(shape.v_len(), 4);
    let flops = 8.0 * (b * h * l * d * m) as f64;
    println!("L={l} B={b} H={h} d=dv={d} m={m} threads={}", rayon::current_num_threads());
    for isa in Isa::available().into_iter().filter(|i| words.first().is_none_or(|w| w.as_str() == i.name())) {
        let be = SimdBackend::with_isa(isa).unwrap();
        for (name, opts, mult) in [
            ("bidir fwd", AttentionOptions::bidirectional(), 1.0),
            ("causal fwd", AttentionOptions::causal(), 1.0),
            ("bidir fwd+bwd", AttentionOptions::bidirectional(), 3.0),
            ("causal fwd+bwd", AttentionOptions::causal(), 3.0),
        ]
        .into_iter()
        .filter(|(n, _, _)| words.get(1).is_none_or(|w| n.replace(' ', "-") == **w))
        {
            let p = Problem::new(shape, &map).with_options(opts);
            let inputs = Inputs { q: (&q[..]).into(), k: (&k[..]).into(), v: (&v[..]).into(), key_mask: None };
            let mut out = vec![0.0f32; shape.v_len()];
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; q.len()], vec![0.0f32; v.len()]);
            let mut best = f64::INFINITY;
            let mut best_cpu = f64::INFINITY;
            favor_simd::phases::set_enabled(std::env::var_os("FAVOR_PHASES").is_some());
            favor_simd::phases::reset();
            for _ in 0..reps {
                let t = Instant::now();
                let c0 = cpu_seconds();
                be.forward(&p, inputs, (&mut out[..]).into()).unwrap();
                if mult > 1.0 {
                    let g = Grads { dq: (&mut dq[..]).into(), dk: (&mut dk[..]).into(), dv: (&mut dv[..]).into() };
                    be.backward(&p, inputs, (&dout[..]).into(), g).unwrap();
                }
                best = best.min(t.elapsed().as_secs_f64());
                best_cpu = best_cpu.min(cpu_seconds() - c0);
            }
            println!(
                "{:>8} {:>15}: wall {:8.2} ms {:6.1} GFLOP/s | cpu {:8.2} ms {:6.1} GFLOP/s per core",
                isa.name(),
                name,
                best * 1e3,
                mult * flops / best / 1e9,
                best_cpu * 1e3,
                mult * flops / best_cpu / 1e9
            );
            if favor_simd::phases::enabled() {
                let times = favor_simd::phases::snapshot();
                let total: f64 = times.iter().map(|t| t.total.as_secs_f64()).sum();
                for t in times.iter().filter(|t| t.spans > 0) {
                    let s = t.total.as_secs_f64() / reps as f64;
                    println!(
                        "    {:>17}: {:8.2} ms cpu/call {:5.1}%",
                        t.phase.name(),
                        s * 1e3,
                        100.0 * s * reps as f64 / total
                    );
                }
            }
        }
    }
}

/// User + system CPU time of the whole process (all threads), from /proc/self/stat (10 ms ticks).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
