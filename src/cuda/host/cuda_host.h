// The CUDA built-ins that ovsw's kernels use, for compiling the unchanged kernel
// sources (src/cuda/kernels/*.cu, *.cuh) as C++17 with the host compiler and running
// them on the CPU: no GPU, no CUDA toolkit. Include it before the kernel sources:
//
//     #include "cuda_host.h"
//     #include "../kernels/common.cuh"
//     #include "../kernels/binconv.cu"
//
// and launch with ovsw_host::launch(kernel, grid, block, args...).
//
// Execution model. Every thread of a block is a real std::thread; the block's
// threads meet at real barriers (__syncthreads, and per warp of 32 for the warp
// shuffles and __syncwarp), so ThreadSanitizer sees the happens-before edges a GPU's
// barriers give, and no others: a missing __syncthreads is a data race it reports.
// Blocks run one after another, in index order, and grids one at a time in the process
// (a `__shared__` variable is a function-local static, hence one storage per kernel for
// the block that runs); the end of a block orders it before the next, so races between
// blocks are not seen.
//
// What is checked at run time (a report on stderr, then abort):
// - a barrier reached by some threads of a block at one place and by others at another
//   place, or by some threads while others have finished the kernel (a __syncthreads
//   in a branch not all threads take);
// - a warp operation reached by the lanes of a warp at different places, or with a
//   mask other than the whole warp (the kernels use full-warp masks only);
// - a deadlock: every live thread of the block waiting at a barrier none can finish.
//
// What it cannot see: a GPU's weaker memory ordering (barriers and shuffles here also
// order memory; a shuffle orders more than on a GPU), races between blocks, NVRTC's own
// code generation (it contracts a * b + c into FMA where the kernel does not ask for
// __fmul_rn/__fadd_rn; the host build must use -ffp-contract=off), speed, and reads of
// uninitialised shared memory (statics start at zero).
//
// Half and bfloat16 conversions are plain C++ twins of the PTX `cvt` instructions in
// common.cuh (round to nearest, ties to even; NaN becomes the canonical 0x7fff), picked
// there by OVSW_CUDA_HOST, which only this header defines.

#ifndef OVSW_CUDA_HOST_H
#define OVSW_CUDA_HOST_H

#define OVSW_CUDA_HOST 1

#include <math.h>

#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__FAST_MATH__)
#error "the kernels' rounding needs IEEE float arithmetic: build without -ffast-math"
#endif

// ---------------------------------------------------------------------------------------
// Vector types of the launch configuration
// ---------------------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};

namespace ovsw_host {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

// Prints a report and stops the process: what a broken kernel gets.
[[noreturn]] inline void fail(const char* what, const char* file, int line, unsigned block,
                              unsigned thread) {
    std::fprintf(stderr, "ovsw cuda_host: %s (block %u, thread %u, at %s:%d)\n", what, block,
                 thread, file ? file : "?", line);
    std::fflush(stderr);
    std::abort();
}

// One barrier of a block: all of the block's threads (__syncthreads) or one warp's.
struct Barrier {
    unsigned expected = 0;   // participants
    unsigned arrived = 0;    // in the current generation
    uint64_t generation = 0;
    const char* file = nullptr;  // where the current generation's first arrival was
    int line = 0;
    int kind = 0;
    std::condition_variable cv;
};

enum BarrierKind { kSyncthreads = 1, kSyncwarp, kShuffle };

// The state of the block that runs, shared by its threads. All fields are guarded by
// `mu`, except `exchange`, which the warp barriers order.
struct Block {
    std::mutex mu;
    unsigned threads = 0, warps = 0;
    unsigned index = 0;
    unsigned exited = 0;   // threads that returned from the kernel
    unsigned blocked = 0;  // threads waiting at a barrier that has not completed
    Barrier block_barrier;
    std::vector<Barrier> warp_barriers;
    // Shuffle values, double-buffered so one barrier per shuffle suffices: a lane
    // writes buffer (generation & 1) only after every lane passed the barrier that
    // ended its last read of it.
    std::vector<uint64_t> exchange;  // [warp][2][lane]
    std::condition_variable block_done;
    uint64_t finished_blocks = 0;
};

// What a thread knows about itself (the CUDA built-in variables).
struct ThreadCtx {
    uint3 thread_idx{0, 0, 0};
    uint3 block_idx{0, 0, 0};
    dim3 block_dim;
    dim3 grid_dim;
    unsigned linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    Block* block = nullptr;
};

inline thread_local ThreadCtx tls_ctx;

inline const ThreadCtx& ctx() {
    if (tls_ctx.block == nullptr) fail("a CUDA built-in used outside a kernel", nullptr, 0, 0, 0);
    return tls_ctx;
}

// Arrives at `b` and waits for its generation to complete; `lk` holds blk.mu.
inline void arrive_and_wait(Block& blk, Barrier& b, int kind, const char* file, int line,
                            std::unique_lock<std::mutex>& lk) {
    const ThreadCtx& c = tls_ctx;
    if (b.arrived == 0) {
        b.file = file;
        b.line = line;
        b.kind = kind;
    } else if (b.kind != kind || b.line != line || std::strcmp(b.file, file) != 0) {
        std::fprintf(stderr,
                     "ovsw cuda_host: barrier divergence: other threads wait at %s:%d\n",
                     b.file, b.line);
        fail("threads of one block (or warp) reached different barriers", file, line,
             blk.index, c.linear);
    }
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.generation;
        blk.blocked -= b.expected - 1;  // the waiters are released now, not when they wake
        b.cv.notify_all();
        return;
    }
    if (blk.blocked + 1 + blk.exited == blk.threads) {
        if (blk.exited > 0)
            fail("barrier not reached by every thread: some threads of the block have "
                 "returned from the kernel",
                 file, line, blk.index, c.linear);
        fail("deadlock: every thread of the block waits at a barrier that cannot complete",
             file, line, blk.index, c.linear);
    }
    ++blk.blocked;
    const uint64_t gen = b.generation;
    b.cv.wait(lk, [&] { return b.generation != gen; });
}

inline void syncthreads(const char* file, int line) {
    const ThreadCtx& c = ctx();
    Block& blk = *c.block;
    std::unique_lock<std::mutex> lk(blk.mu);
    arrive_and_wait(blk, blk.block_barrier, kSyncthreads, file, line, lk);
}

inline unsigned lane_id() { return ctx().linear % kWarpSize; }

// Lanes of this thread's warp (a partial last warp has fewer).
inline unsigned warp_lanes(const ThreadCtx& c) {
    const unsigned w = c.linear / kWarpSize;
    const unsigned rest = c.block->threads - w * kWarpSize;
    return rest < kWarpSize ? rest : kWarpSize;
}

inline void check_mask(const ThreadCtx& c, unsigned mask, const char* file, int line) {
    const unsigned lanes = warp_lanes(c);
    const unsigned full = lanes == kWarpSize ? kFullMask : ((1u << lanes) - 1u);
    if (mask != full)
        fail("warp operation with a mask other than the whole warp (unsupported)", file, line,
             c.block->index, c.linear);
}

inline void syncwarp(unsigned mask, const char* file, int line) {
    const ThreadCtx& c = ctx();
    check_mask(c, mask, file, line);
    Block& blk = *c.block;
    std::unique_lock<std::mutex> lk(blk.mu);
    arrive_and_wait(blk, blk.warp_barriers[c.linear / kWarpSize], kSyncwarp, file, line, lk);
}

enum ShuffleKind { kIdx, kUp, kDown, kXor };

// The value of `v` in the lane that `kind` and `arg` name, within groups of `width`
// lanes (CUDA's rules: out-of-range sources keep the caller's own value).
template <class T>
T shuffle(ShuffleKind kind, unsigned mask, T v, int arg, int width, const char* file,
          int line) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "shuffled values are at most 8 bytes");
    const ThreadCtx& c = ctx();
    check_mask(c, mask, file, line);
    if (width <= 0 || width > (int)kWarpSize || (width & (width - 1)) != 0)
        fail("shuffle width is not a power of two up to 32", file, line, c.block->index,
             c.linear);
    Block& blk = *c.block;
    const unsigned warp = c.linear / kWarpSize, lane = c.linear % kWarpSize;
    Barrier& bar = blk.warp_barriers[warp];
    const int base = (int)(lane & ~(unsigned)(width - 1));
    const int in_group = (int)lane - base;
    int src = (int)lane;
    switch (kind) {
        case kIdx: src = base + (arg & (width - 1)); break;
        case kUp: src = in_group - arg >= 0 ? (int)lane - arg : (int)lane; break;
        case kDown: src = in_group + arg < width ? (int)lane + arg : (int)lane; break;
        case kXor: {
            // A lane may read an earlier group, not a later one.
            const int s = (int)lane ^ arg;
            src = s >= base + width ? (int)lane : s;
        } break;
    }
    if (src >= (int)warp_lanes(c)) src = (int)lane;  // a lane the partial warp lacks
    std::unique_lock<std::mutex> lk(blk.mu);
    uint64_t* slots = &blk.exchange[(warp * 2 + (bar.generation & 1)) * kWarpSize];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[lane] = bits;
    arrive_and_wait(blk, bar, kShuffle, file, line, lk);
    // Every lane has written `slots` for this generation; none writes it again before
    // this lane has arrived at the next barrier of the warp.
    T out;
    std::memcpy(&out, &slots[src], sizeof(T));
    return out;
}

// ---------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------
// Runs `body` (one kernel invocation) for every thread of every block of `grid`, with
// `block` threads per block. Returns when every block has finished.
// One grid at a time in the process: every launch of a kernel shares its statics.
inline std::mutex& grid_mutex() {
    static std::mutex m;
    return m;
}

inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
    const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    const uint64_t nthreads64 = (uint64_t)block.x * block.y * block.z;
    if (nthreads64 == 0 || nthreads64 > kMaxThreadsPerBlock) {
        std::fprintf(stderr, "ovsw cuda_host: %llu threads per block (1 to %u)\n",
                     (unsigned long long)nthreads64, kMaxThreadsPerBlock);
        std::abort();
    }
    if (nblocks == 0) return;
    if (tls_ctx.block != nullptr) fail("a launch from inside a kernel", nullptr, 0, 0, 0);
    std::lock_guard<std::mutex> one_grid(grid_mutex());
    const unsigned nthreads = (unsigned)nthreads64;
    Block blk;
    blk.threads = nthreads;
    blk.warps = (nthreads + kWarpSize - 1) / kWarpSize;
    blk.block_barrier.expected = nthreads;
    blk.warp_barriers = std::vector<Barrier>(blk.warps);
    for (unsigned w = 0; w < blk.warps; ++w)
        blk.warp_barriers[w].expected =
            w + 1 < blk.warps ? kWarpSize : nthreads - w * kWarpSize;
    blk.exchange.assign((size_t)blk.warps * 2 * kWarpSize, 0);

    auto worker = [&](unsigned t) {
        ThreadCtx& c = tls_ctx;
        c.block = &blk;
        c.block_dim = block;
        c.grid_dim = grid;
        c.linear = t;
        c.thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        for (uint64_t b = 0; b < nblocks; ++b) {
            c.block_idx = uint3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                                (unsigned)(b / ((uint64_t)grid.x * grid.y))};
            body();
            // End of the block: the last thread out resets the block for the next one.
            std::unique_lock<std::mutex> lk(blk.mu);
            ++blk.exited;
            if (blk.exited == blk.threads) {
                if (blk.blocked != 0)
                    fail("a barrier is still waited at when the block ends", nullptr, 0,
                         blk.index, t);
                blk.exited = 0;
                ++blk.index;
                ++blk.finished_blocks;
                blk.block_done.notify_all();
            } else {
                if (blk.blocked > 0 && blk.blocked + blk.exited == blk.threads)
                    fail("barrier not reached by every thread: this thread returned from "
                         "the kernel while others wait at a barrier",
                         nullptr, 0, blk.index, t);
                const uint64_t done = blk.finished_blocks;
                blk.block_done.wait(lk, [&] { return blk.finished_blocks != done; });
            }
        }
        c = ThreadCtx{};
    };
    std::vector<std::thread> pool;
    pool.reserve(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) pool.emplace_back(worker, t);
    for (auto& th : pool) th.join();
}

// Launches `kernel` on `grid` x `block` threads with `args` (converted to the kernel's
// parameter types, as cudaLaunchKernel would pass them).
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "argument count differs from the kernel's");
    const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
    run_grid(grid, block, [&] { std::apply(kernel, params); });
}

// `kernel` called with arguments as cuLaunchKernel takes them: args[i] points to the
// value of parameter i.
template <class... P, size_t... I>
void call_packed(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::decay_t<P>*>(args[I])...);
}

template <class... P>
void launch_packed(void (*kernel)(P...), dim3 grid, dim3 block, void** args) {
    run_grid(grid, block,
             [&] { call_packed(kernel, args, std::index_sequence_for<P...>{}); });
}

// ---------------------------------------------------------------------------------------
// Half and bfloat16 (the twins of PTX cvt.f32.f16, cvt.rn.f16.f32, cvt.rn.bf16.f32)
// ---------------------------------------------------------------------------------------
inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return man ? bits_float(0x7fffffffu) : bits_float(sign | 0x7f800000u);
    if (exp == 0) {
        // Subnormal (or zero): man * 2^-24, exact in float.
        const float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half_rn(float f) {
    const uint32_t x = float_bits(f);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;                   // NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (ax >= 0x38800000u) {                                // normal: >= 2^-14
        uint32_t h = (ax >> 13) - (112u << 10);
        const uint32_t rem = ax & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
        return (uint16_t)(sign | h);
    }
    if (ax <= 0x33000000u) return sign;  // <= 2^-25: rounds to zero (2^-25 ties to even)
    // Subnormal result: the value in units of 2^-24, rounded to nearest even.
    const uint32_t e = ax >> 23;  // 102 .. 112
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14 .. 24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (uint16_t)(sign | q);
}

inline uint16_t float_to_bfloat16_rn(float f) {
    const uint32_t x = float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace ovsw_host

// ---------------------------------------------------------------------------------------
// The CUDA names the kernels use
// ---------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Function-local statics: one storage per kernel, for the one block that runs.
// (`extern __shared__` dynamic shared memory is not supported: it fails to compile.)
#define __shared__ static

#define threadIdx (::ovsw_host::ctx().thread_idx)
#define blockIdx (::ovsw_host::ctx().block_idx)
#define blockDim (static_cast<const dim3&>(::ovsw_host::ctx().block_dim))
#define gridDim (static_cast<const dim3&>(::ovsw_host::ctx().grid_dim))
#define warpSize 32

#define __syncthreads() ::ovsw_host::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::ovsw_host::syncwarp(::ovsw_host::mask_or_full(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, v, ...) \
    ::ovsw_host::shfl_call(::ovsw_host::kIdx, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) \
    ::ovsw_host::shfl_call(::ovsw_host::kUp, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) \
    ::ovsw_host::shfl_call(::ovsw_host::kDown, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) \
    ::ovsw_host::shfl_call(::ovsw_host::kXor, mask, v, __FILE__, __LINE__, __VA_ARGS__)

namespace ovsw_host {
inline unsigned mask_or_full() { return kFullMask; }
inline unsigned mask_or_full(unsigned m) { return m; }
template <class T>
T shfl_call(ShuffleKind kind, unsigned mask, T v, const char* file, int line, int arg,
            int width = (int)kWarpSize) {
    return shuffle<T>(kind, mask, v, arg, width, file, line);
}
}  // namespace ovsw_host

// Atomics (sequentially consistent, as a GPU's device-scope atomics are at least as
// strong as the kernels may assume): the old value is returned.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* p, float v) {
    uint32_t old = __atomic_load_n((uint32_t*)p, __ATOMIC_RELAXED);
    for (;;) {
        const uint32_t next = ovsw_host::float_bits(ovsw_host::bits_float(old) + v);
        if (__atomic_compare_exchange_n((uint32_t*)p, &old, next, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
            return ovsw_host::bits_float(old);
    }
}
inline double atomicAdd(double* p, double v) {
    uint64_t old = __atomic_load_n((uint64_t*)p, __ATOMIC_RELAXED);
    for (;;) {
        double d;
        std::memcpy(&d, &old, 8);
        d += v;
        uint64_t next;
        std::memcpy(&next, &d, 8);
        if (__atomic_compare_exchange_n((uint64_t*)p, &old, next, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED)) {
            std::memcpy(&d, &old, 8);
            return d;
        }
    }
}
inline int atomicCAS(int* p, int expected, int desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return expected;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long expected,
                                    unsigned long long desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return expected;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,
                                                   __ATOMIC_RELAXED)) {
    }
    return old;
}

// Bit casts and correctly rounded arithmetic (no contraction: build with
// -ffp-contract=off).
inline float __uint_as_float(unsigned u) { return ovsw_host::bits_float(u); }
inline unsigned __float_as_uint(float f) { return ovsw_host::float_bits(f); }
inline float __int_as_float(int i) { return ovsw_host::bits_float((uint32_t)i); }
inline int __float_as_int(float f) { return (int)ovsw_host::float_bits(f); }
inline double __longlong_as_double(long long v) {
    double d;
    std::memcpy(&d, &v, 8);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long v;
    std::memcpy(&v, &d, 8);
    return v;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// CUDA's integer and float min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) {
    return a < b ? a : b;
}
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) {
    return a > b ? a : b;
}
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

#endif  // OVSW_CUDA_HOST_H
