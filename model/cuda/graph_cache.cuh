#ifndef SPARSEACCEL_MODEL_CUDA_GRAPH_CACHE_CUH_
#define SPARSEACCEL_MODEL_CUDA_GRAPH_CACHE_CUH_

// Executable CUDA graphs of a recurring sequence of launches (a decode step), by key. A step
// of a few hundred small kernels pays a launch gap for each when enqueued one by one; as one
// graph it pays one launch. What the launches read and write (pointers, grid sizes, scalars)
// is frozen at capture, so the key must name everything that varies between steps, and the
// caller refills the buffers the graph reads before each launch.

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <vector>

#include "absl/status/status.h"

namespace sparseaccel {

class GraphCache {
 public:
  // Keeps at most `capacity` graphs (least recently launched ones go first).
  explicit GraphCache(size_t capacity) : capacity_(capacity) {}
  ~GraphCache() { Clear(); }
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;

  using Key = std::vector<int64_t>;

  // Launches the graph for `key` on `stream`, first capturing what `enqueue` enqueues on
  // `stream` when there is none. `enqueue` must only enqueue work on `stream` (no allocation,
  // no synchronisation); its error ends the capture and is returned.
  absl::Status Launch(const Key& key, cudaStream_t stream,
                      const std::function<absl::Status()>& enqueue);

  // Drops every graph (what they captured, e.g. a buffer, is gone).
  void Clear();

  size_t size() const { return graphs_.size(); }
  int64_t captures() const { return captures_; }

 private:
  struct Entry {
    cudaGraphExec_t exec = nullptr;
    std::list<Key>::iterator recency;
  };
  absl::Status Capture(const Key& key, cudaStream_t stream,
                       const std::function<absl::Status()>& enqueue);

  const size_t capacity_;
  std::map<Key, Entry> graphs_;
  std::list<Key> recency_;  // Most recently launched first.
  int64_t captures_ = 0;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_GRAPH_CACHE_CUH_
