// The CPU emulator's launcher (see cuda_emu.h): runs the real kernel sources.
#include "cuda_emu.h"

#include "../convert.cu"
#include "../features.cu"
#include "../bidirectional.cu"
#include "../causal.cu"
#include "selftest.cu"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// Bounds of the static __shared__ section (weak: absent when no kernel declares one).
extern "C" char __start_favor_emu_shared[] __attribute__((weak));
extern "C" char __stop_favor_emu_shared[] __attribute__((weak));

namespace {

// What a launch may use without opting in, on sm_80 and sm_90 alike.
constexpr size_t SMEM_LIMIT = 48 * 1024;

// Launch results (mirrored in favor-cuda/src/emulator.rs).
enum : int {
    EMU_OK = 0,
    EMU_UNKNOWN = 1,
    EMU_BLOCK_SHAPE = 2,
    EMU_DIVERGENT = 3,
    EMU_BAD_SHUFFLE = 4,
    EMU_LAUNCH_BOUNDS = 5,
    EMU_SMEM_LIMIT = 6,
};

// Per-kernel facts read from the sources by build.rs: the __launch_bounds__ (0 = none) and the
// bytes of static __shared__ variables declared in the kernel's body.
struct KernelInfo {
    const char* name;
    unsigned max_threads;
    size_t static_smem;
};
#define FAVOR_EMU_KERNEL_INFO(name, bound, smem) {name, (unsigned)(bound), (size_t)(smem)},
const KernelInfo KERNEL_INFO[] = {
#include "emu_kernels.inc"
};

struct Block {
    std::barrier<>* bar;
    std::vector<std::barrier<>*> warps;
    std::vector<float> smem;
    std::vector<float> shuffle;  // one slot per lane of whole warps; missing lanes stay NaN
    unsigned threads;
    std::atomic<bool> bad_shuffle{false};
};

Block* g_block = nullptr;
thread_local long t_syncs = 0;

void poison_static_smem() {
    if (__start_favor_emu_shared != nullptr && __stop_favor_emu_shared != nullptr)
        std::memset(__start_favor_emu_shared, 0xFF, (size_t)(__stop_favor_emu_shared - __start_favor_emu_shared));
}

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The block order of one launch: a permutation drawn from FAVOR_EMU_SEED and the launch's name
// and shape, so a run is reproducible whatever order the tests' launches interleave in.
std::vector<dim3> block_order(const std::string& name, const unsigned* grid, size_t smem) {
    static const uint64_t seed = [] {
        const char* s = std::getenv("FAVOR_EMU_SEED");
        return s != nullptr ? std::strtoull(s, nullptr, 0) : 0x5eedfa7012ull;
    }();
    uint64_t state = seed;
    for (char c : name) state = state * 1099511628211ull ^ (unsigned char)c;
    state ^= ((uint64_t)grid[0] << 40) ^ ((uint64_t)grid[1] << 20) ^ grid[2] ^ (smem << 7);
    std::vector<dim3> order;
    order.reserve((size_t)grid[0] * grid[1] * grid[2]);
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) order.push_back(dim3{x, y, z});
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[splitmix(state) % i]);
    return order;
}

void* run_body(void* body) {
    (*static_cast<std::function<void()>*>(body))();
    return nullptr;
}

template <typename... A, size_t... I>
void call(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<A*>(p[I])...);
}

template <typename... A>
int run(void (*k)(A...), const std::string& name, const unsigned* grid, const unsigned* block, size_t smem_bytes,
        void** params) {
    if (block[1] != 1 || block[2] != 1 || block[0] == 0 || block[0] > 1024) return EMU_BLOCK_SHAPE;
    for (const KernelInfo& info : KERNEL_INFO) {
        if (name != info.name) continue;
        if (info.max_threads != 0 && block[0] > info.max_threads) return EMU_LAUNCH_BOUNDS;
        if (smem_bytes + info.static_smem > SMEM_LIMIT) return EMU_SMEM_LIMIT;
    }
    if (smem_bytes > SMEM_LIMIT) return EMU_SMEM_LIMIT;
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    const unsigned n = block[0];
    const std::vector<dim3> order = block_order(name, grid, smem_bytes);
    std::barrier<> bar(n);
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    Block blk;
    blk.bar = &bar;
    blk.threads = n;
    for (unsigned w = 0; w * 32 < n; ++w) {
        warp_bars.emplace_back(new std::barrier<>((std::ptrdiff_t)std::min(32u, n - w * 32)));
        blk.warps.push_back(warp_bars.back().get());
    }
    blk.smem.assign(smem_bytes / 4 + 1, NAN);
    blk.shuffle.assign((size_t)blk.warps.size() * 32, NAN);
    poison_static_smem();
    g_block = &blk;
    std::vector<long> syncs(n, 0);
    bool divergent = false;
    std::vector<std::function<void()>> bodies;
    for (unsigned t = 0; t < n; ++t) {
        bodies.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (const dim3& b : order) {
                blockIdx = b;
                t_syncs = 0;
                call(k, params, std::index_sequence_for<A...>{});
                syncs[t] = t_syncs;
                bar.arrive_and_wait();  // block end: everyone finished
                if (t == 0) {
                    for (unsigned i = 1; i < n; ++i) divergent |= syncs[i] != syncs[0];
                    std::fill(blk.smem.begin(), blk.smem.end(), NAN);
                    poison_static_smem();
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
    if (blk.bad_shuffle.load()) return EMU_BAD_SHUFFLE;
    return divergent ? EMU_DIVERGENT : EMU_OK;
}

// One warp exchange: every live lane publishes `v`, then reads lane `src`. A lane that names a
// missing lane in `mask`, is not in `mask` itself, or reads a lane that is missing or outside
// `mask` gets NaN and fails the launch: on a GPU that is undefined behaviour, and in a partial
// warp the missing lanes are past the end of the block.
float shuffle(unsigned mask, float v, unsigned src) {
    Block& blk = *g_block;
    const unsigned t = threadIdx.x, w = t / 32, lane = t % 32;
    const unsigned live = std::min(32u, blk.threads - w * 32);
    const unsigned live_mask = live == 32 ? 0xffffffffu : (1u << live) - 1u;
    blk.shuffle[t] = v;
    blk.warps[w]->arrive_and_wait();
    const bool ok = (mask & ~live_mask) == 0 && ((mask >> lane) & 1u) && src < live && ((mask >> src) & 1u);
    const float r = ok ? blk.shuffle[w * 32 + src] : NAN;
    if (!ok) blk.bad_shuffle.store(true);
    blk.warps[w]->arrive_and_wait();
    return r;
}

std::mutex g_launch;

}  // namespace

void __syncthreads() {
    ++t_syncs;
    g_block->bar->arrive_and_wait();
}

float __shfl_sync(unsigned mask, float v, int src_lane) { return shuffle(mask, v, (unsigned)src_lane & 31u); }

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    return shuffle(mask, v, (threadIdx.x % 32) ^ (unsigned)lane_mask);
}

float* favor_emu_dynamic_smem() { return g_block->smem.data(); }

#define FAVOR_EMU_KERNEL(name) \
    if (n == #name) return run(name, n, grid, block, smem, params);

// Runs kernel `name` synchronously. Returns one of the EMU_* codes above.
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
    FAVOR_EMU_KERNEL(favor_flag_wide_f32)
    FAVOR_EMU_KERNEL(favor_features_f32)
    FAVOR_EMU_KERNEL(favor_features_bwd_f32)
    FAVOR_EMU_KERNEL(favor_stabiliser_f32)
    FAVOR_EMU_KERNEL(favor_kv_reduce_f32)
    FAVOR_EMU_KERNEL(favor_kv_combine_f32)
    FAVOR_EMU_KERNEL(favor_kv_apply_f32)
    FAVOR_EMU_KERNEL(favor_causal_scan_f32)
    FAVOR_EMU_KERNEL(favor_state_c_update_f32)
    FAVOR_EMU_KERNEL(favor_emu_test_static_smem)
    FAVOR_EMU_KERNEL(favor_emu_test_block_order)
    FAVOR_EMU_KERNEL(favor_emu_test_bounded)
    FAVOR_EMU_KERNEL(favor_emu_test_big_static)
    FAVOR_EMU_KERNEL(favor_emu_test_xor_reduce)
    return EMU_UNKNOWN;
}
