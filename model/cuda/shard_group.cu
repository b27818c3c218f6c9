#include <dlfcn.h>
#include <nccl.h>

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "common/status_macros.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/device_memory.h"
#include "model/cuda/shard_group.cuh"

namespace sparseaccel {
namespace {

// The NCCL entry points the group calls, from libnccl.so.2 opened at run time.
struct NcclApi {
  decltype(&ncclCommInitAll) comm_init_all = nullptr;
  decltype(&ncclCommAbort) comm_abort = nullptr;
  decltype(&ncclCommDestroy) comm_destroy = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclGroupStart) group_start = nullptr;
  decltype(&ncclGroupEnd) group_end = nullptr;
  decltype(&ncclGetErrorString) error_string = nullptr;
};

template <typename F>
absl::Status Resolve(void* library, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(library, name));
  if (*out == nullptr)
    return absl::FailedPreconditionError(absl::StrCat("libnccl.so.2: no ", name));
  return absl::OkStatus();
}

absl::StatusOr<NcclApi> OpenNccl() {
  void* library = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor parallelism needs NCCL: ", dlerror()));
  }
  NcclApi api;
  RETURN_IF_ERROR(Resolve(library, "ncclCommInitAll", &api.comm_init_all));
  RETURN_IF_ERROR(Resolve(library, "ncclCommAbort", &api.comm_abort));
  RETURN_IF_ERROR(Resolve(library, "ncclCommDestroy", &api.comm_destroy));
  RETURN_IF_ERROR(Resolve(library, "ncclAllReduce", &api.all_reduce));
  RETURN_IF_ERROR(Resolve(library, "ncclGroupStart", &api.group_start));
  RETURN_IF_ERROR(Resolve(library, "ncclGroupEnd", &api.group_end));
  RETURN_IF_ERROR(Resolve(library, "ncclGetErrorString", &api.error_string));
  return api;
}

// Opened once per process; the library stays loaded.
absl::StatusOr<const NcclApi*> Nccl() {
  static const absl::StatusOr<NcclApi>* const api = new absl::StatusOr<NcclApi>(OpenNccl());
  if (!api->ok()) return api->status();
  return &**api;
}

absl::Status NcclStatus(const NcclApi& nccl, ncclResult_t result, const char* what) {
  if (result == ncclSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", nccl.error_string(result)));
}

}  // namespace

struct ShardGroup::Comms {
  const NcclApi* nccl = nullptr;
  std::vector<ncclComm_t> comms;
  bool aborted = false;  // ncclCommAbort has freed them.
  ~Comms() {
    if (aborted) return;
    for (ncclComm_t comm : comms) {
      if (comm != nullptr) nccl->comm_destroy(comm);
    }
  }
};

ShardGroup::ShardGroup(std::vector<int> devices) : devices_(std::move(devices)) {}

ShardGroup::~ShardGroup() {
  absl::MutexLock lock(&comms_mu_);
  comms_.reset();
}

absl::StatusOr<std::unique_ptr<ShardGroup>> ShardGroup::Create(std::vector<int> devices) {
  if (devices.empty()) return absl::InvalidArgumentError("a shard group needs a GPU");
  auto group = std::unique_ptr<ShardGroup>(new ShardGroup(std::move(devices)));
  RETURN_IF_ERROR(group->Connect());
  return group;
}

// NCCL sets up its channels at the first collective, which waits for every rank; connecting
// here (one float summed over all ranks from this thread) leaves later all-reduces to enqueue
// work only, so aborting never races a rank still waiting on the host for another.
absl::Status ShardGroup::Connect() {
  absl::MutexLock lock(&comms_mu_);
  if (comms_ != nullptr) return absl::OkStatus();
  ASSIGN_OR_RETURN(const NcclApi* nccl, Nccl());
  auto comms = std::make_unique<Comms>();
  comms->nccl = nccl;
  comms->comms.assign(devices_.size(), nullptr);
  RETURN_IF_ERROR(NcclStatus(
      *nccl, nccl->comm_init_all(comms->comms.data(), size(), devices_.data()), "ncclCommInitAll"));
  int current = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  std::vector<cuda::DeviceBuffer> ones(devices_.size());
  absl::Status status = NcclStatus(*nccl, nccl->group_start(), "ncclGroupStart");
  for (int r = 0; r < size() && status.ok(); ++r) {
    status = cuda::CudaStatus(cudaSetDevice(devices_[r]), "cudaSetDevice");
    if (status.ok()) status = ones[r].Reserve(sizeof(float));
    if (status.ok()) {
      status = NcclStatus(*nccl,
                          nccl->all_reduce(ones[r].As<float>(), ones[r].As<float>(), 1, ncclFloat32,
                                           ncclSum, comms->comms[r], cudaStreamPerThread),
                          "ncclAllReduce");
    }
  }
  const absl::Status ended = NcclStatus(*nccl, nccl->group_end(), "ncclGroupEnd");
  if (status.ok()) status = ended;
  for (int r = 0; r < size() && status.ok(); ++r) {
    status = cuda::CudaStatus(cudaSetDevice(devices_[r]), "cudaSetDevice");
    if (status.ok())
      status = cuda::CudaStatus(cudaStreamSynchronize(cudaStreamPerThread), "connect");
  }
  for (int r = 0; r < size(); ++r) {
    if (cudaSetDevice(devices_[r]) == cudaSuccess) ones[r].Release();
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(current));
  if (status.ok()) comms_ = std::move(comms);
  return status;
}

absl::Status ShardGroup::Run(const std::function<absl::Status(int rank)>& fn) {
  {
    absl::MutexLock lock(&barrier_mu_);
    arrived_ = 0;
    round_status_ = absl::OkStatus();
    round_failed_ = false;
    aborted_ = false;
  }
  RETURN_IF_ERROR(Connect());
  std::vector<absl::Status> results(devices_.size());
  auto run_rank = [&](int rank) {
    const cudaError_t set = cudaSetDevice(devices_[rank]);
    results[rank] = set == cudaSuccess ? fn(rank) : cuda::CudaStatus(set, "cudaSetDevice");
    if (!results[rank].ok()) Abort(results[rank]);
  };
  std::vector<std::thread> threads;
  for (int r = 1; r < size(); ++r) threads.emplace_back(run_rank, r);
  run_rank(0);
  for (std::thread& thread : threads) thread.join();
  for (const absl::Status& status : results) RETURN_IF_ERROR(status);
  return absl::OkStatus();
}

absl::Status ShardGroup::AllReduceBf16(int rank, uint16_t* data, int64_t count,
                                       cudaStream_t stream) {
  absl::ReaderMutexLock lock(&comms_mu_);
  if (comms_ == nullptr) {
    return absl::AbortedError("the tensor-parallel group was aborted after an error");
  }
  const NcclApi& nccl = *comms_->nccl;
  return NcclStatus(nccl,
                    nccl.all_reduce(data, data, static_cast<size_t>(count), ncclBfloat16, ncclSum,
                                    comms_->comms[rank], stream),
                    "ncclAllReduce");
}

absl::Status ShardGroup::Barrier(absl::Status status) {
  absl::MutexLock lock(&barrier_mu_);
  if (!status.ok() && round_status_.ok()) round_status_ = std::move(status);
  const int64_t round = round_;
  if (!aborted_ && ++arrived_ == size()) {
    last_round_status_ = std::exchange(round_status_, absl::OkStatus());
    arrived_ = 0;
    ++round_;
    // Every rank leaves with this error at the same point: no collective is left half-done.
    if (!last_round_status_.ok()) round_failed_ = true;
    round_done_.SignalAll();
    return last_round_status_;
  }
  while (round_ == round && !aborted_) round_done_.Wait(&barrier_mu_);
  // Ranks of a finished round leave before the next can finish, so last_round_status_ is
  // still this round's.
  if (round_ != round) return last_round_status_;
  return absl::AbortedError("another GPU of the tensor-parallel group failed");
}

void ShardGroup::Abort(const absl::Status& cause) {
  {
    absl::MutexLock lock(&barrier_mu_);
    if (aborted_ || round_failed_) return;
    aborted_ = true;
    round_done_.SignalAll();
  }
  absl::MutexLock lock(&comms_mu_);
  if (comms_ == nullptr) return;
  for (ncclComm_t comm : comms_->comms) comms_->nccl->comm_abort(comm);
  comms_->aborted = true;
  comms_.reset();
  LogError("tensor_parallel.abort",
           {{"code", absl::StatusCodeToString(cause.code())}, {"error", cause.message()}});
}

}  // namespace sparseaccel
