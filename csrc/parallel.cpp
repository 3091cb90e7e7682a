// at::parallel_for for the Rust kernels: they run on libtorch's own intra-op thread pool
// (torch.set_num_threads applies), so they never compete with a second pool for cores.

#include <ATen/Parallel.h>

#include <cstring>
#include <exception>

extern "C" {
typedef void (*ovsw_range_fn)(void* ctx, int64_t begin, int64_t end);

int ovsw_parallel_for(int64_t n, int64_t grain, ovsw_range_fn fn, void* ctx, char* err,
                      size_t err_len) {
  try {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(ctx, begin, end); });
    return 0;
  } catch (const std::exception& e) {
    if (err_len > 0) {
      std::strncpy(err, e.what(), err_len - 1);
      err[err_len - 1] = '\0';
    }
    return 1;
  }
}
}
