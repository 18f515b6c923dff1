// A CPU emulator of the small CUDA subset the favor kernels use, for testing them on machines
// without a GPU (favor-cuda feature `emulator`). One OS thread per CUDA thread of a block;
// blocks run one after another; __syncthreads is a barrier, __shfl_xor_sync a per-warp
// exchange. It checks that every thread of a block passes the same number of __syncthreads
// (a divergent barrier is a bug on a GPU too) and fills dynamic shared memory with NaN before
// each block, so a read of shared memory that no thread wrote shows up in the results.
// Not a race detector: compute-sanitizer racecheck on a GPU is.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FAVOR_EMULATOR 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

void __syncthreads();
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
float* favor_emu_dynamic_smem();
#define FAVOR_DYNAMIC_SMEM(name) float* name = favor_emu_dynamic_smem()

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

struct __half {
    _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = (uint32_t)b.bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (isnan(f)) return __nv_bfloat16{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}
