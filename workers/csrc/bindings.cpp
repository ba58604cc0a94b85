// The kernels as a Python extension module (workers/cpu_kernels.py loads it): a direct call,
// without the torch op dispatcher's per-call cost, and the wire builder and readers of
// wire_codec.cpp. Loading the module also registers the torch ops of the other files.

#include <torch/extension.h>

#include "kernels.h"
#include "wire_codec.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention_", &moecluster::paged_decode_attention_);
  m.def("routed_experts", &moecluster::routed_experts);
  m.def("rms_norm", &moecluster::rms_norm);
  m.def("add_rms_norm", &moecluster::add_rms_norm);
  m.def("moe_route", &moecluster::moe_route);
  m.def("rope", &moecluster::rope);
  m.def("plan_dispatch", &moecluster::plan_dispatch);
  m.def("combine_replies", &moecluster::combine_replies);
  m.def("dispatch_messages", &moecluster::dispatch_messages);
  m.def("decode_dispatch", &moecluster::decode_dispatch, pybind11::arg("frames"), pybind11::arg("num_experts"));
  m.def("decode_result", &moecluster::decode_result, pybind11::arg("frames"));
}
