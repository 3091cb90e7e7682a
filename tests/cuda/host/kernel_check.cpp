// Every kernel of src/cuda/kernels/binconv.cu and ags_sad.cu, compiled for the CPU
// (src/cuda/host/launch.cpp) and launched by name with packed arguments, grid sizes as
// src/conv/cuda.rs and src/cuda/ags.rs compute them, against a scalar float64 reference
// written here. No Python, no libtorch: scripts/cuda_host_check.sh builds and runs it
// plain, under AddressSanitizer and under ThreadSanitizer.
//
// Tolerances: each output element gets a bound derived from the roundings the kernel
// is allowed (eps_F = 2^-p, the unit roundoff of a format F with p significant bits:
// 2^-24 float32, 2^-11 float16, 2^-8 bfloat16); the derivations are beside each
// check. Each check is also run once with a planted wrong answer (one element 8 ulps
// off in the coarsest format involved, a sign flipped, a count off by one, or the
// reference of an input one ulp off) that must be refused.
//
// Usage: kernel_check            every check; exit status 1 on any failure
//        kernel_check --self-test-fail NAME
//                                run one deliberately broken kernel (the header's own
//                                checks and the sanitisers must stop it; see the script)

#include "host/cuda_host.h"

#include <chrono>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

extern "C" {
int ovsw_host_kernel_count();
const char* ovsw_host_kernel_name(int i);
int ovsw_host_launch(const char* name, unsigned long long blocks, unsigned threads, void** args);
}

namespace {

using i64 = long long;
using u64 = unsigned long long;

// ---------------------------------------------------------------------------------------
// Formats, rounding and storage (independent of the header's conversions: float16
// through the compiler's _Float16, rounding through frexp/nearbyint)
// ---------------------------------------------------------------------------------------
enum class Fmt { f32 = 0, f16 = 1, bf16 = 2 };
const Fmt kFmts[3] = {Fmt::f32, Fmt::f16, Fmt::bf16};

const char* sfx(Fmt f) { return f == Fmt::f32 ? "f32" : (f == Fmt::f16 ? "f16" : "bf16"); }
int prec(Fmt f) { return f == Fmt::f32 ? 24 : (f == Fmt::f16 ? 11 : 8); }
int emin(Fmt f) { return f == Fmt::f16 ? -14 : -126; }
double max_finite(Fmt f) {
    return f == Fmt::f32 ? (double)FLT_MAX : (f == Fmt::f16 ? 65504.0 : 3.3895313892515355e38);
}
double eps_of(Fmt f) { return std::ldexp(1.0, -prec(f)); }
const double E32 = std::ldexp(1.0, -24);
// One rounding to float then to F (a single one for float32).
double rho(Fmt f) { return f == Fmt::f32 ? E32 : eps_of(f) + E32; }
// The absolute error a rounding to F may add below its normal range: half the smallest
// subnormal (2^-25 for float16). Tolerances of values stored in F allow a few of them.
double tiny(Fmt f) { return std::ldexp(1.0, emin(f) - prec(f)); }
size_t esize(Fmt f) { return f == Fmt::f32 ? 4 : 2; }
Fmt coarsest(Fmt a, Fmt b) { return prec(a) <= prec(b) ? a : b; }

// v rounded to nearest (ties to even) in format f.
double round_to(double v, Fmt f) {
    if (!std::isfinite(v) || v == 0.0) return v;
    int e;
    std::frexp(v, &e);
    const int exp = std::max(e - 1, emin(f));
    const double q = std::ldexp(1.0, exp - (prec(f) - 1));
    const double r = std::nearbyint(v / q) * q;
    return std::fabs(r) > max_finite(f) ? std::copysign(INFINITY, v) : r;
}

double ulp_of(double v, Fmt f) {
    int e = 0;
    if (v != 0.0) std::frexp(v, &e);
    const int exp = std::max(e - 1, emin(f));
    return std::ldexp(1.0, exp - (prec(f) - 1));
}

// A tensor in memory as the kernels read it: float32, or 16-bit patterns.
struct Buf {
    Fmt fmt;
    size_t n;
    std::vector<unsigned char> bytes;
    Buf(Fmt f, size_t n_) : fmt(f), n(n_), bytes(n_ * esize(f), 0xff) {}  // all NaN
    void* ptr() { return n ? bytes.data() : nullptr; }
    double get(size_t i) const {
        if (fmt == Fmt::f32) {
            float v;
            std::memcpy(&v, &bytes[4 * i], 4);
            return v;
        }
        uint16_t b;
        std::memcpy(&b, &bytes[2 * i], 2);
        if (fmt == Fmt::f16) {
            _Float16 h;
            std::memcpy(&h, &b, 2);
            return (double)h;
        }
        const uint32_t u = (uint32_t)b << 16;
        float v;
        std::memcpy(&v, &u, 4);
        return v;
    }
    // Stores v rounded to the format.
    void set(size_t i, double v) {
        const double r = round_to(v, fmt);
        if (fmt == Fmt::f32) {
            const float f = (float)r;
            std::memcpy(&bytes[4 * i], &f, 4);
        } else if (fmt == Fmt::f16) {
            const _Float16 h = (_Float16)r;
            std::memcpy(&bytes[2 * i], &h, 2);
        } else {
            const float f = (float)r;
            uint32_t u;
            std::memcpy(&u, &f, 4);
            const uint16_t b = (uint16_t)(u >> 16);
            std::memcpy(&bytes[2 * i], &b, 2);
        }
    }
    std::vector<double> values() const {
        std::vector<double> v(n);
        for (size_t i = 0; i < n; ++i) v[i] = get(i);
        return v;
    }
};

// Deterministic data: splitmix64.
struct Rng {
    u64 s;
    explicit Rng(u64 seed) : s(seed) {}
    u64 next() {
        u64 z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    double uniform(double lo, double hi) { return lo + (hi - lo) * (double)(next() >> 11) * 0x1p-53; }
};

double sign_of(double v) { return v > 0 ? 1.0 : (v < 0 ? -1.0 : v); }

// ---------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------
int g_failures = 0, g_checks = 0;

struct Verdict {
    bool ok = true;
    double worst = 0.0;  // largest err / tol
    size_t at = 0;
};

// NaN passes only against NaN, an infinity only against itself; a finite reference
// needs a finite value within its tolerance (a zero tolerance asks for equality).
Verdict compare(const std::vector<double>& got, const std::vector<double>& ref,
                const std::vector<double>& tol) {
    Verdict v;
    if (got.size() != ref.size() || tol.size() != ref.size()) {
        v.ok = false;
        v.worst = INFINITY;
        return v;
    }
    for (size_t i = 0; i < ref.size(); ++i) {
        const double g = got[i], r = ref[i];
        double ratio;
        if (std::isnan(r)) {
            ratio = std::isnan(g) ? 0.0 : INFINITY;
        } else if (std::isinf(r)) {
            ratio = g == r ? 0.0 : INFINITY;
        } else if (!std::isfinite(g)) {
            ratio = INFINITY;
        } else {
            const double err = std::fabs(g - r);
            ratio = tol[i] > 0 ? err / tol[i] : (err == 0.0 ? 0.0 : INFINITY);
        }
        if (ratio > 1.0) v.ok = false;
        if (ratio > v.worst || (i == 0 && ratio >= v.worst)) {
            v.worst = ratio;
            v.at = i;
        }
    }
    return v;
}

// A planted wrong answer: values and reference to compare instead, and what was done.
struct Plant {
    std::vector<double> got, ref;
    std::string what;
};

size_t largest(const std::vector<double>& ref) {
    size_t at = 0;
    double best = -1;
    for (size_t i = 0; i < ref.size(); ++i)
        if (std::isfinite(ref[i]) && std::fabs(ref[i]) > best) best = std::fabs(ref[i]), at = i;
    return at;
}

// One element (the largest reference) replaced by the reference moved by k ulps of f.
Plant plant_ulps(const std::vector<double>& got, const std::vector<double>& ref, Fmt f,
                 int k = 8) {
    Plant p{got, ref, ""};
    const size_t i = largest(ref);
    p.got[i] = ref[i] + k * ulp_of(ref[i], f);
    p.what = std::to_string(k) + " " + sfx(f) + " ulps at [" + std::to_string(i) + "]";
    return p;
}

// One nonzero element with its sign flipped.
Plant plant_flip(const std::vector<double>& got, const std::vector<double>& ref) {
    Plant p{got, ref, ""};
    const size_t i = largest(ref);
    p.got[i] = -ref[i];
    p.what = "sign flipped at [" + std::to_string(i) + "]";
    return p;
}

Plant plant_add(const std::vector<double>& got, const std::vector<double>& ref, double d) {
    Plant p{got, ref, ""};
    const size_t i = largest(ref);
    p.got[i] = ref[i] + d;
    p.what = "+" + std::to_string(d) + " at [" + std::to_string(i) + "]";
    return p;
}

void check(const std::string& name, const std::vector<double>& got,
           const std::vector<double>& ref, const std::vector<double>& tol, const Plant& plant) {
    ++g_checks;
    const Verdict v = compare(got, ref, tol);
    const Verdict pv = compare(plant.got, plant.ref, tol);
    const bool ok = v.ok && !pv.ok;
    if (!ok) ++g_failures;
    std::printf("%s %-44s n=%-6zu worst err/tol %-9.3g | plant (%s): err/tol %.3g %s\n",
                ok ? "ok  " : "FAIL", name.c_str(), ref.size(), v.worst, plant.what.c_str(),
                pv.worst, pv.ok ? "ACCEPTED (tolerance too loose)" : "refused");
    if (!v.ok) {
        const size_t i = v.at;
        std::printf("     at [%zu]: got %.17g, want %.17g, tol %.3g\n", i, got[i], ref[i],
                    tol[i]);
    }
}

void expect(bool cond, const std::string& what) {
    ++g_checks;
    if (!cond) ++g_failures;
    std::printf("%s %s\n", cond ? "ok  " : "FAIL", what.c_str());
}

[[noreturn]] void die(const std::string& why) {
    std::fprintf(stderr, "kernel_check: %s\n", why.c_str());
    std::exit(2);
}

// ---------------------------------------------------------------------------------------
// Launches, as src/cuda/launcher.rs and src/conv/cuda.rs / src/optim/cuda.rs make them
// ---------------------------------------------------------------------------------------
constexpr unsigned kThreads = 256;  // device.rs THREADS
constexpr i64 kMomentChunk = 16 * 1024, kMaxChunks = 64, kSignSpan = 8 * 1024;
constexpr u64 kSmCount = 1;  // elementwise_blocks caps grid-stride grids at sm_count * 32

template <class... A>
void launch(const std::string& name, u64 blocks, A*... args) {
    if (blocks == 0) return;  // device.rs: an empty grid launches nothing
    void* packed[] = {(void*)args...};
    if (ovsw_host_launch(name.c_str(), blocks, kThreads, packed) != 0) die("no kernel " + name);
}

u64 elementwise_blocks(i64 n) {
    const u64 needed = ((u64)std::max<i64>(n, 0) + kThreads - 1) / kThreads;
    return std::max<u64>(std::min<u64>(needed, kSmCount * 32), 1);
}

// ---------------------------------------------------------------------------------------
// The binary conv's activation passes: ovsw_sample_moments_*, ovsw_sign_*_*
// ---------------------------------------------------------------------------------------
enum class StdMode { Compute, Given, None };

struct Binarized {
    Buf a, std_out;
    std::vector<double> partial;
    i64 chunks = 0, chunk = 0;
};

// src/conv/cuda.rs binarize_activation. With `moments`, its partial sums are reused instead
// of launching the moments kernel again (the same launch, for the other output dtypes).
Binarized binarize(Buf& x, i64 n, i64 per, StdMode mode, Buf* std_in, Fmt out,
                   const Binarized* moments = nullptr) {
    Binarized r{Buf(out, (size_t)(n * per)), Buf(x.fmt, mode == StdMode::Compute ? (size_t)n : 0),
                {}, 0, 0};
    if (n == 0 || per == 0) return r;
    const void* x_ptr = x.ptr();
    void* a_ptr = r.a.ptr();
    const float eps = 1e-5f;
    const i64 blocks_per_sample = (per + kSignSpan - 1) / kSignSpan;
    const void* part_ptr = nullptr;
    const void* std_in_ptr = nullptr;
    void* std_out_ptr = nullptr;
    if (mode == StdMode::Compute) {
        r.chunks = std::min(std::max<i64>((per + kMomentChunk - 1) / kMomentChunk, 1), kMaxChunks);
        r.chunk = (per + r.chunks - 1) / r.chunks;
        r.partial.assign((size_t)(n * r.chunks * 2), NAN);
        if (moments != nullptr) r.partial = moments->partial;
        void* pp = r.partial.data();
        if (moments == nullptr)
            launch(std::string("ovsw_sample_moments_") + sfx(x.fmt), (u64)(n * r.chunks), &x_ptr,
                   &per, &r.chunk, &r.chunks, &pp);
        part_ptr = pp;
        std_out_ptr = r.std_out.ptr();
    } else if (mode == StdMode::Given) {
        std_in_ptr = std_in->ptr();
    }
    const i64 span = kSignSpan;
    launch(std::string("ovsw_sign_") + sfx(x.fmt) + "_" + sfx(out), (u64)(n * blocks_per_sample),
           &x_ptr, &part_ptr, &r.chunks, &per, &blocks_per_sample, &span, &eps, &std_in_ptr,
           &std_out_ptr, &a_ptr);
    return r;
}

struct Activation {
    std::string name;
    i64 n, c, h, w;
    std::vector<double> values;  // float64, rounded to each format when stored
};

// Samples: [2, 5, 60, 60] (18,000 elements per sample: 2 moment chunks, 3 sign blocks):
// sample 0 a wave of amplitude ~4 with exact zeros and one 2^-24 (which x / std
// rounds to zero in float16, not in the others), sample 1 around 100 (the shift);
// [3, 2, 3, 3]: a constant sample (variance 0), a mixed one, one with zeros.
std::vector<Activation> activations() {
    std::vector<Activation> out;
    {
        Activation a{"x[2,5,60,60]", 2, 5, 60, 60, {}};
        const i64 per = a.c * a.h * a.w;
        a.values.resize((size_t)(a.n * per));
        for (i64 i = 0; i < per; ++i) {
            double v = 4.0 * std::sin(0.731 * (double)i) + 0.5 * std::cos(0.0137 * (double)i);
            if (i % 997 == 5) v = 0.0;
            if (i == 4321) v = std::ldexp(1.0, -24);
            a.values[(size_t)i] = v;
            a.values[(size_t)(per + i)] = 100.0 + 0.75 * std::sin(0.377 * (double)i + 1.0);
        }
        out.push_back(a);
    }
    {
        Activation a{"x[3,2,3,3]", 3, 2, 3, 3, {}};
        Rng rng(7);
        for (int i = 0; i < 18; ++i) a.values.push_back(0.75);
        for (int i = 0; i < 18; ++i) a.values.push_back(rng.uniform(-2, 2));
        for (int i = 0; i < 18; ++i) a.values.push_back(i % 3 == 0 ? 0.0 : rng.uniform(-0.5, 1.0));
        out.push_back(a);
    }
    return out;
}

Buf store(Fmt f, const std::vector<double>& v) {
    Buf b(f, v.size());
    for (size_t i = 0; i < v.size(); ++i) b.set(i, v[i]);
    return b;
}

// The exact per-sample std: sqrt(unbiased var + 1e-5), two passes in float64.
std::vector<double> ref_std(const Buf& x, i64 n, i64 per) {
    std::vector<double> s((size_t)n);
    for (i64 k = 0; k < n; ++k) {
        double mean = 0;
        for (i64 i = 0; i < per; ++i) mean += x.get((size_t)(k * per + i));
        mean /= (double)per;
        double ss = 0;
        for (i64 i = 0; i < per; ++i) {
            const double d = x.get((size_t)(k * per + i)) - mean;
            ss += d * d;
        }
        s[(size_t)k] = std::sqrt(ss / (double)(per - 1) + 1e-5);
    }
    return s;
}

// sign(x / sd) with x / sd rounded to X (libtorch's x.div(std)): 0 where |x / sd| is
// at most half X's smallest subnormal. A quotient within rounding of that threshold
// would make the test data ambiguous: refused.
double ref_sign_div(double x, double sd, Fmt xf) {
    const double q = x / sd;
    const double thr = std::ldexp(1.0, emin(xf) - prec(xf));  // half the smallest subnormal
    if (q != 0 && std::fabs(std::fabs(q) / thr - 1.0) < 8 * eps_of(xf))
        die("test data: x / std lies on the rounding-to-zero threshold");
    return std::fabs(q) <= thr ? 0.0 : sign_of(q);
}

void check_activation_passes(const Activation& act) {
    const i64 n = act.n, per = act.c * act.h * act.w;
    for (Fmt xf : kFmts) {
        Buf x = store(xf, act.values);
        const std::vector<double> xv = x.values();
        const std::vector<double> sd = ref_std(x, n, per);
        Binarized first = binarize(x, n, per, StdMode::Compute, nullptr, xf);
        for (Fmt of : kFmts) {
            const std::string tag = std::string(sfx(xf)) + "->" + sfx(of) + " " + act.name;
            Binarized b = of == xf ? first
                                   : binarize(x, n, per, StdMode::Compute, nullptr, of, &first);
            if (of == xf) {
                // Moments: (sum(x - x0), sum((x - x0)^2)) per chunk, float64 sums in
                // another order. Each sum's error is at most (terms per thread + 5
                // shuffle levels + 8 warp sums) u |terms| for the kernel and (terms) u
                // |terms| for the reference, u = 2^-53; the squares add u each.
                std::vector<double> ref, tol, ref_plant;
                for (i64 k = 0; k < n; ++k) {
                    const double x0 = xv[(size_t)(k * per)];
                    for (i64 c = 0; c < b.chunks; ++c) {
                        const i64 lo = c * b.chunk, hi = std::min(lo + b.chunk, per);
                        double s1 = 0, s2 = 0, a1 = 0, p1 = 0, p2 = 0;
                        for (i64 i = lo; i < hi; ++i) {
                            double v = xv[(size_t)(k * per + i)];
                            const double d = v - x0;
                            s1 += d;
                            s2 += d * d;
                            a1 += std::fabs(d);
                            // The plant: element 1 of sample 0 one ulp of X higher.
                            if (k == 0 && i == 1) v += ulp_of(v, xf);
                            p1 += v - x0;
                            p2 += (v - x0) * (v - x0);
                        }
                        const double depth = (double)(hi - lo) + (double)((hi - lo + 255) / 256) + 16;
                        double a2 = 0;
                        for (i64 i = lo; i < hi; ++i) {
                            const double d = xv[(size_t)(k * per + i)] - x0;
                            a2 += d * d;
                        }
                        ref.push_back(s1);
                        ref.push_back(s2);
                        ref_plant.push_back(p1);
                        ref_plant.push_back(p2);
                        tol.push_back(depth * 0x1p-53 * a1 * 1.01);
                        tol.push_back(depth * 0x1p-53 * a2 * 1.01);
                    }
                }
                Plant p{b.partial, ref_plant, std::string("x[1] one ") + sfx(xf) + " ulp up"};
                check(std::string("moments ") + sfx(xf) + " " + act.name, b.partial, ref, tol, p);
                // std = sqrt(var + eps) in X: var to float and X (rho), + eps (rho), halved
                // by the root; sqrtf and X (rho): 2 rho + E32 for the double sums.
                std::vector<double> tol_s(sd.size());
                for (size_t i = 0; i < sd.size(); ++i)
                    tol_s[i] = (2 * rho(xf) + E32) * sd[i] * 1.01;
                const std::vector<double> got_s = b.std_out.values();
                check(std::string("std ") + sfx(xf) + " " + act.name, got_s, sd, tol_s,
                      plant_ulps(got_s, sd, xf));
            }
            // a = sign(x / std): exact.
            std::vector<double> ref_a((size_t)(n * per)), zero((size_t)(n * per), 0.0);
            for (i64 k = 0; k < n; ++k)
                for (i64 i = 0; i < per; ++i)
                    ref_a[(size_t)(k * per + i)] = ref_sign_div(xv[(size_t)(k * per + i)], sd[(size_t)k], xf);
            const std::vector<double> got_a = b.a.values();
            check("sign train " + tag, got_a, ref_a, zero, plant_flip(got_a, ref_a));
            if (xf == of || (xf == Fmt::f32 && of == Fmt::f16)) {
                // The backward's rebuild from a given std, and eval mode (no std).
                Binarized g = binarize(x, n, per, StdMode::Given, &b.std_out, of);
                const std::vector<double> given = b.std_out.values();
                std::vector<double> ref_g((size_t)(n * per)), ref_e((size_t)(n * per));
                for (i64 k = 0; k < n; ++k)
                    for (i64 i = 0; i < per; ++i) {
                        const size_t j = (size_t)(k * per + i);
                        ref_g[j] = ref_sign_div(xv[j], given[(size_t)k], xf);
                        ref_e[j] = sign_of(xv[j]);
                    }
                const std::vector<double> got_g = g.a.values();
                check("sign given-std " + tag, got_g, ref_g, zero, plant_flip(got_g, ref_g));
                Binarized e = binarize(x, n, per, StdMode::None, nullptr, of);
                const std::vector<double> got_e = e.a.values();
                check("sign eval " + tag, got_e, ref_e, zero, plant_flip(got_e, ref_e));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// ovsw_bireal_backward_*_*: grad_x = g * max(0, 2 - 2|x / std|) / std
// ---------------------------------------------------------------------------------------
// Dims of a 4-D tensor in NCHW order; strides of a contiguous or channels_last layout.
std::vector<i64> strides_of(const i64 size[4], bool channels_last) {
    if (!channels_last) return {size[1] * size[2] * size[3], size[2] * size[3], size[3], 1};
    return {size[1] * size[2] * size[3], 1, size[3] * size[1], size[1]};
}

void check_bireal(const Activation& act, bool x_cl, bool g_cl, bool with_std, Fmt gf, Fmt xf) {
    const i64 size[4] = {act.n, act.c, act.h, act.w};
    const i64 per = act.c * act.h * act.w, total = act.n * per;
    const std::vector<i64> xs = strides_of(size, x_cl), gs = strides_of(size, g_cl);
    // x stored in its layout: element (n, c, h, w) at dot(index, xs).
    Buf x(xf, (size_t)total), g(gf, (size_t)total), sd(xf, (size_t)act.n);
    Rng rng(11);
    std::vector<double> logical_g((size_t)total);
    for (auto& v : logical_g) v = rng.uniform(-3, 3);
    for (i64 n = 0; n < size[0]; ++n)
        for (i64 c = 0; c < size[1]; ++c)
            for (i64 h = 0; h < size[2]; ++h)
                for (i64 w = 0; w < size[3]; ++w) {
                    const i64 l = ((n * size[1] + c) * size[2] + h) * size[3] + w;
                    x.set((size_t)(n * xs[0] + c * xs[1] + h * xs[2] + w * xs[3]), act.values[(size_t)l] * 0.5);
                    g.set((size_t)(n * gs[0] + c * gs[1] + h * gs[2] + w * gs[3]), logical_g[(size_t)l]);
                }
    if (with_std) {
        const std::vector<double> s = ref_std(x, act.n, per);  // any positive std will do
        for (i64 n = 0; n < act.n; ++n) sd.set((size_t)n, s[(size_t)n]);
    }
    // src/conv/cuda.rs bireal_backward: x's dims from outermost to innermost stride.
    std::vector<int> order = {0, 1, 2, 3};
    if (x_cl) order = {0, 2, 3, 1};
    i64 sizes[4], gst[4];
    for (int k = 0; k < 4; ++k) sizes[k] = size[order[k]], gst[k] = gs[order[k]];
    const int n_axis = 0;
    const int same_layout = x_cl == g_cl ? 1 : 0;
    Buf out(xf, (size_t)total);
    const void *g_ptr = g.ptr(), *x_ptr = x.ptr(), *std_ptr = with_std ? sd.ptr() : nullptr;
    void* out_ptr = out.ptr();
    const std::string name = std::string("ovsw_bireal_backward_") + sfx(gf) + "_" + sfx(xf);
    launch(name, elementwise_blocks(total), &g_ptr, &x_ptr, &std_ptr, &out_ptr, &total,
           &sizes[1], &sizes[2], &sizes[3], &gst[0], &gst[1], &gst[2], &gst[3], &n_axis,
           &same_layout, &per);
    // Reference per memory offset of x (the output has x's layout).
    std::vector<double> ref((size_t)total), tol((size_t)total);
    for (i64 n = 0; n < size[0]; ++n)
        for (i64 c = 0; c < size[1]; ++c)
            for (i64 h = 0; h < size[2]; ++h)
                for (i64 w = 0; w < size[3]; ++w) {
                    const size_t xo = (size_t)(n * xs[0] + c * xs[1] + h * xs[2] + w * xs[3]);
                    const size_t go = (size_t)(n * gs[0] + c * gs[1] + h * gs[2] + w * gs[3]);
                    const double s = with_std ? sd.get((size_t)n) : 1.0;
                    const double gv = g.get(go), xh = x.get(xo) / s;
                    const double t = std::max(0.0, 2.0 - 2.0 * std::fabs(xh));
                    ref[xo] = gv * t / s;
                    // g to X (eps_X); x / s to float and X (E32 + eps_X), so 2 - 2|xh|
                    // is off by 2 (eps_X + E32)|xh| plus its own rounding (E32 + eps_X)
                    // relative; g * t and / s each round to float and X.
                    tol[xo] = 1.02 * (std::fabs(gv) / s * 2 * rho(xf) * std::min(std::fabs(xh), 1.1) +
                                      4 * rho(xf) * std::fabs(ref[xo])) +
                              4 * tiny(xf);
                }
    const std::vector<double> got = out.values();
    check(std::string("bireal ") + sfx(gf) + "->" + sfx(xf) + (x_cl ? " x:cl" : " x:nchw") +
              (g_cl ? " g:cl" : " g:nchw") + (with_std ? " std" : " eval") + " " + act.name,
          got, ref, tol, plant_ulps(got, ref, coarsest(gf, xf)));
}

// ---------------------------------------------------------------------------------------
// ovsw_weight_prep_*_* and ovsw_weight_grad_*_*
// ---------------------------------------------------------------------------------------
struct Weight {
    std::string name;
    i64 o, k;
    std::vector<double> values;  // [o, k]
};

// mean |W_o| of the stored values.
double abs_mean(const std::vector<double>& w, i64 o, i64 k) {
    double s = 0;
    for (i64 i = 0; i < k; ++i) s += std::fabs(w[(size_t)(o * k + i)]);
    return s / (double)k;
}

// [5, 288] (288 = 32 x 3 x 3 > 256 threads): a random channel with |W| > 1 and < 1, a
// zero channel, one with exact zeros and a wide range, a constant one (variance 0),
// one of tiny values; [3, 9]: fewer weights than warps have lanes. Values closer to
// mean |W_o| than rounding can resolve (hardtanhv2's mask) are moved away, in every
// format the weight is stored in.
std::vector<Weight> weights() {
    std::vector<Weight> out;
    Rng rng(3);
    Weight a{"W[5,288]", 5, 288, {}};
    for (i64 i = 0; i < 288; ++i) a.values.push_back(rng.uniform(-1.6, 1.6));
    for (i64 i = 0; i < 288; ++i) a.values.push_back(0.0);
    for (i64 i = 0; i < 288; ++i) a.values.push_back(i % 4 == 0 ? 0.0 : rng.uniform(-3, 3) * (i % 7 == 0 ? 10 : 1));
    for (i64 i = 0; i < 288; ++i) a.values.push_back(0.5);
    for (i64 i = 0; i < 288; ++i) a.values.push_back(rng.uniform(-2e-3, 2e-3));
    out.push_back(a);
    Weight b{"W[3,9]", 3, 9, {}};
    for (i64 i = 0; i < 27; ++i) b.values.push_back(rng.uniform(-1, 1));
    out.push_back(b);
    for (Weight& w : out) {
        for (int round = 0; round < 20; ++round) {
            bool moved = false;
            for (i64 o = 0; o < w.o; ++o)
                for (Fmt f : kFmts) {
                    std::vector<double> st(w.values.size());
                    for (size_t i = 0; i < st.size(); ++i) st[i] = round_to(w.values[i], f);
                    const double m = abs_mean(st, o, w.k);
                    for (i64 i = 0; i < w.k; ++i) {
                        double& v = w.values[(size_t)(o * w.k + i)];
                        const double gap = std::fabs(std::fabs(st[(size_t)(o * w.k + i)]) - m);
                        if (m > 0 && gap > 0 && gap < 0.03 * m) {
                            v = std::copysign(m * 1.08, v == 0 ? 1.0 : v);
                            moved = true;
                        }
                    }
                }
            if (!moved) break;
            if (round == 19) die("test data: weights near mean |W| could not be moved away");
        }
    }
    return out;
}

struct AlphaRef {
    std::vector<double> alpha, tol, m;
};

// alpha_o = mean |(W - mu) / sqrt(var + eps)| in float64, and its bound, with rho the
// rounding to float then W: mu off by rho |mu|; var, var + eps, sqrtf and W make sd off
// by 2 rho relative; W - mu off by rho (|mu| + |W - mu|), its quotient by sd by 2 rho
// more and rho of its own; the mean rho: rho |mu| / sd + 5 rho alpha.
AlphaRef ref_alpha(const Buf& w, i64 o_n, i64 k) {
    AlphaRef r;
    const double ew = rho(w.fmt);
    for (i64 o = 0; o < o_n; ++o) {
        double mu = 0, absm = 0;
        for (i64 i = 0; i < k; ++i) mu += w.get((size_t)(o * k + i)), absm += std::fabs(w.get((size_t)(o * k + i)));
        mu /= (double)k;
        double ss = 0;
        for (i64 i = 0; i < k; ++i) ss += (w.get((size_t)(o * k + i)) - mu) * (w.get((size_t)(o * k + i)) - mu);
        const double sd = std::sqrt(ss / (double)(k - 1) + 1e-5);
        double a = 0;
        for (i64 i = 0; i < k; ++i) a += std::fabs((w.get((size_t)(o * k + i)) - mu) / sd);
        a /= (double)k;
        r.alpha.push_back(a);
        r.tol.push_back(1.05 * (ew * std::fabs(mu) / sd + 5 * ew * a) + 4 * tiny(w.fmt));
        r.m.push_back(absm / (double)k);
    }
    return r;
}

void check_weight_prep(const Weight& wt, Fmt wf, Fmt of, int act_w, bool learnable, bool bias,
                       bool fold) {
    const i64 o_n = wt.o, k = wt.k;
    Buf w = store(wf, wt.values);
    std::vector<double> sv, bv;
    for (i64 o = 0; o < o_n; ++o) {
        sv.push_back(o % 5 == 1 ? 0.0 : (o % 2 ? -0.3 : 0.7) * (1.0 + 0.25 * (double)o));
        bv.push_back(0.1 * (double)o - 0.15);
    }
    Buf scale = store(wf, sv), bias_b = store(wf, bv);
    Buf w_eff(of, (size_t)(o_n * k)), alpha(wf, learnable ? 0 : (size_t)o_n), bias_eff(of, bias ? (size_t)o_n : 0);
    const void* w_ptr = w.ptr();
    const void* scale_ptr = learnable ? scale.ptr() : nullptr;
    const void* bias_ptr = bias ? bias_b.ptr() : nullptr;
    void *weff_ptr = w_eff.ptr(), *alpha_ptr = alpha.ptr(), *beff_ptr = bias_eff.ptr();
    const int fold_i = fold ? 1 : 0;
    const float eps = 1e-5f;
    launch(std::string("ovsw_weight_prep_") + sfx(wf) + "_" + sfx(of), (u64)o_n, &w_ptr, &k,
           &act_w, &scale_ptr, &bias_ptr, &fold_i, &eps, &weff_ptr, &alpha_ptr, &beff_ptr);
    const AlphaRef ar = ref_alpha(w, o_n, k);
    std::vector<double> s(o_n), tol_s(o_n, 0.0);
    for (i64 o = 0; o < o_n; ++o) {
        s[o] = learnable ? scale.get((size_t)o) : ar.alpha[(size_t)o];
        if (!learnable) tol_s[o] = ar.tol[(size_t)o];
    }
    const std::string tag = std::string(sfx(wf)) + "->" + sfx(of) + " act_w=" + std::to_string(act_w) +
                            (learnable ? " scale" : " alpha") + (bias ? " bias" : "") +
                            (fold ? " fold" : "") + " " + wt.name;
    const Fmt cf = coarsest(wf, of);
    if (!learnable) {
        const std::vector<double> got = alpha.values();
        check("alpha " + tag, got, ar.alpha, ar.tol, plant_ulps(got, ar.alpha, wf));
    }
    // w_eff = sign(W) (x mean|W| for ste_v2) (x s folded), in O: mean|W| rounds to float
    // and W, w_b * s to float, the store to O; plus w_b times the bound on alpha.
    std::vector<double> ref((size_t)(o_n * k)), tol((size_t)(o_n * k));
    const double eo = eps_of(of);
    for (i64 o = 0; o < o_n; ++o)
        for (i64 i = 0; i < k; ++i) {
            const size_t j = (size_t)(o * k + i);
            const double wb = sign_of(w.get(j)) * (act_w == 2 ? ar.m[(size_t)o] : 1.0);
            ref[j] = fold ? wb * s[o] : wb;
            const double rel = eo + (act_w == 2 ? rho(wf) : 0.0) + (fold ? E32 : 0.0);
            tol[j] = 1.02 * (rel * std::fabs(ref[j]) + (fold ? std::fabs(wb) * tol_s[o] : 0.0)) +
                     2 * tiny(of) + (act_w == 2 ? 2 * tiny(wf) : 0.0);
        }
    const std::vector<double> got = w_eff.values();
    check("w_eff " + tag, got, ref, tol, plant_ulps(got, ref, cf));
    if (bias) {
        std::vector<double> rb(o_n), tb(o_n);
        for (i64 o = 0; o < o_n; ++o) {
            const double b = bias_b.get((size_t)o);
            rb[o] = fold ? b * s[o] : b;
            tb[o] = 1.02 * ((eo + (fold ? E32 : 0.0)) * std::fabs(rb[o]) + (fold ? std::fabs(b) * tol_s[o] : 0.0)) +
                    2 * tiny(of);
        }
        const std::vector<double> gb = bias_eff.values();
        check("bias_eff " + tag, gb, rb, tb, plant_ulps(gb, rb, cf));
    }
}

void check_weight_grad(const Weight& wt, Fmt gf, Fmt wf, int act_w, bool want_w, bool want_s,
                       bool bias) {
    const i64 o_n = wt.o, k = wt.k;
    Buf w = store(wf, wt.values);
    Rng rng(5);
    std::vector<double> gev((size_t)(o_n * k)), sv, bv, gbv;
    for (i64 o = 0; o < o_n; ++o) {
        for (i64 i = 0; i < k; ++i) gev[(size_t)(o * k + i)] = o == 1 ? 0.0 : rng.uniform(-1, 1) * (o == 4 ? 1e-3 : 1.0);
        sv.push_back(o == 3 ? 0.0 : 0.4 + 0.3 * (double)o);
        bv.push_back(0.2 - 0.1 * (double)o);
        gbv.push_back(o == 1 ? 0.0 : 1.5 - 0.5 * (double)o);
    }
    Buf ge = store(gf, gev), s = store(wf, sv), b = store(wf, bv), gbe = store(gf, gbv);
    Buf gw(wf, want_w ? (size_t)(o_n * k) : 0), gs(wf, want_s ? (size_t)o_n : 0), gb(wf, bias ? (size_t)o_n : 0);
    const void *gw_ptr = ge.ptr(), *w_ptr = w.ptr(), *s_ptr = s.ptr();
    const void* gb_ptr = bias ? gbe.ptr() : nullptr;
    const void* b_ptr = bias ? b.ptr() : nullptr;
    void *ow = gw.ptr(), *os = gs.ptr(), *ob = gb.ptr();
    launch(std::string("ovsw_weight_grad_") + sfx(gf) + "_" + sfx(wf), (u64)o_n, &gw_ptr, &w_ptr,
           &k, &act_w, &s_ptr, &gb_ptr, &b_ptr, &ow, &os, &ob);
    const std::string tag = std::string(sfx(gf)) + "->" + sfx(wf) + " act_w=" + std::to_string(act_w) +
                            (bias ? " bias" : "") + " " + wt.name;
    const double ew = eps_of(wf);
    const Fmt cf = coarsest(gf, wf);
    std::vector<double> m(o_n);
    for (i64 o = 0; o < o_n; ++o) m[o] = abs_mean(w.values(), o, k);
    if (want_w) {
        // grad_w = ge * s * mask: the product rounds to float and W.
        std::vector<double> ref((size_t)(o_n * k)), tol((size_t)(o_n * k));
        for (i64 o = 0; o < o_n; ++o)
            for (i64 i = 0; i < k; ++i) {
                const size_t j = (size_t)(o * k + i);
                const double wv = w.get(j);
                double keep = 1.0;
                if (act_w == 1) keep = std::fabs(wv) < 1.0 ? 1.0 : 0.0;
                if (act_w == 3) keep = std::fabs(wv) < m[o] ? 1.0 : 0.0;
                ref[j] = ge.get(j) * s.get((size_t)o) * keep;
                tol[j] = 1.01 * rho(wf) * std::fabs(ref[j]) + 2 * tiny(wf);
            }
        const std::vector<double> got = gw.values();
        check("grad_w " + tag, got, ref, tol, plant_ulps(got, ref, cf));
    }
    if (want_s) {
        // grad_scale = sum ge * w_b (+ gbeff * bias) in float64, stored in W (eW); for
        // ste_v2 every w_b carries the same mean|W|, rounded to float and W: rho of
        // that part of the sum.
        std::vector<double> ref(o_n), tol(o_n);
        for (i64 o = 0; o < o_n; ++o) {
            double acc = 0, mag = 0;
            for (i64 i = 0; i < k; ++i) {
                const size_t j = (size_t)(o * k + i);
                const double wb = sign_of(w.get(j)) * (act_w == 2 ? m[o] : 1.0);
                acc += ge.get(j) * wb;
                mag += std::fabs(ge.get(j) * wb);
            }
            const double weighted = acc;
            if (bias) acc += gbe.get((size_t)o) * b.get((size_t)o), mag += std::fabs(gbe.get((size_t)o) * b.get((size_t)o));
            ref[o] = acc;
            tol[o] = 1.01 * (ew * std::fabs(acc) + (act_w == 2 ? rho(wf) * std::fabs(weighted) : 0.0) +
                             (double)(k + 32) * 0x1p-52 * mag) + 2 * tiny(wf);
        }
        const std::vector<double> got = gs.values();
        check("grad_scale " + tag, got, ref, tol, plant_ulps(got, ref, wf));
    }
    if (bias) {
        std::vector<double> ref(o_n), tol(o_n);
        for (i64 o = 0; o < o_n; ++o) {
            ref[o] = gbe.get((size_t)o) * s.get((size_t)o);
            tol[o] = 1.01 * rho(wf) * std::fabs(ref[o]) + 2 * tiny(wf);
        }
        const std::vector<double> got = gb.values();
        check("grad_bias " + tag, got, ref, tol, plant_ulps(got, ref, cf));
    }
}

// ---------------------------------------------------------------------------------------
// ovsw_ags_sad_step and ovsw_ags_sad_finalize
// ---------------------------------------------------------------------------------------
// ags.rs writes these rows and this struct (AgsLayer / AgsParams in ags_sad.cu).
struct LayerRow {
    i64 grad, weight, tracker, prev, channels, per_channel, first_channel, dtype;
};
struct Params {
    int ags, sad;
    float delta, m, one_minus_m, tau, lambda;
};
static_assert(sizeof(LayerRow) == 64 && sizeof(Params) == 28, "the layouts ags.rs writes");

struct Layer {
    Fmt fmt;
    i64 o, k;
    Buf grad, weight, tracker, prev;
};

// Three layers (f32 [4, 300], f16 [3, 45], bf16 [2, 260]); per layer channels where AGS
// rescales (ratio 0.2 delta), where it does not (5 delta), with zero gradients (the
// 1e-6 floor) and with zero weights (the 1e-3 floor); trackers in {0, 0.002, 0.3, 0.8}
// (far from tau after the update), weight_prev with flipped signs and zeros.
std::vector<Layer> ags_layers(double delta) {
    std::vector<Layer> out;
    const Fmt fmts[3] = {Fmt::f32, Fmt::f16, Fmt::bf16};
    const i64 os[3] = {4, 3, 2}, ks[3] = {300, 45, 260};
    Rng rng(17);
    for (int l = 0; l < 3; ++l) {
        const Fmt f = fmts[l];
        const i64 o_n = os[l], k = ks[l];
        Layer L{f, o_n, k, Buf(f, (size_t)(o_n * k)), Buf(f, (size_t)(o_n * k)), Buf(f, (size_t)(o_n * k)),
                Buf(f, (size_t)(o_n * k))};
        const double trackers[4] = {0.0, 0.002, 0.3, 0.8};
        for (i64 o = 0; o < o_n; ++o) {
            // 0 rescaled, 1 left alone, 2 zero gradients, 3 zero weights
            const int kinds[3][4] = {{0, 1, 2, 3}, {0, 3, 1, 0}, {1, 0, 0, 0}};
            const int kind = kinds[l][o];
            std::vector<double> wv(k), gv(k);
            double wn = 0, gn = 0;
            for (i64 i = 0; i < k; ++i) {
                wv[i] = kind == 3 ? 0.0 : round_to(rng.uniform(-1, 1), f);
                gv[i] = kind == 2 ? 0.0 : rng.uniform(-1, 1);
                wn += wv[i] * wv[i];
                gn += gv[i] * gv[i];
            }
            wn = std::max(std::sqrt(wn), 1e-3);
            gn = std::sqrt(gn);
            const double target = kind == 0 ? 0.2 * delta : 5.0 * delta;
            const double g_scale = (kind == 0 || kind == 1) ? target * wn / gn : 1.0;
            for (i64 i = 0; i < k; ++i) {
                const size_t j = (size_t)(o * k + i);
                L.weight.set(j, wv[i]);
                L.grad.set(j, gv[i] * g_scale);
                L.tracker.set(j, trackers[rng.next() % 4]);
                const u64 r = rng.next() % 10;
                L.prev.set(j, r < 3 ? -wv[i] : (r == 3 ? 0.0 : wv[i] * 0.5));
            }
        }
        out.push_back(std::move(L));
    }
    return out;
}

void check_ags_sad(bool ags, bool sad) {
    const double delta = 0.05, mom = 0.9, tau = 0.05, lambda = 0.01;
    std::vector<Layer> layers = ags_layers(delta);
    // Inputs before the step (the kernel writes grad, tracker and prev in place).
    std::vector<std::vector<double>> g0, w0, t0, p0;
    std::vector<std::vector<unsigned char>> w_bits;
    for (Layer& L : layers) {
        g0.push_back(L.grad.values());
        w0.push_back(L.weight.values());
        t0.push_back(L.tracker.values());
        p0.push_back(L.prev.values());
        w_bits.push_back(L.weight.bytes);
    }
    std::vector<LayerRow> table;
    i64 total = 0;
    for (Layer& L : layers) {
        table.push_back({(i64)(uintptr_t)L.grad.ptr(), (i64)(uintptr_t)L.weight.ptr(),
                         sad ? (i64)(uintptr_t)L.tracker.ptr() : 0, sad ? (i64)(uintptr_t)L.prev.ptr() : 0,
                         L.o, L.k, total, (i64)L.fmt});
        total += L.o;
    }
    const Params params{ags ? 1 : 0, sad ? 1 : 0, (float)delta, (float)mom, (float)(1.0 - mom),
                        (float)tau, (float)lambda};
    std::vector<double> chan((size_t)(total * 2), NAN), out(layers.size() * 2, NAN);
    const void* table_ptr = table.data();
    const int num_layers = (int)layers.size();
    void *chan_ptr = chan.data(), *out_ptr = out.data();
    launch("ovsw_ags_sad_step", (u64)total, &table_ptr, &num_layers, &params, &chan_ptr);
    launch("ovsw_ags_sad_finalize", (u64)layers.size(), &table_ptr, &params, &chan_ptr, &out_ptr);

    const double df = params.delta, mf = params.m, omf = params.one_minus_m, lf = params.lambda;
    std::vector<double> ref_chan, tol_chan, ref_out, tol_out;
    const std::string mode = std::string(ags ? "ags" : "") + (ags && sad ? "+" : "") + (sad ? "sad" : "");
    for (size_t l = 0; l < layers.size(); ++l) {
        Layer& L = layers[l];
        const i64 k = L.k;
        const double et = eps_of(L.fmt);
        const double tau_t = round_to(params.tau, L.fmt);  // compared in the tracker's dtype
        std::vector<double> rg(L.o * k), tg(L.o * k), rt(L.o * k), tt(L.o * k);
        double rsum = 0, rtol = 0, silent_total = 0;
        for (i64 o = 0; o < L.o; ++o) {
            double gs = 0, ws = 0;
            for (i64 i = 0; i < k; ++i) {
                gs += g0[l][o * k + i] * g0[l][o * k + i];
                ws += w0[l][o * k + i] * w0[l][o * k + i];
            }
            const double gn = std::max(std::sqrt(gs), 1e-6), wn = std::max(std::sqrt(ws), 1e-3);
            const double r = gn / wn;
            if (ags && std::fabs(r / df - 1.0) < 1e-3) die("test data: a ratio at delta");
            const bool active = ags && r < df;
            const double factor = active ? df * wn / gn : 1.0;
            double silent = 0;
            for (i64 i = 0; i < k; ++i) {
                const size_t j = (size_t)(o * k + i);
                const double gf = g0[l][j] * factor;
                double decay = 0;
                if (sad) {
                    const double flipped = sign_of(w0[l][j]) != sign_of(p0[l][j]) ? 1.0 : 0.0;
                    const double tn = mf * t0[l][j] + omf * flipped;
                    if (std::fabs(tn - tau_t) < 0.1 * tau_t) die("test data: a tracker at tau");
                    rt[j] = tn;
                    // Two products and a sum, each to float and T.
                    tt[j] = 1.02 * (rho(L.fmt) * (std::fabs(mf * t0[l][j]) + omf * flipped) + et * tn) + 4 * tiny(L.fmt);
                    if (tn < tau_t) {
                        silent += 1;
                        decay = lf * w0[l][j];
                    }
                }
                rg[j] = gf + decay;
                // g * factor: the norms' roots to float (E32 each), delta * wn and / gn
                // (E32 each), the product (E32) and T (eT); lambda * w to float and T;
                // the sum to T.
                tg[j] = 1.02 * ((active ? et + 6 * E32 : 0.0) * std::fabs(gf) + (et + 2 * E32) * std::fabs(decay) +
                                (sad && decay != 0 ? et * std::fabs(rg[j]) : 0.0)) +
                        (active || decay != 0 ? 4 * tiny(L.fmt) : 0.0);
            }
            ref_chan.push_back(ags ? r : 0.0);
            tol_chan.push_back(ags ? 4.04 * E32 * r : 0.0);  // two roots and the ratio in float
            ref_chan.push_back(silent);
            tol_chan.push_back(0.0);
            rsum += r;
            rtol += 4.04 * E32 * r;
            silent_total += silent;
        }
        ref_out.push_back(ags ? rsum / (double)L.o : NAN);
        tol_out.push_back(ags ? rtol / (double)L.o * 1.01 : 0.0);
        ref_out.push_back(sad ? silent_total / ((double)L.o * (double)k) : NAN);
        tol_out.push_back(sad ? 0x1p-50 * silent_total / ((double)L.o * (double)k) : 0.0);
        const std::string tag = std::string(sfx(L.fmt)) + " layer " + std::to_string(l) + " [" +
                                std::to_string(L.o) + "," + std::to_string(k) + "] " + mode;
        const std::vector<double> got_g = L.grad.values();
        check("ags_sad grad " + tag, got_g, rg, tg, plant_ulps(got_g, rg, L.fmt));
        if (sad) {
            const std::vector<double> got_t = L.tracker.values();
            check("ags_sad tracker " + tag, got_t, rt, tt, plant_ulps(got_t, rt, L.fmt));
            expect(L.prev.bytes == w_bits[l], "ags_sad weight_prev == weight bit for bit " + tag);
        } else {
            const std::vector<double> got_t = L.tracker.values(), got_p = L.prev.values();
            check("ags_sad tracker untouched " + tag, got_t, t0[l], std::vector<double>(got_t.size(), 0.0),
                  plant_add(got_t, t0[l], 1.0));
            check("ags_sad prev untouched " + tag, got_p, p0[l], std::vector<double>(got_p.size(), 0.0),
                  plant_flip(got_p, p0[l]));
        }
    }
    check("ags_sad_step chan (ratio, silent) " + mode, chan, ref_chan, tol_chan,
          ags ? plant_ulps(chan, ref_chan, Fmt::f32) : plant_add(chan, ref_chan, 1.0));
    check("ags_sad_finalize out (mean ratio, silent fraction) " + mode, out, ref_out, tol_out,
          ags ? plant_ulps(out, ref_out, Fmt::f32) : plant_add(out, ref_out, 1e-6));
}

// ---------------------------------------------------------------------------------------
// The header itself: conversions, shuffles, barriers, atomics
// ---------------------------------------------------------------------------------------
void check_conversions() {
    // Every float16 pattern to float, against the compiler's _Float16.
    size_t bad = 0;
    for (uint32_t b = 0; b < 65536; ++b) {
        _Float16 h;
        const uint16_t hb = (uint16_t)b;
        std::memcpy(&h, &hb, 2);
        const float want = (float)h, got = ovsw_host::half_to_float(hb);
        if (!(std::isnan(want) ? std::isnan(got) : std::memcmp(&want, &got, 4) == 0)) ++bad;
    }
    expect(bad == 0, "half_to_float == (float)_Float16 for all 65536 patterns (" + std::to_string(bad) + " differ)");
    // Floats to float16 and bfloat16: every float16/bfloat16 value, the midpoints and
    // their neighbours (the ties), and random bit patterns.
    std::vector<float> probes;
    for (uint32_t b = 0; b < 65536; ++b) {
        for (int fmt = 0; fmt < 2; ++fmt) {
            double v;
            if (fmt == 0) {
                _Float16 h;
                const uint16_t hb = (uint16_t)b;
                std::memcpy(&h, &hb, 2);
                v = (double)h;
            } else {
                const uint32_t u = b << 16;
                float f;
                std::memcpy(&f, &u, 4);
                v = f;
            }
            if (!std::isfinite(v)) continue;
            const Fmt F = fmt == 0 ? Fmt::f16 : Fmt::bf16;
            const double mid = v + 0.5 * ulp_of(v, F);
            probes.push_back((float)v);
            probes.push_back((float)mid);
            probes.push_back(std::nextafter((float)mid, 0.0f));
            probes.push_back(std::nextafter((float)mid, INFINITY));
        }
    }
    Rng rng(99);
    for (int i = 0; i < 200000; ++i) {
        const uint32_t u = (uint32_t)rng.next();
        float f;
        std::memcpy(&f, &u, 4);
        probes.push_back(f);
    }
    probes.push_back(INFINITY);
    probes.push_back(-INFINITY);
    probes.push_back(NAN);
    size_t bad16 = 0, bad_b = 0;
    for (float f : probes) {
        const uint16_t h = ovsw_host::float_to_half_rn(f);
        const _Float16 want = (_Float16)f;
        uint16_t wb;
        std::memcpy(&wb, &want, 2);
        if (std::isnan(f) ? h != 0x7fff : h != wb) ++bad16;
        const uint16_t b = ovsw_host::float_to_bfloat16_rn(f);
        const double r = round_to((double)f, Fmt::bf16);
        const float rf = (float)r;
        uint32_t ru;
        std::memcpy(&ru, &rf, 4);
        if (std::isnan(f) ? b != 0x7fff : (ru & 0xffffu) != 0 || b != (uint16_t)(ru >> 16)) ++bad_b;
    }
    expect(bad16 == 0, "float_to_half_rn == (_Float16) on " + std::to_string(probes.size()) +
                           " floats incl. every tie (" + std::to_string(bad16) + " differ)");
    expect(bad_b == 0, "float_to_bfloat16_rn == nearest-even rounding on " + std::to_string(probes.size()) +
                           " floats incl. every tie (" + std::to_string(bad_b) + " differ)");
}

// out[((kind * 3 + wi) * blocks + block) * threads + t] = the shuffled value.
__global__ void shuffle_kernel(int* out) {
    const int t = (int)threadIdx.x, n = (int)(blockDim.x * gridDim.x);
    const int v = t * 7 + 3 + 1000 * (int)blockIdx.x;
    const int widths[3] = {32, 16, 8};
    for (int wi = 0; wi < 3; ++wi) {
        const int w = widths[wi];
        const int base = ((0 * 3 + wi) * n) + (int)(blockIdx.x * blockDim.x) + t;
        out[base] = __shfl_sync(0xffffffffu, v, 5, w);
        out[base + 3 * n] = __shfl_up_sync(0xffffffffu, v, 3, w);
        out[base + 6 * n] = __shfl_down_sync(0xffffffffu, v, 3, w);
        out[base + 9 * n] = __shfl_xor_sync(0xffffffffu, v, 6, w);
    }
}

// A shared-memory tree sum with __syncthreads, a __syncwarp exchange and atomics.
__global__ void reduce_kernel(const float* in, float* block_sums, int* count, double* total,
                              int* neighbour) {
    __shared__ float s[128];
    __shared__ int lanes[128];
    const unsigned t = threadIdx.x;
    s[t] = in[blockIdx.x * blockDim.x + t];
    lanes[t] = (int)(t * 3);
    __syncwarp();
    neighbour[blockIdx.x * blockDim.x + t] = lanes[(t & ~31u) | ((t + 1) & 31u)];
    __syncthreads();
    for (unsigned o = blockDim.x / 2; o > 0; o >>= 1) {
        if (t < o) s[t] += s[t + o];
        __syncthreads();
    }
    if (t == 0) block_sums[blockIdx.x] = s[0];
    atomicAdd(count, 1);
    atomicAdd(total, (double)in[blockIdx.x * blockDim.x + t]);
}

void check_header() {
    {
        const unsigned blocks = 2, threads = 64;
        const int n = (int)(blocks * threads);
        std::vector<int> out((size_t)(12 * n), -1);
        ovsw_host::launch(shuffle_kernel, dim3(blocks), dim3(threads), out.data());
        size_t bad = 0;
        const int widths[3] = {32, 16, 8};
        for (int b = 0; b < (int)blocks; ++b)
            for (int t = 0; t < (int)threads; ++t)
                for (int wi = 0; wi < 3; ++wi) {
                    const int w = widths[wi], lane = t % 32, warp0 = t - lane;
                    const int gbase = lane - lane % w;
                    auto val = [&](int src_lane) { return (warp0 + src_lane) * 7 + 3 + 1000 * b; };
                    const int want[4] = {
                        val(gbase + 5 % w),
                        lane - gbase >= 3 ? val(lane - 3) : val(lane),
                        lane - gbase + 3 < w ? val(lane + 3) : val(lane),
                        (lane ^ 6) < gbase + w ? val(lane ^ 6) : val(lane)};
                    for (int kind = 0; kind < 4; ++kind)
                        if (out[(size_t)(((kind * 3 + wi) * n) + b * (int)threads + t)] != want[kind]) ++bad;
                }
        expect(bad == 0, "__shfl_sync/_up/_down/_xor at widths 32, 16, 8 (" + std::to_string(bad) + " wrong)");
    }
    {
        const unsigned blocks = 3, threads = 128;
        std::vector<float> in(blocks * threads);
        for (size_t i = 0; i < in.size(); ++i) in[i] = (float)(i % 17) - 8.0f;
        std::vector<float> sums(blocks, NAN);
        std::vector<int> neighbour(blocks * threads, -1);
        int count = 0;
        double total = 0;
        ovsw_host::launch(reduce_kernel, dim3(blocks), dim3(threads), in.data(), sums.data(), &count,
                          &total, neighbour.data());
        bool ok = count == (int)(blocks * threads);
        double all = 0;
        for (unsigned b = 0; b < blocks; ++b) {
            double s = 0;
            for (unsigned t = 0; t < threads; ++t) s += in[b * threads + t];
            ok = ok && sums[b] == (float)s;
            all += s;
            for (unsigned t = 0; t < threads; ++t)
                ok = ok && neighbour[b * threads + t] == (int)(((t & ~31u) | ((t + 1) & 31u)) * 3);
        }
        ok = ok && total == all;
        expect(ok, "__syncthreads tree sum, __syncwarp exchange, atomicAdd (int, double)");
    }
    {
        // Two host threads launching the same kernel at once: the grids take turns (the
        // kernel's __shared__ statics serve one block at a time).
        auto sum_of = [](float base) {
            std::vector<float> in(128);
            for (size_t i = 0; i < in.size(); ++i) in[i] = base + (float)i;
            float sum = NAN;
            int count = 0, neighbour[128];
            double total = 0;
            ovsw_host::launch(reduce_kernel, dim3(1), dim3(128), in.data(), &sum, &count, &total,
                              neighbour);
            return sum;
        };
        float a = 0, b = 0;
        std::thread ta([&] { a = sum_of(1.0f); }), tb([&] { b = sum_of(-3.0f); });
        ta.join();
        tb.join();
        expect(a == 128.0f + 127.0f * 64.0f && b == -384.0f + 127.0f * 64.0f,
               "two host threads launching one kernel at once");
    }
    {
        int sentinel = 12345;
        ovsw_host::launch(reduce_kernel, dim3(0), dim3(128), (const float*)nullptr, (float*)nullptr,
                          &sentinel, (double*)nullptr, (int*)nullptr);
        expect(sentinel == 12345, "an empty grid runs nothing");
    }
    // Every kernel the crate names has a CPU entry point.
    expect(ovsw_host_kernel_count() == 3 + 4 * 9 + 2,
           "41 kernels compiled for the CPU (" + std::to_string(ovsw_host_kernel_count()) + ")");
}

// ---------------------------------------------------------------------------------------
// Deliberately broken kernels (run one with --self-test-fail NAME; it must be stopped)
// ---------------------------------------------------------------------------------------
__global__ void divergent_barrier(int* out) {
    if (threadIdx.x < 40) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}
__global__ void early_exit_barrier(int* out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
__global__ void partial_mask(int* out) {
    out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, (int)threadIdx.x, 1);
}
// A missing __syncthreads: thread t reads what thread t + 1 wrote (ThreadSanitizer).
__global__ void missing_barrier(int* out) {
    __shared__ int s[64];
    s[threadIdx.x] = (int)threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
// An undersized shared array, written through a pointer (AddressSanitizer).
__global__ void shared_overflow(int* out) {
    __shared__ int s[63];
    int* p = s;
    p[threadIdx.x] = (int)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = p[threadIdx.x];
}

int self_test_fail(const std::string& name) {
    std::vector<int> out(64, 0);
    void (*k)(int*) = nullptr;
    if (name == "divergent-barrier") k = divergent_barrier;
    if (name == "early-exit-barrier") k = early_exit_barrier;
    if (name == "partial-mask") k = partial_mask;
    if (name == "missing-barrier") k = missing_barrier;
    if (name == "shared-overflow") k = shared_overflow;
    if (k == nullptr) die("no self-test " + name);
    ovsw_host::launch(k, dim3(2), dim3(64), out.data());
    std::printf("self-test %s ran to the end\n", name.c_str());
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc == 3 && std::string(argv[1]) == "--self-test-fail") return self_test_fail(argv[2]);
    if (argc != 1) die("usage: kernel_check [--self-test-fail NAME]");
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    auto part = [&](const char* what, const std::function<void()>& f) {
        const auto s = clock::now();
        f();
        std::printf("-- %s: %.1f s\n", what, std::chrono::duration<double>(clock::now() - s).count());
        std::fflush(stdout);
    };
    part("header", [] {
        check_conversions();
        check_header();
    });
    part("activation passes (moments, sign)", [] {
        for (const Activation& a : activations()) check_activation_passes(a);
        // An empty batch: src/conv/cuda.rs launches nothing; nothing is written.
        Buf x(Fmt::f32, 0);
        Binarized b = binarize(x, 0, 18, StdMode::Compute, nullptr, Fmt::f16);
        expect(b.a.n == 0 && b.partial.empty(), "empty batch: no launch, empty outputs");
    });
    part("bireal backward", [] {
        const std::vector<Activation> acts = activations();
        for (Fmt g : kFmts)
            for (Fmt x : kFmts) check_bireal(acts[0], false, false, true, g, x);
        check_bireal(acts[0], false, true, true, Fmt::f32, Fmt::f32);
        check_bireal(acts[0], true, false, true, Fmt::f16, Fmt::bf16);
        check_bireal(acts[0], true, true, false, Fmt::bf16, Fmt::f16);
        check_bireal(acts[1], false, false, false, Fmt::f32, Fmt::f16);
        check_bireal(acts[1], false, true, true, Fmt::f16, Fmt::f16);
    });
    part("weight prep", [] {
        const std::vector<Weight> ws = weights();
        for (Fmt w : kFmts)
            for (Fmt o : kFmts) check_weight_prep(ws[0], w, o, 0, false, true, true);
        for (int act = 0; act < 4; ++act) {
            check_weight_prep(ws[0], Fmt::f32, Fmt::f32, act, false, false, act % 2 == 0);
            check_weight_prep(ws[0], Fmt::f16, Fmt::f16, act, true, false, true);
        }
        check_weight_prep(ws[0], Fmt::bf16, Fmt::f32, 2, false, true, false);
        check_weight_prep(ws[1], Fmt::f32, Fmt::bf16, 2, false, true, true);
        check_weight_prep(ws[1], Fmt::f16, Fmt::f16, 0, true, false, true);
    });
    part("weight grad", [] {
        const std::vector<Weight> ws = weights();
        for (Fmt g : kFmts)
            for (Fmt w : kFmts) check_weight_grad(ws[0], g, w, 1, true, true, false);
        for (int act = 0; act < 4; ++act) {
            check_weight_grad(ws[0], Fmt::f32, Fmt::f32, act, true, true, act == 0);
            check_weight_grad(ws[0], Fmt::bf16, Fmt::bf16, act, true, act % 2 == 0, false);
        }
        check_weight_grad(ws[0], Fmt::f16, Fmt::f32, 3, false, false, true);
        check_weight_grad(ws[1], Fmt::f16, Fmt::f16, 2, true, true, false);
    });
    part("ags+sad", [] {
        check_ags_sad(true, true);
        check_ags_sad(true, false);
        check_ags_sad(false, true);
    });
    std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
    std::printf("-- total: %.1f s\n", std::chrono::duration<double>(clock::now() - t0).count());
    return g_failures == 0 ? 0 : 1;
}
