#include "kernels/cuda/attention_operands.h"

#include "absl/strings/str_cat.h"

namespace sparseaccel {
namespace cuda {
namespace {

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

absl::Status CheckAttentionOperands(const AttentionOperands& x, absl::string_view kernel) {
  if (x.head_dim != 64 && x.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat(kernel, ": head_dim ", x.head_dim, " (supported: 64, 128)"));
  }
  if (x.num_heads <= 0 || x.num_kv_heads <= 0 || x.num_heads % x.num_kv_heads != 0 ||
      x.num_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(kernel, ": bad head counts: heads=", x.num_heads,
                                                   " kv_heads=", x.num_kv_heads));
  }
  if (x.q_stride < x.num_heads * x.head_dim || x.kv_stride < x.num_kv_heads * x.head_dim ||
      x.out_stride < x.num_heads * x.head_dim || x.q_stride % 8 != 0 || x.kv_stride % 8 != 0 ||
      x.out_stride % 8 != 0 || !Aligned16(x.q) || !Aligned16(x.k) || !Aligned16(x.v) ||
      !Aligned16(x.out)) {
    return absl::InvalidArgumentError(absl::StrCat(
        kernel,
        ": strides must cover a row and be multiples of 8 elements, pointers 16-byte aligned"));
  }
  return absl::OkStatus();
}

}  // namespace cuda
}  // namespace sparseaccel
