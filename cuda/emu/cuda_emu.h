// A CPU emulator of the small CUDA subset the favor kernels use, for testing them on machines
// without a GPU (favor-cuda feature `emulator`). One OS thread per CUDA thread of a block;
// blocks run one after another, in a seeded random order (FAVOR_EMU_SEED); __syncthreads is a
// barrier, the warp shuffles a per-warp exchange. It rejects what a GPU rejects at launch: more
// threads than the kernel's __launch_bounds__, or dynamic + static shared memory above the 48 KB
// available without opt-in. It checks that every thread of a block passes the same number of
// __syncthreads (a divergent barrier is a bug on a GPU too) and that a shuffle names and reads
// only lanes that exist and are in its mask, and it fills dynamic and static shared memory with
// NaN before each block, so a read of shared memory that no thread of the block wrote shows up
// in the results.
// Not a race detector: compute-sanitizer racecheck on a GPU is. Every live lane of a warp must
// take part in a shuffle (as in the kernels), otherwise the emulated warp waits forever.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FAVOR_EMULATOR 1
#define __global__
#define __device__
#define __forceinline__ inline
// The bounds are read from the sources by favor-cuda/build.rs (emu_kernels.inc) and enforced at
// launch.
#define __launch_bounds__(x)
// Every static __shared__ variable lives in one section, which the launcher fills with NaN
// before each block (the linker provides __start_/__stop_ symbols for it).
#define __shared__ __attribute__((section("favor_emu_shared"))) static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

void __syncthreads();
float __shfl_sync(unsigned mask, float v, int src_lane);
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
