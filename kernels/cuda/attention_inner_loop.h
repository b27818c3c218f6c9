#ifndef SPARSEACCEL_KERNELS_CUDA_ATTENTION_INNER_LOOP_H_
#define SPARSEACCEL_KERNELS_CUDA_ATTENTION_INNER_LOOP_H_

namespace sparseaccel {
namespace cuda {

// Tensor-core instructions of the prefill attention kernels (dense and sparse): warpgroup MMA
// (wgmma, Hopper's sm_90a only) or mma.sync (every supported GPU). kAuto takes wgmma where the
// device has it; asking for kWgmma elsewhere is a FailedPrecondition error. Both compute the
// same attention; tests and benchmarks pin one to compare them.
enum class AttentionInnerLoop { kAuto, kMmaSync, kWgmma };

}  // namespace cuda
}  // namespace sparseaccel

#endif  // SPARSEACCEL_KERNELS_CUDA_ATTENTION_INNER_LOOP_H_
