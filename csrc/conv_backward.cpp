// C shim over at::convolution_backward, which tch 0.24 does not bind, and the state
// that decides how libtorch runs a CUDA convolution (autocast, cuDNN's TF32).
//
// Tensors cross as `at::Tensor*`, the representation tch uses for its C_tensor
// handles. Results are heap-allocated at::Tensor objects whose ownership passes to
// the Rust caller (tch::Tensor::from_ptr, freed by tch's Drop). Errors never cross
// the FFI boundary as C++ exceptions: the message is copied into `err` and 1 returned.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/convolution_backward.h>

#include <array>
#include <cstring>
#include <exception>

extern "C" int ovsw_convolution_backward(
    const at::Tensor* grad_output, const at::Tensor* input, const at::Tensor* weight,
    const int64_t* stride, const int64_t* padding, const int64_t* dilation, int64_t groups,
    int want_input, int want_weight, int want_bias, at::Tensor** grad_input,
    at::Tensor** grad_weight, at::Tensor** grad_bias, char* err, size_t err_len) {
  *grad_input = nullptr;
  *grad_weight = nullptr;
  *grad_bias = nullptr;
  try {
    std::array<int64_t, 1> bias_sizes{weight->size(0)};
    std::array<int64_t, 2> output_padding{0, 0};
    std::array<bool, 3> mask{want_input != 0, want_weight != 0, want_bias != 0};
    at::OptionalIntArrayRef bias_opt = std::nullopt;
    if (want_bias) bias_opt = at::IntArrayRef(bias_sizes);
    auto grads = at::convolution_backward(
        *grad_output, *input, *weight, bias_opt, at::IntArrayRef(stride, 2),
        at::IntArrayRef(padding, 2), at::IntArrayRef(dilation, 2), /*transposed=*/false,
        at::IntArrayRef(output_padding), groups, mask);
    if (want_input) *grad_input = new at::Tensor(std::move(std::get<0>(grads)));
    if (want_weight) *grad_weight = new at::Tensor(std::move(std::get<1>(grads)));
    if (want_bias) *grad_bias = new at::Tensor(std::move(std::get<2>(grads)));
    return 0;
  } catch (const std::exception& e) {
    delete *grad_input;
    delete *grad_weight;
    delete *grad_bias;
    *grad_input = nullptr;
    *grad_weight = nullptr;
    *grad_bias = nullptr;
    if (err_len > 0) {
      std::strncpy(err, e.what(), err_len - 1);
      err[err_len - 1] = '\0';
    }
    return 1;
  }
}

// How libtorch will run a float convolution on CUDA tensors (on CPU tensors with `cpu`)
// from the calling thread: the dtype autocast casts its operands to (`*autocast_dtype`, a
// c10::ScalarType; -1 outside `torch.autocast("cuda")`, or "cpu"), and whether cuDNN may
// run float32 convolutions in TF32 (`torch.backends.cudnn.conv.fp32_precision == "tf32"`,
// the default; never on the CPU). Neither read touches the GPU. Returns 0, or 1 with the
// message in `err`.
extern "C" int ovsw_conv_mode(int cpu, int32_t* autocast_dtype, int* tf32, char* err,
                              size_t err_len) {
  try {
    const auto device = cpu ? at::kCPU : at::kCUDA;
    *autocast_dtype = at::autocast::is_autocast_enabled(device)
                          ? static_cast<int32_t>(at::autocast::get_autocast_dtype(device))
                          : -1;
    *tf32 = !cpu && at::globalContext().allowTF32CuDNN(at::Float32Op::CONV) ? 1 : 0;
    return 0;
  } catch (const std::exception& e) {
    if (err_len > 0) {
      std::strncpy(err, e.what(), err_len - 1);
      err[err_len - 1] = '\0';
    }
    return 1;
  }
}
