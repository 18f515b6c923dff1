// Bidirectional linear attention on fp32 rows: out_t = A_tᵀ(Σ_l B_l V_lᵀ) for every row t of a
// (batch, head). The forward uses A = φ(Q), B = φ(K), V = [V 1] (so the last output column is
// the denominator); the backward reuses the same two kernels with other operands
// (favor-cuda/src/ops.rs lists them).
//
// Data flow:
//   favor_kv_reduce_f32   grid (segments, B·H): each block sums B_l V_lᵀ (na × nv) over its own
//                         contiguous segment of the sequence into partial[bh, segment]
//   favor_kv_combine_f32  grid (⌈na·nv/256⌉, B·H): sums the partials in segment order, so the
//                         result is deterministic (no atomics)
//   favor_kv_apply_f32    grid (⌈L/APPLY_ROWS⌉, B·H): out_t = A_tᵀ·KV
//
// All keys of a (batch, head) share one stabiliser (the maximum over unpadded keys, computed
// before the features), so no rescaling between segments is needed; ε is inside φ already.
#include "common.cuh"

#define APPLY_ROWS 16

extern "C" __global__ void favor_kv_reduce_f32(const float* __restrict__ b, int ldb, int na,
                                               const float* __restrict__ v, int ldv, int nv, int len, int seg_len,
                                               float* __restrict__ partial) {
    const i64 bh = blockIdx.y;
    const int seg = blockIdx.x, nsegs = gridDim.x;
    const int lo = seg * seg_len, hi = min(len, lo + seg_len);
    const i64 n = (i64)na * nv;
    float* dst = partial + (bh * nsegs + seg) * n;
    for (i64 idx = threadIdx.x; idx < n; idx += blockDim.x) {
        const int f = (int)(idx / nv), e = (int)(idx % nv);
        float acc = 0.0f;
        for (int l = lo; l < hi; ++l) {
            const i64 row = bh * len + l;
            acc = fmaf(b[row * ldb + f], v[row * ldv + e], acc);
        }
        dst[idx] = acc;
    }
}

extern "C" __global__ void favor_kv_combine_f32(const float* __restrict__ partial, int nsegs, i64 n,
                                                float* __restrict__ kv) {
    const i64 bh = blockIdx.y;
    const i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (idx >= n) return;
    float acc = 0.0f;
    for (int s = 0; s < nsegs; ++s) acc += partial[(bh * nsegs + s) * n + idx];
    kv[bh * n + idx] = acc;
}

extern "C" __global__ void favor_kv_apply_f32(const float* __restrict__ a, int lda, int na,
                                              const float* __restrict__ kv, int nv, int len,
                                              float* __restrict__ out, int ldo) {
    const i64 bh = blockIdx.y;
    const int t0 = blockIdx.x * APPLY_ROWS;
    const float* m = kv + bh * (i64)na * nv;
    for (int idx = threadIdx.x; idx < APPLY_ROWS * nv; idx += blockDim.x) {
        const int t = t0 + idx / nv, e = idx % nv;
        if (t >= len) continue;
        const i64 row = bh * len + t;
        float acc = 0.0f;
        for (int f = 0; f < na; ++f) acc = fmaf(a[row * lda + f], m[(i64)f * nv + e], acc);
        out[row * ldo + e] = acc;
    }
}
