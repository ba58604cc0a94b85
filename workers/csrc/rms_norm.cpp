// RMSNorm for the CPU in float32, optionally fused with the residual add before it.
//
// Registered as torch.ops.moecluster.rms_norm and torch.ops.moecluster.add_rms_norm (see
// workers/cpu_kernels.py). torch's rms_norm on the CPU runs as half a dozen separate ops; on the
// small activations of a decode step their per-op overhead is the whole cost.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

#include <cmath>
#include <cstdint>
#include <tuple>

#include "float8.h"

namespace {

using namespace moecluster;

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "x and weight must be float32");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "x [..., H] needs weight [H], got ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.size(-1) % 8 == 0, "the normalised width must be a multiple of 8, got ", x.size(-1));
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x and weight must be contiguous");
}

// out = weight * (x * rsqrt(mean(x^2) + eps)), row by row.
void normalise_rows(float* out, const float* x, const float* weight, int64_t rows, int64_t width, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    float8 squares = {};
    for (int64_t d = 0; d < width; d += 8) {
      const float8 v = load8(row + d);
      squares += v * v;
    }
    const float inv = 1.f / std::sqrt(sum8(squares) / static_cast<float>(width) + static_cast<float>(eps));
    float* dst = out + r * width;
    for (int64_t d = 0; d < width; d += 8) store8(dst + d, load8(weight + d) * (load8(row + d) * inv));
  }
}

}  // namespace

namespace moecluster {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t width = x.size(-1);
  normalise_rows(out.data_ptr<float>(), x.data_ptr<float>(), weight.data_ptr<float>(), x.numel() / width, width, eps);
  return out;
}

// (x + residual, rms_norm(x + residual)): the residual stream and the next block's input at once.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check(x, weight);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == at::kFloat && residual.is_contiguous(),
              "residual must be a contiguous float32 tensor shaped like x");
  at::Tensor sum = at::empty_like(x);
  const int64_t n = x.numel();
  const float* a = x.data_ptr<float>();
  const float* b = residual.data_ptr<float>();
  float* s = sum.data_ptr<float>();
  for (int64_t i = 0; i < n; i += 8) store8(s + i, load8(a + i) + load8(b + i));
  at::Tensor out = at::empty_like(x);
  const int64_t width = x.size(-1);
  normalise_rows(out.data_ptr<float>(), s, weight.data_ptr<float>(), n / width, width, eps);
  return {sum, out};
}

}  // namespace moecluster

TORCH_LIBRARY_FRAGMENT(moecluster, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moecluster, CPU, m) {
  m.impl("rms_norm", &moecluster::rms_norm);
  m.impl("add_rms_norm", &moecluster::add_rms_norm);
}
