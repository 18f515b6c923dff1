// Kernels that exist only to test the emulator itself (favor-cuda/src/emulator.rs tests): each
// one trips one of its checks. Not part of the GPU build (build.rs compiles cuda/*.cu only).
#include "../common.cuh"

// Thread 0 reads a static shared cell before writing it: every block must read the poison.
extern "C" __global__ void favor_emu_test_static_smem(float* __restrict__ out) {
    __shared__ float cell;
    if (threadIdx.x == 0) {
        out[blockIdx.x] = cell;
        cell = 1.0f;
    }
}

// Records the order blocks ran in: out[i] = linear index of the i-th block (blocks run one at
// a time in the emulator, so the counter needs no atomics there).
extern "C" __global__ void favor_emu_test_block_order(unsigned* __restrict__ out, unsigned* __restrict__ counter) {
    if (threadIdx.x == 0) out[(*counter)++] = blockIdx.x + gridDim.x * blockIdx.y;
}

#define EMU_TEST_BOUND 64

extern "C" __global__ void __launch_bounds__(EMU_TEST_BOUND) favor_emu_test_bounded(float* __restrict__ out) {
    if (threadIdx.x == 0) out[blockIdx.x] = 1.0f;
}

// 32 KB of static shared memory: with more than 16 KB of dynamic memory the block does not fit.
extern "C" __global__ void favor_emu_test_big_static(float* __restrict__ out) {
    __shared__ float big[8192];
    big[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = big[blockDim.x - 1];
}

// The full-warp xor butterfly, which is wrong for a partial warp: its lanes read lanes past the
// end of the block. out[w] = the sum lane 0 of warp w sees.
extern "C" __global__ void favor_emu_test_xor_reduce(const float* __restrict__ x, float* __restrict__ out) {
    float v = x[threadIdx.x];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if ((threadIdx.x & 31) == 0) out[threadIdx.x / 32] = v;
}
