// The dispatcher's combine: the expert workers' replies to one MoE layer summed per token.
//
// Registered as torch.ops.moecluster.combine_replies (see workers/cpu_kernels.py). Reply i holds
// rows rows[i] of the token batch (or every token, in order, when rows[i] is absent); out[t] is
// the float32 sum of the reply rows of token t, in the order of the replies, rounded once to the
// dtype (bfloat16 or float32), and zero for a token no reply covers. One pass: each token's sum
// stays in registers and is written once. torch on an AVX2 CPU runs a bfloat16 add at about
// 0.75 ns per element and a float32 sum of N replies as 2N passes over memory.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "float8.h"

namespace {

using namespace moecluster;

typedef uint32_t uint8v __attribute__((vector_size(32)));

inline uint8v load_bits(const void* p) {
  uint8v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline float8 as_float(uint8v u) {
  float8 f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint8v as_bits(float8 f) {
  uint8v u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// float32 bits rounded to nearest even at bit 16 (the top 16 bits are then the bfloat16). Sums of
// bfloat16 values carry no mantissa bits below bit 16 in a NaN, so a NaN stays a NaN.
inline uint8v round_to_bfloat16(uint8v u) { return u + 0x7FFFu + ((u >> 16) & 1u); }

// Sixteen bfloat16 values as 32 bytes: the even ones are the low halves of eight 32-bit lanes
// (shifted up they are float32), the odd ones the high halves (masked they are float32). Summing
// even and odd lanes separately needs no shuffles, and neither does packing them back.
inline uint8v pack_bfloat16(float8 even, float8 odd) {
  return (round_to_bfloat16(as_bits(even)) >> 16) | (round_to_bfloat16(as_bits(odd)) & 0xFFFF0000u);
}

void sum_bfloat16_row(uint16_t* out, const std::vector<const uint16_t*>& rows, int64_t width) {
  if (rows.size() == 2) {  // the common case (two workers): no loop over the rows
    const uint16_t* a = rows[0];
    const uint16_t* b = rows[1];
    for (int64_t d = 0; d < width; d += 16) {
      const uint8v u = load_bits(a + d);
      const uint8v v = load_bits(b + d);
      const uint8v packed = pack_bfloat16(as_float(u << 16) + as_float(v << 16),
                                          as_float(u & 0xFFFF0000u) + as_float(v & 0xFFFF0000u));
      std::memcpy(out + d, &packed, sizeof(packed));
    }
    return;
  }
  for (int64_t d = 0; d < width; d += 16) {
    float8 even = {};
    float8 odd = {};
    for (const uint16_t* row : rows) {
      const uint8v v = load_bits(row + d);
      even += as_float(v << 16);
      odd += as_float(v & 0xFFFF0000u);
    }
    const uint8v packed = pack_bfloat16(even, odd);
    std::memcpy(out + d, &packed, sizeof(packed));
  }
}

void sum_float32_row(float* out, const std::vector<const float*>& rows, int64_t width) {
  for (int64_t d = 0; d < width; d += 8) {
    float8 acc = {};
    for (const float* row : rows) acc += load8(row + d);
    store8(out + d, acc);
  }
}

}  // namespace

namespace moecluster {

at::Tensor combine_replies(int64_t num_tokens, const std::vector<at::Tensor>& replies,
                           const std::vector<std::optional<at::Tensor>>& rows) {
  TORCH_CHECK(!replies.empty(), "combine_replies needs at least one reply");
  TORCH_CHECK(rows.size() == replies.size(), "got ", replies.size(), " replies but ", rows.size(), " row lists");
  TORCH_CHECK(num_tokens >= 0, "num_tokens must be >= 0, got ", num_tokens);
  const at::ScalarType dtype = replies[0].scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kFloat, "replies must be bfloat16 or float32, got ", dtype);
  const int64_t width = replies[0].dim() == 2 ? replies[0].size(1) : -1;
  const int64_t lanes = dtype == at::kBFloat16 ? 16 : 8;
  TORCH_CHECK(width >= 0 && width % lanes == 0, "replies must be [n, H] with H a multiple of ", lanes, ", got ",
              replies[0].sizes());
  const int64_t count = static_cast<int64_t>(replies.size());
  // position[i * num_tokens + t]: the row of reply i holding token t, or -1
  std::vector<int64_t> position(static_cast<size_t>(count * num_tokens), -1);
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& y = replies[i];
    TORCH_CHECK(y.scalar_type() == dtype && y.dim() == 2 && y.size(1) == width && y.is_contiguous() && y.is_cpu(),
                "reply ", i, " is ", y.scalar_type(), " ", y.sizes(), "; every reply must be a contiguous CPU ",
                dtype, " [n, ", width, "]");
    int64_t* where = position.data() + i * num_tokens;
    const std::optional<at::Tensor>& reply_rows = rows[i];
    if (!reply_rows.has_value()) {
      TORCH_CHECK(y.size(0) == num_tokens, "reply ", i, " covers every token but has ", y.size(0), " rows, not ",
                  num_tokens);
      for (int64_t t = 0; t < num_tokens; ++t) where[t] = t;
      continue;
    }
    const at::Tensor& r = *reply_rows;
    TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.size(0) == y.size(0) && r.is_contiguous(),
                "rows of reply ", i, " must be a contiguous int64 [", y.size(0), "], got ", r.scalar_type(), " ",
                r.sizes());
    const int64_t* token = r.data_ptr<int64_t>();
    for (int64_t p = 0; p < r.size(0); ++p) {
      TORCH_CHECK_INDEX(token[p] >= 0 && token[p] < num_tokens, "reply ", i, " names token ", token[p], " outside 0..",
                        num_tokens - 1);
      TORCH_CHECK(where[token[p]] < 0, "reply ", i, " names token ", token[p], " twice");
      where[token[p]] = p;
    }
  }
  at::Tensor out = at::empty({num_tokens, width}, replies[0].options());
  const size_t row_bytes = static_cast<size_t>(width) * replies[0].element_size();
  std::vector<const uint16_t*> bfloat16_rows;
  std::vector<const float*> float32_rows;
  std::vector<const char*> sources;
  sources.reserve(static_cast<size_t>(count));
  for (int64_t t = 0; t < num_tokens; ++t) {
    char* dst = static_cast<char*>(out.data_ptr()) + t * row_bytes;
    sources.clear();
    for (int64_t i = 0; i < count; ++i) {
      const int64_t p = position[i * num_tokens + t];
      if (p >= 0) sources.push_back(static_cast<const char*>(replies[i].data_ptr()) + p * row_bytes);
    }
    if (sources.empty()) {
      std::memset(dst, 0, row_bytes);
    } else if (sources.size() == 1) {
      std::memcpy(dst, sources[0], row_bytes);  // nothing to add, nothing to round
    } else if (dtype == at::kBFloat16) {
      bfloat16_rows.assign(sources.size(), nullptr);
      for (size_t s = 0; s < sources.size(); ++s) bfloat16_rows[s] = reinterpret_cast<const uint16_t*>(sources[s]);
      sum_bfloat16_row(reinterpret_cast<uint16_t*>(dst), bfloat16_rows, width);
    } else {
      float32_rows.assign(sources.size(), nullptr);
      for (size_t s = 0; s < sources.size(); ++s) float32_rows[s] = reinterpret_cast<const float*>(sources[s]);
      sum_float32_row(reinterpret_cast<float*>(dst), float32_rows, width);
    }
  }
  return out;
}

}  // namespace moecluster

namespace {

// The torch op's argument types for the same call.
at::Tensor combine_replies_op(int64_t num_tokens, at::TensorList replies,
                              const c10::List<std::optional<at::Tensor>>& rows) {
  std::vector<std::optional<at::Tensor>> row_list(rows.begin(), rows.end());
  return moecluster::combine_replies(num_tokens, replies.vec(), row_list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moecluster, m) {
  m.def("combine_replies(int num_tokens, Tensor[] replies, Tensor?[] rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(moecluster, CPU, m) { m.impl("combine_replies", &combine_replies_op); }
