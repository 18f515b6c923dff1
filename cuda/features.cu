// Feature maps φ (forward and backward) and the key stabilisers, on fp32 rows.
//
// Notation (favor-core/src/features): x̃ = in_scale·x (d^{-1/4}x for the exponential maps, the
// map's scale for the generalized ones), a_j = w_jᵀx̃ (or a = x̃ without a projection),
// h = ‖x̃‖²/2, c = the row's stabiliser.
//
// Data flow of `favor_features_f32` (TOK rows per block, W read through L1/L2):
//   x rows --(×in_scale)--> smem x̃ --> h per row
//   mode 0/2: pass 1 over the m projections: running max of a (|a| for hyperbolic) per row,
//             block max --> s = max − h (trigonometric: s = h): the row's log-scale;
//             mode 2 writes s and stops, mode 0 uses c = s (queries: own log-scale)
//   mode 1:   c read from c_in (keys: shared or running maximum from favor_stabiliser_f32)
//   pass 2 over the projections: a again, φ in registers, written to fp32 rows (ld_phi apart);
//   padded keys (keep[b, l] == 0) get φ = 0.
//
// `favor_features_bwd_f32`: da per projection in shared memory (with the h-cotangent dh reduced
// deterministically over the block), then dx = in_scale·(Wᵀda + x̃·dh). Stabilisers are
// constants (favor's stop-gradient rule). Padded rows get dx = 0.
//
// `favor_stabiliser_f32`: one block per (batch, head); bidirectional: c = max of the unpadded
// log-scales for every row; causal: c_l = max(c_init, max_{l' ≤ l, unpadded} s_{l'}), by
// per-thread segment maxima, a sequential exclusive scan of the 256 maxima and a rescan.
#include "common.cuh"

#define TOK 8

__device__ __forceinline__ bool row_kept(const unsigned char* keep, i64 row, int heads, int len) {
    if (keep == nullptr) return true;
    const i64 bh = row / len;
    const i64 b = bh / heads;
    return keep[b * len + row % len] != 0;
}

__device__ __forceinline__ float project_row(const float* __restrict__ w, const float* xs, int j, int d) {
    if (w == nullptr) return xs[j];
    float a = 0.0f;
    const float* wj = w + (i64)j * d;
    for (int t = 0; t < d; ++t) a = fmaf(wj[t], xs[t], a);
    return a;
}

// Shared-memory floats: xs[TOK·d], red[TOK·blockDim], hs[TOK], cs[TOK].
extern "C" __global__ void favor_features_f32(const float* __restrict__ x, i64 rows, int d,
                                              const float* __restrict__ w, int m, int kind, float in_scale, float eps,
                                              int mode, const float* __restrict__ c_in, float* __restrict__ c_out,
                                              const unsigned char* __restrict__ keep, int heads, int len,
                                              float* __restrict__ phi, int ld_phi) {
    FAVOR_DYNAMIC_SMEM(smem);
    const int nt = blockDim.x, tid = threadIdx.x;
    float* xs = smem;
    float* red = xs + TOK * d;
    float* hs = red + TOK * nt;
    float* cs = hs + TOK;
    const i64 r0 = (i64)blockIdx.x * TOK;

    for (int idx = tid; idx < TOK * d; idx += nt) {
        const i64 row = r0 + idx / d;
        xs[idx] = row < rows ? x[row * d + idx % d] * in_scale : 0.0f;
    }
    __syncthreads();
    if (tid < TOK) {
        float h = 0.0f;
        for (int t = 0; t < d; ++t) h = fmaf(xs[tid * d + t], xs[tid * d + t], h);
        hs[tid] = 0.5f * h;
        cs[tid] = 0.0f;
    }
    __syncthreads();

    const bool exp_kind = is_exp_kind(kind);
    if (exp_kind && mode != 1) {
        if (kind != KIND_TRIGONOMETRIC) {
            float mx[TOK];
            for (int r = 0; r < TOK; ++r) mx[r] = -INFINITY;
            for (int j = tid; j < m; j += nt) {
                for (int r = 0; r < TOK; ++r) {
                    const float a = project_row(w, xs + r * d, j, d);
                    mx[r] = fmaxf(mx[r], kind == KIND_HYPERBOLIC ? fabsf(a) : a);
                }
            }
            for (int r = 0; r < TOK; ++r) red[r * nt + tid] = mx[r];
        }
        __syncthreads();
        if (tid < TOK) {
            float s = hs[tid];
            if (kind != KIND_TRIGONOMETRIC) {
                float v = -INFINITY;
                for (int i = 0; i < nt; ++i) v = fmaxf(v, red[tid * nt + i]);
                s = v - hs[tid];
            }
            cs[tid] = s;
            if (c_out != nullptr && r0 + tid < rows) c_out[r0 + tid] = s;
        }
        __syncthreads();
        if (mode == 2) return;
    } else if (exp_kind && mode == 1) {
        if (tid < TOK) cs[tid] = r0 + tid < rows ? c_in[r0 + tid] : 0.0f;
        __syncthreads();
    }

    const float ratio = 1.0f / sqrtf((float)(kind == KIND_HYPERBOLIC ? 2 * m : m));
    const bool two = kind == KIND_HYPERBOLIC || kind == KIND_TRIGONOMETRIC;
    for (int j = tid; j < m; j += nt) {
        for (int r = 0; r < TOK; ++r) {
            const i64 row = r0 + r;
            if (row >= rows) break;
            float* out = phi + row * ld_phi;
            if (!row_kept(keep, row, heads, len)) {
                out[j] = 0.0f;
                if (two) out[m + j] = 0.0f;
                continue;
            }
            const float a = project_row(w, xs + r * d, j, d);
            const float h = hs[r], c = cs[r];
            switch (kind) {
                case KIND_POSITIVE: out[j] = ratio * (expf(a - h - c) + eps); break;
                case KIND_HYPERBOLIC:
                    out[j] = ratio * (expf(a - h - c) + eps);
                    out[m + j] = ratio * (expf(-a - h - c) + eps);
                    break;
                case KIND_TRIGONOMETRIC: {
                    const float scale = ratio * expf(h - c);
                    float s, co;
                    sincosf(a, &s, &co);
                    out[j] = scale * co;
                    out[m + j] = scale * s;
                    break;
                }
                case KIND_RELU: out[j] = fmaxf(a, 0.0f) + eps; break;
                case KIND_ELU_PLUS_ONE: out[j] = (a > 0.0f ? a + 1.0f : expf(a)) + eps; break;
                default: out[j] = softplus_f(a) + eps; break;
            }
        }
    }
}

// Shared-memory floats: xs[TOK·d], da[TOK·m], red[TOK·blockDim], hs[TOK], dh[TOK].
extern "C" __global__ void favor_features_bwd_f32(const float* __restrict__ x, i64 rows, int d,
                                                  const float* __restrict__ w, int m, int kind, float in_scale,
                                                  const float* __restrict__ c, const float* __restrict__ dphi,
                                                  int ld_dphi, const unsigned char* __restrict__ keep, int heads,
                                                  int len, float* __restrict__ dx) {
    FAVOR_DYNAMIC_SMEM(smem);
    const int nt = blockDim.x, tid = threadIdx.x;
    float* xs = smem;
    float* da = xs + TOK * d;
    float* red = da + TOK * m;
    float* hs = red + TOK * nt;
    float* dh = hs + TOK;
    const i64 r0 = (i64)blockIdx.x * TOK;

    for (int idx = tid; idx < TOK * d; idx += nt) {
        const i64 row = r0 + idx / d;
        xs[idx] = row < rows ? x[row * d + idx % d] * in_scale : 0.0f;
    }
    __syncthreads();
    if (tid < TOK) {
        float h = 0.0f;
        for (int t = 0; t < d; ++t) h = fmaf(xs[tid * d + t], xs[tid * d + t], h);
        hs[tid] = 0.5f * h;
    }
    __syncthreads();

    const float ratio = 1.0f / sqrtf((float)(kind == KIND_HYPERBOLIC ? 2 * m : m));
    float dhl[TOK];
    for (int r = 0; r < TOK; ++r) dhl[r] = 0.0f;
    for (int j = tid; j < m; j += nt) {
        for (int r = 0; r < TOK; ++r) {
            const i64 row = r0 + r;
            float g = 0.0f;
            if (row >= rows) {
                da[r * m + j] = 0.0f;
                continue;
            }
            const float* gr = dphi + row * ld_dphi;
            const float a = project_row(w, xs + r * d, j, d);
            const float h = hs[r];
            const float cr = is_exp_kind(kind) ? c[row] : 0.0f;
            switch (kind) {
                case KIND_POSITIVE:
                    g = gr[j] * ratio * expf(a - h - cr);
                    dhl[r] -= g;
                    break;
                case KIND_HYPERBOLIC: {
                    const float plus = gr[j] * ratio * expf(a - h - cr);
                    const float minus = gr[m + j] * ratio * expf(-a - h - cr);
                    g = plus - minus;
                    dhl[r] -= plus + minus;
                    break;
                }
                case KIND_TRIGONOMETRIC: {
                    const float scale = ratio * expf(h - cr);
                    float s, co;
                    sincosf(a, &s, &co);
                    g = scale * (gr[m + j] * co - gr[j] * s);
                    dhl[r] += scale * (gr[j] * co + gr[m + j] * s);
                    break;
                }
                case KIND_RELU: g = a > 0.0f ? gr[j] : 0.0f; break;
                case KIND_ELU_PLUS_ONE: g = gr[j] * (a > 0.0f ? 1.0f : expf(a)); break;
                default: g = gr[j] * sigmoid_f(a); break;
            }
            da[r * m + j] = g;
        }
    }
    for (int r = 0; r < TOK; ++r) red[r * nt + tid] = dhl[r];
    __syncthreads();
    if (tid < TOK) {
        float s = 0.0f;
        for (int i = 0; i < nt; ++i) s += red[tid * nt + i];
        dh[tid] = s;
    }
    __syncthreads();

    for (int idx = tid; idx < TOK * d; idx += nt) {
        const int r = idx / d, t = idx % d;
        const i64 row = r0 + r;
        if (row >= rows) continue;
        float acc = 0.0f;
        if (row_kept(keep, row, heads, len)) {
            if (w == nullptr) {
                acc = da[r * m + t];
            } else {
                for (int j = 0; j < m; ++j) acc = fmaf(w[(i64)j * d + t], da[r * m + j], acc);
            }
            if (is_exp_kind(kind)) acc = fmaf(xs[idx], dh[r], acc);
            acc *= in_scale;
        }
        dx[row * d + t] = acc;
    }
}

#define STAB_THREADS 256

extern "C" __global__ void __launch_bounds__(STAB_THREADS)
favor_stabiliser_f32(const float* __restrict__ s, const unsigned char* __restrict__ keep, int heads, int len,
                     const float* __restrict__ c_init, int causal, float* __restrict__ c_out) {
    __shared__ float seg_max[STAB_THREADS];
    __shared__ float total;
    const int tid = threadIdx.x;
    const i64 bh = blockIdx.x;
    const i64 base = bh * len;
    const int seg = (len + STAB_THREADS - 1) / STAB_THREADS;
    const int lo = min(len, tid * seg), hi = min(len, lo + seg);

    float mx = -INFINITY;
    for (int l = lo; l < hi; ++l)
        if (row_kept(keep, base + l, heads, len)) mx = fmaxf(mx, s[base + l]);
    seg_max[tid] = mx;
    __syncthreads();
    if (tid == 0) {
        float run = (causal && c_init != nullptr) ? c_init[bh] : -INFINITY;
        for (int i = 0; i < STAB_THREADS; ++i) {
            const float v = seg_max[i];
            if (causal) seg_max[i] = run;
            run = fmaxf(run, v);
        }
        total = run;
    }
    __syncthreads();
    if (causal) {
        float run = seg_max[tid];
        for (int l = lo; l < hi; ++l) {
            if (row_kept(keep, base + l, heads, len)) run = fmaxf(run, s[base + l]);
            c_out[base + l] = run;
        }
    } else {
        for (int l = lo; l < hi; ++l) c_out[base + l] = total;
    }
}
