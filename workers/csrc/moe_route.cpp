// The MoE gate after its matmul, for the CPU in one call: sigmoid scores, the correction bias for
// choosing, group-limited top-k, and the chosen experts' weights (GLM45.md section 2, "MoE block").
//
// Registered as torch.ops.moecluster.moe_route (see workers/cpu_kernels.py). The same steps in
// torch are a dozen small ops per MoE layer; on a decode step's few tokens their overhead is the
// whole cost.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// Indices of the `count` largest of values[0:n], largest first; ties go to the lower index.
void top_indices(const float* values, int64_t n, int64_t count, int64_t* out) {
  std::vector<bool> taken(n, false);
  for (int64_t k = 0; k < count; ++k) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      if (!taken[i] && (best < 0 || values[i] > values[best])) best = i;
    }
    taken[best] = true;
    out[k] = best;
  }
}

}  // namespace

namespace moecluster {

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const at::Tensor& bias, int64_t top_k,
                                             int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                             double routed_scaling_factor) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "logits must be contiguous float32 [T, E]");
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_experts && bias.scalar_type() == at::kFloat &&
                  bias.is_contiguous(),
              "bias must be contiguous float32 [E]");
  TORCH_CHECK(n_group >= 1 && num_experts % n_group == 0, "n_group must divide the experts");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "topk_group must be in [1, n_group]");
  const int64_t group_size = num_experts / n_group;
  TORCH_CHECK(n_group == 1 || group_size >= 2, "a group needs at least two experts");
  TORCH_CHECK(top_k >= 1 && top_k <= topk_group * group_size, "top_k exceeds the experts it may choose from");

  at::Tensor ids = at::empty({num_tokens, top_k}, logits.options().dtype(at::kLong));
  at::Tensor weights = at::empty({num_tokens, top_k}, logits.options());
  const float* logit_data = logits.data_ptr<float>();
  const float* bias_data = bias.data_ptr<float>();
  int64_t* id_data = ids.data_ptr<int64_t>();
  float* weight_data = weights.data_ptr<float>();
  std::vector<float> scores(num_experts);
  std::vector<float> choice(num_experts);
  std::vector<float> group_scores(n_group);
  std::vector<int64_t> kept(topk_group);
  std::vector<int64_t> pair(2);
  const float minus_inf = -std::numeric_limits<float>::infinity();

  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* row = logit_data + t * num_experts;
    for (int64_t e = 0; e < num_experts; ++e) {
      scores[e] = 1.f / (1.f + std::exp(-row[e]));
      choice[e] = scores[e] + bias_data[e];  // the bias picks experts, never weighs them
    }
    if (n_group > 1) {  // keep the topk_group groups whose two best experts score highest
      for (int64_t g = 0; g < n_group; ++g) {
        top_indices(choice.data() + g * group_size, group_size, 2, pair.data());
        group_scores[g] = choice[g * group_size + pair[0]] + choice[g * group_size + pair[1]];
      }
      top_indices(group_scores.data(), n_group, topk_group, kept.data());
      std::vector<bool> keep(n_group, false);
      for (int64_t g : kept) keep[g] = true;
      for (int64_t e = 0; e < num_experts; ++e) {
        if (!keep[e / group_size]) choice[e] = minus_inf;
      }
    }
    int64_t* chosen = id_data + t * top_k;
    top_indices(choice.data(), num_experts, top_k, chosen);
    float* w = weight_data + t * top_k;
    float total = 0.f;
    for (int64_t k = 0; k < top_k; ++k) {
      w[k] = scores[chosen[k]];
      total += w[k];
    }
    const float scale = static_cast<float>(routed_scaling_factor);
    for (int64_t k = 0; k < top_k; ++k) w[k] = (norm_topk_prob ? w[k] / (total + 1e-20f) : w[k]) * scale;
  }
  return {ids, weights};
}

}  // namespace moecluster

TORCH_LIBRARY_FRAGMENT(moecluster, m) {
  m.def(
      "moe_route(Tensor logits, Tensor bias, int top_k, int n_group, int topk_group, bool norm_topk_prob, "
      "float routed_scaling_factor) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moecluster, CPU, m) { m.impl("moe_route", &moecluster::moe_route); }
