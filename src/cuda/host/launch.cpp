// Every ovsw kernel compiled for the CPU (cuda_host.h) from the unchanged sources, and
// one C entry point that launches a kernel by name with its arguments packed as
// cuLaunchKernel takes them (args[i] points to the value of parameter i): what the Rust
// launch code hands the driver, handed to the CPU instead.

#include "cuda_host.h"

#include "../kernels/common.cuh"
#include "../kernels/binconv.cu"
#include "../kernels/ags_sad.cu"

#include <cstring>

// The layouts src/optim/cuda.rs writes (8 x 8 bytes per layer; 2 ints and 5 floats).
static_assert(sizeof(AgsLayer) == 64, "AgsLayer is 8 x 8 bytes");
static_assert(sizeof(AgsParams) == 28, "AgsParams is 2 x i32 + 5 x f32");

namespace {

struct Entry {
    const char* name;
    void (*launch)(dim3 grid, dim3 block, void** args);
};

template <auto Kernel>
void launch_entry(dim3 grid, dim3 block, void** args) {
    ovsw_host::launch_packed(Kernel, grid, block, args);
}

#define OVSW_HOST_ENTRY(k) {#k, &launch_entry<&k>},
#define OVSW_HOST_PAIRS(op, a)                                                             \
    OVSW_HOST_ENTRY(ovsw_##op##_##a##_f32)                                                 \
    OVSW_HOST_ENTRY(ovsw_##op##_##a##_f16)                                                 \
    OVSW_HOST_ENTRY(ovsw_##op##_##a##_bf16)
#define OVSW_HOST_FAMILY(op)                                                               \
    OVSW_HOST_PAIRS(op, f32)                                                               \
    OVSW_HOST_PAIRS(op, f16)                                                               \
    OVSW_HOST_PAIRS(op, bf16)

const Entry kEntries[] = {
    OVSW_HOST_ENTRY(ovsw_sample_moments_f32)
    OVSW_HOST_ENTRY(ovsw_sample_moments_f16)
    OVSW_HOST_ENTRY(ovsw_sample_moments_bf16)
    OVSW_HOST_FAMILY(sign)
    OVSW_HOST_FAMILY(bireal_backward)
    OVSW_HOST_FAMILY(weight_prep)
    OVSW_HOST_FAMILY(weight_grad)
    OVSW_HOST_ENTRY(ovsw_ags_sad_step)
    OVSW_HOST_ENTRY(ovsw_ags_sad_finalize)
};

}  // namespace

extern "C" {

// The number of kernels, and the name of kernel i (nullptr past the end).
int ovsw_host_kernel_count() { return (int)(sizeof(kEntries) / sizeof(kEntries[0])); }
const char* ovsw_host_kernel_name(int i) {
    return i >= 0 && i < ovsw_host_kernel_count() ? kEntries[i].name : nullptr;
}

// Runs kernel `name` on `blocks` x `threads` threads (one dimension each, as the Rust
// code launches) with `args` packed as for cuLaunchKernel, and returns when it is done:
// 0, or 1 for an unknown name (nothing ran).
int ovsw_host_launch(const char* name, unsigned long long blocks, unsigned threads,
                     void** args) {
    for (const Entry& e : kEntries) {
        if (std::strcmp(e.name, name) == 0) {
            if (blocks > 0x7fffffffull) return 2;
            e.launch(dim3((unsigned)blocks), dim3(threads), args);
            return 0;
        }
    }
    return 1;
}

}  // extern "C"
