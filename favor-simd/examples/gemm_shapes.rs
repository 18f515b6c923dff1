//! Single-thread rate of the internal product at the shapes the attention kernels use (a tuning
//! aid, not a test): `cargo run --release -p favor-simd --example gemm_shapes`.

fn main() {
    let isa = favor_simd::best_isa();
    println!("isa {}", isa.name());
    for (name, rows, k, n, at) in [
        ("Q'S (64x256 . 256x64)", 64, 256, 64, false),
        ("proj (64x64 . 64x256)", 64, 64, 256, false),
        ("K'^T V (256x64^T . 64x64)", 256, 64, 64, true),
        ("Q'K'^T (64x256 . 256x64)", 64, 256, 64, false),
        ("att V (64x64 . 64x64)", 64, 64, 64, false),
        ("dphi (64x64 . 64x256)", 64, 64, 256, false),
        ("big (512x512 . 512x512)", 512, 512, 512, false),
    ] {
        let reps = (2e9 / (2.0 * (rows * k * n) as f64)) as usize;
        let g = favor_simd::testing::gemm_gflops(isa, rows, k, n, at, reps).unwrap_or(0.0);
        println!("{name:>28}: {g:6.1} GFLOP/s");
    }
}
