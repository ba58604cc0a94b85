// The dispatcher's plan: which expert worker gets which (token, expert) pairs and token rows.
//
// Registered as torch.ops.moecluster.plan_dispatch (see workers/cpu_kernels.py). It computes in
// one call what router.dispatcher's numpy path computes in some thirty array operations (about
// 130 us at 64 tokens and 2 workers on this CPU): each pair's worker from the placement table
// (token t of expert e goes to replica t % counts[e]), then per worker its pairs in token-major
// order as one [3, P] int32 block (row of x, expert id, weight bits), the rows of x it needs, and
// those rows gathered. A worker that needs at least full_batch_share of the tokens gets x as it
// is: its rows and x are then empty tensors, and a pair's row is its token.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace moecluster {

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> plan_dispatch(
    const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights, const at::Tensor& table,
    const at::Tensor& counts, int64_t num_workers, double full_batch_share) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.is_cpu(), "x must be a contiguous CPU [T, H], got ", x.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong && topk_ids.dim() == 2 && topk_ids.is_contiguous() &&
                  topk_ids.size(0) == x.size(0),
              "topk_ids must be a contiguous int64 [T, K] with T = ", x.size(0), ", got ", topk_ids.scalar_type(),
              " ", topk_ids.sizes());
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.sizes() == topk_ids.sizes() &&
                  topk_weights.is_contiguous(),
              "topk_weights must be a contiguous float32 shaped like topk_ids, got ", topk_weights.scalar_type(), " ",
              topk_weights.sizes());
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.is_contiguous() && table.size(1) >= 1,
              "table must be a contiguous int64 [E, R]");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.size(0) == table.size(0) &&
                  counts.is_contiguous(),
              "counts must be a contiguous int64 [E]");
  TORCH_CHECK(num_workers >= 1, "num_workers must be >= 1, got ", num_workers);
  const int64_t tokens = topk_ids.size(0);
  const int64_t k = topk_ids.size(1);
  const int64_t num_experts = table.size(0);
  const int64_t width = table.size(1);
  const int64_t* ids = topk_ids.data_ptr<int64_t>();
  const int64_t* table_ptr = table.data_ptr<int64_t>();
  const int64_t* count_ptr = counts.data_ptr<int64_t>();

  // The worker of each pair, and per worker its pair count and the tokens it needs.
  std::vector<int32_t> worker_of_pair(static_cast<size_t>(tokens * k));
  std::vector<int64_t> pairs_of(static_cast<size_t>(num_workers), 0);
  std::vector<uint8_t> needs(static_cast<size_t>(num_workers * tokens), 0);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = ids[t * k + s];
      TORCH_CHECK_INDEX(e >= 0 && e < num_experts, "topk_ids outside 0..", num_experts - 1, ": got ", e);
      const int64_t replicas = count_ptr[e];
      TORCH_CHECK(replicas >= 1 && replicas <= width, "expert ", e, " has ", replicas, " replicas in a table of width ",
                  width);
      const int64_t w = table_ptr[e * width + t % replicas];
      TORCH_CHECK(w >= 0 && w < num_workers, "expert ", e, " is placed on worker ", w, ", outside 0..",
                  num_workers - 1);
      worker_of_pair[t * k + s] = static_cast<int32_t>(w);
      ++pairs_of[w];
      needs[w * tokens + t] = 1;
    }
  }

  const int32_t* weight_bits = reinterpret_cast<const int32_t*>(topk_weights.data_ptr<float>());
  const char* x_rows = static_cast<const char*>(x.data_ptr());
  const size_t row_bytes = static_cast<size_t>(x.size(1)) * x.element_size();
  std::vector<int64_t> destinations;
  std::vector<at::Tensor> xs, pairs, rows;
  std::vector<int32_t> row_of_token(static_cast<size_t>(tokens));
  for (int64_t w = 0; w < num_workers; ++w) {
    if (pairs_of[w] == 0) continue;
    const uint8_t* needed = needs.data() + w * tokens;
    int64_t num_needed = 0;
    for (int64_t t = 0; t < tokens; ++t) num_needed += needed[t];
    at::Tensor worker_rows = at::empty({0}, topk_ids.options());
    at::Tensor worker_x = at::empty({0}, x.options());
    if (static_cast<double>(num_needed) >= full_batch_share * static_cast<double>(tokens)) {
      for (int64_t t = 0; t < tokens; ++t) row_of_token[t] = static_cast<int32_t>(t);
    } else {
      worker_rows = at::empty({num_needed}, topk_ids.options());
      worker_x = at::empty({num_needed, x.size(1)}, x.options());
      int64_t* token_of_row = worker_rows.data_ptr<int64_t>();
      char* gathered = static_cast<char*>(worker_x.data_ptr());
      int64_t row = 0;
      for (int64_t t = 0; t < tokens; ++t) {
        if (!needed[t]) continue;
        row_of_token[t] = static_cast<int32_t>(row);
        token_of_row[row] = t;
        std::memcpy(gathered + row * row_bytes, x_rows + t * row_bytes, row_bytes);
        ++row;
      }
    }
    at::Tensor block = at::empty({3, pairs_of[w]}, topk_ids.options().dtype(at::kInt));
    int32_t* pair_row = block.data_ptr<int32_t>();
    int32_t* pair_expert = pair_row + pairs_of[w];
    int32_t* pair_weight = pair_expert + pairs_of[w];
    int64_t p = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      if (!needed[t]) continue;
      for (int64_t s = 0; s < k; ++s) {
        if (worker_of_pair[t * k + s] != w) continue;
        pair_row[p] = row_of_token[t];
        pair_expert[p] = static_cast<int32_t>(ids[t * k + s]);
        pair_weight[p] = weight_bits[t * k + s];
        ++p;
      }
    }
    destinations.push_back(w);
    xs.push_back(worker_x);
    pairs.push_back(block);
    rows.push_back(worker_rows);
  }
  at::Tensor workers = at::empty({static_cast<int64_t>(destinations.size())}, topk_ids.options());
  if (!destinations.empty()) {
    std::memcpy(workers.data_ptr<int64_t>(), destinations.data(), destinations.size() * sizeof(int64_t));
  }
  return {workers, xs, pairs, rows};
}

}  // namespace moecluster

TORCH_LIBRARY_FRAGMENT(moecluster, m) {
  m.def(
      "plan_dispatch(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor table, Tensor counts, int num_workers, "
      "float full_batch_share) -> (Tensor, Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(moecluster, CPU, m) { m.impl("plan_dispatch", &moecluster::plan_dispatch); }
