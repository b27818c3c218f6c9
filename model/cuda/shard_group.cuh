#ifndef SPARSEACCEL_MODEL_CUDA_SHARD_GROUP_CUH_
#define SPARSEACCEL_MODEL_CUDA_SHARD_GROUP_CUH_

// The GPUs of one tensor-parallel engine in this process: an NCCL communicator per GPU
// (libnccl.so.2 is loaded on first use, so one-GPU engines run without NCCL installed), the
// all-reduce of the shards' partial outputs, a host barrier that carries errors, and the
// fan-out of one call over a host thread per GPU.
//
// No rank may be left waiting in a collective when another stops. Errors at a barrier reach
// every rank there, so they all stop at the same point. An error elsewhere aborts the
// communicators (NCCL's kernels then return) and releases the barrier; the next Run makes new
// communicators. Included by .cu files only.

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace sparseaccel {

class ShardGroup {
 public:
  // Communicators over `devices` (rank r on devices[r]), connected by a first all-reduce.
  static absl::StatusOr<std::unique_ptr<ShardGroup>> Create(std::vector<int> devices);
  ~ShardGroup();
  ShardGroup(const ShardGroup&) = delete;
  ShardGroup& operator=(const ShardGroup&) = delete;

  int size() const { return static_cast<int>(devices_.size()); }
  int device(int rank) const { return devices_[rank]; }

  // Runs fn(rank) for every rank at once, each on a thread whose current device is the
  // rank's (rank 0 on the caller's thread); returns rank 0's error, else the first other.
  absl::Status Run(const std::function<absl::Status(int rank)>& fn);

  // Sums `count` bf16 values of every rank's `data` in place, ordered on the rank's `stream`.
  absl::Status AllReduceBf16(int rank, uint16_t* data, int64_t count, cudaStream_t stream);

  // Returns once every rank has called it in this round: OK, or the first error any rank
  // passed (the same for all). Aborted when a rank failed outside a barrier.
  absl::Status Barrier(absl::Status status);

 private:
  struct Comms;
  explicit ShardGroup(std::vector<int> devices);
  absl::Status Connect();
  // Stops the round after `cause` on one rank: aborts the communicators, releases waiters.
  void Abort(const absl::Status& cause);

  const std::vector<int> devices_;
  // Held shared while a collective is enqueued, exclusively to abort the communicators.
  absl::Mutex comms_mu_;
  std::unique_ptr<Comms> comms_ ABSL_GUARDED_BY(comms_mu_);

  absl::Mutex barrier_mu_;
  int arrived_ ABSL_GUARDED_BY(barrier_mu_) = 0;
  int64_t round_ ABSL_GUARDED_BY(barrier_mu_) = 0;
  absl::Status round_status_ ABSL_GUARDED_BY(barrier_mu_);
  absl::Status last_round_status_ ABSL_GUARDED_BY(barrier_mu_);
  // A round ended with an error: every rank stops there, nothing needs aborting.
  bool round_failed_ ABSL_GUARDED_BY(barrier_mu_) = false;
  bool aborted_ ABSL_GUARDED_BY(barrier_mu_) = false;
  absl::CondVar round_done_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_SHARD_GROUP_CUH_
