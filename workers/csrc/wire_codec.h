// The dispatch round trip's messages built and read in C++ (wire_codec.cpp), bound as plain
// Python functions in bindings.cpp: they take and return Python objects, so they are not torch ops.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace moecluster {

// Per destination worker of plan_dispatch's plan: (worker, header bytes, gathered rows of x or None
// for x as it is, pairs bytes, their tokens or None), the frames wire.dispatch_frames would make.
pybind11::list dispatch_messages(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                                 const at::Tensor& table, const at::Tensor& counts, int64_t num_workers,
                                 double full_batch_share, int64_t req, int64_t layer);

// (req, layer, x, pair_token, pair_expert, pair_weight) of a well-formed dispatch, else None.
pybind11::object decode_dispatch(const pybind11::sequence& frames, int64_t num_experts);

// (req, layer, y) of a well-formed result, else None.
pybind11::object decode_result(const pybind11::sequence& frames);

}  // namespace moecluster
