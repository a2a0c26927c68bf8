// Tensor: dense, row-major, contiguous. A tensor owns (shares) its storage or
// views part of another tensor's storage (Reshape, Slice along dim 0). No
// autograd: layers keep what their backward needs in activation structs.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/status.h"

namespace loom {

using Shape = std::vector<int64_t>;
std::string ShapeString(const Shape& shape);
int64_t NumElements(const Shape& shape);

struct Device {
  enum class Kind : uint8_t { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;
  static Device Cpu() { return {}; }
  static Device Cuda(int index) { return {Kind::kCuda, index}; }
  bool is_cpu() const { return kind == Kind::kCpu; }
  bool operator==(const Device&) const = default;
  std::string ToString() const;
};

// Raw memory of one device. Freed through the allocator that made it.
// Pinned: host memory page-locked by CUDA (a CUDA build's host staging).
class Storage {
 public:
  Storage(size_t bytes, Device device, bool pinned = false);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device device_;
  bool pinned_ = false;
};

// Bytes of CPU tensor storage allocated now, and the most at any moment
// since the start (or the last ResetPeakCpuTensorBytes). Counts the bytes
// tensors ask for, not the allocator's rounding; thread-safe.
int64_t CpuTensorBytes();
int64_t PeakCpuTensorBytes();
void ResetPeakCpuTensorBytes();  // peak := current

class Tensor {
 public:
  Tensor() = default;
  static Tensor Empty(const Shape& shape, DType dtype, Device device = Device::Cpu());
  static Tensor Zeros(const Shape& shape, DType dtype, Device device = Device::Cpu());
  // A CPU tensor in page-locked memory when Loom is built with CUDA (copies
  // from and to a GPU then run at the link's speed; needs a GPU), else
  // plain memory.
  static Tensor PinnedEmpty(const Shape& shape, DType dtype);
  template <typename T>
  static Tensor FromVector(const std::vector<T>& values, const Shape& shape) {
    LOOM_CHECK(NumElements(shape) == static_cast<int64_t>(values.size()), "[tensor] ",
               values.size(), " values for shape ", ShapeString(shape));
    Tensor t = Empty(shape, DTypeOf<T>());
    if (!values.empty()) std::memcpy(t.raw(), values.data(), values.size() * sizeof(T));
    return t;
  }

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(i < 0 ? i + ndim() : i); }
  int64_t numel() const { return NumElements(shape_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::Cpu(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }

  void* raw() const { return storage_ ? static_cast<char*>(storage_->data()) + offset_ : nullptr; }
  template <typename T>
  T* data() const {
    LOOM_CHECK(dtype_ == DTypeOf<T>(), "[tensor] data<", DTypeName(DTypeOf<T>()),
               "> of a ", DTypeName(dtype_), " tensor");
    return static_cast<T*>(raw());
  }

  // Views sharing this tensor's storage.
  Tensor Reshape(const Shape& shape) const;
  Tensor Slice(int64_t start, int64_t length) const;  // rows [start, start+length) of dim 0
  // The rows of `parts` (2-D, one dtype and width) as one [Σ rows, width]
  // view when each starts where the previous one ends in one storage (a
  // model's compute copies, DataParallel's flat buffers); else undefined.
  static Tensor Stacked(const std::vector<const Tensor*>& parts);

  Tensor Clone() const;
  void CopyFrom(const Tensor& src);  // same shape size and dtype; any devices
  void Zero();
  void Fill(double value);           // CPU float tensors
  Tensor To(DType dtype) const;      // CPU conversion (a copy)
  Tensor To(Device device) const;    // a copy on `device`
  // Element i as a double, whatever the (CPU) dtype: for tests and logs.
  double Get(int64_t i) const;

 private:
  static Tensor Allocate(const Shape& shape, DType dtype, Device device, bool pinned);

  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::kF32;
};

// `height` rows of `width` bytes, row i from src + i·spitch to dst + i·dpitch,
// both on `device`: memcpy on the CPU, one 2-D copy on the default stream on
// a GPU (ordered after the work queued there).
void CopyStrided(void* dst, int64_t dpitch, const void* src, int64_t spitch, int64_t width, int64_t height,
                 Device device);
// Columns [src_col, src_col + n) of src [R, ·] into columns [dst_col,
// dst_col + n) of dst [R, ·]: 2-D tensors of one dtype on one device.
void CopyColumns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t n);

}  // namespace loom
