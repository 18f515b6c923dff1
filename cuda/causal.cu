// Causal linear attention with favor-core's running-maximum stabiliser, chunked, on fp32 rows.
//
// Computes, per (batch, head) and in "mapped" time τ (τ = t, or τ = L−1−t when `reverse`):
//   out_τ = Σ_{σ ≤ τ} exp(ĉ_σ − ĉ_τ)·(A_τ·B_σ)·V_σ,   ĉ = c (forward) or −c (reverse),
// where c is the nondecreasing running key maximum, so every weight is ≤ 1 (ĉ is nondecreasing
// in mapped time in both cases). With A = φ(Q), B = φ(K), V = [V 1] this is the causal forward
// (numerator and denominator, M_ij = exp(c_j − c_i)[j ≤ i]); the backward uses the same kernel
// forward for dφ(Q) and reversed for dφ(K) and dV (operands in favor-cuda/src/ops.rs).
//
// Data flow of one block (one (batch, head) × one tile of `nvt` value columns), chunks of CHUNK
// rows walked in order, state S (na × nvt, fp32) relative to exp(ĉ_ref) in shared memory:
//   ĉ of the chunk -> smem
//   P_ij = (A_i·B_j)·exp(ĉ_j − ĉ_i) for j ≤ i in the chunk -> smem (CHUNK × CHUNK)
//   out_i = Σ_{j ≤ i} P_ij V_j + exp(ĉ_ref − ĉ_i)·(A_iᵀS)          (intra + inter chunk)
//   S ← exp(ĉ_ref − ĉ_new)·S + Σ_j exp(ĉ_j − ĉ_new)·B_j V_jᵀ,  ĉ_ref ← ĉ_new = ĉ of the last row
// `state`/`c0` (forward only): S starts from state[bh] (relative to exp(c0[bh])) and the final S
// is written back there: prefill and decoding. The block owns its state slice, so in place is safe.
// The stabilisers c are doubles (they can be huge for large inputs while their differences
// matter); each decay is formed from a difference of doubles.
// Grid (⌈nv/nvt⌉, B·H), SCAN_THREADS threads; dynamic smem CHUNK doubles + (na·nvt + CHUNK²)
// floats, which the host keeps ≤ 48 KB.
#include "common.cuh"

#define CHUNK 32
#define SCAN_THREADS 256

extern "C" __global__ void __launch_bounds__(SCAN_THREADS)
favor_causal_scan_f32(const float* __restrict__ a, int lda, const float* __restrict__ b, int ldb, int na,
                      const float* __restrict__ v, int ldv, int nv, const double* __restrict__ c, int len,
                      int reverse, float* __restrict__ out, int ldo, float* state, const double* __restrict__ c0,
                      int nvt) {
    FAVOR_DYNAMIC_SMEM(smem);
    double* cc = reinterpret_cast<double*>(smem);
    float* s = reinterpret_cast<float*>(cc + CHUNK);
    float* p = s + (i64)na * nvt;
    const int tid = threadIdx.x, nt = blockDim.x;
    const i64 bh = blockIdx.y;
    const int e0 = blockIdx.x * nvt;
    const i64 base = bh * len;
    const int snum = na * nvt;

    for (int idx = tid; idx < snum; idx += nt) {
        const int f = idx / nvt, eg = e0 + idx % nvt;
        s[idx] = (state != nullptr && eg < nv) ? state[(bh * na + f) * nv + eg] : 0.0f;
    }
    double c_ref = (state != nullptr && c0 != nullptr) ? c0[bh] : -INFINITY;
    __syncthreads();

    for (int t0 = 0; t0 < len; t0 += CHUNK) {
        const int n = min(CHUNK, len - t0);
        if (tid < n) {
            const int pos = reverse ? len - 1 - (t0 + tid) : t0 + tid;
            cc[tid] = reverse ? -c[base + pos] : c[base + pos];
        }
        __syncthreads();

        for (int idx = tid; idx < CHUNK * CHUNK; idx += nt) {
            const int i = idx / CHUNK, j = idx % CHUNK;
            float val = 0.0f;
            if (i < n && j <= i) {
                const i64 ri = base + (reverse ? len - 1 - (t0 + i) : t0 + i);
                const i64 rj = base + (reverse ? len - 1 - (t0 + j) : t0 + j);
                const float* ai = a + ri * lda;
                const float* bj = b + rj * ldb;
                for (int f = 0; f < na; ++f) val = fmaf(ai[f], bj[f], val);
                val *= decay(cc[j], cc[i]);
            }
            p[idx] = val;
        }
        __syncthreads();

        for (int idx = tid; idx < n * nvt; idx += nt) {
            const int i = idx / nvt, e = idx % nvt, eg = e0 + e;
            if (eg >= nv) continue;
            const i64 ri = base + (reverse ? len - 1 - (t0 + i) : t0 + i);
            float acc = 0.0f;
            for (int j = 0; j <= i; ++j) {
                const i64 rj = base + (reverse ? len - 1 - (t0 + j) : t0 + j);
                acc = fmaf(p[i * CHUNK + j], v[rj * ldv + eg], acc);
            }
            const float* ai = a + ri * lda;
            float inter = 0.0f;
            for (int f = 0; f < na; ++f) inter = fmaf(ai[f], s[f * nvt + e], inter);
            out[ri * ldo + eg] = fmaf(decay(c_ref, cc[i]), inter, acc);
        }
        __syncthreads();

        const double c_new = cc[n - 1];
        const float keep_old = decay(c_ref, c_new);
        for (int idx = tid; idx < snum; idx += nt) {
            const int f = idx / nvt, eg = e0 + idx % nvt;
            if (eg >= nv) continue;
            float acc = keep_old * s[idx];
            for (int j = 0; j < n; ++j) {
                const i64 rj = base + (reverse ? len - 1 - (t0 + j) : t0 + j);
                acc = fmaf(decay(cc[j], c_new) * b[rj * ldb + f], v[rj * ldv + eg], acc);
            }
            s[idx] = acc;
        }
        c_ref = c_new;
        __syncthreads();
    }

    if (state != nullptr) {
        for (int idx = tid; idx < snum; idx += nt) {
            const int f = idx / nvt, eg = e0 + idx % nvt;
            if (eg < nv) state[(bh * na + f) * nv + eg] = s[idx];
        }
    }
}

// state_c[bh] = c[bh, L−1]: the running maximum after a prefill/decode call. Runs after the scan
// (same stream), which still read the old state_c.
extern "C" __global__ void favor_state_c_update_f32(const double* __restrict__ c, int len, int problems,
                                                    double* __restrict__ state_c) {
    const int bh = blockIdx.x * blockDim.x + threadIdx.x;
    if (bh < problems) state_c[bh] = c[(i64)bh * len + len - 1];
}
