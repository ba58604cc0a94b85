// Eight floats as one vector, for the CPU kernels in this folder (GCC/Clang vector extension:
// AVX with -march=native on x86, NEON pairs on ARM, plain scalar code elsewhere). Lengths handed
// to these helpers must be multiples of 8.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX__
#include <immintrin.h>
#endif

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

// out[i] = dot(q, rows + i * dim) for eight consecutive rows: the eight sums are reduced together
// (one horizontal-add tree on AVX instead of eight separate ones).
inline void dot_rows8(float* out, const float* q, const float* rows, int64_t dim) {
  float8 acc[8] = {};
  for (int64_t d = 0; d < dim; d += 8) {
    const float8 qv = load8(q + d);
    for (int i = 0; i < 8; ++i) acc[i] += qv * load8(rows + i * dim + d);
  }
#ifdef __AVX__
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]);
  const __m256 t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]);
  const __m256 t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // rows 0-3: sums of lanes 0-3, then of lanes 4-7
  const __m256 u1 = _mm256_hadd_ps(t2, t3);  // rows 4-7 likewise
  const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(out, sums);
#else
  for (int i = 0; i < 8; ++i) out[i] = sum8(acc[i]);
#endif
}

inline void axpy(float* out, float w, const float* v, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 8) store8(out + d, load8(out + d) + w * load8(v + d));
}

// acc[0 : 8N] += sum over t < count of w[t] * rows[t * dim : t * dim + 8N], accumulated in
// registers and written back once: read-modify-writing acc in memory row after row stalls on
// store-to-load forwarding (badly where a 256-bit store is split in two, as on Zen 1).
template <int N>
inline void weighted_rows(float* acc, const float* w, const float* rows, int64_t count, int64_t dim) {
  float8 a[N];
  for (int c = 0; c < N; ++c) a[c] = load8(acc + 8 * c);
  for (int64_t t = 0; t < count; ++t) {
    const float wt = w[t];
    const float* row = rows + t * dim;
    for (int c = 0; c < N; ++c) a[c] += wt * load8(row + 8 * c);
  }
  for (int c = 0; c < N; ++c) store8(acc + 8 * c, a[c]);
}

// The same over the whole width dim (a multiple of 8), 32 columns at a time.
inline void weighted_rows(float* acc, const float* w, const float* rows, int64_t count, int64_t dim) {
  int64_t d = 0;
  for (; d + 32 <= dim; d += 32) weighted_rows<4>(acc + d, w, rows + d, count, dim);
  switch ((dim - d) / 8) {
    case 3: return weighted_rows<3>(acc + d, w, rows + d, count, dim);
    case 2: return weighted_rows<2>(acc + d, w, rows + d, count, dim);
    case 1: return weighted_rows<1>(acc + d, w, rows + d, count, dim);
    default: return;
  }
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
