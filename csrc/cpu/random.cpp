// Counter-based random ops on CPU: random_tangents and mc_softmax.
//
// Bit-for-bit the generator of fastlla/reference.py: hash4(a, b, c, d) chains the 'lowbias32'
// integer hash (Wellons) over four 32-bit counters,
//     h = mix(a ^ 0x9E3779B9); h = mix(h ^ b); h = mix(h ^ c); h = mix(h ^ d),
// every counter taken modulo 2³² (two's complement for negative seeds, as Python's `& 0xFFFFFFFF`);
// uniforms u = (h + 0.5)/2³² in double; normals by Box–Muller from the counters (.., 2·row, col)
// and (.., 2·row + 1, col): √(−2 log u1) cos(2π u2), rounded to the output dtype.
// The reference emulates uint32 arithmetic in int64; here it is plain uint32_t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "checks.h"

namespace fastlla {
namespace {

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t u32(int64_t v) { return static_cast<uint32_t>(static_cast<uint64_t>(v)); }

// The first two rounds depend only on (a, b): computed once per (seed, step).
inline uint32_t hash_prefix(int64_t a, int64_t b) { return mix32(mix32(u32(a) ^ 0x9E3779B9u) ^ u32(b)); }

inline uint32_t hash_tail(uint32_t prefix, int64_t c, int64_t d) {
  return mix32(mix32(prefix ^ u32(c)) ^ u32(d));
}

inline double uniform(uint32_t h) { return (static_cast<double>(h) + 0.5) / 4294967296.0; }

constexpr double kTwoPi = 6.283185307179586;  // 2π as the float64 the reference multiplies

inline double normal(uint32_t prefix, int64_t row, int64_t col) {
  const double u1 = uniform(hash_tail(prefix, 2 * row, col));
  const double u2 = uniform(hash_tail(prefix, 2 * row + 1, col));
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

void random_tangents_cpu(at::Tensor& out, int64_t seed, int64_t step,
                         c10::string_view distribution) {
  check_random_tangents(out, seed, step, distribution);
  const int64_t S = out.size(0), P = out.size(1);
  if (out.numel() == 0) return;
  const bool gaussian = distribution == "gaussian";
  const uint32_t prefix = hash_prefix(seed, step);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "random_tangents_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t s = 0; s < S; ++s) {
      scalar_t* row = o + s * P;
      const uint32_t c_even = u32(2 * s);
      at::parallel_for(0, P, 4096, [&](int64_t p0, int64_t p1) {
        if (gaussian) {
          for (int64_t p = p0; p < p1; ++p) row[p] = static_cast<scalar_t>(normal(prefix, s, p));
        } else {
          const uint32_t h = mix32(prefix ^ c_even);
          for (int64_t p = p0; p < p1; ++p) {
            const uint32_t bit = mix32(h ^ u32(p)) >> 31;
            row[p] = static_cast<scalar_t>(1 - 2 * static_cast<int>(bit));
          }
        }
      });
    }
  });
}

at::Tensor mc_softmax_cpu(const at::Tensor& mean, const at::Tensor& scale_tril, int64_t n_samples,
                          int64_t seed) {
  check_mc_softmax(mean, scale_tril, n_samples, seed);
  const int64_t B = mean.size(0), C = mean.size(1);
  at::Tensor out = at::empty({B, C}, mean.options());
  if (out.numel() == 0) return out;
  const at::Tensor mu = mean.contiguous(), lt = scale_tril.contiguous();
  // One hash prefix per sample s (the reference keys sample s by (seed, s, 2b(+1), c)).
  std::vector<uint32_t> prefix(n_samples);
  for (int64_t s = 0; s < n_samples; ++s) prefix[s] = hash_prefix(seed, s);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "mc_softmax_cpu", [&] {
    const scalar_t* mp = mu.data_ptr<scalar_t>();
    const scalar_t* lp = lt.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, C * n_samples)),
                     [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> eps(C), f(C);
      std::vector<double> acc(C);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* m = mp + b * C;
        const scalar_t* l = lp + b * C * C;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t s = 0; s < n_samples; ++s) {
          for (int64_t c = 0; c < C; ++c) eps[c] = static_cast<scalar_t>(normal(prefix[s], b, c));
          // f = mean + scale_tril ε (the full matrix, as the reference's matmul), then softmax.
          scalar_t mx = -INFINITY;
          for (int64_t i = 0; i < C; ++i) {
            scalar_t v = 0;
            for (int64_t j = 0; j < C; ++j) v += l[i * C + j] * eps[j];
            f[i] = m[i] + v;
            mx = std::max(mx, f[i]);
          }
          double total = 0;
          for (int64_t i = 0; i < C; ++i) total += (f[i] = std::exp(f[i] - mx));
          for (int64_t i = 0; i < C; ++i) acc[i] += f[i] / total;
        }
        for (int64_t i = 0; i < C; ++i) op[b * C + i] = static_cast<scalar_t>(acc[i] / n_samples);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlla, CPU, m) {
  m.impl("random_tangents", &random_tangents_cpu);
  m.impl("mc_softmax", &mc_softmax_cpu);
}

}  // namespace fastlla
