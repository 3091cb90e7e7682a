// Fallible tensor accessors for the Rust core, and `new_full` (a tensor on another's
// device, which tch can only name for CPU and CUDA). tch's accessors (size, dim, kind,
// device, data_ptr, is_contiguous, ...) panic when libtorch throws, for instance on a
// FakeTensor's data pointer under torch.export; these read everything the core needs in
// one call, catch every C++ exception and report it through `err` instead.

#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/GradMode.h>

#include <cstring>
#include <string>
#include <exception>

extern "C" {

// Where a tensor's elements are. Kept in sync with `Storage` in src/facts.rs.
enum OvswStorage : int32_t {
  OVSW_STORAGE_READABLE = 0,  // real memory (data null only when empty or not strided)
  OVSW_STORAGE_META = 1,      // a meta tensor: shape and dtype, no elements
  OVSW_STORAGE_NONE = 2,      // no readable storage: FakeTensor, FunctionalTensor, ...
};

// Kept in sync with `Place` in src/facts.rs.
enum OvswPlace : int32_t {
  OVSW_PLACE_CPU = 0,
  OVSW_PLACE_CUDA = 1,
  OVSW_PLACE_META = 2,
  OVSW_PLACE_OTHER = 3,
};

// Kept in sync with `RawFacts` in src/ffi.rs.
struct OvswTensorFacts {
  int64_t dim;
  int32_t defined;
  int32_t scalar_type;  // c10::ScalarType
  int32_t place;        // OvswPlace
  int32_t device_index;
  int32_t strided;
  int32_t contiguous;
  int32_t python;   // carries the Python dispatch key (a __torch_dispatch__ subclass)
  int32_t storage;  // OvswStorage
  void* data;
  char device_name[32];
};

static void copy_message(const char* what, char* err, size_t err_len) {
  if (err_len > 0) {
    std::strncpy(err, what, err_len - 1);
    err[err_len - 1] = '\0';
  }
}

// Fills `out` and, when `dim <= cap`, `sizes[0..dim]` and (for a strided tensor)
// `strides[0..dim]`. Returns 0, or 1 with the message in `err`. An undefined tensor
// returns 0 with `defined == 0` and nothing else set.
int ovsw_tensor_facts(const at::Tensor* t, OvswTensorFacts* out, int64_t* sizes,
                      int64_t* strides, int64_t cap, char* err, size_t err_len) {
  std::memset(out, 0, sizeof(*out));
  try {
    if (!t->defined()) return 0;
    out->defined = 1;
    out->python = t->key_set().has(c10::DispatchKey::Python) ? 1 : 0;
    const c10::Device device = t->device();
    std::string name = device.str();
    std::strncpy(out->device_name, name.c_str(), sizeof(out->device_name) - 1);
    out->device_index = device.has_index() ? device.index() : -1;
    if (device.is_cpu()) {
      out->place = OVSW_PLACE_CPU;
    } else if (device.is_cuda()) {
      out->place = OVSW_PLACE_CUDA;
    } else if (device.is_meta()) {
      out->place = OVSW_PLACE_META;
    } else {
      out->place = OVSW_PLACE_OTHER;
    }
    out->scalar_type = static_cast<int32_t>(t->scalar_type());
    out->strided = t->layout() == at::kStrided ? 1 : 0;

    if (device.is_meta()) {
      out->storage = OVSW_STORAGE_META;
    } else if (!out->strided) {
      // Sparse and other layouts keep their elements elsewhere; the core refuses them
      // by layout (a TypeError) and never reads their memory.
      out->storage = OVSW_STORAGE_READABLE;
    } else if (at::functionalization::impl::isFunctionalTensor(*t) || !t->has_storage()) {
      out->storage = OVSW_STORAGE_NONE;
    } else {
      // A FakeTensor has storage without memory (a null data pointer) or one that throws
      // on access; both count as none. The read-only pointer decides: the mutable one
      // makes a FakeTensor warn (a Python warning raised later, with our error set).
      try {
        const void* data = t->const_data_ptr();
        const bool empty = t->numel() == 0;
        out->storage = (data != nullptr || empty) ? OVSW_STORAGE_READABLE : OVSW_STORAGE_NONE;
        // The fused loops write through this pointer, so take the mutable one (it
        // materialises a lazily cloned tensor); Python subclasses never reach them.
        if (out->storage == OVSW_STORAGE_READABLE && !out->python) out->data = t->data_ptr();
      } catch (const std::exception&) {
        out->storage = OVSW_STORAGE_NONE;
        out->data = nullptr;
      }
    }
    if (out->storage == OVSW_STORAGE_NONE) {
      // Sizes may be symbolic here; the caller refuses the tensor before reading them.
      out->dim = -1;
      return 0;
    }
    out->contiguous = (out->strided && t->is_contiguous()) ? 1 : 0;
    const int64_t dim = t->dim();
    out->dim = dim;
    if (dim <= cap) {
      const auto s = t->sizes();
      for (int64_t i = 0; i < dim; ++i) sizes[i] = s[i];
      if (out->strided) {
        const auto st = t->strides();
        for (int64_t i = 0; i < dim; ++i) strides[i] = st[i];
      }
    }
    return 0;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return 1;
  }
}

// `like->new_full(sizes, value)` in dtype `scalar_type`, on `like`'s device (meta
// included). Returns the new tensor, or null with the message in `err`.
at::Tensor* ovsw_new_full(const at::Tensor* like, const int64_t* sizes, int64_t dim,
                          double value, int32_t scalar_type, char* err, size_t err_len) {
  try {
    const auto options = like->options().dtype(static_cast<c10::ScalarType>(scalar_type));
    return new at::Tensor(like->new_full(at::IntArrayRef(sizes, dim), value, options));
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return nullptr;
  }
}

// Sets autograd's grad mode on this thread; returns the previous mode.
int ovsw_set_grad_enabled(int enabled) {
  const bool previous = c10::GradMode::is_enabled();
  c10::GradMode::set_enabled(enabled != 0);
  return previous ? 1 : 0;
}
}
