// The kernels of this folder, each defined in its own .cpp: registered there as torch ops
// (torch.ops.moecluster.*) and bound in bindings.cpp as plain Python functions, which
// workers/cpu_kernels.py calls (a torch op call costs about 10 us of dispatch, a bound call 1-2).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace moecluster {

void paged_decode_attention_(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& rows, const at::Tensor& block_tables,
                             const at::Tensor& context_lens, int64_t block_size, double scale);

at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& pair_token, const at::Tensor& pair_expert,
                          const at::Tensor& pair_weight, const at::Tensor& local_index, const at::Tensor& gate_up,
                          const at::Tensor& down);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const at::Tensor& bias, int64_t top_k,
                                             int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                             double routed_scaling_factor);

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> plan_dispatch(
    const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& table,
    const at::Tensor& counts, int64_t num_workers, double full_batch_share);

at::Tensor combine_replies(int64_t num_tokens, const std::vector<at::Tensor>& replies,
                           const std::vector<std::optional<at::Tensor>>& rows);

}  // namespace moecluster
