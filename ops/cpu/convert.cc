#include "ops/convert.h"

namespace loom::ops {

void Convert(const Tensor& src, Tensor& dst) {
  LOOM_CHECK(src.numel() == dst.numel() && src.device() == dst.device(), "[convert] ", ShapeString(src.shape()),
             " on ", src.device().ToString(), " into ", ShapeString(dst.shape()), " on ", dst.device().ToString());
  if (!src.device().is_cpu()) return cuda::Convert(src, dst);
  if (src.dtype() == dst.dtype()) return dst.CopyFrom(src);
  dst.CopyFrom(src.To(dst.dtype()));
}

Tensor ConvertedCopy(const Tensor& t, DType dtype) {
  Tensor c = Tensor::Empty(t.shape(), dtype, t.device());
  Convert(t, c);
  return c;
}

}  // namespace loom::ops
