// The dispatch round trip's messages in C++: the dispatcher's dispatches built in one call
// (dispatch_messages), and the expert server's dispatch and the dispatcher's result each read in
// one call (decode_dispatch, decode_result).
//
// dispatch_messages runs plan_dispatch (plan_dispatch.cpp) and returns, per destination worker,
// the frames wire.dispatch_frames would make of its plan: the msgpack header msgpack.packb writes
// for it, the pairs' bytes, and the gathered rows of x (or None: x as it is) for the caller to
// send as a zero-copy frame.
//
// router/wire.py defines the format, and its decode is the reference. These readers take only
// what wire.encode writes for a well-formed, non-empty dispatch or result (a msgpack fixarray
// header of fixints, uints and fixstrs, the frame count and byte sizes the header implies, pair
// rows inside x and expert ids below the expert count) and return exactly what decode returns for
// it, as plain values. For anything else they return None, and the caller runs wire.decode, which
// reads the message or names what is wrong. They do in one call what decode does in a few dozen
// Python and torch calls (about 100 us on this CPU once a wake-up has left the caches cold).
// The tensors are views of the frames' memory, as torch.frombuffer gives, and keep the frames
// alive.

#include <torch/extension.h>

#include "kernels.h"
#include "wire_codec.h"

#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace moecluster {
namespace {

constexpr uint64_t kWireVersion = 2;  // router.wire.WIRE_VERSION
constexpr uint64_t kMaxDim = uint64_t(1) << 40;  // larger counts are left to wire.decode

// a * b * c, false if it overflows
bool product(uint64_t a, uint64_t b, uint64_t c, uint64_t& out) {
  return !__builtin_mul_overflow(a, b, &out) && !__builtin_mul_overflow(out, c, &out);
}

// A frame's bytes (PyBUF_SIMPLE: contiguous), released when this goes out of scope.
class FrameBytes {
 public:
  explicit FrameBytes(PyObject* frame) : ok_(PyObject_GetBuffer(frame, &view_, PyBUF_SIMPLE) == 0) {
    if (!ok_) PyErr_Clear();  // not a contiguous buffer: wire.decode says what it is
  }
  ~FrameBytes() {
    if (ok_) PyBuffer_Release(&view_);
  }
  FrameBytes(const FrameBytes&) = delete;
  FrameBytes& operator=(const FrameBytes&) = delete;

  bool ok() const { return ok_; }
  const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
  uint64_t size() const { return static_cast<uint64_t>(view_.len); }

 private:
  Py_buffer view_{};
  bool ok_;
};

// msgpack, only as wire.encode (msgpack.packb) writes a header: every read fails on anything else.
class HeaderReader {
 public:
  explicit HeaderReader(const FrameBytes& frame) : p_(frame.data()), end_(frame.data() + frame.size()) {}

  bool array(uint64_t items) {  // fixarray
    if (p_ >= end_ || *p_ != 0x90 + items) return false;
    ++p_;
    return true;
  }
  bool count(uint64_t& value) {  // a non-negative int: positive fixint or uint 8/16/32/64
    if (p_ >= end_) return false;
    const uint8_t tag = *p_++;
    if (tag <= 0x7f) {
      value = tag;
      return true;
    }
    const int width = tag == 0xcc ? 1 : tag == 0xcd ? 2 : tag == 0xce ? 4 : tag == 0xcf ? 8 : 0;
    if (width == 0 || end_ - p_ < width) return false;
    value = 0;
    for (int i = 0; i < width; ++i) value = value << 8 | p_[i];
    p_ += width;
    return true;
  }
  bool str(std::string_view& value) {  // fixstr
    if (p_ >= end_ || (*p_ & 0xe0) != 0xa0) return false;
    const size_t length = *p_++ & 0x1f;
    if (static_cast<size_t>(end_ - p_) < length) return false;
    value = std::string_view(reinterpret_cast<const char*>(p_), length);
    p_ += length;
    return true;
  }
  bool done() const { return p_ == end_; }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

// The header fields a dispatch and a result share, after the version and the kind.
struct HiddenHeader {
  uint64_t req = 0, layer = 0, rows = 0, hidden = 0;
  at::ScalarType dtype = at::kFloat;
  uint64_t itemsize = 0;
};

bool read_hidden_header(HeaderReader& reader, HiddenHeader& h) {
  std::string_view dtype;
  if (!reader.count(h.req) || !reader.count(h.layer) || !reader.str(dtype) || !reader.count(h.rows) ||
      !reader.count(h.hidden)) {
    return false;
  }
  if (dtype == "bfloat16") {
    h.dtype = at::kBFloat16;
    h.itemsize = 2;
  } else if (dtype == "float32") {
    h.dtype = at::kFloat;
    h.itemsize = 4;
  } else if (dtype == "float16") {
    h.dtype = at::kHalf;
    h.itemsize = 2;
  } else {
    return false;
  }
  // Python ints past int64 and empty tensors (torch.frombuffer refuses empty buffers) go to wire.decode.
  return h.req <= INT64_MAX && h.layer <= INT64_MAX && h.rows >= 1 && h.rows <= kMaxDim && h.hidden >= 1 &&
         h.hidden <= kMaxDim;
}

bool read_kind(HeaderReader& reader, uint64_t items, std::string_view kind) {
  uint64_t version = 0;
  std::string_view got;
  return reader.array(items) && reader.count(version) && version == kWireVersion && reader.str(got) && got == kind;
}

// A tensor over a frame's memory that holds a reference to the frame until the tensor is freed.
at::Tensor tensor_over(PyObject* frame, const FrameBytes& bytes, at::IntArrayRef sizes, at::ScalarType dtype) {
  Py_INCREF(frame);
  return at::from_blob(
      const_cast<uint8_t*>(bytes.data()), sizes,
      [frame](void*) {
        py::gil_scoped_acquire gil;
        Py_DECREF(frame);
      },
      at::TensorOptions().dtype(dtype));
}

uint32_t max_u32(const uint8_t* data, uint64_t n) {  // frames need not be 4-byte aligned
  uint32_t top = 0;
  for (uint64_t i = 0; i < n; ++i) {
    uint32_t v;
    std::memcpy(&v, data + 4 * i, 4);
    top = v > top ? v : top;
  }
  return top;
}

// msgpack as msgpack.packb writes it for the ints and short strings of a header.
class HeaderWriter {
 public:
  explicit HeaderWriter(uint64_t items) { out_.push_back(static_cast<char>(0x90 + items)); }  // fixarray

  void integer(int64_t value) {
    if (value >= 0) {
      const uint64_t v = static_cast<uint64_t>(value);
      if (v <= 0x7f) {
        out_.push_back(static_cast<char>(v));  // positive fixint
      } else if (v <= 0xff) {
        tagged(0xcc, v, 1);
      } else if (v <= 0xffff) {
        tagged(0xcd, v, 2);
      } else if (v <= 0xffffffffu) {
        tagged(0xce, v, 4);
      } else {
        tagged(0xcf, v, 8);
      }
    } else if (value >= -32) {
      out_.push_back(static_cast<char>(value));  // negative fixint
    } else if (value >= INT8_MIN) {
      tagged(0xd0, static_cast<uint64_t>(value), 1);
    } else if (value >= INT16_MIN) {
      tagged(0xd1, static_cast<uint64_t>(value), 2);
    } else if (value >= INT32_MIN) {
      tagged(0xd2, static_cast<uint64_t>(value), 4);
    } else {
      tagged(0xd3, static_cast<uint64_t>(value), 8);
    }
  }
  void str(std::string_view value) {  // fixstr: the header's strings are short
    out_.push_back(static_cast<char>(0xa0 + value.size()));
    out_.append(value);
  }
  py::bytes bytes() const { return py::bytes(out_); }

 private:
  void tagged(uint8_t tag, uint64_t value, int width) {  // big-endian, the low `width` bytes
    out_.push_back(static_cast<char>(tag));
    for (int i = width - 1; i >= 0; --i) out_.push_back(static_cast<char>(value >> (8 * i)));
  }
  std::string out_;
};

std::string_view dtype_name(at::ScalarType dtype) {  // router.wire.HIDDEN_DTYPES
  switch (dtype) {
    case at::kBFloat16:
      return "bfloat16";
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    default:
      TORCH_CHECK(false, "hidden dtype ", dtype, " is not one of bfloat16, float16, float32");
  }
}

}  // namespace

py::list dispatch_messages(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                           const at::Tensor& table, const at::Tensor& counts, int64_t num_workers,
                           double full_batch_share, int64_t req, int64_t layer) {
  const std::string_view dtype = dtype_name(x.scalar_type());
  auto [workers, xs, pairs, rows] =
      plan_dispatch(x, topk_ids, topk_weights, table, counts, num_workers, full_batch_share);
  const int64_t* worker_ids = workers.data_ptr<int64_t>();
  py::list messages;
  for (size_t i = 0; i < xs.size(); ++i) {
    const bool whole = rows[i].numel() == 0;  // x as it is
    const int64_t num_pairs = pairs[i].size(1);
    HeaderWriter header(8);
    header.integer(static_cast<int64_t>(kWireVersion));
    header.str("dispatch");
    header.integer(req);
    header.integer(layer);
    header.str(dtype);
    header.integer(whole ? x.size(0) : xs[i].size(0));
    header.integer(x.size(1));
    header.integer(num_pairs);
    py::bytes pair_bytes(static_cast<const char*>(pairs[i].data_ptr()), static_cast<size_t>(pairs[i].nbytes()));
    messages.append(py::make_tuple(worker_ids[i], header.bytes(), whole ? py::none() : py::cast(xs[i]), pair_bytes,
                                   whole ? py::none() : py::cast(rows[i])));
  }
  return messages;
}

py::object decode_dispatch(const py::sequence& frames, int64_t num_experts) {
  if (py::len(frames) != 3) return py::none();
  py::object header_frame = frames[0], x_frame = frames[1], pairs_frame = frames[2];
  FrameBytes header(header_frame.ptr());
  if (!header.ok()) return py::none();
  HeaderReader reader(header);
  HiddenHeader h;
  uint64_t num_pairs = 0;
  if (!read_kind(reader, 8, "dispatch") || !read_hidden_header(reader, h) || !reader.count(num_pairs) ||
      !reader.done() || num_pairs < 1 || num_pairs > kMaxDim) {
    return py::none();
  }
  FrameBytes x_bytes(x_frame.ptr());
  FrameBytes pair_bytes(pairs_frame.ptr());
  uint64_t x_size = 0;
  if (!x_bytes.ok() || !pair_bytes.ok() || !product(h.rows, h.hidden, h.itemsize, x_size) ||
      x_bytes.size() != x_size || pair_bytes.size() != 3 * 4 * num_pairs) {
    return py::none();
  }
  // As unsigned, a negative int32 is above any bound (wire.decode's test).
  if (max_u32(pair_bytes.data(), num_pairs) >= h.rows ||
      max_u32(pair_bytes.data() + 4 * num_pairs, num_pairs) >= static_cast<uint64_t>(num_experts)) {
    return py::none();
  }
  at::Tensor x = tensor_over(x_frame.ptr(), x_bytes, {int64_t(h.rows), int64_t(h.hidden)}, h.dtype);
  at::Tensor pairs = tensor_over(pairs_frame.ptr(), pair_bytes, {3, int64_t(num_pairs)}, at::kInt);
  return py::make_tuple(h.req, h.layer, x, pairs.select(0, 0), pairs.select(0, 1),
                        pairs.select(0, 2).view(at::kFloat));
}

py::object decode_result(const py::sequence& frames) {
  if (py::len(frames) != 2) return py::none();
  py::object header_frame = frames[0], y_frame = frames[1];
  FrameBytes header(header_frame.ptr());
  if (!header.ok()) return py::none();
  HeaderReader reader(header);
  HiddenHeader h;
  if (!read_kind(reader, 7, "result") || !read_hidden_header(reader, h) || !reader.done()) return py::none();
  FrameBytes y_bytes(y_frame.ptr());
  uint64_t y_size = 0;
  if (!y_bytes.ok() || !product(h.rows, h.hidden, h.itemsize, y_size) || y_bytes.size() != y_size) {
    return py::none();
  }
  return py::make_tuple(h.req, h.layer, tensor_over(y_frame.ptr(), y_bytes, {int64_t(h.rows), int64_t(h.hidden)},
                                                    h.dtype));
}

}  // namespace moecluster
