// The CPU emulator's launcher (see cuda_emu.h): runs the real kernel sources.
#include "cuda_emu.h"

#include "../convert.cu"
#include "../features.cu"
#include "../bidirectional.cu"
#include "../causal.cu"

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <pthread.h>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace {

struct Block {
    std::barrier<>* bar;
    std::vector<std::barrier<>*> warps;
    std::vector<float> smem;
    std::vector<float> shuffle;
};

Block* g_block = nullptr;
thread_local long t_syncs = 0;

void* run_body(void* body) {
    (*static_cast<std::function<void()>*>(body))();
    return nullptr;
}

template <typename... A, size_t... I>
void call(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<A*>(p[I])...);
}

template <typename... A>
int run(void (*k)(A...), const unsigned* grid, const unsigned* block, size_t smem_bytes, void** params) {
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    if (block[1] != 1 || block[2] != 1 || block[0] == 0 || block[0] > 1024) return 2;
    const unsigned n = block[0];
    std::barrier<> bar(n);
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    Block blk;
    blk.bar = &bar;
    for (unsigned w = 0; w * 32 < n; ++w) {
        warp_bars.emplace_back(new std::barrier<>((std::ptrdiff_t)std::min(32u, n - w * 32)));
        blk.warps.push_back(warp_bars.back().get());
    }
    blk.smem.assign(smem_bytes / 4 + 1, NAN);
    blk.shuffle.assign(n, 0.0f);
    g_block = &blk;
    std::vector<long> syncs(n, 0);
    bool divergent = false;
    std::vector<std::function<void()>> bodies;
    for (unsigned t = 0; t < n; ++t) {
        bodies.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (unsigned z = 0; z < grid[2]; ++z)
                for (unsigned y = 0; y < grid[1]; ++y)
                    for (unsigned x = 0; x < grid[0]; ++x) {
                        blockIdx = dim3{x, y, z};
                        t_syncs = 0;
                        call(k, params, std::index_sequence_for<A...>{});
                        syncs[t] = t_syncs;
                        bar.arrive_and_wait();  // block end: everyone finished
                        if (t == 0) {
                            for (unsigned i = 1; i < n; ++i) divergent |= syncs[i] != syncs[0];
                            std::fill(blk.smem.begin(), blk.smem.end(), NAN);
                        }
                        bar.arrive_and_wait();  // next block starts with fresh shared memory
                    }
        });
    }
    // pthreads with small stacks: thousands of launches create threads, and the default 8 MB
    // stacks made mmap/munmap the emulator's main cost. The kernels need a few hundred bytes.
    std::vector<pthread_t> threads(n);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (unsigned t = 0; t < n; ++t) {
        if (pthread_create(&threads[t], &attr, run_body, &bodies[t]) != 0) std::abort();
    }
    pthread_attr_destroy(&attr);
    for (unsigned t = 0; t < n; ++t) pthread_join(threads[t], nullptr);
    g_block = nullptr;
    return divergent ? 3 : 0;
}

std::mutex g_launch;

}  // namespace

void __syncthreads() {
    ++t_syncs;
    g_block->bar->arrive_and_wait();
}

float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    const unsigned t = threadIdx.x, w = t / 32;
    g_block->shuffle[t] = v;
    g_block->warps[w]->arrive_and_wait();
    const float r = g_block->shuffle[w * 32 + ((t % 32) ^ (unsigned)lane_mask)];
    g_block->warps[w]->arrive_and_wait();
    return r;
}

float* favor_emu_dynamic_smem() { return g_block->smem.data(); }

#define FAVOR_EMU_KERNEL(name) \
    if (n == #name) return run(name, grid, block, smem, params);

// Runs kernel `name` synchronously. Returns 0 on success, 1 for an unknown name, 2 for an
// unsupported block shape, 3 when threads of a block passed different numbers of barriers.
extern "C" int favor_emu_launch(const char* name_c, const unsigned* grid, const unsigned* block, size_t smem,
                                void** params) {
    std::lock_guard<std::mutex> lock(g_launch);  // kernels keep __shared__ arrays in statics
    const std::string n(name_c);
    FAVOR_EMU_KERNEL(favor_pack_f32)
    FAVOR_EMU_KERNEL(favor_pack_f16)
    FAVOR_EMU_KERNEL(favor_pack_bf16)
    FAVOR_EMU_KERNEL(favor_unpack_f32)
    FAVOR_EMU_KERNEL(favor_unpack_f16)
    FAVOR_EMU_KERNEL(favor_unpack_bf16)
    FAVOR_EMU_KERNEL(favor_normalize_f32)
    FAVOR_EMU_KERNEL(favor_normalize_f16)
    FAVOR_EMU_KERNEL(favor_normalize_bf16)
    FAVOR_EMU_KERNEL(favor_cotangent_f32)
    FAVOR_EMU_KERNEL(favor_features_f32)
    FAVOR_EMU_KERNEL(favor_features_bwd_f32)
    FAVOR_EMU_KERNEL(favor_stabiliser_f32)
    FAVOR_EMU_KERNEL(favor_kv_reduce_f32)
    FAVOR_EMU_KERNEL(favor_kv_combine_f32)
    FAVOR_EMU_KERNEL(favor_kv_apply_f32)
    FAVOR_EMU_KERNEL(favor_causal_scan_f32)
    FAVOR_EMU_KERNEL(favor_state_c_update_f32)
    return 1;
}
