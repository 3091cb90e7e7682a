// Shared by every ovsw kernel: scalar types, dtype traits, exact-rounding helpers and
// block reductions. Compiled by NVRTC at run time (src/cuda/compile.rs) with no headers:
// half and bfloat16 conversions are single PTX instructions (bf16 needs sm_80+). The
// same files also compile as C++ on the CPU under src/cuda/host/cuda_host.h, which
// defines OVSW_CUDA_HOST and supplies plain C++ twins of those instructions.
//
// Rounding: libtorch evaluates each elementwise op in float ("opmath") and rounds its
// result to the tensor's dtype. The kernels round at the same places (T::round) and use
// __fmul_rn/__fadd_rn where libtorch runs two ops, so that no multiply-add is contracted
// into one FMA that libtorch would not have done.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#ifndef OVSW_CUDA_HOST
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u16 f2b(float f) {
    u16 b;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
    return b;
}
#else
// The CPU twins (round to nearest even, as cvt.rn; src/cuda/host/cuda_host.h).
__device__ __forceinline__ float h2f(u16 h) { return ovsw_host::half_to_float(h); }
__device__ __forceinline__ u16 f2h(float f) { return ovsw_host::float_to_half_rn(f); }
__device__ __forceinline__ u16 f2b(float f) { return ovsw_host::float_to_bfloat16_rn(f); }
#endif
__device__ __forceinline__ float b2f(u16 b) { return __uint_as_float(((u32)b) << 16); }

// dtype traits: storage type, load as float, store from float, round float to the dtype.
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(const T* p, i64 i) { return p[i]; }
    static __device__ __forceinline__ void store(T* p, i64 i, float v) { p[i] = v; }
    static __device__ __forceinline__ float round(float v) { return v; }
};
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const T* p, i64 i) { return h2f(p[i]); }
    static __device__ __forceinline__ void store(T* p, i64 i, float v) { p[i] = f2h(v); }
    static __device__ __forceinline__ float round(float v) { return h2f(f2h(v)); }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const T* p, i64 i) { return b2f(p[i]); }
    static __device__ __forceinline__ void store(T* p, i64 i, float v) { p[i] = f2b(v); }
    static __device__ __forceinline__ float round(float v) { return b2f(f2b(v)); }
};

// torch.sign: +1 / -1, and 0 for +-0 and for NaN (as torch.sign and upstream give).
__device__ __forceinline__ float sign_of(float v) {
    return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : 0.0f);
}

#define OVSW_THREADS 256
#define OVSW_WARPS (OVSW_THREADS / 32)

// Sum over the block (blockDim.x == OVSW_THREADS); the result is valid in every thread.
// `scratch` holds OVSW_WARPS values; the call ends with a barrier so it can be reused.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    A total = 0;
    // Every thread adds the warp sums in the same order: a deterministic result.
    for (int w = 0; w < OVSW_WARPS; ++w) total += scratch[w];
    __syncthreads();
    return total;
}
