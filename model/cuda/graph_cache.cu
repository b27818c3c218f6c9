#include "common/status_macros.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/device_memory.h"
#include "model/cuda/graph_cache.cuh"

namespace sparseaccel {

absl::Status GraphCache::Capture(const Key& key, cudaStream_t stream,
                                 const std::function<absl::Status()>& enqueue) {
  // Thread-local mode: other threads of the process (K/V uploads on their own streams) may
  // keep calling CUDA while this one captures.
  CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const absl::Status enqueued = enqueue();
  cudaGraph_t graph = nullptr;
  // The capture ends whether or not the enqueueing failed, so the stream is usable again.
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
  if (!enqueued.ok() || ended != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();  // A failed capture leaves its error as the last one; clear it.
    if (!enqueued.ok()) return enqueued;
    return cuda::CudaStatus(ended, "cudaStreamEndCapture");
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_RETURN_IF_ERROR(instantiated);
  if (graphs_.size() >= capacity_ && !recency_.empty()) {
    auto oldest = graphs_.find(recency_.back());
    cudaGraphExecDestroy(oldest->second.exec);
    graphs_.erase(oldest);
    recency_.pop_back();
  }
  recency_.push_front(key);
  graphs_[key] = Entry{exec, recency_.begin()};
  ++captures_;
  return absl::OkStatus();
}

absl::Status GraphCache::Launch(const Key& key, cudaStream_t stream,
                                const std::function<absl::Status()>& enqueue) {
  auto it = graphs_.find(key);
  if (it == graphs_.end()) {
    RETURN_IF_ERROR(Capture(key, stream, enqueue));
    it = graphs_.find(key);
  } else {
    recency_.splice(recency_.begin(), recency_, it->second.recency);
  }
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second.exec, stream));
  return absl::OkStatus();
}

void GraphCache::Clear() {
  for (auto& [key, entry] : graphs_) cudaGraphExecDestroy(entry.exec);
  graphs_.clear();
  recency_.clear();
}

}  // namespace sparseaccel
