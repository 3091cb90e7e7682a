// AGS (SPEC section 2) then SAD (section 3) on every binary conv of a model, as one
// multi-tensor pass: block b handles output channel b of the concatenation of all
// layers' channels (ovsw_ags_sad_step), then one block per layer turns the per-channel
// figures into the layer's two numbers (ovsw_ags_sad_finalize). Two launches for the
// whole model, no host synchronisation.

// One layer, as src/optim/cuda.rs lays it out (8 x 8 bytes, device memory).
struct AgsLayer {
    u64 grad, weight, tracker, prev;  // device pointers; tracker/prev 0 without SAD
    i64 channels, per_channel, first_channel, dtype;  // dtype: 0 f32, 1 f16, 2 bf16
};

struct AgsParams {
    int ags, sad;
    float delta, m, one_minus_m, tau, lambda;
};

template <class T>
__device__ __forceinline__ void ags_sad_channel(const AgsLayer& L, i64 c, const AgsParams& p,
                                                double* __restrict__ chan, i64 g,
                                                double* scratch) {
    typedef typename T::T S;
    S* grad = (S*)L.grad;
    const S* w = (const S*)L.weight;
    const i64 K = L.per_channel, base = c * K;
    float factor = 1.0f;
    double ratio = 0.0;
    if (p.ags) {
        double gs = 0.0, ws = 0.0;
        for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS) {
            const double gv = (double)T::load(grad, base + i);
            const double wv = (double)T::load(w, base + i);
            gs += gv * gv;
            ws += wv * wv;
        }
        gs = block_sum(gs, scratch);
        ws = block_sum(ws, scratch);
        // g_o = max(||G_o||, 1e-6), w_o = max(||W_o||, 1e-3), r_o = g_o / w_o (float32).
        const float gn = fmaxf((float)sqrt(gs), 1e-6f);
        const float wn = fmaxf((float)sqrt(ws), 1e-3f);
        const float r = gn / wn;
        ratio = (double)r;
        if (r < p.delta) factor = __fmul_rn(p.delta, wn) / gn;
    }
    double silent = 0.0;
    if (p.sad) {
        S* tracker = (S*)L.tracker;
        S* prev = (S*)L.prev;
        const float tau = T::round(p.tau);  // `tracker < tau` compares in the tracker's dtype
        for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS) {
            const S w_raw = w[base + i];
            const float wv = T::load(w, base + i);
            const float flipped = sign_of(wv) != sign_of(T::load(prev, base + i)) ? 1.0f : 0.0f;
            // T <- m * T + (1 - m) * flipped, rounded per op as tracker.mul_(m).add_(...)
            const float tn = T::round(__fadd_rn(T::round(__fmul_rn(T::load(tracker, base + i), p.m)),
                                                T::round(__fmul_rn(flipped, p.one_minus_m))));
            T::store(tracker, base + i, tn);
            const bool is_silent = tn < tau;
            silent += is_silent ? 1.0 : 0.0;
            // G <- G * factor + lambda * M * W
            const float gv = factor == 1.0f ? T::load(grad, base + i)
                                             : T::round(__fmul_rn(T::load(grad, base + i), factor));
            const float decay = is_silent ? T::round(__fmul_rn(wv, p.lambda)) : 0.0f;
            T::store(grad, base + i, is_silent ? __fadd_rn(gv, decay) : gv);
            prev[base + i] = w_raw;  // P <- W, bit for bit
        }
        silent = block_sum(silent, scratch);
    } else if (factor != 1.0f) {
        for (i64 i = threadIdx.x; i < K; i += OVSW_THREADS)
            T::store(grad, base + i, __fmul_rn(T::load(grad, base + i), factor));
    }
    if (threadIdx.x == 0) {
        chan[2 * g] = ratio;
        chan[2 * g + 1] = silent;
    }
}

// chan[2 * g + {0, 1}] = (r_o, silent count) of global channel g.
extern "C" __global__ void __launch_bounds__(OVSW_THREADS)
    ovsw_ags_sad_step(const AgsLayer* __restrict__ layers, int num_layers, AgsParams p,
                      double* __restrict__ chan) {
    __shared__ double scratch[OVSW_WARPS];
    const i64 g = blockIdx.x;
    // The layer holding channel g: the last with first_channel <= g.
    int lo = 0, hi = num_layers - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (layers[mid].first_channel <= g) lo = mid; else hi = mid - 1;
    }
    const AgsLayer L = layers[lo];
    const i64 c = g - L.first_channel;
    switch (L.dtype) {
        case 0: ags_sad_channel<F32>(L, c, p, chan, g, scratch); break;
        case 1: ags_sad_channel<F16>(L, c, p, chan, g, scratch); break;
        case 2: ags_sad_channel<BF16>(L, c, p, chan, g, scratch); break;
        default: break;
    }
}

// out[l] = (mean over channels of r_o, silent count / numel), float64; NaN for a part
// that is disabled.
extern "C" __global__ void __launch_bounds__(OVSW_THREADS)
    ovsw_ags_sad_finalize(const AgsLayer* __restrict__ layers, AgsParams p,
                          const double* __restrict__ chan, double* __restrict__ out) {
    __shared__ double scratch[OVSW_WARPS];
    const AgsLayer L = layers[blockIdx.x];
    double r = 0.0, s = 0.0;
    for (i64 c = threadIdx.x; c < L.channels; c += OVSW_THREADS) {
        r += chan[2 * (L.first_channel + c)];
        s += chan[2 * (L.first_channel + c) + 1];
    }
    r = block_sum(r, scratch);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const double nan = __longlong_as_double(0x7ff8000000000000LL);
        out[2 * blockIdx.x] = p.ags ? r / (double)L.channels : nan;
        out[2 * blockIdx.x + 1] = p.sad ? s / ((double)L.channels * (double)L.per_channel) : nan;
    }
}
