// Paged decode attention for the CPU: one query token per sequence, read straight from the
// head-major paged KV cache, without gathering the context into a padded copy first.
//
// Registered as torch.ops.moecluster.paged_decode_attention_ (see workers/cpu_kernels.py, which
// builds and loads this file). For every (sequence, KV head) pair it walks the sequence's blocks
// once for the scores and once for the values; the query heads that share the KV head are done
// together, so each key and value row is read from memory once per step.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "float8.h"

namespace {

using namespace moecluster;

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Ask for a block's cache lines ahead of use: blocks sit at scattered places in the cache.
template <typename T>
inline void prefetch(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < count * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(bytes + off);
}

// A block's rows as float32: the cache itself when it is float32, else converted into `buffer`.
inline const float* block_rows(const float* rows, int64_t, float*) { return rows; }
inline const float* block_rows(const c10::BFloat16* rows, int64_t count, float* buffer) {
  for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(rows[i]);
  return buffer;
}

template <typename io_t, typename cache_t>
void decode_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& rows, const at::Tensor& block_tables, const at::Tensor& context_lens,
                   int64_t block_size, double scale) {
  const int64_t num_seqs = rows.size(0);
  const int64_t num_q_heads = q.size(1);
  const int64_t dim = q.size(2);
  const int64_t num_kv_heads = k_cache.size(0);
  const int64_t num_slots = k_cache.size(1);
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t q_row_stride = q.stride(0);

  const io_t* q_data = q.data_ptr<io_t>();
  io_t* out_data = out.data_ptr<io_t>();
  const cache_t* k_data = k_cache.data_ptr<cache_t>();
  const cache_t* v_data = v_cache.data_ptr<cache_t>();
  const int64_t* row_data = rows.data_ptr<int64_t>();
  const int64_t* table_data = block_tables.data_ptr<int64_t>();
  const int64_t* len_data = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim);
    std::vector<float> acc(group * dim);
    std::vector<float> scores;
    std::vector<float> converted(block_size * dim);
    std::vector<float> inv_sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads;
      const int64_t kv_head = item % num_kv_heads;
      const int64_t row = row_data[seq];
      const int64_t length = len_data[seq];
      const int64_t* table = table_data + seq * max_blocks;
      const cache_t* k_head = k_data + kv_head * num_slots * dim;
      const cache_t* v_head = v_data + kv_head * num_slots * dim;
      const io_t* q_row = q_data + row * q_row_stride + kv_head * group * dim;
      for (int64_t i = 0; i < group * dim; ++i) query[i] = to_float(q_row[i]) * fscale;
      scores.resize(group * length);

      // scores[g, p] = q_g . k_p over the sequence's blocks, block by block
      for (int64_t start = 0; start < length; start += block_size) {
        const int64_t count = std::min(block_size, length - start);
        if (start + 4 * block_size < length) prefetch(k_head + table[start / block_size + 4] * block_size * dim, block_size * dim);
        prefetch(v_head + table[start / block_size] * block_size * dim, count * dim);
        const float* k_block =
            block_rows(k_head + table[start / block_size] * block_size * dim, count * dim, converted.data());
        for (int64_t g = 0; g < group; ++g) {
          float* s = scores.data() + g * length + start;
          const float* q = query.data() + g * dim;
          int64_t t = 0;
          for (; t + 8 <= count; t += 8) dot_rows8(s + t, q, k_block + t * dim, dim);
          for (; t < count; ++t) s[t] = dot(q, k_block + t * dim, dim);
        }
      }
      // softmax per query head, left unnormalised until the end
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        float peak = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < length; ++p) peak = std::max(peak, s[p]);
        float8 totals = {};
        int64_t p = 0;
        for (; p + 8 <= length; p += 8) {
          const float8 e = exp8(load8(s + p) - peak);
          store8(s + p, e);
          totals += e;
        }
        float total = sum8(totals);
        for (; p < length; ++p) {
          s[p] = std::exp(s[p] - peak);
          total += s[p];
        }
        inv_sum[g] = 1.f / total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t start = 0; start < length; start += block_size) {
        const int64_t count = std::min(block_size, length - start);
        const float* v_block =
            block_rows(v_head + table[start / block_size] * block_size * dim, count * dim, converted.data());
        for (int64_t g = 0; g < group; ++g) {
          weighted_rows(acc.data() + g * dim, scores.data() + g * length + start, v_block, count, dim);
        }
      }
      io_t* out_row = out_data + (row * num_q_heads + kv_head * group) * dim;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t d = 0; d < dim; ++d) out_row[g * dim + d] = static_cast<io_t>(acc[g * dim + d] * inv_sum[g]);
      }
    }
  });
}

}  // namespace

namespace moecluster {

void paged_decode_attention_(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& block_tables,
                             const at::Tensor& context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must both be [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "k_cache and v_cache must be [Hkv, slots, D]");
  TORCH_CHECK(k_cache.size(2) == q.size(2), "head_dim of q and the cache differ");
  TORCH_CHECK(q.size(2) % 8 == 0, "head_dim must be a multiple of 8, got ", q.size(2));
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "each row of q must be contiguous (rows may be strided)");
  TORCH_CHECK(out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "out and the cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == out.scalar_type(), "q and out must have one dtype");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must have one dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && block_tables.scalar_type() == at::kLong &&
                  context_lens.scalar_type() == at::kLong,
              "rows, block_tables and context_lens must be int64");
  TORCH_CHECK(rows.dim() == 1 && block_tables.dim() == 2 && context_lens.dim() == 1 &&
                  block_tables.size(0) == rows.size(0) && context_lens.size(0) == rows.size(0),
              "need rows [B], block_tables [B, N] and context_lens [B]");
  TORCH_CHECK(rows.is_contiguous() && block_tables.is_contiguous() && context_lens.is_contiguous(),
              "rows, block_tables and context_lens must be contiguous");
  TORCH_CHECK(block_size > 0, "block_size must be > 0");
  const int64_t num_slots = k_cache.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* table = block_tables.data_ptr<int64_t>();
  const int64_t* row_data = rows.data_ptr<int64_t>();
  for (int64_t s = 0; s < rows.size(0); ++s) {
    TORCH_CHECK(row_data[s] >= 0 && row_data[s] < q.size(0), "row ", row_data[s], " outside q");
    TORCH_CHECK(lens[s] > 0 && lens[s] <= block_tables.size(1) * block_size, "context length ", lens[s],
                " outside (0, ", block_tables.size(1) * block_size, "]");
    for (int64_t b = 0; b * block_size < lens[s]; ++b) {
      const int64_t block = table[s * block_tables.size(1) + b];
      TORCH_CHECK(block >= 0 && (block + 1) * block_size <= num_slots, "block ", block, " outside the cache");
    }
  }
  const bool float_io = q.scalar_type() == at::kFloat;
  TORCH_CHECK(float_io || q.scalar_type() == at::kBFloat16, "q must be float32 or bfloat16");
  const bool float_cache = k_cache.scalar_type() == at::kFloat;
  TORCH_CHECK(float_cache || k_cache.scalar_type() == at::kBFloat16, "the cache must be float32 or bfloat16");
  if (float_io && float_cache) {
    decode_kernel<float, float>(out, q, k_cache, v_cache, rows, block_tables, context_lens, block_size, scale);
  } else if (float_io) {
    decode_kernel<float, c10::BFloat16>(out, q, k_cache, v_cache, rows, block_tables, context_lens, block_size, scale);
  } else if (float_cache) {
    decode_kernel<c10::BFloat16, float>(out, q, k_cache, v_cache, rows, block_tables, context_lens, block_size, scale);
  } else {
    decode_kernel<c10::BFloat16, c10::BFloat16>(out, q, k_cache, v_cache, rows, block_tables, context_lens,
                                                block_size, scale);
  }
}

}  // namespace moecluster

TORCH_LIBRARY(moecluster, m) {
  m.def(
      "paged_decode_attention_(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, "
      "Tensor block_tables, Tensor context_lens, int block_size, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(moecluster, CPU, m) { m.impl("paged_decode_attention_", &moecluster::paged_decode_attention_); }
