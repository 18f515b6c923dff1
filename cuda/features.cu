// Feature maps φ (forward and backward) and the key stabilisers, on fp32 rows.
//
// Notation (favor-core/src/features): x̃ = in_scale·x (√τ·x for the exponential maps, with τ
// the softmax scale, 1/√d by default; the map's scale for the generalized ones), a_j = w_jᵀx̃
// (or a = x̃ without a projection), h = ‖x̃‖²/2, s = the row's log-scale (max_j a_j − h;
// max_j |a_j| − h for hyperbolic; h for trigonometric), c = the row's stabiliser (c ≥ s).
// φ_j = ratio·(e^{a_j − h − c} + ε·e^{s − c}):
// the ε floor is relative to the token's own largest feature, so attention does not depend on c.
//
// Precision: the per-row scalars h, s and c are doubles (h = hcoef·Σx², hcoef = in_scale²/2
// from the host in f64), so they keep their accuracy however large the input is. The exp
// arguments are a_j − shift with an f32 shift ≥ max_j a_j (resp. max |a_j|) by construction:
// shift = max a when c = s (a query: h cancels and is never formed), else h + c rounded up to f32
// and at least max a. Every exp argument is therefore ≤ 0.
//
// Data flow of `favor_features_f32` (TOK rows per block, W read through L1/L2):
//   x rows --(×in_scale)--> smem x̃;  h per row (double, from x)
//   exponential maps: pass 1 over the m projections: running max of a (|a| for hyperbolic) per
//             row, block max --> s; mode 2 writes s and stops; mode 0 uses c = s (queries),
//             mode 1 reads c from c_in (keys: shared or running maximum, favor_stabiliser_f32)
//   per row: shift and floor = ratio·ε·e^{s − c} (trigonometric: factor ratio·e^{h − c})
//   pass 2 over the projections: a again, φ in registers, written to fp32 rows (ld_phi apart);
//   padded keys (keep[b, l] == 0) get φ = 0.
//
// `favor_features_bwd_f32`: pass 1 recomputes s with its arg-max j* (first on ties); pass 2 puts
// da per projection in shared memory, with the h-cotangent dh and Σ_j ∂ℒ/∂φ_j reduced
// deterministically over the block; the floor adds ∂ℒ/∂s = floor·Σ_j ∂ℒ/∂φ_j to da_{j*} (with
// the sign of a_{j*} for hyperbolic) and −∂ℒ/∂s to dh. Then dx = in_scale·(Wᵀda + x̃·dh). c is
// a constant (exact: attention does not depend on it). Rows flagged in `invariant` (queries
// whose denominator guard did not fire: their output does not depend on their feature scale)
// drop the dh term, which is zero in exact arithmetic and only cancellation noise in f32.
// Padded rows get dx = 0.
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

// The smallest float ≥ x (x finite or −∞).
__device__ __forceinline__ float round_up_f32(double x) {
    const float f = (float)x;
    return (double)f < x ? nextafterf(f, INFINITY) : f;
}

// The per-row scalars every thread of a feature block reads (shared memory).
struct RowScalars {
    double* h;    // ‖x̃‖²/2
    float* amax;  // max_j a_j (|a_j| for hyperbolic)
    float* shift; // exponent shift (exponential maps)
    float* floor; // ratio·ε·e^{s − c} (positive, hyperbolic) or ratio·e^{h − c} (trigonometric)
};

// Carves the shared memory of a feature block: the row scalars first (8-byte aligned), then
// the float arrays the caller takes from the returned pointer.
__device__ __forceinline__ float* carve_rows(float* smem, RowScalars& r) {
    double* dbl = reinterpret_cast<double*>(smem);
    r.h = dbl;
    float* f = reinterpret_cast<float*>(dbl + TOK);
    r.amax = f;
    r.shift = f + TOK;
    r.floor = f + 2 * TOK;
    return f + 3 * TOK;
}

// x̃ rows into xs and h per row (double, from the unscaled inputs).
__device__ __forceinline__ void load_rows(const float* __restrict__ x, i64 r0, i64 rows, int d, float in_scale,
                                          double hcoef, float* xs, RowScalars& r) {
    const int nt = blockDim.x, tid = threadIdx.x;
    for (int idx = tid; idx < TOK * d; idx += nt) {
        const i64 row = r0 + idx / d;
        xs[idx] = row < rows ? x[row * d + idx % d] * in_scale : 0.0f;
    }
    if (tid < TOK) {
        double h = 0.0;
        const i64 row = r0 + tid;
        if (row < rows)
            for (int t = 0; t < d; ++t) {
                const double v = x[row * d + t];
                h = fma(v, v, h);
            }
        r.h[tid] = hcoef * h;
    }
    __syncthreads();
}

// Shift and floor of row `i` from h, s, c (thread-local; the caller writes them to shared memory).
__device__ __forceinline__ void row_exp(int kind, float ratio, float eps, double h, double s, double c, float amax,
                                        float* shift, float* floor) {
    if (kind == KIND_TRIGONOMETRIC) {
        *shift = 0.0f;
        *floor = (float)((double)ratio * exp(fmin(h - c, 0.0)));
        return;
    }
    // A query (c = s) is shifted by its own largest projection: h cancels.
    *shift = c == s ? amax : round_up_f32(fmax(h + c, (double)amax));
    *floor = (float)((double)ratio * (double)eps * exp(fmin(s - c, 0.0)));
}

// Shared-memory layout: RowScalars (TOK doubles, 3·TOK floats), xs[TOK·d], red[TOK·blockDim].
extern "C" __global__ void favor_features_f32(const float* __restrict__ x, i64 rows, int d,
                                              const float* __restrict__ w, int m, int kind, float in_scale,
                                              double hcoef, float eps, int mode, const double* __restrict__ c_in,
                                              double* __restrict__ c_out, const unsigned char* __restrict__ keep,
                                              int heads, int len, float* __restrict__ phi, int ld_phi) {
    FAVOR_DYNAMIC_SMEM(smem);
    const int nt = blockDim.x, tid = threadIdx.x;
    RowScalars rs;
    float* xs = carve_rows(smem, rs);
    float* red = xs + TOK * d;
    const i64 r0 = (i64)blockIdx.x * TOK;
    load_rows(x, r0, rows, d, in_scale, hcoef, xs, rs);

    const bool exp_kind = is_exp_kind(kind);
    const float ratio = 1.0f / sqrtf((float)(kind == KIND_HYPERBOLIC ? 2 * m : m));
    if (exp_kind) {
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
            const i64 row = r0 + tid;
            float amax = 0.0f;
            double s = rs.h[tid];
            if (kind != KIND_TRIGONOMETRIC) {
                amax = -INFINITY;
                for (int i = 0; i < nt; ++i) amax = fmaxf(amax, red[tid * nt + i]);
                s = (double)amax - rs.h[tid];
            }
            if (c_out != nullptr && row < rows) c_out[row] = s;
            const double c = mode == 1 ? (row < rows ? c_in[row] : s) : s;
            float shift, floor;
            row_exp(kind, ratio, eps, rs.h[tid], s, c, amax, &shift, &floor);
            rs.shift[tid] = shift;
            rs.floor[tid] = floor;
        }
        __syncthreads();
        if (mode == 2) return;
    }

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
            switch (kind) {
                case KIND_POSITIVE: out[j] = fmaf(ratio, expf(a - rs.shift[r]), rs.floor[r]); break;
                case KIND_HYPERBOLIC:
                    out[j] = fmaf(ratio, expf(a - rs.shift[r]), rs.floor[r]);
                    out[m + j] = fmaf(ratio, expf(-a - rs.shift[r]), rs.floor[r]);
                    break;
                case KIND_TRIGONOMETRIC: {
                    float sn, co;
                    sincosf(a, &sn, &co);
                    out[j] = rs.floor[r] * co;
                    out[m + j] = rs.floor[r] * sn;
                    break;
                }
                case KIND_RELU: out[j] = fmaxf(a, 0.0f) + eps; break;
                case KIND_ELU_PLUS_ONE: out[j] = (a > 0.0f ? a + 1.0f : expf(a)) + eps; break;
                default: out[j] = softplus_f(a) + eps; break;
            }
        }
    }
}

// Sum over the block of one float per (row, thread), in a fixed order (deterministic). Every
// thread calls it; the sums land in out[0..TOK).
__device__ __forceinline__ void block_row_sums(const float* vals, float* red, float* out) {
    const int nt = blockDim.x, tid = threadIdx.x;
    for (int r = 0; r < TOK; ++r) red[r * nt + tid] = vals[r];
    __syncthreads();
    if (tid < TOK) {
        float s = 0.0f;
        for (int i = 0; i < nt; ++i) s += red[tid * nt + i];
        out[tid] = s;
    }
    __syncthreads();
}

// Shared-memory layout: RowScalars, xs[TOK·d], da[TOK·m], red[TOK·blockDim], dh[TOK], gs[TOK],
// star[TOK] (the arg-max projection, as a float: m < 2^24).
extern "C" __global__ void favor_features_bwd_f32(const float* __restrict__ x, i64 rows, int d,
                                                  const float* __restrict__ w, int m, int kind, float in_scale,
                                                  double hcoef, float eps, const double* __restrict__ c,
                                                  const unsigned char* __restrict__ invariant,
                                                  const float* __restrict__ dphi, int ld_dphi,
                                                  const unsigned char* __restrict__ keep, int heads, int len,
                                                  float* __restrict__ dx) {
    FAVOR_DYNAMIC_SMEM(smem);
    const int nt = blockDim.x, tid = threadIdx.x;
    RowScalars rs;
    float* xs = carve_rows(smem, rs);
    float* da = xs + TOK * d;
    float* red = da + TOK * m;
    float* dh = red + TOK * nt;
    float* gs = dh + TOK;
    float* star = gs + TOK;
    const i64 r0 = (i64)blockIdx.x * TOK;
    load_rows(x, r0, rows, d, in_scale, hcoef, xs, rs);

    const float ratio = 1.0f / sqrtf((float)(kind == KIND_HYPERBOLIC ? 2 * m : m));
    const bool floored = kind == KIND_POSITIVE || kind == KIND_HYPERBOLIC;
    if (is_exp_kind(kind)) {
        // s and its arg-max: each thread's first maximum over its projections, the block max,
        // then the smallest index attaining it.
        float mx[TOK];
        int mi[TOK];
        for (int r = 0; r < TOK; ++r) {
            mx[r] = -INFINITY;
            mi[r] = m;
        }
        if (floored)
            for (int j = tid; j < m; j += nt)
                for (int r = 0; r < TOK; ++r) {
                    const float a = project_row(w, xs + r * d, j, d);
                    const float v = kind == KIND_HYPERBOLIC ? fabsf(a) : a;
                    if (v > mx[r]) {
                        mx[r] = v;
                        mi[r] = j;
                    }
                }
        for (int r = 0; r < TOK; ++r) red[r * nt + tid] = mx[r];
        __syncthreads();
        if (tid < TOK) {
            float amax = -INFINITY;
            for (int i = 0; i < nt; ++i) amax = fmaxf(amax, red[tid * nt + i]);
            rs.amax[tid] = amax;
        }
        __syncthreads();
        for (int r = 0; r < TOK; ++r) red[r * nt + tid] = mx[r] == rs.amax[r] ? (float)mi[r] : (float)m;
        __syncthreads();
        if (tid < TOK) {
            const i64 row = r0 + tid;
            float first = (float)m;
            for (int i = 0; i < nt; ++i) first = fminf(first, red[tid * nt + i]);
            star[tid] = first;
            const double s = floored ? (double)rs.amax[tid] - rs.h[tid] : rs.h[tid];
            const double cr = row < rows ? c[row] : s;
            float shift, floor;
            row_exp(kind, ratio, eps, rs.h[tid], s, cr, floored ? rs.amax[tid] : 0.0f, &shift, &floor);
            rs.shift[tid] = shift;
            rs.floor[tid] = floor;
        }
        __syncthreads();
    }

    float dhl[TOK], gsl[TOK];
    for (int r = 0; r < TOK; ++r) dhl[r] = gsl[r] = 0.0f;
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
            switch (kind) {
                case KIND_POSITIVE:
                    g = gr[j] * ratio * expf(a - rs.shift[r]);
                    dhl[r] -= g;
                    gsl[r] += gr[j];
                    break;
                case KIND_HYPERBOLIC: {
                    const float plus = gr[j] * ratio * expf(a - rs.shift[r]);
                    const float minus = gr[m + j] * ratio * expf(-a - rs.shift[r]);
                    g = plus - minus;
                    dhl[r] -= plus + minus;
                    gsl[r] += gr[j] + gr[m + j];
                    break;
                }
                case KIND_TRIGONOMETRIC: {
                    const float scale = rs.floor[r];
                    float sn, co;
                    sincosf(a, &sn, &co);
                    g = scale * (gr[m + j] * co - gr[j] * sn);
                    dhl[r] += scale * (gr[j] * co + gr[m + j] * sn);
                    break;
                }
                case KIND_RELU: g = a > 0.0f ? gr[j] : 0.0f; break;
                case KIND_ELU_PLUS_ONE: g = gr[j] * (a > 0.0f ? 1.0f : expf(a)); break;
                default: g = gr[j] * sigmoid_f(a); break;
            }
            da[r * m + j] = g;
        }
    }
    block_row_sums(dhl, red, dh);
    block_row_sums(gsl, red, gs);
    if (floored && tid < TOK && r0 + tid < rows) {
        // ∂ℒ/∂s through the ε floor: to a_{j*} (with its sign for hyperbolic) and to −h.
        const int j = (int)star[tid];
        const float ds = rs.floor[tid] * gs[tid];
        if (j < m) {
            const float sign = kind == KIND_HYPERBOLIC && project_row(w, xs + tid * d, j, d) < 0.0f ? -1.0f : 1.0f;
            da[tid * m + j] += sign * ds;
        }
        dh[tid] -= ds;
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
            const bool scale_free = invariant != nullptr && invariant[row] != 0;
            if (is_exp_kind(kind) && !scale_free) acc = fmaf(xs[idx], dh[r], acc);
            acc *= in_scale;
        }
        dx[row * d + t] = acc;
    }
}

#define STAB_THREADS 256

extern "C" __global__ void __launch_bounds__(STAB_THREADS)
favor_stabiliser_f32(const double* __restrict__ s, const unsigned char* __restrict__ keep, int heads, int len,
                     const double* __restrict__ c_init, int causal, double* __restrict__ c_out) {
    __shared__ double seg_max[STAB_THREADS];
    __shared__ double total;
    const int tid = threadIdx.x;
    const i64 bh = blockIdx.x;
    const i64 base = bh * len;
    const int seg = (len + STAB_THREADS - 1) / STAB_THREADS;
    const int lo = min(len, tid * seg), hi = min(len, lo + seg);

    double mx = -INFINITY;
    for (int l = lo; l < hi; ++l)
        if (row_kept(keep, base + l, heads, len)) mx = fmax(mx, s[base + l]);
    seg_max[tid] = mx;
    __syncthreads();
    if (tid == 0) {
        double run = (causal && c_init != nullptr) ? c_init[bh] : -INFINITY;
        for (int i = 0; i < STAB_THREADS; ++i) {
            const double v = seg_max[i];
            if (causal) seg_max[i] = run;
            run = fmax(run, v);
        }
        total = run;
    }
    __syncthreads();
    if (causal) {
        double run = seg_max[tid];
        for (int l = lo; l < hi; ++l) {
            if (row_kept(keep, base + l, heads, len)) run = fmax(run, s[base + l]);
            c_out[base + l] = run;
        }
    } else {
        for (int l = lo; l < hi; ++l) c_out[base + l] = total;
    }
}
