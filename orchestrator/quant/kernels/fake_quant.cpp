// Fused quantize-dequantize for CPU: the numerics of reference.py's integer format (ONNX
// QuantizeLinear -> DequantizeLinear), forward and backward, fixed and learned (LSQ/LSQ+) encodings,
// and of its scaled float formats with fixed encodings, in reference.py's scale layout (every
// granularity: per tensor, per channel, per block, per token).
//
//   qat::quantize_dequantize(x, scale, offset, qmax, grad_factor) -> x_hat
//       x_hat = s * clamp(round(x / s), o, o + qmax)   (true division, round half to even)
//   qat::quantize_dequantize_backward(grad, x, scale, offset, qmax, grad_factor, encoding_grads)
//       -> (grad_x, grad_scale, grad_offset)
//       grad_x = grad where round(x/s) lies in [o, o + qmax], else 0 (clipped STE);
//       with encoding_grads: grad_scale[c] = gf * sum(grad * (clamp(r) - m * x/s)), summed as
//                            m*grad*(clamp(r) - x/s) + (1-m)*grad*clamp(r) (no cancellation),
//                            grad_offset[c] = gf * s * sum(grad * (1 - m))     (sums over scale element c's block)
//
//   qat::quantize_dequantize_with_mask(x, scale, offset, qmax) -> (x_hat, inside)
//       the forward, plus a bool tensor: where round(x/s) lies in [o, o + qmax] (the STE's mask)
//   qat::mask_gradient(grad, inside) -> grad where inside, else 0
//       with fixed encodings autograd saves the 1-byte mask instead of x (4 bytes) and the
//       backward is one select: less memory and no division in the backward pass.
//
//   qat::quantize_dequantize_float(x, scale, mantissa_bits, min_exponent, max) -> x_hat
//   qat::quantize_dequantize_float_with_mask(x, scale, mantissa_bits, min_exponent, max) -> (x_hat, inside)
//       the scaled minifloat formats (FP8 e4m3fn/e5m2, FP4 e2m1; MX and NVFP4 elements under their block
//       scales): x_hat = s * cast(clamp(x / s, -max, max)), round to nearest even, subnormals kept;
//       inside = |x / s| <= max. Fixed scales only: autograd saves the mask (grad_x = grad where inside).
//   qat::quantize_dequantize_float_learned(x, log_scale, log_floor, mantissa_bits, min_exponent, max,
//                                          grad_factor) -> x_hat
//       range learning on a float format (s from its log inside the kernel; LSQ gradient to log_scale)
//
//   qat::quantize_dequantize_learned(x, log_scale, log_floor, offset, qmax, grad_factor, learn_offset)
//       the same with s = exp(clamp(log_scale, log_floor, log(SCALE_CEIL))) and, when learn_offset,
//       o = clamp(round(offset), -qmax, 0): range learning in one call. Gradients: d/dlog_scale =
//       s * d/ds (straight through the floor), d/doffset = d/do (straight through the rounding).
//
// scale: one element (per tensor) or x's rank with every dim dividing x's; element x[i] uses
// scale[i / B], B = x.shape / scale.shape per dim (per channel [1, C, 1, 1], per block [C, K / B], per
// token [..., 1]). offset: one element or the scale's shape. grad_scale/grad_offset come back in their
// shapes. The layout is computed once per call (Layout): x as rows under one scale element each; every
// layout runs the kernel (the common ones are one run (outer, C, inner), the others index the scale per
// row); a last dim indexed element by element is moved first (moves_last_dim) so rows are not one element.
// Arithmetic in float32: other dtypes of x are upcast and the result cast back (as the reference does).
// One pass over x forward, one backward; reductions accumulate in double. Other devices: the reference's
// ATen ops (registered from kernels/__init__.py) or Triton on CUDA.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrain = 32768;

constexpr const char* kAllowedScale =
    "allowed: one element (per tensor), or x's rank with every dim dividing x's (per channel [1, C, 1, 1], "
    "per block [C, K / B], per token [..., 1])";

// One clear error for an encoding whose shape does not fit x (reference.py's layout).
void check_encoding(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset) {
  bool ok = scale.numel() == 1 || scale.dim() == x.dim();
  for (int64_t d = 0; ok && scale.numel() != 1 && d < x.dim(); ++d) {
    const int64_t n = x.size(d), k = scale.size(d);
    ok = k > 0 ? n % k == 0 : n == 0;
  }
  TORCH_CHECK(ok, "quantize_dequantize: scale of shape ", scale.sizes(), " does not fit x of shape ", x.sizes(),
              "; ", kAllowedScale);
  TORCH_CHECK(offset.numel() == 1 || offset.sizes() == scale.sizes(), "quantize_dequantize: offset of shape ",
              offset.sizes(), " does not fit scale of shape ", scale.sizes(),
              "; allowed: one element or the scale's shape");
}

// x (contiguous, C order) as `rows` rows of `inner` elements, each row under one scale element:
// every dim d of x is split into (scale.size(d), x.size(d) / scale.size(d)), parts of size 1 are dropped
// and neighbouring parts of one kind (scale-indexed or inside a block) merged; a trailing block part is
// `inner`, and row r uses scale element sum over the scale-indexed runs of (r / row_stride) % size * scale_stride.
// The common layouts have one such run, (outer, C, inner): per channel on any axis, blocks along the last
// dim, blocks along axis 1 of a conv weight, per token. One encoding (`flat`): x as flat memory, any dense layout.
struct Layout {
  bool flat = false;
  bool row_per_scale = false;  // each scale element's elements are exactly one row: sums need no per-thread copies
  int64_t rows = 1, inner = 1, scales = 1;
  std::vector<std::array<int64_t, 3>> runs;  // (row stride, size, scale stride) of each scale-indexed run

  int64_t scale_of(int64_t row) const {
    int64_t c = 0;
    for (const auto& r : runs) c += (row / r[0]) % r[1] * r[2];
    return c;
  }
};

Layout layout_of(const at::Tensor& x, const at::Tensor& scale) {
  Layout l;
  l.scales = scale.numel();
  if (l.scales == 1 || x.numel() == 0) {
    l.flat = true;
    l.inner = x.numel();
    return l;
  }
  std::vector<std::pair<int64_t, bool>> parts;  // (size, indexes the scale)
  auto push = [&](int64_t n, bool indexed) {
    if (n == 1) return;
    if (!parts.empty() && parts.back().second == indexed)
      parts.back().first *= n;
    else
      parts.push_back({n, indexed});
  };
  for (int64_t d = 0; d < x.dim(); ++d) {
    push(scale.size(d), true);
    push(x.size(d) / scale.size(d), false);
  }
  if (!parts.empty() && !parts.back().second) {
    l.inner = parts.back().first;
    parts.pop_back();
  }
  int64_t row_stride = 1, scale_stride = 1;
  bool blocks_above = false;
  for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
    if (it->second) {
      l.runs.push_back({row_stride, it->first, scale_stride});
      scale_stride *= it->first;
    } else {
      blocks_above = true;
    }
    row_stride *= it->first;
  }
  l.rows = row_stride;
  l.row_per_scale = !blocks_above;
  return l;
}

// Calls f(begin, end, scale_index) over contiguous runs of elements that share one scale element.
template <typename F>
void for_each_run(const Layout& l, F&& f) {
  if (l.flat) {
    at::parallel_for(0, l.inner, kGrain, [&](int64_t b, int64_t e) { f(b, e, 0); });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(l.inner, 1));
  const int64_t inner = l.inner;
  if (l.runs.size() == 1 && l.runs[0][0] == 1) {  // one run, (outer, C, inner): no index arithmetic beyond row % C
    const int64_t C = l.runs[0][1];
    at::parallel_for(0, l.rows, grain, [&](int64_t b, int64_t e) {
      if (l.rows == C) {  // outer = 1: row r is scale element r (blocks along the last dim, per token)
        for (int64_t row = b; row < e; ++row) f(row * inner, (row + 1) * inner, row);
      } else {
        for (int64_t row = b; row < e; ++row) f(row * inner, (row + 1) * inner, row % C);
      }
    });
    return;
  }
  at::parallel_for(0, l.rows, grain, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) f(row * inner, (row + 1) * inner, l.scale_of(row));
  });
}

inline float round_half_even(float v) { return std::nearbyint(v); }

// Mask bytes (0/1) from a vector compare mask and back, with the instruction set the build targets.
#if defined(CPU_CAPABILITY_AVX512)
inline void store_mask(uint8_t* m, const Vec& keep) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(m), _mm_maskz_set1_epi8(_mm512_movepi32_mask(_mm512_castps_si512(keep)), 1));
}
inline Vec select_by_mask(const uint8_t* m, const Vec& g) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
  return _mm512_maskz_mov_ps(_mm_test_epi8_mask(b, b), g);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void store_mask(uint8_t* m, const Vec& keep) {
  const uint64_t bits = static_cast<uint64_t>(_mm256_movemask_ps(keep));
  uint64_t bytes = 0;
  for (int k = 0; k < 8; ++k) bytes |= ((bits >> k) & 1u) << (8 * k);
  std::memcpy(m, &bytes, 8);
}
inline Vec select_by_mask(const uint8_t* m, const Vec& g) {
  const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_and_ps(g, _mm256_castsi256_ps(_mm256_cmpgt_epi32(wide, _mm256_setzero_si256())));
}
#else
inline void store_mask(uint8_t* m, const Vec& keep) {
  float lanes[Vec::size()];
  keep.store(lanes);
  for (int k = 0; k < Vec::size(); ++k) {
    uint32_t b;
    std::memcpy(&b, &lanes[k], 4);
    m[k] = b != 0;
  }
}
inline Vec select_by_mask(const uint8_t* m, const Vec& g) {
  float lanes[Vec::size()];
  g.store(lanes);
  for (int k = 0; k < Vec::size(); ++k) lanes[k] = m[k] ? lanes[k] : 0.f;
  return Vec::loadu(lanes);
}
#endif

// ------------------------------------------------------------------ grids
// The integer grid of one scale element (reference.py's IntFormat): c = clamp(round(u), lo, hi);
// inside (the STE's mask) where round(u) lies in [lo, hi].
struct IntGrid {
  float lo, hi;
  Vec quantize(const Vec& u, Vec& inside) const {
    const Vec r = u.round(), vlo(lo), vhi(hi);
    inside = (r >= vlo) & (r <= vhi);
    return at::vec::clamp(r, vlo, vhi);
  }
  float quantize(float u, bool& inside) const {
    const float r = round_half_even(u);
    inside = r >= lo && r <= hi;
    return std::min(std::max(r, lo), hi);
  }
};

// A scaled minifloat grid (reference.py's float formats: FP8 e4m3fn/e5m2, FP4 e2m1): c = cast(clamp(u,
// -max, max)), inside where |u| <= max. The cast rounds to nearest, ties to even, subnormals kept
// (reference.round_minifloat, equal to torch's float8 casts): with e = max(exponent of u, the smallest
// normal exponent) the grid step around u is 2^(e - m), read from u's float32 exponent bits, and
// c = round(u * 2^(m - e)) * 2^(e - m), exact (powers of two; float32 holds every value of the grid).
struct FloatGrid {
  float max;
  int32_t mantissa_bits, min_biased;  // m; the smallest normal exponent + 127 (float32's exponent bias)
  Vec quantize(const Vec& u, Vec& inside) const {
    using IVec = at::vec::Vectorized<int32_t>;
    const Vec vmax(max), vmin(-max);
    inside = u.abs() <= vmax;
    const Vec c = at::vec::clamp(u, vmin, vmax);
    const IVec e = at::vec::maximum((at::vec::cast<int32_t>(c) >> IVec(23)) & IVec(0xff), IVec(min_biased));
    const Vec up = at::vec::cast<float>((IVec(254 + mantissa_bits) - e) << IVec(23));
    const Vec step = at::vec::cast<float>((e - IVec(mantissa_bits)) << IVec(23));
    return (c * up).round() * step;
  }
  float quantize(float u, bool& inside) const {
    inside = std::abs(u) <= max;
    const float c = std::min(std::max(u, -max), max);
    int32_t bits;
    std::memcpy(&bits, &c, 4);
    const int32_t e = std::max((bits >> 23) & 0xff, min_biased);
    const int32_t up_bits = (254 + mantissa_bits - e) << 23, step_bits = (e - mantissa_bits) << 23;
    float up, step;
    std::memcpy(&up, &up_bits, 4);
    std::memcpy(&step, &step_bits, 4);
    return round_half_even(c * up) * step;
  }
};

// The forward over x[b, e) under one scale element s and its grid; with kMask also the STE's mask.
template <bool kMask, typename Grid>
void qdq_forward_run(const float* x, float* y, uint8_t* m, int64_t b, int64_t e, float s, const Grid& g) {
  const Vec vs(s);
  int64_t i = b;
  for (; i + Vec::size() <= e; i += Vec::size()) {
    Vec inside;
    (g.quantize(Vec::loadu(x + i) / vs, inside) * vs).store(y + i);
    if constexpr (kMask) store_mask(m + i, inside);
  }
  for (; i < e; ++i) {
    bool inside;
    y[i] = g.quantize(x[i] / s, inside) * s;
    if constexpr (kMask) m[i] = inside;
  }
}

// The grid of scale element c: integer (its offset) or float (one for every element).
struct IntGrids {
  int64_t qmax;
  IntGrid operator()(const float* offset, int64_t ostep, int64_t c) const {
    const float lo = offset[c * ostep];
    return {lo, lo + static_cast<float>(qmax)};
  }
};
struct FloatGrids {
  FloatGrid grid;
  FloatGrid operator()(const float*, int64_t, int64_t) const { return grid; }
};

// The output has x's layout (empty_like: what the fake kernel promises torch.compile, channels-last
// included). One encoding: any dense layout is processed as flat memory. Otherwise: computed on a
// contiguous copy, then copied into that layout when it differs.
at::Tensor in_layout_of(const at::Tensor& like, const at::Tensor& result) {
  if (result.strides() == like.strides()) return result;
  at::Tensor out = at::empty_like(like, result.options());
  out.copy_(result);
  return out;
}

// x (and grad) as the kernels read them: float32, contiguous unless one encoding on dense memory;
// scale/offset float32 contiguous; the layout; offset index step (0: one offset for every scale element).
struct Prepared {
  at::Tensor x, grad, scale, offset;
  Layout l;
  int64_t ostep;
};

Prepared prepare(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& offset_in,
                 const at::Tensor& grad_in = at::Tensor()) {
  Prepared p;
  p.scale = scale_in.to(at::kFloat).contiguous();
  p.offset = offset_in.to(at::kFloat).contiguous();
  const bool flat = scale_in.numel() == 1 && x_in.is_non_overlapping_and_dense() &&
                    (!grad_in.defined() || grad_in.strides() == x_in.strides());
  p.x = flat ? x_in : x_in.contiguous();
  if (grad_in.defined()) p.grad = flat ? grad_in : grad_in.contiguous();
  p.l = layout_of(x_in, scale_in);
  p.ostep = offset_in.numel() == 1 ? 0 : 1;
  return p;
}

// When x's last dim indexes the scale element by element (per channel on the last axis; a HF Conv1D
// weight [K, C] with blocks [K / B, C]) every row would be one element: the kernels then run once more
// with that dim moved first (a transposed copy in, one out) and the results are moved back.
bool moves_last_dim(const at::Tensor& x, const at::Tensor& scale) {
  return scale.numel() > 1 && x.dim() > 1 && x.numel() > 0 && x.size(-1) > 1 && scale.size(-1) == x.size(-1);
}

at::Tensor last_first(const at::Tensor& t) { return t.numel() == 1 ? t : t.movedim(-1, 0); }

// The forward (with_mask: and the STE's mask) in every layout: a last dim indexed element by element
// moved first, other dtypes computed in float32, then one pass over x.
template <typename GridOf>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x_in, const at::Tensor& scale_in,
                                                const at::Tensor& offset_in, const GridOf& grid_of, bool with_mask,
                                                bool may_move) {
  check_encoding(x_in, scale_in, offset_in);
  if (may_move && moves_last_dim(x_in, scale_in)) {
    auto [y, inside] = forward_impl(last_first(x_in), last_first(scale_in), last_first(offset_in), grid_of,
                                    with_mask, false);
    return {in_layout_of(x_in, y.movedim(0, -1)), with_mask ? in_layout_of(x_in, inside.movedim(0, -1)) : inside};
  }
  if (x_in.scalar_type() != at::kFloat) {  // float32 arithmetic, as the reference: upcast, then back to x's dtype
    auto [y, inside] = forward_impl(x_in.to(at::kFloat), scale_in, offset_in, grid_of, with_mask, false);
    return {in_layout_of(x_in, y.to(x_in.scalar_type())), with_mask ? in_layout_of(x_in, inside) : inside};
  }
  const Prepared p = prepare(x_in, scale_in, offset_in);
  at::Tensor y = at::empty_like(p.x), mask;
  const float* xp = p.x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* sp = p.scale.data_ptr<float>();
  const float* op = p.offset.data_ptr<float>();
  if (with_mask) {
    mask = at::empty_like(p.x, p.x.options().dtype(at::kBool));
    uint8_t* mp = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
    for_each_run(p.l, [&](int64_t b, int64_t e, int64_t c) {
      qdq_forward_run<true>(xp, yp, mp, b, e, sp[c], grid_of(op, p.ostep, c));
    });
  } else {
    for_each_run(p.l, [&](int64_t b, int64_t e, int64_t c) {
      qdq_forward_run<false>(xp, yp, nullptr, b, e, sp[c], grid_of(op, p.ostep, c));
    });
  }
  return {in_layout_of(x_in, y), with_mask ? in_layout_of(x_in, mask) : mask};
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset, int64_t qmax,
                       double grad_factor) {
  return std::get<0>(forward_impl(x, scale, offset, IntGrids{qmax}, false, true));
}

std::tuple<at::Tensor, at::Tensor> forward_mask_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                    const at::Tensor& offset, int64_t qmax) {
  return forward_impl(x, scale, offset, IntGrids{qmax}, true, true);
}

// A minifloat format as the float ops take it: m mantissa bits, the smallest normal exponent, the largest
// finite value (formats.FloatFormat's mantissa_bits, min_normal_exponent, max).
FloatGrids float_grids(int64_t mantissa_bits, int64_t min_exponent, double max) {
  TORCH_CHECK(mantissa_bits >= 0 && mantissa_bits <= 22 && min_exponent - mantissa_bits >= -126 &&
                  min_exponent <= 0 && std::isfinite(max) && max > 0 && std::ilogb(max) + mantissa_bits <= 126,
              "quantize_dequantize_float: mantissa_bits=", mantissa_bits, ", min_exponent=", min_exponent,
              ", max=", max, " is not a scaled minifloat this kernel runs; allowed: 0 <= mantissa_bits <= 22, ",
              "-126 <= min_exponent - mantissa_bits, min_exponent <= 0, ",
              "a finite max > 0 below 2^(127 - mantissa_bits)");
  return {{static_cast<float>(max), static_cast<int32_t>(mantissa_bits), static_cast<int32_t>(min_exponent + 127)}};
}

// The float formats have no offset (reference.py: zero, never learned).
const at::Tensor& no_offset() {
  static const at::Tensor* zero = new at::Tensor(at::zeros({1}));  // leaked: no destructor at exit
  return *zero;
}

at::Tensor float_forward_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t mantissa_bits,
                             int64_t min_exponent, double max) {
  return std::get<0>(forward_impl(x, scale, no_offset(), float_grids(mantissa_bits, min_exponent, max), false,
                                  true));
}

std::tuple<at::Tensor, at::Tensor> float_forward_mask_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                          int64_t mantissa_bits, int64_t min_exponent, double max) {
  return forward_impl(x, scale, no_offset(), float_grids(mantissa_bits, min_exponent, max), true, true);
}

// grad where the mask is set, else +0; the result has grad's layout (the fake kernel's empty_like(grad)).
at::Tensor mask_gradient_aten(const at::Tensor& grad, const at::Tensor& mask) {
  return in_layout_of(grad, at::where(mask, grad, at::scalar_tensor(0, grad.options())));
}

at::Tensor mask_gradient_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  if (grad.scalar_type() != at::kFloat || grad.strides() != mask.strides() || grad.sizes() != mask.sizes() ||
      !grad.is_non_overlapping_and_dense())
    return mask_gradient_aten(grad, mask);
  at::Tensor out = at::empty_like(grad);
  const float* gp = grad.data_ptr<float>();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + Vec::size() <= e; i += Vec::size()) select_by_mask(mp + i, Vec::loadu(gp + i)).store(outp + i);
    for (; i < e; ++i) outp[i] = mp[i] ? gp[i] : 0.f;
  });
  return out;
}

// The backward in every layout (as forward_impl): grad_x by the clipped STE and, with encoding_grads, the
// LSQ sums per scale element; grid_of(offset, ostep, c) is the grid of scale element c.
template <typename GridOf>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                             const at::Tensor& scale_in, const at::Tensor& offset_in,
                                                             const GridOf& grid_of, double gf, bool encoding_grads,
                                                             bool may_move) {
  check_encoding(x_in, scale_in, offset_in);
  if (may_move && moves_last_dim(x_in, scale_in)) {
    auto [gx, gs, go] = backward_impl(last_first(grad_in), last_first(x_in), last_first(scale_in),
                                      last_first(offset_in), grid_of, gf, encoding_grads, false);
    return {in_layout_of(x_in, gx.movedim(0, -1)), gs.movedim(0, -1).contiguous(),
            offset_in.numel() == 1 ? go : go.movedim(0, -1).contiguous()};
  }
  if (x_in.scalar_type() != at::kFloat || grad_in.scalar_type() != at::kFloat) {
    auto [gx, gs, go] = backward_impl(grad_in.to(at::kFloat), x_in.to(at::kFloat), scale_in, offset_in, grid_of,
                                      gf, encoding_grads, false);
    return {in_layout_of(x_in, gx.to(grad_in.scalar_type())), gs, go};
  }
  const Prepared p = prepare(x_in, scale_in, offset_in, grad_in);
  const Layout& l = p.l;
  at::Tensor gx = at::empty_like(p.x);
  const float* xp = p.x.data_ptr<float>();
  const float* gp = p.grad.data_ptr<float>();
  float* gxp = gx.data_ptr<float>();
  const float* sp = p.scale.data_ptr<float>();
  const float* op = p.offset.data_ptr<float>();
  const int64_t C = l.scales, ostep = p.ostep;
  if (!encoding_grads) {
    for_each_run(l, [&](int64_t b, int64_t e, int64_t c) {
      const float s = sp[c];
      const auto grid = grid_of(op, ostep, c);
      const Vec vs(s), zero(0.f);
      int64_t i = b;
      for (; i + Vec::size() <= e; i += Vec::size()) {
        Vec keep;
        grid.quantize(Vec::loadu(xp + i) / vs, keep);
        Vec::blendv(zero, Vec::loadu(gp + i), keep).store(gxp + i);
      }
      for (; i < e; ++i) {
        bool keep;
        grid.quantize(xp[i] / s, keep);
        gxp[i] = keep ? gp[i] : 0.f;
      }
    });
    return {in_layout_of(x_in, gx), at::zeros_like(scale_in), at::zeros_like(offset_in)};
  }
  // Partial sums per scale element: sum(g*c) - sum(g_x*u) for the scale, sum(g) - sum(g_x) for the offset;
  // one copy per thread unless each scale element is one row (then each sum has one writer).
  const int slots = l.row_per_scale ? 1 : at::get_num_threads();
  std::vector<double> ds(static_cast<size_t>(slots) * C, 0.0), dox(static_cast<size_t>(slots) * C, 0.0);
  for_each_run(l, [&](int64_t b, int64_t e, int64_t c) {
    const int64_t t = l.row_per_scale ? 0 : at::get_thread_num();
    const float s = sp[c];
    const auto grid = grid_of(op, ostep, c);
    const Vec vs(s), zero(0.f);
    Vec acc_s(0.f), acc_o(0.f);
    int64_t i = b;
    for (; i + Vec::size() <= e; i += Vec::size()) {
      Vec g = Vec::loadu(gp + i);
      Vec u = Vec::loadu(xp + i) / vs;
      Vec keep;
      Vec clipped = grid.quantize(u, keep);
      Vec g_in = Vec::blendv(zero, g, keep);
      g_in.store(gxp + i);
      // inside the grid g*(r - u) (small), outside g*clip: no cancellation of g*r against g*u
      acc_s = acc_s + g_in * (clipped - u) + (g - g_in) * clipped;
      acc_o = acc_o + (g - g_in);
    }
    float tail_s = 0.f, tail_o = 0.f;
    for (; i < e; ++i) {
      const float u = xp[i] / s;
      bool in;
      const float clipped = grid.quantize(u, in);
      const float g = gp[i], gin = in ? g : 0.f;
      gxp[i] = gin;
      tail_s += gin * (clipped - u) + (g - gin) * clipped;
      tail_o += g - gin;
    }
    float lanes_s[Vec::size()], lanes_o[Vec::size()];
    acc_s.store(lanes_s);
    acc_o.store(lanes_o);
    double sum_s = tail_s, sum_o = tail_o;
    for (int k = 0; k < Vec::size(); ++k) {
      sum_s += lanes_s[k];
      sum_o += lanes_o[k];
    }
    ds[static_cast<size_t>(t * C + c)] += sum_s;
    dox[static_cast<size_t>(t * C + c)] += sum_o;
  });
  at::Tensor gs = at::empty({C}, p.scale.options()), go = at::empty({C}, p.scale.options());
  float* gsp = gs.data_ptr<float>();
  float* gop = go.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    double s_sum = 0.0, o_sum = 0.0;
    for (int t = 0; t < slots; ++t) {
      s_sum += ds[static_cast<size_t>(t * C + c)];
      o_sum += dox[static_cast<size_t>(t * C + c)];
    }
    gsp[c] = static_cast<float>(s_sum * gf);
    gop[c] = static_cast<float>(o_sum * sp[c] * gf);
  }
  if (ostep == 0) go = go.sum();  // one offset for every scale element
  return {in_layout_of(x_in, gx), gs.reshape(scale_in.sizes()).to(scale_in.scalar_type()),
          go.reshape(offset_in.sizes()).to(offset_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& scale, const at::Tensor& offset,
                                                            int64_t qmax, double gf, bool encoding_grads) {
  return backward_impl(grad, x, scale, offset, IntGrids{qmax}, gf, encoding_grads, true);
}

// ------------------------------------------------------------------ autograd
at::Tensor call_forward(const at::Tensor& x, const at::Tensor& s, const at::Tensor& o, int64_t qmax,
                        double gf) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::quantize_dequantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>();
  return op.call(x, s, o, qmax, gf);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(const at::Tensor& g, const at::Tensor& x,
                                                             const at::Tensor& s, const at::Tensor& o, int64_t qmax,
                                                             double gf, bool encoding_grads) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::quantize_dequantize_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           double, bool)>();
  return op.call(g, x, s, o, qmax, gf, encoding_grads);
}

std::tuple<at::Tensor, at::Tensor> call_forward_mask(const at::Tensor& x, const at::Tensor& s, const at::Tensor& o,
                                                     int64_t qmax) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::quantize_dequantize_with_mask", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t)>();
  return op.call(x, s, o, qmax);
}

at::Tensor call_mask_gradient(const at::Tensor& grad, const at::Tensor& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::mask_gradient", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, mask);
}

// Fixed encodings (no gradient wanted for scale/offset): save the 1-byte mask, not x.
class QuantizeDequantizeFunction : public torch::autograd::Function<QuantizeDequantizeFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& offset, int64_t qmax, double gf, bool grad_mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool masked = !(scale.requires_grad() || offset.requires_grad());
    ctx->saved_data["masked"] = masked;
    if (masked) {
      if (!(grad_mode && x.requires_grad())) return call_forward(x, scale, offset, qmax, gf);
      auto [y, inside] = call_forward_mask(x, scale, offset, qmax);
      ctx->save_for_backward({inside});
      return y;
    }
    ctx->save_for_backward({x, scale, offset});
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["gf"] = gf;
    return call_forward(x, scale, offset, qmax, gf);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    if (ctx->saved_data["masked"].toBool()) {
      // CPU: the vectorized kernel. Elsewhere one at::where, which torch.compile can fuse into its neighbours.
      at::Tensor gx = grads[0].is_cpu() ? call_mask_gradient(grads[0], saved[0]) : mask_gradient_aten(grads[0], saved[0]);
      return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const bool encoding_grads = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    auto [gx, gs, go] = call_backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["qmax"].toInt(),
                                      ctx->saved_data["gf"].toDouble(), encoding_grads);
    return {gx, gs, go, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor forward_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& offset, int64_t qmax,
                            double gf) {
  return QuantizeDequantizeFunction::apply(x, scale, offset, qmax, gf, at::GradMode::is_enabled());
}

// ------------------------------------------------------------------ float formats
at::Tensor call_float_forward(const at::Tensor& x, const at::Tensor& s, int64_t m, int64_t emin, double max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::quantize_dequantize_float", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, double)>();
  return op.call(x, s, m, emin, max);
}

std::tuple<at::Tensor, at::Tensor> call_float_forward_mask(const at::Tensor& x, const at::Tensor& s, int64_t m,
                                                           int64_t emin, double max) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::quantize_dequantize_float_with_mask", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                 int64_t, double)>();
  return op.call(x, s, m, emin, max);
}

// Fixed float encodings: the clipped STE from the saved 1-byte mask (the scale gets no gradient: learned
// float encodings run quantize_dequantize_float_learned).
class FloatFunction : public torch::autograd::Function<FloatFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            int64_t m, int64_t emin, double max, bool grad_mode) {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (!(grad_mode && x.requires_grad())) return call_float_forward(x, scale, m, emin, max);
    auto [y, inside] = call_float_forward_mask(x, scale, m, emin, max);
    ctx->save_for_backward({inside});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor inside = ctx->get_saved_variables()[0];
    at::Tensor gx = grads[0].is_cpu() ? call_mask_gradient(grads[0], inside) : mask_gradient_aten(grads[0], inside);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor float_autograd(const at::Tensor& x, const at::Tensor& scale, int64_t m, int64_t emin, double max) {
  TORCH_CHECK(!scale.requires_grad(), "quantize_dequantize_float: the scale requires grad and this op gives it "
              "none; allowed: a fixed scale (learned float encodings run qat::quantize_dequantize_float_learned)");
  return FloatFunction::apply(x, scale, m, emin, max, at::GradMode::is_enabled());
}

// ------------------------------------------------------------------ learned encodings
// log(SCALE_CEIL) of encoding.py: s * (o + 2^16 - 1) stays finite in float32.
const double kLogScaleCeil = std::log(static_cast<double>(std::numeric_limits<float>::max()) / 65536.0);

std::pair<at::Tensor, at::Tensor> learned_encoding(const at::Tensor& log_scale, const at::Tensor& log_floor,
                                                   const at::Tensor& offset, int64_t qmax, bool learn_offset) {
  at::Tensor s = at::exp(at::clamp_max(at::maximum(log_scale, log_floor), kLogScaleCeil));
  at::Tensor o = learn_offset ? at::clamp(at::round(offset), -static_cast<double>(qmax), 0.0) : offset;
  return {s, o};
}

at::Tensor learned_composite(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& log_floor,
                             const at::Tensor& offset, int64_t qmax, double gf, bool learn_offset) {
  auto [s, o] = learned_encoding(log_scale, log_floor, offset, qmax, learn_offset);
  return call_forward(x, s, o, qmax, gf);
}

class LearnedFunction : public torch::autograd::Function<LearnedFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& log_scale,
                            const at::Tensor& log_floor, const at::Tensor& offset, int64_t qmax,
                            double gf, bool learn_offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [s, o] = learned_encoding(log_scale, log_floor, offset, qmax, learn_offset);
    ctx->save_for_backward({x, s, o});
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["gf"] = gf;
    return call_forward(x, s, o, qmax, gf);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const bool encoding_grads = ctx->needs_input_grad(1) || ctx->needs_input_grad(3);
    auto [gx, gs, go] = call_backward(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["qmax"].toInt(),
                                      ctx->saved_data["gf"].toDouble(), encoding_grads);
    at::Tensor g_log_scale = encoding_grads ? gs * saved[1] : at::Tensor();
    at::Tensor g_offset = ctx->needs_input_grad(3) ? go : at::Tensor();
    return {gx, g_log_scale, at::Tensor(), g_offset, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor learned_autograd(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& log_floor,
                            const at::Tensor& offset, int64_t qmax, double gf, bool learn_offset) {
  return LearnedFunction::apply(x, log_scale, log_floor, offset, qmax, gf, learn_offset);
}

// ------------------------------------------------------------------ learned float encodings
// Range learning on a float format: s = exp(clamp(max(log_scale, log_floor), log(SCALE_CEIL))) computed inside
// the CPU kernels (eager ATen: torch.compile sees one opaque op and never traces the exp, as the reference's
// learned op), then the float forward; the backward gives grad_x (clipped STE) and grad_log_scale = s * dL/ds,
// dL/ds = grad_factor * sum over the block of g * (c - inside * x / s) (LSQ; the floor passes it straight).
at::Tensor learned_float_scale(const at::Tensor& log_scale, const at::Tensor& log_floor) {
  return learned_encoding(log_scale, log_floor, no_offset(), 0, false).first;
}

at::Tensor float_learned_cpu(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& log_floor,
                             int64_t m, int64_t emin, double max, double gf) {
  return float_forward_cpu(x, learned_float_scale(log_scale, log_floor), m, emin, max);
}

std::tuple<at::Tensor, at::Tensor> float_learned_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& log_scale,
                                                              const at::Tensor& log_floor, int64_t m, int64_t emin,
                                                              double max, double gf) {
  const at::Tensor s = learned_float_scale(log_scale, log_floor);
  auto [gx, gs, go] = backward_impl(grad, x, s, no_offset(), float_grids(m, emin, max), gf, true, true);
  return {gx, gs * s};
}

at::Tensor call_float_learned(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& log_floor,
                              int64_t m, int64_t emin, double max, double gf) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::quantize_dequantize_float_learned", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                         double, double)>();
  return op.call(x, log_scale, log_floor, m, emin, max, gf);
}

std::tuple<at::Tensor, at::Tensor> call_float_learned_backward(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& log_scale,
                                                               const at::Tensor& log_floor, int64_t m, int64_t emin,
                                                               double max, double gf) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qat::quantize_dequantize_float_learned_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, int64_t,
                                                                 int64_t, double, double)>();
  return op.call(grad, x, log_scale, log_floor, m, emin, max, gf);
}

class FloatLearnedFunction : public torch::autograd::Function<FloatLearnedFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& log_scale,
                            const at::Tensor& log_floor, int64_t m, int64_t emin, double max, double gf) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, log_scale, log_floor});
    ctx->saved_data["m"] = m;
    ctx->saved_data["emin"] = emin;
    ctx->saved_data["max"] = max;
    ctx->saved_data["gf"] = gf;
    return call_float_learned(x, log_scale, log_floor, m, emin, max, gf);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [gx, g_log_scale] = call_float_learned_backward(
        grads[0], saved[0], saved[1], saved[2], ctx->saved_data["m"].toInt(), ctx->saved_data["emin"].toInt(),
        ctx->saved_data["max"].toDouble(), ctx->saved_data["gf"].toDouble());
    return {gx, ctx->needs_input_grad(1) ? g_log_scale : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor float_learned_autograd(const at::Tensor& x, const at::Tensor& log_scale, const at::Tensor& log_floor,
                                  int64_t m, int64_t emin, double max, double gf) {
  return FloatLearnedFunction::apply(x, log_scale, log_floor, m, emin, max, gf);
}

}  // namespace

// flexible_layout: every kernel takes any strides and returns its output in the layout the fake kernel
// promises (empty_like of x, or of grad), so inductor need not convert channels-last activations around
// each call (it did: a transpose of the input, the output and the mask per quantizer).
TORCH_LIBRARY(qat, m) {
  const std::vector<at::Tag> flexible = {at::Tag::flexible_layout};
  m.def("quantize_dequantize(Tensor x, Tensor scale, Tensor offset, int qmax, float grad_factor) -> Tensor",
        flexible);
  m.def("quantize_dequantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor offset, int qmax, "
        "float grad_factor, bool encoding_grads) -> (Tensor, Tensor, Tensor)", flexible);
  m.def("quantize_dequantize_with_mask(Tensor x, Tensor scale, Tensor offset, int qmax) -> (Tensor, Tensor)",
        flexible);
  m.def("mask_gradient(Tensor grad, Tensor mask) -> Tensor", flexible);
  m.def("quantize_dequantize_learned(Tensor x, Tensor log_scale, Tensor log_floor, Tensor offset, int qmax, "
        "float grad_factor, bool learn_offset) -> Tensor", flexible);
  m.def("quantize_dequantize_float(Tensor x, Tensor scale, int mantissa_bits, int min_exponent, float max) -> Tensor",
        flexible);
  m.def("quantize_dequantize_float_with_mask(Tensor x, Tensor scale, int mantissa_bits, int min_exponent, "
        "float max) -> (Tensor, Tensor)", flexible);
  m.def("quantize_dequantize_float_learned(Tensor x, Tensor log_scale, Tensor log_floor, int mantissa_bits, "
        "int min_exponent, float max, float grad_factor) -> Tensor", flexible);
  m.def("quantize_dequantize_float_learned_backward(Tensor grad, Tensor x, Tensor log_scale, Tensor log_floor, "
        "int mantissa_bits, int min_exponent, float max, float grad_factor) -> (Tensor, Tensor)", flexible);
}

TORCH_LIBRARY_IMPL(qat, CPU, m) {
  m.impl("quantize_dequantize", &forward_cpu);
  m.impl("quantize_dequantize_backward", &backward_cpu);
  m.impl("quantize_dequantize_with_mask", &forward_mask_cpu);
  m.impl("mask_gradient", &mask_gradient_cpu);
  m.impl("quantize_dequantize_float", &float_forward_cpu);
  m.impl("quantize_dequantize_float_with_mask", &float_forward_mask_cpu);
  m.impl("quantize_dequantize_float_learned", &float_learned_cpu);
  m.impl("quantize_dequantize_float_learned_backward", &float_learned_backward_cpu);
}

// Other devices: quantize_dequantize, its backward and with_mask, and the float ops come from
// kernels/__init__.py (the reference's ATen ops; Triton on CUDA), so the math is written once; the
// mask's select is this one.
TORCH_LIBRARY_IMPL(qat, CompositeExplicitAutograd, m) {
  m.impl("mask_gradient", &mask_gradient_aten);
  m.impl("quantize_dequantize_learned", &learned_composite);
}

TORCH_LIBRARY_IMPL(qat, Autograd, m) {
  m.impl("quantize_dequantize", &forward_autograd);
  m.impl("quantize_dequantize_learned", &learned_autograd);
  m.impl("quantize_dequantize_float", &float_autograd);
  m.impl("quantize_dequantize_float_learned", &float_learned_autograd);
}
