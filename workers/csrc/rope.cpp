// Partial NeoX rotary embedding for the CPU in one call (GLM45.md section 2): the first R
// channels of each head rotate by half-split pairs, the rest pass through.
//
// Registered as torch.ops.moecluster.rope (see workers/cpu_kernels.py); in torch the same is ten
// small ops per attention layer.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>

namespace moecluster {

// x [T, heads, D] float32 (rows may be strided, each head contiguous); cos and sin [T, R].
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "x must be float32 [T, heads, D]");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "each token's heads must be contiguous in x");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == tokens, "cos and sin must be [T, R]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(),
              "cos and sin must be contiguous float32");
  const int64_t rot = cos.size(1);
  TORCH_CHECK(rot % 2 == 0 && rot <= dim, "the rotary width must be even and at most head_dim");
  const int64_t half = rot / 2;
  at::Tensor out = at::empty({tokens, heads, dim}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const int64_t row_stride = x.stride(0);
  for (int64_t t = 0; t < tokens; ++t) {
    const float* ct = c + t * rot;
    const float* st = s + t * rot;
    for (int64_t h = 0; h < heads; ++h) {
      const float* in = src + t * row_stride + h * dim;
      float* o = dst + (t * heads + h) * dim;
      for (int64_t j = 0; j < half; ++j) {  // x * cos + rotate_half(x) * sin, rotate_half = (-x2, x1)
        o[j] = in[j] * ct[j] + (-in[j + half]) * st[j];
        o[j + half] = in[j + half] * ct[j + half] + in[j] * st[j + half];
      }
      for (int64_t j = rot; j < dim; ++j) o[j] = in[j];
    }
  }
  return out;
}

}  // namespace moecluster

TORCH_LIBRARY_FRAGMENT(moecluster, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor"); }

TORCH_LIBRARY_IMPL(moecluster, CPU, m) { m.impl("rope", &moecluster::rope); }
