// Edge kernels: storage dtype <-> fp32 scratch, the normalisation out = N / R, and the
// cotangents of the backward pass.
//
// Data flow of one attention call (host side in favor-cuda/src/ops.rs):
//   Q, K, V (dtype) --pack--> fp32 rows;  V gets an appended ones column: V1 = [V 1]
//   ... features / attention kernels produce O1 = [N R] (fp32, rows × (d_v + 1)) ...
//   O1 --normalize--> out (dtype) and the guarded denominators R (fp32, for the backward)
//   dO (dtype) --pack--> G;  (G, O1) --cotangent--> G1 = [G/R, −<G, out>/R]  (rows × (d_v + 1))
//
// One thread per element; grid-stride loops so any row count works.
//
// The kernels that touch the caller's tensors (pack, unpack, normalize) read and write them in
// the caller's layout: row r = (b·heads + h)·len + t starts at element b·bs + (h / group)·hs +
// t·ts (the row's elements contiguous), so [B, L, H, d] and packed QKV tensors are used in
// place. `group` > 1 packs the key/value head h / group for each of `heads` query heads
// (grouped-query attention); unpack sums such a group's rows back into one.
#include "common.cuh"

// First element of row r of a strided tensor (see above).
__device__ __forceinline__ i64 row_at(i64 r, i64 len, i64 heads, i64 group, i64 bs, i64 hs, i64 ts) {
    const i64 bh = r / len;
    return (bh / heads) * bs + ((bh % heads) / group) * hs + (r % len) * ts;
}
#define FAVOR_ROWS_PARAMS i64 len, i64 heads, i64 group, i64 bs, i64 hs, i64 ts
#define FAVOR_ROWS_ARGS len, heads, group, bs, hs, ts

// dst[r, 0..n) = src[r, 0..n) widened; dst[r, n] = 1 when `ones` (the normaliser column).
template <typename T>
__device__ void pack(const T* __restrict__ src, i64 rows, int n, float* __restrict__ dst, int ld, int ones,
                     FAVOR_ROWS_PARAMS) {
    const int width = n + (ones ? 1 : 0);
    const i64 total = rows * width;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / width;
        const int e = (int)(idx % width);
        dst[r * ld + e] = e < n ? to_f32(src[row_at(r, FAVOR_ROWS_ARGS) + e]) : 1.0f;
    }
}

// dst[r, 0..n) = the sum of the `sums` source rows (bh·sums + j)·len + t, j = 0..sums (bh = r /
// len, t = r % len), in order, rounded to T: one row per head (sums = 1), or a key/value head's
// gradient summed over its query heads, which are consecutive.
template <typename T>
__device__ void unpack(const float* __restrict__ src, int ld, i64 rows, int n, T* __restrict__ dst, int sums,
                       FAVOR_ROWS_PARAMS) {
    const i64 total = rows * n;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / n;
        const int e = (int)(idx % n);
        const i64 first = (r / len) * sums * len + r % len;
        float acc = 0.0f;
        for (int j = 0; j < sums; ++j) acc += src[(first + j * len) * ld + e];
        dst[row_at(r, FAVOR_ROWS_ARGS) + e] = from_f32<T>(acc);
    }
}

// Guarded denominator: |R| ≤ δ becomes R + 2δ (favor-core's rule).
__device__ __forceinline__ float guard(float r, float delta) {
    return (delta > 0.0f && fabsf(r) <= delta) ? r + 2.0f * delta : r;
}

// out[r, e] = N[r, e] / R[r] with R = guard(O1[r, dv]); a zero denominator gives a zero row.
// Writes the guarded R to r_out when it is not null. Rows at risk (see at_risk; tracked when
// first_seen is not null) set risk[head]; their quotient is formed in double, so it stays
// finite (|N| ≤ |R|·max|v| for non-negative features) whether or not the host replaces it.
template <typename T>
__device__ void normalize(const float* __restrict__ o1, i64 rows, int dv, float delta, T* __restrict__ out,
                          float* __restrict__ r_out, const int* __restrict__ first_seen, int len,
                          int* __restrict__ risk, i64 out_len, i64 heads, i64 group, i64 bs, i64 hs, i64 ts) {
    const i64 total = rows * dv;
    for (i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 r = idx / dv;
        const int e = (int)(idx % dv);
        const float den = guard(o1[r * (dv + 1) + dv], delta);
        const float num = o1[r * (dv + 1) + e];
        const bool tiny = fabsf(den) < FAVOR_RISK_DEN;
        const float q = den == 0.0f ? 0.0f : (tiny ? (float)((double)num / (double)den) : num / den);
        out[row_at(r, out_len, heads, group, bs, hs, ts) + e] = from_f32<T>(q);
        if (e == 0 && r_out != nullptr) r_out[r] = den;
        // Every writer stores the same value: the race is benign.
        if (e == 0 && at_risk(den, r, len, first_seen)) risk[r / len] = 1;
    }
}

#define FAVOR_EDGE_KERNELS(NAME, T)                                                                         \
    extern "C" __global__ void favor_pack_##NAME(const T* src, i64 rows, int n, float* dst, int ld, int ones, \
                                                 FAVOR_ROWS_PARAMS) {                                      \
        pack<T>(src, rows, n, dst, ld, ones, FAVOR_ROWS_ARGS);                                             \
    }                                                                                                      \
    extern "C" __global__ void favor_unpack_##NAME(const float* src, int ld, i64 rows, int n, T* dst,      \
                                                   int sums, FAVOR_ROWS_PARAMS) {                          \
        unpack<T>(src, ld, rows, n, dst, sums, FAVOR_ROWS_ARGS);                                           \
    }                                                                                                      \
    extern "C" __global__ void favor_normalize_##NAME(const float* o1, i64 rows, int dv, float delta, T* out, \
                                                      float* r_out, const int* first_seen, int len,        \
                                                      int* risk, i64 out_len, i64 heads, i64 group,        \
                                                      i64 bs, i64 hs, i64 ts) {                            \
        normalize<T>(o1, rows, dv, delta, out, r_out, first_seen, len, risk, out_len, heads, group, bs, hs, ts); \
    }

FAVOR_EDGE_KERNELS(f32, float)
FAVOR_EDGE_KERNELS(f16, __half)
FAVOR_EDGE_KERNELS(bf16, __nv_bfloat16)

// G1[r] = [G[r]/R, −<G[r], out[r]>/R] with out = N/R, R = guard(O1[r, dv]); zero when R == 0
// (the output row is defined as zero there and has zero gradient). One warp per row.
// invariant[r] (when not null) = 1 where the guard did not fire: that query's output does not
// depend on the scale of its features (the feature backward then drops the scale's cotangent).
// Rows with |R| < 2^-40 get zero cotangents (G/R could overflow); those that are at risk (when
// first_seen is not null) set risk[head], and the host recomputes that head in f64.
//
// The dot product is reduced over the lanes that exist: a block whose size is not a multiple of
// 32 ends in a partial warp, whose missing lanes must be neither named in the shuffle mask nor
// read. Lanes add the partner `off` above them only when it exists (a tree towards lane 0, the
// only lane that uses the sum), so every lane reads only live lanes' registers; the columns
// are strided by the live lane count so a partial warp still covers the whole row.
extern "C" __global__ void favor_cotangent_f32(const float* __restrict__ g, const float* __restrict__ o1, i64 rows,
                                               int dv, float delta, float* __restrict__ g1,
                                               unsigned char* __restrict__ invariant,
                                               const int* __restrict__ first_seen, int len, int* __restrict__ risk) {
    const int lane = threadIdx.x & 31;
    const int warp_base = (int)(threadIdx.x & ~31u);
    const int live = min(32, (int)blockDim.x - warp_base);
    const unsigned mask = live == 32 ? 0xffffffffu : (1u << live) - 1u;
    const i64 warps = (i64)gridDim.x * ((blockDim.x + 31) / 32);
    for (i64 r = blockIdx.x * (i64)((blockDim.x + 31) / 32) + threadIdx.x / 32; r < rows; r += warps) {
        const float raw_den = guard(o1[r * (dv + 1) + dv], delta);
        // A tiny denominator's cotangents are left to the f64 recomputation (zero here).
        const float den = fabsf(raw_den) < FAVOR_RISK_DEN ? 0.0f : raw_den;
        float dot = 0.0f;
        for (int e = lane; e < dv; e += live) {
            const float out = den == 0.0f ? 0.0f : o1[r * (dv + 1) + e] / den;
            dot += g[r * dv + e] * out;
        }
        for (int off = 16; off > 0; off >>= 1) {
            // Lanes off..31 of this step hand down; a source beyond `live` does not exist.
            const int src = lane + off < live ? lane + off : lane;
            const float other = __shfl_sync(mask, dot, src);
            if (lane + off < live) dot += other;
        }
        for (int e = lane; e < dv; e += live) g1[r * (dv + 1) + e] = den == 0.0f ? 0.0f : g[r * dv + e] / den;
        if (lane == 0) {
            g1[r * (dv + 1) + dv] = den == 0.0f ? 0.0f : -dot / den;
            const float raw = o1[r * (dv + 1) + dv];
            if (invariant != nullptr) invariant[r] = (delta > 0.0f && fabsf(raw) <= delta) ? 0 : 1;
            if (at_risk(raw_den, r, len, first_seen)) risk[r / len] = 1;
        }
    }
}

// Rows the f32 kernels cannot carry: their (batch, head) is flagged (flags[r / len] = 1) when
// the row's largest |x| is non-finite, beyond `hi`, or non-zero and below `lo`; the host then
// recomputes that head in f64 (see favor-cuda/src/ops.rs). Run on the packed inputs (an entry
// beyond 2^24 could overflow the projection or its gradient) and, for the maps without a
// built-in stabiliser, on the features (sums and cotangents stay in range for features in
// [2^-24, 2^24]). One thread per row: only rows × n reads, next to the kernels' rows × n × m.
extern "C" __global__ void favor_flag_wide_f32(const float* __restrict__ x, i64 rows, int n, int len, float lo,
                                               float hi, int* __restrict__ flags) {
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < rows; r += (i64)gridDim.x * blockDim.x) {
        float mx = 0.0f;
        bool finite = true;
        for (int e = 0; e < n; ++e) {
            const float a = fabsf(x[r * n + e]);
            finite = finite && a <= 3.40282347e38f;  // false for ±∞ and NaN
            mx = fmaxf(mx, a);
        }
        // Every writer stores the same value: the race is benign.
        if (!finite || mx > hi || (mx != 0.0f && mx < lo)) flags[r / len] = 1;
    }
}
