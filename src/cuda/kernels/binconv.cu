// The binary convolution's elementwise work (SPEC section 1), around cuDNN's convolution.
//
// Activations: "sample-major dense" tensors, i.e. NCHW-contiguous or channels_last
// (NHWC-strided): sample n owns the flat range [n * per_sample, (n + 1) * per_sample) and
// the order inside it does not matter to a reduction or an elementwise map, so both
// layouts run the same code with no copy. The Bi-Real backward also accepts a gradient
// whose layout differs from x's (it walks x's memory order and indexes the gradient
// through its strides).
//
// Weights: [O, ...] with each output channel's K elements contiguous (also true for
// channels_last weights); one block per output channel.
//
// act_w codes: 0 ste, 1 hardtanh, 2 ste_v2, 3 hardtanhv2.

// 1. Forward, pass 1: partial moments of every chunk of every sample, shifted by the
// sample's first element (exact for constant samples, no cancellation for large means):
// partial[2 * b + {0, 1}] = (sum(x - x0), sum((x - x0)^2)) in float64, block b = n * chunks + c.
template <class X>
__device__ __forceinline__ void sample_moments(const typename X::T* __restrict__ x,
                                               i64 per_sample, i64 chunk, i64 chunks,
                                               double* __restrict__ partial) {
    __shared__ double scratch[OVSW_WARPS];
    const i64 n = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const i64 base = n * per_sample;
    const double shift = (double)X::load(x, base);
    const i64 lo = c * chunk;
    const i64 hi = min(lo + chunk, per_sample);
    double s1 = 0.0, s2 = 0.0;
#pragma unroll 4
    for (i64 i = lo + threadIdx.x; i < hi; i += OVSW_THREADS) {
        const double d = (double)X::load(x, base + i) - shift;
        s1 += d;
        s2 += d * d;
    }
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
        partial[2 * (i64)blockIdx.x] = s1;
        partial[2 * (i64)blockIdx.x + 1] = s2;
    }
}

// 2. Forward, pass 2: a = sign(x / std_n) written in the convolution's dtype O, and
// std_n = sqrt(Var(x_n) + eps) (unbiased) written once per sample in x's dtype. Each
// block first folds its sample's `chunks` partials into std_n. Without `partial`
// a = sign(x / std_in[n]) with a given std (the backward rebuilding a), or a = sign(x)
// with neither (eval mode). Block b covers elements [j * span, (j + 1) * span) of sample
// n = b / blocks_per_sample, j = b % blocks_per_sample.
template <class X, class O>
__device__ __forceinline__ void sign_normalized(const typename X::T* __restrict__ x,
                                                const double* __restrict__ partial,
                                                i64 chunks, i64 per_sample,
                                                i64 blocks_per_sample, i64 span, float eps,
                                                const typename X::T* __restrict__ std_in,
                                                typename X::T* __restrict__ std_out,
                                                typename O::T* __restrict__ a) {
    __shared__ float s_std;
    const i64 n = blockIdx.x / blocks_per_sample, j = blockIdx.x % blocks_per_sample;
    if (partial != nullptr) {
        if (threadIdx.x == 0) {
            double s1 = 0.0, s2 = 0.0;
            for (i64 c = 0; c < chunks; ++c) {
                s1 += partial[2 * (n * chunks + c)];
                s2 += partial[2 * (n * chunks + c) + 1];
            }
            const double count = (double)per_sample;
            double var = (s2 - s1 * s1 / count) / (count - 1.0);
            if (var < 0.0) var = 0.0;  // rounding only; NaN passes through
            // libtorch rounds var, var + eps and the sqrt each to x's dtype.
            const float v = X::round((float)var);
            const float sd = X::round(sqrtf(X::round(__fadd_rn(v, eps))));
            s_std = sd;
            if (j == 0 && std_out != nullptr) X::store(std_out, n, sd);
        }
        __syncthreads();
    } else if (std_in != nullptr) {
        if (threadIdx.x == 0) s_std = X::load(std_in, n);
        __syncthreads();
    }
    const bool normalize = partial != nullptr || std_in != nullptr;
    const float sd = normalize ? s_std : 1.0f;
    const i64 base = n * per_sample;
    const i64 lo = j * span;
    const i64 hi = min(lo + span, per_sample);
#pragma unroll 4
    for (i64 i = lo + threadIdx.x; i < hi; i += OVSW_THREADS) {
        const float v = X::load(x, base + i);
        const float q = normalize ? X::round(v / sd) : v;  // x.div(std) in x's dtype
        O::store(a, base + i, sign_of(q));
    }
}

// 3. Backward: grad_x = grad_a * max(0, 2 - 2 |x / std_n|) / std_n (Bi-Real through
// x_hat = x / std with std a constant; no std in eval mode), in x's dtype and layout.
// The walk follows x's memory order: dims d0..d3 from outermost to innermost stride with
// inner sizes s1..s3; g0..g3 are grad_a's strides of those dims and n_axis is the
// position of the batch dim among them. same_layout: grad_a has x's strides and the batch
// dim is outermost, so offsets are flat and n = i / per_sample.
template <class G, class X>
__device__ __forceinline__ void bireal_backward(
    const typename G::T* __restrict__ g, const typename X::T* __restrict__ x,
    const typename X::T* __restrict__ std, typename X::T* __restrict__ out, i64 total,
    i64 s1, i64 s2, i64 s3, i64 g0, i64 g1, i64 g2, i64 g3, int n_axis, int same_layout,
    i64 per_sample) {
    const i64 stride = (i64)gridDim.x * OVSW_THREADS;
    // Not unrolled: unrolled, the two IEEE divisions' slow-path calls made ptxas spill
    // (16 B stores, 32 B loads in the f32_f32 kernel for sm_90; `ovsw.cuda check`).
#pragma unroll 1
    for (i64 i = (i64)blockIdx.x * OVSW_THREADS + threadIdx.x; i < total; i += stride) {
        i64 gi, n;
        if (same_layout) {
            gi = i;
            n = i / per_sample;
        } else {
            i64 r = i;
            const i64 c3 = r % s3;
            r /= s3;
            const i64 c2 = r % s2;
            r /= s2;
            const i64 c1 = r % s1;
            const i64 c0 = r / s1;
            gi = c0 * g0 + c1 * g1 + c2 * g2 + c3 * g3;
            n = n_axis == 0 ? c0 : (n_axis == 1 ? c1 : (n_axis == 2 ? c2 : c3));
        }
        const float gv = X::round(G::load(g, gi));  // grad_a.to(x.dtype)
        const float xv = X::load(x, i);
        float r;
        if (std != nullptr) {
            const float sd = X::load(std, n);
            const float xh = X::round(xv / sd);
            float t = X::round(__fadd_rn(X::round(-2.0f * fabsf(xh)), 2.0f));
            t = t < 0.0f ? 0.0f : t;  // clamp_min(0), NaN-propagating
            r = X::round(X::round(__fmul_rn(gv, t)) / sd);
        } else {
            float t = X::round(__fadd_rn(X::round(-2.0f * fabsf(xv)), 2.0f));
            t = t < 0.0f ? 0.0f : t;
            r = X::round(__fmul_rn(gv, t));
        }
        X::store(out, i, r);
    }
}

// mean_o |W| of the block's channel, rounded to W's dtype (channel_abs_mean).
template <class W>
__device__ __forceinline__ float channel_abs_mean(const typename W::T* __restrict__ w, i64 base,
                                                  i64 K, double* scratch) {
    double s = 0.0;
    for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS) s += fabs((double)W::load(w, base + i));
    s = block_sum(s, scratch);
    return W::round((float)(s / (double)K));
}

// 4. The weight operand of the convolution, one block per output channel o:
//    w_b = sign(W) (ste_v2: times mean_o |W|), s_o = scale[o] (a learnable
//    scaling_factor) or alpha_o = mean(|(W_o - mean W_o) / sqrt(Var W_o + eps)|) (written
//    to alpha_out), then w_eff = fold ? w_b * s_o : w_b in the convolution's dtype O, and
//    bias_eff = fold ? bias * s_o : bias. Folding the scale into the weight (and bias)
//    makes conv(a, w_eff, bias_eff) equal conv(a, w_b, bias) * s without a pass over the
//    output.
template <class W, class O>
__device__ __forceinline__ void weight_prep(const typename W::T* __restrict__ w, i64 K,
                                            int act_w, const typename W::T* __restrict__ scale,
                                            const typename W::T* __restrict__ bias, int fold,
                                            float eps, typename O::T* __restrict__ w_eff,
                                            typename W::T* __restrict__ alpha_out,
                                            typename O::T* __restrict__ bias_eff) {
    __shared__ double scratch[OVSW_WARPS];
    const i64 o = blockIdx.x, base = o * K;
    const float m = act_w == 2 ? channel_abs_mean<W>(w, base, K, scratch) : 0.0f;
    float s;
    if (scale != nullptr) {
        s = W::load(scale, o);
    } else {
        // channel_alpha, with libtorch's roundings of each elementwise op.
        double sum = 0.0;
        for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS) sum += (double)W::load(w, base + i);
        sum = block_sum(sum, scratch);
        const float mu = W::round((float)(sum / (double)K));
        double ss = 0.0;
        const double mu_d = sum / (double)K;
        for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS) {
            const double d = (double)W::load(w, base + i) - mu_d;
            ss += d * d;
        }
        ss = block_sum(ss, scratch);
        const float var = W::round((float)(ss / (double)(K - 1)));
        const float sd = W::round(sqrtf(W::round(__fadd_rn(var, eps))));
        double sa = 0.0;
        for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS) {
            const float d = W::round(__fsub_rn(W::load(w, base + i), mu));
            sa += fabs((double)W::round(d / sd));
        }
        sa = block_sum(sa, scratch);
        s = W::round((float)(sa / (double)K));
        if (alpha_out != nullptr && threadIdx.x == 0) W::store(alpha_out, o, s);
    }
    for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS) {
        float wb = sign_of(W::load(w, base + i));
        if (act_w == 2) wb = W::round(wb * m);
        O::store(w_eff, base + i, fold ? wb * s : wb);
    }
    if (bias != nullptr && bias_eff != nullptr && threadIdx.x == 0) {
        const float b = W::load(bias, o);
        O::store(bias_eff, o, fold ? b * s : b);
    }
}

// 5. Backward of (4), one block per output channel o, from the gradients of w_eff and
// bias_eff that convolution_backward returns (in the convolution's dtype G):
//    grad_w = grad_weff * s_o * mask(W)  (ste, ste_v2: 1; hardtanh: |W| < 1;
//             hardtanhv2: |W| < mean_o |W|), in W's dtype;
//    grad_scale_o = sum_k grad_weff * w_b + grad_beff_o * bias_o (a learnable scale);
//    grad_bias_o = grad_beff_o * s_o.
// Each output is skipped when its pointer is null.
template <class G, class W>
__device__ __forceinline__ void weight_grad(const typename G::T* __restrict__ grad_weff,
                                            const typename W::T* __restrict__ w, i64 K,
                                            int act_w, const typename W::T* __restrict__ s_vec,
                                            const typename G::T* __restrict__ grad_beff,
                                            const typename W::T* __restrict__ bias,
                                            typename W::T* __restrict__ grad_w,
                                            typename W::T* __restrict__ grad_scale,
                                            typename W::T* __restrict__ grad_bias) {
    __shared__ double scratch[OVSW_WARPS];
    const i64 o = blockIdx.x, base = o * K;
    const float s = W::load(s_vec, o);
    const float m = (act_w == 2 || act_w == 3) ? channel_abs_mean<W>(w, base, K, scratch) : 0.0f;
    double acc = 0.0;
    const bool per_element = grad_w != nullptr || grad_scale != nullptr;
    for (i64 i = threadIdx.x; per_element && i < K; i += OVSW_THREADS) {
        const float ge = G::load(grad_weff, base + i);
        const float wv = W::load(w, base + i);
        if (grad_w != nullptr) {
            float keep = 1.0f;
            if (act_w == 1) keep = fabsf(wv) < 1.0f ? 1.0f : 0.0f;
            if (act_w == 3) keep = fabsf(wv) < m ? 1.0f : 0.0f;
            W::store(grad_w, base + i, W::round(__fmul_rn(ge, s)) * keep);
        }
        if (grad_scale != nullptr) {
            float wb = sign_of(wv);
            if (act_w == 2) wb = W::round(wb * m);
            acc += (double)ge * (double)wb;
        }
    }
    if (grad_scale != nullptr) {
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) {
            if (grad_beff != nullptr && bias != nullptr)
                acc += (double)G::load(grad_beff, o) * (double)W::load(bias, o);
            W::store(grad_scale, o, (float)acc);
        }
    }
    if (grad_bias != nullptr && grad_beff != nullptr && threadIdx.x == 0)
        W::store(grad_bias, o, G::load(grad_beff, o) * s);
}

// Entry points, one per dtype combination: f32, f16, bf16.
#define OVSW_MOMENTS(X, xs)                                                                 \
    extern "C" __global__ void __launch_bounds__(OVSW_THREADS) ovsw_sample_moments_##xs(   \
        const X::T* x, i64 per_sample, i64 chunk, i64 chunks, double* partial) {           \
        sample_moments<X>(x, per_sample, chunk, chunks, partial);                           \
    }
#define OVSW_SIGN(X, xs, O, os)                                                             \
    extern "C" __global__ void __launch_bounds__(OVSW_THREADS) ovsw_sign_##xs##_##os(       \
        const X::T* x, const double* partial, i64 chunks, i64 per_sample,                   \
        i64 blocks_per_sample, i64 span, float eps, const X::T* std_in, X::T* std_out,      \
        O::T* a) {                                                                          \
        sign_normalized<X, O>(x, partial, chunks, per_sample, blocks_per_sample, span, eps, \
                              std_in, std_out, a);                                          \
    }
#define OVSW_BIREAL(G, gs, X, xs)                                                           \
    extern "C" __global__ void __launch_bounds__(OVSW_THREADS)                              \
        ovsw_bireal_backward_##gs##_##xs(const G::T* g, const X::T* x, const X::T* std,     \
                                         X::T* out, i64 total, i64 s1, i64 s2, i64 s3,      \
                                         i64 g0, i64 g1, i64 g2, i64 g3, int n_axis,        \
                                         int same_layout, i64 per_sample) {                 \
        bireal_backward<G, X>(g, x, std, out, total, s1, s2, s3, g0, g1, g2, g3, n_axis,    \
                              same_layout, per_sample);                                     \
    }
#define OVSW_WPREP(W, ws, O, os)                                                            \
    extern "C" __global__ void __launch_bounds__(OVSW_THREADS) ovsw_weight_prep_##ws##_##os( \
        const W::T* w, i64 K, int act_w, const W::T* scale, const W::T* bias, int fold,     \
        float eps, O::T* w_eff, W::T* alpha_out, O::T* bias_eff) {                          \
        weight_prep<W, O>(w, K, act_w, scale, bias, fold, eps, w_eff, alpha_out, bias_eff); \
    }
#define OVSW_WGRAD(G, gs, W, ws)                                                            \
    extern "C" __global__ void __launch_bounds__(OVSW_THREADS) ovsw_weight_grad_##gs##_##ws( \
        const G::T* grad_weff, const W::T* w, i64 K, int act_w, const W::T* s_vec,          \
        const G::T* grad_beff, const W::T* bias, W::T* grad_w, W::T* grad_scale,            \
        W::T* grad_bias) {                                                                  \
        weight_grad<G, W>(grad_weff, w, K, act_w, s_vec, grad_beff, bias, grad_w,           \
                          grad_scale, grad_bias);                                           \
    }
#define OVSW_PAIRS(M, A, as)                                                                \
    M(A, as, F32, f32)                                                                      \
    M(A, as, F16, f16)                                                                      \
    M(A, as, BF16, bf16)
#define OVSW_ALL_PAIRS(M)                                                                   \
    OVSW_PAIRS(M, F32, f32)                                                                 \
    OVSW_PAIRS(M, F16, f16)                                                                 \
    OVSW_PAIRS(M, BF16, bf16)

OVSW_MOMENTS(F32, f32)
OVSW_MOMENTS(F16, f16)
OVSW_MOMENTS(BF16, bf16)
OVSW_ALL_PAIRS(OVSW_SIGN)
OVSW_ALL_PAIRS(OVSW_BIREAL)
OVSW_ALL_PAIRS(OVSW_WPREP)
OVSW_ALL_PAIRS(OVSW_WGRAD)
