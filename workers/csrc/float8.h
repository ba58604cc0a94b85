// Eight floats as one vector, for the CPU kernels in this folder (GCC/Clang vector extension:
// AVX with -march=native on x86, NEON pairs on ARM, plain scalar code elsewhere). Lengths handed
// to these helpers must be multiples of 8.
#pragma once

#include <cstdint>
#include <cstring>

namespace moecluster {

typedef float float8 __attribute__((vector_size(32)));

inline float8 load8(const float* p) {
  float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, float8 v) { std::memcpy(p, &v, sizeof(v)); }

inline float sum8(float8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float dot(const float* q, const float* k, int64_t dim) {
  float8 acc = {};
  for (int64_t d = 0; d < dim; d += 8) acc += load8(q + d) * load8(k + d);
  return sum8(acc);
}

inline void axpy(float* out, float w, const float* v, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 8) store8(out + d, load8(out + d) + w * load8(v + d));
}

// exp of eight floats at once: x = n ln2 + r with |r| <= ln2 / 2 (n rounded to nearest by the
// 1.5 * 2^23 trick), exp(r) by its Taylor series to r^7 (relative error below 1e-7), times 2^n
// built in the exponent bits. x is clamped to [-87, 88]: below, about 1e-38 instead of underflow.
inline float8 exp8(float8 x) {
  typedef int int8v __attribute__((vector_size(32)));
  const float8 lowest = float8{} - 87.0f;
  const float8 highest = float8{} + 88.0f;
  x = x < lowest ? lowest : x;
  x = x > highest ? highest : x;
  const float8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for exactness
  float8 p = r * (1.f / 5040) + (1.f / 720);
  p = p * r + (1.f / 120);
  p = p * r + (1.f / 24);
  p = p * r + (1.f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int8v bits = (__builtin_convertvector(n, int8v) + 127) << 23;
  float8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace moecluster
