// Shared helpers of the favor kernels.
//
// Conventions (every kernel):
// * tensors are row-major; a "row" is one token of one (batch, head); rows of one (batch, head)
//   are contiguous, so row r belongs to head r / L and sequence position r % L;
// * offsets are 64-bit (long long): B·H·L·M overflows 32 bits at realistic sizes;
// * arithmetic, state and scratch are fp32, except the per-row scalars of the exponential maps
//   (h, log-scales, stabilisers: doubles); f16/bf16 appear only at the pack/unpack edges;
// * every thread index is bounds-checked against the real size (arbitrary L, d, d_v, M tails).
#pragma once
#ifndef FAVOR_EMULATOR
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// The block's dynamic shared memory as floats (the test emulator in emu/ provides its own).
#define FAVOR_DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif

typedef long long i64;

// Storage conversions (round-to-nearest-even on the way out, exact on the way in).
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Storage policy (favor-core's): a finite value beyond the storage type's range is stored as the
// largest finite value of its sign, never as ±∞ (NaN stays NaN: fminf/fmaxf would drop it).
__device__ __forceinline__ float clamp_finite(float x, float max) { return x > max ? max : (x < -max ? -max : x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return clamp_finite(x, 3.40282347e38f); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half_rn(clamp_finite(x, 65504.0f));
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    // 0x7f7f0000: bf16's largest finite value (3.3895314e38); beyond it rounding gives ∞.
    return __float2bfloat16_rn(clamp_finite(x, 3.38953139e38f));
}

// A denominator below 2^-40 of a query that sees a kept key is *at risk*: G/R may leave f32's
// range and R itself may have lost its precision to underflow, while the true result is finite.
// The kernels flag the row's (batch, head) and the host recomputes that head in f64, as the CPU
// backend does. `first_seen[bh]`: the first row of the head that sees a kept key (L: none).
#define FAVOR_RISK_DEN 9.094947017729282e-13f
__device__ __forceinline__ bool at_risk(float den, i64 row, int len, const int* first_seen) {
    return first_seen != nullptr && fabsf(den) < FAVOR_RISK_DEN && (int)(row % len) >= first_seen[row / len];
}

// exp(c_old − c_new) with 1 for equal values, so that −∞ − (−∞) (no key seen yet) is not NaN.
// Callers guarantee c_old ≤ c_new, so the result is in [0, 1]. The stabilisers are doubles: the
// difference is exact enough however large they are, then rounded once for the f32 exp.
__device__ __forceinline__ float decay(double c_old, double c_new) {
    return c_old == c_new ? 1.0f : expf((float)(c_old - c_new));
}

// Feature-map kinds, mirrored by `FeatureKind` in favor-cuda/src/kernels.rs.
enum FeatureKind : int {
    KIND_POSITIVE = 0,       // m^{-1/2}(exp(a − h − c) + ε·exp(s − c))
    KIND_HYPERBOLIC = 1,     // (2m)^{-1/2}[exp(±a − h − c) + ε·exp(s − c)]
    KIND_TRIGONOMETRIC = 2,  // m^{-1/2}[cos a, sin a]·exp(h − c)
    KIND_RELU = 3,           // max(a, 0) + κ
    KIND_ELU_PLUS_ONE = 4,   // elu(a) + 1 + κ
    KIND_SOFTPLUS = 5,       // ln(1 + e^a) + κ
};

__device__ __forceinline__ bool is_exp_kind(int kind) { return kind <= KIND_TRIGONOMETRIC; }

// ln(1 + e^y) without overflow, and its derivative σ(y).
__device__ __forceinline__ float softplus_f(float y) { return fmaxf(y, 0.0f) + log1pf(expf(-fabsf(y))); }
__device__ __forceinline__ float sigmoid_f(float y) {
    if (y >= 0.0f) return 1.0f / (1.0f + expf(-y));
    float e = expf(y);
    return e / (1.0f + e);
}
