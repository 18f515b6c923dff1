//! A small engine around favor: one causal multi-head attention layer with grouped key/value
//! heads, its Q/K/V/output projections producing and consuming `[batch, len, heads, d]` rows
//! that favor reads and writes in place. It trains for a few steps (forward, favor's backward,
//! the projections' gradients, SGD) and then generates with the slot decoder: two sequences with
//! prompts of different lengths prefilled in one call, then one token per sequence per call, each
//! new input being the layer's previous output. At the end every generated output is checked
//! against a full causal forward over the sequence.
//!
//! `cargo run --release --example engine` (`cargo test --example engine` runs it as a test).

use favor::{
    AttentionOptions, AttentionShape, Backend, FavorBackend, FeatureMap, Grads, Inputs, Layout, Problem, Projection,
    ProjectionConfig, SlotChunks,
};
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

/// One standard normal sample.
fn normal(rng: &mut Xoshiro256PlusPlus) -> f32 {
    StandardNormal.sample(rng)
}

/// `a` (m × k) · `b` (k × n), row-major.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let x = a[i * k + p];
            c[i * n..(i + 1) * n].iter_mut().zip(&b[p * n..(p + 1) * n]).for_each(|(c, &b)| *c += x * b);
        }
    }
    c
}

/// `aᵀ` (a is k × m) · `b` (k × n): the gradient of a weight from its input and output grads.
fn matmul_tn(a: &[f32], b: &[f32], k: usize, m: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for p in 0..k {
        for i in 0..m {
            let x = a[p * m + i];
            c[i * n..(i + 1) * n].iter_mut().zip(&b[p * n..(p + 1) * n]).for_each(|(c, &b)| *c += x * b);
        }
    }
    c
}

/// `a` (m × n) · `bᵀ` (b is k × n): an input's gradient through a weight.
fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * k];
    for i in 0..m {
        for j in 0..k {
            c[i * k + j] = a[i * n..(i + 1) * n].iter().zip(&b[j * n..(j + 1) * n]).map(|(x, y)| x * y).sum();
        }
    }
    c
}

/// One attention layer: x (tokens × d_model) → y (tokens × d_model).
struct Layer {
    d_model: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    map: FeatureMap,
    /// d_model × heads·d, d_model × kv_heads·d (twice), heads·d × d_model.
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
}

/// What the backward needs from a forward.
struct Activations {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    y: Vec<f32>,
}

struct WeightGrads {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
}

impl Layer {
    fn new(d_model: usize, heads: usize, kv_heads: usize, d: usize, seed: u64) -> favor::Result<Layer> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut init = |rows: usize, cols: usize| -> Vec<f32> {
            let std = (rows as f32).sqrt().recip();
            (0..rows * cols).map(|_| std * normal(&mut rng)).collect()
        };
        let (wq, wk, wv) = (init(d_model, heads * d), init(d_model, kv_heads * d), init(d_model, kv_heads * d));
        let wo = init(heads * d, d_model);
        let map = FeatureMap::positive(Projection::draw(ProjectionConfig::new(64, d, seed))?);
        Ok(Layer { d_model, heads, kv_heads, d, map, wq, wk, wv, wo })
    }

    /// The attention problem of `batch` sequences of `len` tokens: causal, grouped key/value
    /// heads, every tensor `[batch, len, heads, d]` as the projections lay it out.
    fn shape(&self, batch: usize, len: usize) -> AttentionShape {
        AttentionShape::new(batch, self.heads, len, self.d).with_kv_heads(self.kv_heads)
    }

    fn forward(&self, backend: &Backend, x: &[f32], batch: usize, len: usize) -> favor::Result<Activations> {
        let (t, dm) = (batch * len, self.d_model);
        let q = matmul(x, &self.wq, t, dm, self.heads * self.d);
        let k = matmul(x, &self.wk, t, dm, self.kv_heads * self.d);
        let v = matmul(x, &self.wv, t, dm, self.kv_heads * self.d);
        let shape = self.shape(batch, len);
        let problem =
            Problem::new(shape, &self.map).with_options(AttentionOptions::causal()).with_layout(Layout::blhd(&shape));
        let mut attn = vec![0.0; t * self.heads * self.d];
        let inputs = Inputs { q: q[..].into(), k: k[..].into(), v: v[..].into(), key_mask: None };
        backend.forward(&problem, inputs, attn.as_mut_slice().into())?;
        let y = matmul(&attn, &self.wo, t, self.heads * self.d, dm);
        Ok(Activations { q, k, v, attn, y })
    }

    fn backward(
        &self,
        backend: &Backend,
        x: &[f32],
        a: &Activations,
        dy: &[f32],
        batch: usize,
        len: usize,
    ) -> favor::Result<WeightGrads> {
        let (t, dm, hd, kd) = (batch * len, self.d_model, self.heads * self.d, self.kv_heads * self.d);
        let wo = matmul_tn(&a.attn, dy, t, hd, dm);
        let dattn = matmul_nt(dy, &self.wo, t, dm, hd);
        let shape = self.shape(batch, len);
        let problem =
            Problem::new(shape, &self.map).with_options(AttentionOptions::causal()).with_layout(Layout::blhd(&shape));
        let (mut dq, mut dk, mut dv) = (vec![0.0; t * hd], vec![0.0; t * kd], vec![0.0; t * kd]);
        let inputs = Inputs { q: a.q[..].into(), k: a.k[..].into(), v: a.v[..].into(), key_mask: None };
        let grads = Grads { dq: dq.as_mut_slice().into(), dk: dk.as_mut_slice().into(), dv: dv.as_mut_slice().into() };
        backend.backward(&problem, inputs, dattn[..].into(), grads)?;
        Ok(WeightGrads {
            wq: matmul_tn(x, &dq, t, dm, hd),
            wk: matmul_tn(x, &dk, t, dm, kd),
            wv: matmul_tn(x, &dv, t, dm, kd),
            wo,
        })
    }

    fn sgd(&mut self, g: &WeightGrads, lr: f32) {
        for (w, g) in [(&mut self.wq, &g.wq), (&mut self.wk, &g.wk), (&mut self.wv, &g.wv), (&mut self.wo, &g.wo)] {
            w.iter_mut().zip(g).for_each(|(w, g)| *w -= lr * g);
        }
    }
}

/// The training target: at each position, the mean of the inputs so far (a job for uniform
/// causal attention with W_v·W_o = I).
fn running_mean(x: &[f32], batch: usize, len: usize, dm: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for b in 0..batch {
        let mut sum = vec![0.0f32; dm];
        for i in 0..len {
            let row = (b * len + i) * dm;
            sum.iter_mut().zip(&x[row..row + dm]).for_each(|(s, &x)| *s += x);
            t[row..row + dm].iter_mut().zip(&sum).for_each(|(t, &s)| *t = s / (i + 1) as f32);
        }
    }
    t
}

fn main() -> favor::Result<()> {
    let backend = Backend::best();
    println!("backend: {}", backend.name());
    let (d_model, heads, kv_heads, d) = (32, 4, 2, 8);
    let mut layer = Layer::new(d_model, heads, kv_heads, d, 1)?;

    // Training: batches of 4 sequences of 48 tokens, mean squared error against the running mean.
    let (batch, len) = (4, 48);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
    let mut losses = Vec::new();
    for step in 0..30 {
        let x: Vec<f32> = (0..batch * len * d_model).map(|_| normal(&mut rng)).collect();
        let target = running_mean(&x, batch, len, d_model);
        let a = layer.forward(&backend, &x, batch, len)?;
        let n = a.y.len() as f32;
        let loss = a.y.iter().zip(&target).map(|(y, t)| (y - t) * (y - t)).sum::<f32>() / n;
        let dy: Vec<f32> = a.y.iter().zip(&target).map(|(y, t)| 2.0 * (y - t) / n).collect();
        let g = layer.backward(&backend, &x, &a, &dy, batch, len)?;
        layer.sgd(&g, 0.5);
        if step % 5 == 0 {
            println!("step {step:>2}: loss {loss:.4}");
        }
        losses.push(loss);
    }
    assert!(losses[29] < 0.7 * losses[0], "training did not reduce the loss: {losses:?}");

    // Generation: two sequences with prompts of 5 and 9 tokens, prefilled in one call, then 6
    // steps of one token each, every new input being the sequence's previous output.
    let dm = d_model;
    let state_shape = layer.shape(2, 1);
    let causal = AttentionOptions::causal();
    let mut state = backend.new_state(&Problem::new(state_shape, &layer.map).with_options(causal))?;
    let prompts: Vec<Vec<f32>> = [5, 9].iter().map(|&n| (0..n * dm).map(|_| normal(&mut rng)).collect()).collect();
    let mut inputs_so_far = prompts.clone();
    let mut outputs: Vec<Vec<f32>> = vec![Vec::new(); 2];
    let mut chunk: Vec<Vec<f32>> = prompts;
    for _ in 0..7 {
        // Pack this call's tokens back to back: [1, tokens, ·].
        let lens: Vec<usize> = chunk.iter().map(|c| c.len() / dm).collect();
        let offsets = [0, lens[0], lens[0] + lens[1]];
        let x: Vec<f32> = chunk.concat();
        let total = offsets[2];
        let (q, k, v) = (
            matmul(&x, &layer.wq, total, dm, heads * d),
            matmul(&x, &layer.wk, total, dm, kv_heads * d),
            matmul(&x, &layer.wv, total, dm, kv_heads * d),
        );
        let shape = AttentionShape { batch: 1, len: total, ..state_shape };
        let problem = Problem::new(shape, &layer.map).with_options(causal).with_layout(Layout::blhd(&shape));
        let mut attn = vec![0.0; total * heads * d];
        let inputs = Inputs { q: q[..].into(), k: k[..].into(), v: v[..].into(), key_mask: None };
        backend.decode_slots(
            &problem,
            &mut state,
            SlotChunks::new(&[0, 1], &offsets),
            inputs,
            attn.as_mut_slice().into(),
        )?;
        let y = matmul(&attn, &layer.wo, total, heads * d, dm);
        // Each sequence's next input is its last output.
        for s in 0..2 {
            outputs[s].extend_from_slice(&y[offsets[s] * dm..offsets[s + 1] * dm]);
            let next = y[(offsets[s + 1] - 1) * dm..offsets[s + 1] * dm].to_vec();
            inputs_so_far[s].extend_from_slice(&next);
            chunk[s] = next;
        }
    }
    for s in 0..2 {
        // The last input has not been consumed yet.
        let consumed = &inputs_so_far[s][..inputs_so_far[s].len() - dm];
        let len = consumed.len() / dm;
        let full = layer.forward(&backend, consumed, 1, len)?.y;
        let err = full.iter().zip(&outputs[s]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("sequence {s}: {len} tokens decoded, largest difference from a full forward {err:.1e}");
        assert!(err < 1e-4, "decoding differs from the full forward by {err}");
    }
    Ok(())
}

#[test]
fn the_engine_trains_and_generates() {
    main().unwrap();
}
