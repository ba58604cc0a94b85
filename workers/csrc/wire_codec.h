// The dispatch round trip's messages read in C++ (wire_codec.cpp), bound as plain Python
// functions in bindings.cpp: they take and return Python objects, so they are not torch ops.
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace moecluster {

// (req, layer, x, pair_token, pair_expert, pair_weight) of a well-formed dispatch, else None.
pybind11::object decode_dispatch(const pybind11::sequence& frames, int64_t num_experts);

// (req, layer, y) of a well-formed result, else None.
pybind11::object decode_result(const pybind11::sequence& frames);

}  // namespace moecluster
