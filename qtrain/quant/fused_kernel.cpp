// The fused quantized activation's CPU kernels (act.impl=fused; the Python side is fused.py).
//
// Forward, one pass over memory: the b-bit staircase y = alpha * clamp(ceil(x / alpha), 0, 2^b - 1)
// (or round-to-nearest) and, for the backward, a 2-bit code per element, four to a byte:
//     0  x <= 0          1  0 < x <= (2^b - 1) alpha          2  x > (2^b - 1) alpha (or NaN: 0)
// Backward, one pass: grad_x = grad * mask(code) and, when alpha is learned, the two terms whose sums
// make the "mean" alpha gradient (grad over codes 1 and over code 2), summed by torch.sum as in the
// reference, so that the alpha gradient too is bitwise the reference's.
//
// Every float operation is the reference's (qtrain/quant/ste.py), in the same order, in float32:
// x / alpha (a division), ceil or floor(k + 0.5), the clamp (which keeps -0.0 and NaN, as
// torch.clamp_), k * alpha; the mask as 0.0/1.0 times grad (so 0 * g keeps g's sign). Built with
// -ffp-contract=off, so the compiler fuses no multiply-add. tests/test_fused.py checks it bitwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

constexpr int64_t kBlock = 1 << 14;  // elements per task (a multiple of 4: a task owns whole code bytes)

// GCC/Clang vector types, lowered to this machine's widest vectors: the code packing and unpacking,
// written with them, vectorise, which the compiler does not manage for the plain loops.
typedef float Floats16 __attribute__((vector_size(64)));
typedef int32_t Ints16 __attribute__((vector_size(64)));
typedef uint8_t Bytes16 __attribute__((vector_size(16)));

void check_dense_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, what, " must be a float32 CPU tensor");
  TORCH_CHECK(t.is_non_overlapping_and_dense(), what, " must be dense (contiguous in some memory format)");
}

inline float level(float v, float alpha, float top, bool ceil_rounding) {
  float k = v / alpha;
  k = ceil_rounding ? std::ceil(k) : std::floor(k + 0.5f);
  k = k < 0.0f ? 0.0f : k;  // clamp_(0, top): -0.0 and NaN pass unchanged
  k = k > top ? top : k;
  return k * alpha;
}

inline uint8_t code(float v, float top_alpha) {
  return static_cast<uint8_t>(v > 0.0f) + static_cast<uint8_t>(v > top_alpha);
}

// A block of `len` elements keeps its codes in q = ceil(len / 4) bytes, "planar" so that the loops
// vectorise: byte j holds the codes of elements j, j + q, j + 2q and j + 3q (those below len), in its
// bits 0-1, 2-3, 4-5 and 6-7.
inline int64_t quarter(int64_t len) { return (len + 3) / 4; }

void codes_block(const float* __restrict x, uint8_t* __restrict codes, int64_t len, const float top_alpha) {
  const int64_t q = quarter(len), whole = len - 3 * q;  // bytes j < whole hold four codes
  int64_t j = 0;
  for (; j + 16 <= whole; j += 16) {
    Ints16 packed = {};
    for (int r = 0; r < 4; ++r) {
      Floats16 v;
      std::memcpy(&v, x + j + r * q, sizeof v);
      packed |= (-(v > 0.0f) - (v > top_alpha)) << (2 * r);  // (a comparison gives -1 where true)
    }
    const Bytes16 c8 = __builtin_convertvector(packed, Bytes16);
    std::memcpy(codes + j, &c8, sizeof c8);
  }
  for (; j < whole; ++j)
    codes[j] = code(x[j], top_alpha) | code(x[j + q], top_alpha) << 2 | code(x[j + 2 * q], top_alpha) << 4 |
               code(x[j + 3 * q], top_alpha) << 6;
  for (j = whole < 0 ? 0 : whole; j < q; ++j) {
    uint8_t c = 0;
    for (int64_t r = 0; r < 4 && j + r * q < len; ++r) c |= code(x[j + r * q], top_alpha) << (2 * r);
    codes[j] = c;
  }
}

// The levels of a block, into y (y == x: in place; each loop is one vectorised expression).
void levels_block(const float* x, float* y, int64_t len, const float alpha, const float top, const bool ceil_rounding) {
  if (x == y) {
    float* __restrict v = y;
    if (ceil_rounding) {
      for (int64_t i = 0; i < len; ++i) v[i] = level(v[i], alpha, top, true);
    } else {
      for (int64_t i = 0; i < len; ++i) v[i] = level(v[i], alpha, top, false);
    }
    return;
  }
  const float* __restrict in = x;
  float* __restrict out = y;
  if (ceil_rounding) {
    for (int64_t i = 0; i < len; ++i) out[i] = level(in[i], alpha, top, true);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = level(in[i], alpha, top, false);
  }
}

// Codes first (they read x), then levels: so y may be x itself.
void forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& alpha, int64_t bits, bool ceil_rounding,
             const at::Tensor& codes) {
  check_dense_float(x, "x");
  TORCH_CHECK(alpha.numel() == 1 && alpha.scalar_type() == at::kFloat && alpha.device().is_cpu(),
              "alpha must be one float32 CPU value");
  TORCH_CHECK(bits >= 1 && bits <= 16, "bits must be in 1..16");
  const float a = alpha.contiguous().data_ptr<float>()[0];
  const float top = static_cast<float>((int64_t{1} << bits) - 1);
  const float top_alpha = top * a;  // as the reference's (2**bits - 1) * alpha.float()
  const int64_t n = x.numel();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  uint8_t* cp = codes.numel() ? codes.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, len = std::min(n - i0, kBlock);
      if (cp != nullptr) codes_block(xp + i0, cp + i0 / 4, len, top_alpha);
      levels_block(xp + i0, yp + i0, len, a, top, ceil_rounding);  // (x is still in cache)
    }
  });
}

at::Tensor new_codes(const at::Tensor& x, bool keep_codes) {
  return at::empty({keep_codes ? (x.numel() + 3) / 4 : 0}, x.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> staircase_forward(const at::Tensor& x, const at::Tensor& alpha, int64_t bits,
                                                     bool ceil_rounding, bool keep_codes) {
  at::Tensor y = at::empty_like(x);  // x's strides: the same memory order
  at::Tensor codes = new_codes(x, keep_codes);
  forward(x, y, alpha, bits, ceil_rounding, codes);
  return {y, codes};
}

// The same, writing the levels over x (as an in-place ReLU does); returns the codes.
at::Tensor staircase_forward_(at::Tensor& x, const at::Tensor& alpha, int64_t bits, bool ceil_rounding,
                              bool keep_codes) {
  at::Tensor codes = new_codes(x, keep_codes);
  forward(x, x, alpha, bits, ceil_rounding, codes);
  return codes;
}

// One pass over a block of grad, writing where asked: out = mask * grad (relu passes codes 1 and 2,
// highest = 2; clipped_relu code 1, highest = 1), and the terms of the "mean" alpha gradient,
// inside = [code == 1] * grad and beyond = [code == 2] * grad (the reference's inside.mul_(g) and
// beyond's, summed by the caller with torch.sum as the reference does: the same sums, bit for bit).
void backward_block(const float* __restrict g, const uint8_t* __restrict codes, int64_t len, const int highest,
                    float* __restrict out, float* __restrict inside, float* __restrict beyond) {
  const int64_t q = quarter(len);
  for (int64_t r = 0; r < 4; ++r) {  // the r-th quarter of the block: its codes are in bits 2r, 2r + 1
    const int64_t start = std::min(len, r * q), count = std::min(len, start + q) - start;
    const float* __restrict gr = g + start;
    const int shift = 2 * static_cast<int>(r);
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
      Bytes16 c8;
      Floats16 v;
      std::memcpy(&c8, codes + j, sizeof c8);
      std::memcpy(&v, gr + j, sizeof v);
      const Ints16 c = (__builtin_convertvector(c8, Ints16) >> shift) & 3;
      if (out != nullptr) {  // (a comparison gives -1 where true)
        const Floats16 o = __builtin_convertvector(-((c >= 1) & (c <= highest)), Floats16) * v;
        std::memcpy(out + start + j, &o, sizeof o);
      }
      if (inside != nullptr) {
        const Floats16 o = __builtin_convertvector(-(c == 1), Floats16) * v;
        std::memcpy(inside + start + j, &o, sizeof o);
      }
      if (beyond != nullptr) {
        const Floats16 o = __builtin_convertvector(-(c == 2), Floats16) * v;
        std::memcpy(beyond + start + j, &o, sizeof o);
      }
    }
    for (; j < count; ++j) {
      const int c = (codes[j] >> shift) & 3;
      if (out != nullptr) out[start + j] = static_cast<float>(c >= 1 && c <= highest) * gr[j];
      if (inside != nullptr) inside[start + j] = static_cast<float>(c == 1) * gr[j];
      if (beyond != nullptr) beyond[start + j] = static_cast<float>(c == 2) * gr[j];
    }
  }
}

// ste: 0 identity (no grad_x: the gradient passes unchanged), 1 relu, 2 clipped_relu. alpha_terms: also
// the inside and beyond terms (for clipped_relu, inside is grad_x itself: an empty tensor is returned).
std::tuple<at::Tensor, at::Tensor, at::Tensor> staircase_backward(const at::Tensor& grad, const at::Tensor& codes,
                                                                  int64_t ste, bool alpha_terms) {
  check_dense_float(grad, "grad");
  const int64_t n = grad.numel();
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.numel() == (n + 3) / 4, "codes do not match grad");
  TORCH_CHECK(ste >= 0 && ste <= 2, "ste must be 0, 1 or 2");
  const auto none = at::empty({0}, grad.options());
  at::Tensor grad_x = ste != 0 ? at::empty_like(grad) : none;
  at::Tensor inside = alpha_terms && ste != 2 ? at::empty_like(grad) : none;
  at::Tensor beyond = alpha_terms ? at::empty_like(grad) : none;
  const float* gp = grad.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  float* op = grad_x.numel() ? grad_x.data_ptr<float>() : nullptr;
  float* ip = inside.numel() ? inside.data_ptr<float>() : nullptr;
  float* bp = beyond.numel() ? beyond.data_ptr<float>() : nullptr;
  const int highest = ste == 1 ? 2 : 1;
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, len = std::min(n - i0, kBlock);
      backward_block(gp + i0, cp + i0 / 4, len, highest, op ? op + i0 : nullptr, ip ? ip + i0 : nullptr,
                     bp ? bp + i0 : nullptr);
    }
  });
  return {grad_x, inside, beyond};
}

}  // namespace

TORCH_LIBRARY(qtrain, m) {
  m.def("staircase_forward(Tensor x, Tensor alpha, int bits, bool ceil_rounding, bool keep_codes) -> (Tensor, Tensor)");
  m.def("staircase_forward_(Tensor(a!) x, Tensor alpha, int bits, bool ceil_rounding, bool keep_codes) -> Tensor");
  m.def("staircase_backward(Tensor grad, Tensor codes, int ste, bool alpha_terms) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qtrain, CPU, m) {
  m.impl("staircase_forward", &staircase_forward);
  m.impl("staircase_forward_", &staircase_forward_);
  m.impl("staircase_backward", &staircase_backward);
}
