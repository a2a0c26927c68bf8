#include "runtime/tensor.h"

#include <atomic>
#include <cstdlib>

#include "absl/strings/str_join.h"
#include "runtime/cuda_runtime.h"

namespace loom {

std::string ShapeString(const Shape& shape) { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {
std::atomic<int64_t> g_cpu_bytes{0}, g_peak_cpu_bytes{0};

void CountCpuBytes(int64_t delta) {
  const int64_t now = g_cpu_bytes.fetch_add(delta, std::memory_order_relaxed) + delta;
  int64_t peak = g_peak_cpu_bytes.load(std::memory_order_relaxed);
  while (now > peak && !g_peak_cpu_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}
}  // namespace

int64_t CpuTensorBytes() { return g_cpu_bytes.load(std::memory_order_relaxed); }
int64_t PeakCpuTensorBytes() { return g_peak_cpu_bytes.load(std::memory_order_relaxed); }
void ResetPeakCpuTensorBytes() { g_peak_cpu_bytes.store(g_cpu_bytes.load(std::memory_order_relaxed)); }

std::string Device::ToString() const { return is_cpu() ? "cpu" : absl::StrCat("cuda:", index); }

Storage::Storage(size_t bytes, Device device, bool pinned)
    : bytes_(bytes), device_(device), pinned_(pinned && device.is_cpu() && BuiltWithCuda()) {
  if (bytes == 0) return;
  if (pinned_) {
    data_ = CudaHostAlloc(bytes);
    CountCpuBytes(static_cast<int64_t>(bytes));
  } else if (device.is_cpu()) {
    // 64-byte alignment: whole cache lines, and what SIMD loads like.
    data_ = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    LOOM_CHECK(data_ != nullptr, "[tensor] out of host memory allocating ", bytes, " bytes");
    CountCpuBytes(static_cast<int64_t>(bytes));
  } else {
    data_ = CudaMalloc(bytes, device.index);
  }
}

Storage::~Storage() {
  if (!data_) return;
  if (pinned_) {
    CudaHostFree(data_);
    CountCpuBytes(-static_cast<int64_t>(bytes_));
  } else if (device_.is_cpu()) {
    std::free(data_);
    CountCpuBytes(-static_cast<int64_t>(bytes_));
  } else {
    CudaFree(data_, device_.index);
  }
}

Tensor Tensor::Allocate(const Shape& shape, DType dtype, Device device, bool pinned) {
  for (int64_t d : shape) LOOM_CHECK(d >= 0, "[tensor] negative dimension in ", ShapeString(shape));
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.storage_ = std::make_shared<Storage>(t.nbytes(), device, pinned);
  return t;
}

Tensor Tensor::Empty(const Shape& shape, DType dtype, Device device) { return Allocate(shape, dtype, device, false); }

Tensor Tensor::PinnedEmpty(const Shape& shape, DType dtype) { return Allocate(shape, dtype, Device::Cpu(), true); }

Tensor Tensor::Zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = Empty(shape, dtype, device);
  t.Zero();
  return t;
}

Tensor Tensor::Reshape(const Shape& shape) const {
  LOOM_CHECK(NumElements(shape) == numel(), "[tensor] cannot view ", ShapeString(shape_), " as ",
             ShapeString(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::Slice(int64_t start, int64_t length) const {
  LOOM_CHECK(ndim() >= 1 && start >= 0 && length >= 0 && start + length <= shape_[0], "[tensor] slice [",
             start, ", ", start + length, ") of ", ShapeString(shape_));
  Tensor t = *this;
  t.shape_[0] = length;
  t.offset_ += static_cast<size_t>(start) * (numel() / std::max<int64_t>(shape_[0], 1)) * DTypeSize(dtype_);
  return t;
}

Tensor Tensor::Stacked(const std::vector<const Tensor*>& parts) {
  LOOM_CHECK(!parts.empty(), "[tensor] Stacked of no tensors");
  const Tensor& first = *parts.front();
  Tensor t = first;
  if (!first.defined() || first.ndim() != 2) return Tensor();
  for (size_t i = 1; i < parts.size(); ++i) {
    const Tensor& p = *parts[i];
    if (p.storage_ != first.storage_ || p.dtype_ != first.dtype_ || p.ndim() != 2 || p.dim(1) != first.dim(1) ||
        p.offset_ != t.offset_ + t.nbytes())
      return Tensor();
    t.shape_[0] += p.dim(0);
  }
  return t;
}

Tensor Tensor::To(Device target) const {
  Tensor t = Empty(shape_, dtype_, target);
  t.CopyFrom(*this);
  return t;
}

Tensor Tensor::Clone() const {
  Tensor t = Empty(shape_, dtype_, device());
  t.CopyFrom(*this);
  return t;
}

void Tensor::CopyFrom(const Tensor& src) {
  LOOM_CHECK(src.numel() == numel() && src.dtype() == dtype_, "[tensor] copy ", ShapeString(src.shape()), " ",
             DTypeName(src.dtype()), " into ", ShapeString(shape_), " ", DTypeName(dtype_));
  if (nbytes() == 0) return;
  if (device().is_cpu() && src.device().is_cpu()) {
    std::memcpy(raw(), src.raw(), nbytes());
  } else {
    CudaMemcpy(raw(), src.raw(), nbytes());
  }
}

void CopyStrided(void* dst, int64_t dpitch, const void* src, int64_t spitch, int64_t width, int64_t height,
                 Device device) {
  if (width == 0 || height == 0) return;
  if (!device.is_cpu()) {
    CudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height);
    return;
  }
  for (int64_t i = 0; i < height; ++i)
    std::memcpy(static_cast<char*>(dst) + i * dpitch, static_cast<const char*>(src) + i * spitch, width);
}

void CopyColumns(const Tensor& src, int64_t src_col, Tensor& dst, int64_t dst_col, int64_t n) {
  LOOM_CHECK(src.ndim() == 2 && dst.ndim() == 2 && src.dim(0) == dst.dim(0) && src.dtype() == dst.dtype() &&
                 src.device() == dst.device() && src_col >= 0 && dst_col >= 0 && src_col + n <= src.dim(1) &&
                 dst_col + n <= dst.dim(1),
             "[tensor] columns [", src_col, ", ", src_col + n, ") of ", ShapeString(src.shape()), " into [", dst_col,
             ", ", dst_col + n, ") of ", ShapeString(dst.shape()));
  const int64_t e = static_cast<int64_t>(DTypeSize(src.dtype()));
  CopyStrided(static_cast<char*>(dst.raw()) + dst_col * e, dst.dim(1) * e,
              static_cast<const char*>(src.raw()) + src_col * e, src.dim(1) * e, n * e, src.dim(0), src.device());
}

void Tensor::Zero() {
  if (nbytes() == 0) return;
  if (device().is_cpu()) {
    std::memset(raw(), 0, nbytes());
  } else {
    CudaMemset(raw(), 0, nbytes());
  }
}

void Tensor::Fill(double value) {
  LOOM_CHECK(device().is_cpu(), "[tensor] Fill on ", device().ToString());
  const int64_t n = numel();
  switch (dtype_) {
    case DType::kF32: for (int64_t i = 0; i < n; ++i) data<float>()[i] = static_cast<float>(value); break;
    case DType::kF64: for (int64_t i = 0; i < n; ++i) data<double>()[i] = value; break;
    case DType::kI32: for (int64_t i = 0; i < n; ++i) data<int32_t>()[i] = static_cast<int32_t>(value); break;
    case DType::kI64: for (int64_t i = 0; i < n; ++i) data<int64_t>()[i] = static_cast<int64_t>(value); break;
    case DType::kBF16: for (int64_t i = 0; i < n; ++i) data<bf16>()[i] = FloatToBf16(static_cast<float>(value)); break;
    case DType::kF16: for (int64_t i = 0; i < n; ++i) data<f16>()[i] = FloatToF16(static_cast<float>(value)); break;
  }
}

double Tensor::Get(int64_t i) const {
  LOOM_CHECK(device().is_cpu() && i >= 0 && i < numel(), "[tensor] Get(", i, ") of ", ShapeString(shape_));
  switch (dtype_) {
    case DType::kF32: return static_cast<float*>(raw())[i];
    case DType::kF64: return static_cast<double*>(raw())[i];
    case DType::kI32: return static_cast<int32_t*>(raw())[i];
    case DType::kI64: return static_cast<double>(static_cast<int64_t*>(raw())[i]);
    case DType::kBF16: return Bf16ToFloat(static_cast<bf16*>(raw())[i]);
    case DType::kF16: return F16ToFloat(static_cast<f16*>(raw())[i]);
  }
  return 0;
}

Tensor Tensor::To(DType dtype) const {
  LOOM_CHECK(device().is_cpu(), "[tensor] To(", DTypeName(dtype), ") on ", device().ToString());
  if (dtype == dtype_) return Clone();
  Tensor t = Empty(shape_, dtype);
  const int64_t n = numel();
  for (int64_t i = 0; i < n; ++i) {
    const double v = Get(i);
    switch (dtype) {
      case DType::kF32: t.data<float>()[i] = static_cast<float>(v); break;
      case DType::kF64: t.data<double>()[i] = v; break;
      case DType::kI32: t.data<int32_t>()[i] = static_cast<int32_t>(v); break;
      case DType::kI64: t.data<int64_t>()[i] = static_cast<int64_t>(v); break;
      case DType::kBF16: t.data<bf16>()[i] = FloatToBf16(static_cast<float>(v)); break;
      case DType::kF16: t.data<f16>()[i] = FloatToF16(static_cast<float>(v)); break;
    }
  }
  return t;
}

}  // namespace loom
