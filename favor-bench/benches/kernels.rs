//! Criterion benches of every kernel: FAVOR+ forward and forward + backward, bidirectional and
//! causal, on every backend present (the f64 reference only at the smallest size), plus the
//! gemm baselines (exact softmax, unfused FAVOR+). CI smoke-runs them with
//! `cargo bench -p favor-bench -- --test`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use favor_bench::backends;
use favor_bench::workload::{self, Buffers, FavorConfig, Method, Pass};
use favor_core::{AttentionShape, Direction};

#[global_allocator]
static ALLOC: favor_bench::alloc::CountingAlloc = favor_bench::alloc::CountingAlloc;

const HEADS: usize = 8;
const D: usize = 64;
const M: usize = 256;
const LENS: [usize; 3] = [256, 1024, 4096];

fn kernels(c: &mut Criterion) {
    // Every ISA of the SIMD backend and the reference; "simd" alone repeats the best ISA.
    let ids = backends::available();
    let explicit_isas = ids.iter().any(|id| id.starts_with("simd:"));
    let backends = ids
        .into_iter()
        .filter(|id| !(explicit_isas && id == "simd"))
        .filter_map(|id| backends::open(&id).ok())
        .collect::<Vec<_>>();
    let favor = FavorConfig::positive(M, D, 1).expect("projection");
    let mut methods: Vec<Method> = Vec::new();
    for b in 0..backends.len() {
        for direction in [Direction::Bidirectional, Direction::Causal] {
            methods.push(Method::Favor { backend: b, direction });
        }
    }
    methods.extend([Method::UnfusedFavor, Method::Softmax]);
    for pass in [Pass::Forward, Pass::ForwardBackward] {
        let mut group = c.benchmark_group(format!("attention/{}", pass.name()));
        group.sample_size(10);
        for &method in &methods {
            if !method.supports(pass) {
                continue;
            }
            let is_ref = matches!(method, Method::Favor { backend, .. } if backends[backend].is_reference());
            for &len in &LENS {
                if is_ref && len > LENS[0] {
                    continue;
                }
                let shape = AttentionShape::new(1, if is_ref { 1 } else { HEADS }, len, D);
                let mut buf = Buffers::new(shape, pass, 1, 1.0);
                group.throughput(Throughput::Elements((shape.batch * len) as u64));
                let id = BenchmarkId::new(method.label(&backends), format!("H{}xL{len}", shape.heads));
                group.bench_function(id, |b| {
                    b.iter(|| {
                        workload::run_once(method, &backends, &favor, &mut buf).expect("kernel");
                        black_box(&buf.out);
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, kernels);
criterion_main!(benches);
