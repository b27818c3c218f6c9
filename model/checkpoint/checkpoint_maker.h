#ifndef SPARSEACCEL_MODEL_CHECKPOINT_CHECKPOINT_MAKER_H_
#define SPARSEACCEL_MODEL_CHECKPOINT_CHECKPOINT_MAKER_H_

// Writes deterministic random-weight Llama checkpoints in Hugging Face's exact layout
// (config.json, generation_config.json, model.safetensors or shards + index), for tests and
// benchmarks: random weights cost the same to run as trained ones.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/checkpoint/config.h"
#include "model/checkpoint/safetensors.h"

namespace sparseaccel {

struct CheckpointOptions {
  ModelConfig config;
  DType dtype = DType::kF32;
  uint64_t seed = 1;
  // Standard deviation of the projection and embedding weights (uniform distribution).
  double init_std = 0.02;
  // 0: one model.safetensors; otherwise shards of at most this many bytes (one tensor minimum).
  uint64_t shard_max_bytes = 0;
  // Optional tokenizer.json to copy in (tokenizer_config.json beside it is copied too).
  std::string tokenizer_json;
};

// "tiny" (2 layers, hidden 64, llama3 rope scaling), "small" (4 layers, hidden 256) or
// "llama-3.1-8b" (the real shape); NotFound for other names.
absl::StatusOr<ModelConfig> PresetConfig(const std::string& preset);

// Writes the checkpoint into `out_dir` (created if needed; weight files of an earlier checkpoint
// there are removed first). Same options, same bytes, whatever the thread count. Tensors are
// generated in parallel and streamed one at a time: the llama-3.1-8b preset in bfloat16
// (16.06 GB) took 14.3 s with 1.0 GB of RSS on a 16-core H100 host (dd: 1.0 GB/s).
absl::Status WriteRandomCheckpoint(const std::string& out_dir, const CheckpointOptions& options);

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CHECKPOINT_CHECKPOINT_MAKER_H_
