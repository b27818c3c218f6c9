#ifndef SPARSEACCEL_MODEL_CUDA_LLAMA_CUDA_H_
#define SPARSEACCEL_MODEL_CUDA_LLAMA_CUDA_H_

// The Llama forward pass on one CUDA GPU: bf16 weights and activations, fp32 accumulation,
// linear layers through cuBLASLt (model/cuda/gemm.cuh), the other steps through the kernels of
// kernels/cuda/cuda_kernels.h (head_dim 64 or 128), the same semantics as LlamaCpu.
//
// Memory stays bounded for long prompts: per layer, the projections, attention and MLP run over
// chunks of `prefill_chunk_tokens` queries (attention of a chunk reads all keys up to its end),
// so a prefill needs the weights, the residual stream [tokens][hidden], one layer's K/V and
// chunk-sized scratch. Logits are computed only for the rows asked for.
//
// With a sparse config, a prompt prefilled from position 0 with at least the config's
// dense_below_tokens tokens runs each head's dynamic sparse pattern (kernels/cuda/
// sparse_attention.h): per layer, the projections of all chunks first (the index estimation
// needs the whole prompt's Q and K, so Q/K/V of the prompt are kept: [tokens][q + 2 kv width]),
// then one index for every head, then attention and MLP chunk by chunk. Shorter prompts,
// continued sequences and decode steps run dense.
//
// Three ways in:
//  - LanguageModel::Forward over host KvStores (what the services call): each chunk's past K/V
//    is uploaded per layer and its new K/V written back, so it is correct everywhere but moves
//    the whole context per step; meant for prefill and for modest contexts.
//  - Prefill(): one prompt, K/V handed to a callback layer by layer while it is on the device.
//  - Device sequences (StartSequence / DecodeStep): K/V in a paged block pool on the device,
//    decode steps batched over many sequences. As a SequenceModel (the decode service), a
//    sequence is imported with K/V computed elsewhere (ImportSequence / WriteKv).
// Tensor parallel (LlamaCudaOptions::gpus): each GPU holds one shard of every layer (its query
// and KV heads, its MLP rows, model/llama_shapes.h) and of the embedding and LM head (its
// vocabulary rows), and runs the prefill on its own host thread. NCCL all-reduces sum the
// shards' embedding rows and their partial o_proj and down_proj outputs; logits and the K/V
// rows handed out are put together from every GPU's columns, so callers see the same rows for
// any number of GPUs. Sparse patterns stay per head:
// each GPU builds the indices of its own heads.
// All methods are thread-safe (serialised).

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/sampling.h"
#include "kernels/sparse/pattern_config.h"
#include "model/checkpoint/config.h"
#include "model/kv_cache.h"
#include "model/language_model.h"
#include "model/sequence_model.h"

namespace sparseaccel {

struct LlamaCudaOptions {
  int64_t prefill_chunk_tokens = 4096;
  // Device K/V pool for StartSequence/DecodeStep, in tokens (0: no pool).
  int64_t kv_pool_tokens = 0;
  int64_t kv_block_tokens = 64;
  // Most sequences in one DecodeStep (at most 256).
  int64_t max_decode_batch = 64;
  // Decode steps run as CUDA graphs captured per (batch, K/V extent) (off: the same launches
  // one by one).
  bool decode_graphs = true;
  // Decode steps of at most this many sequences (0 .. 8) run their linear layers as
  // cuda::SmallBatchLinear, with SwiGLU and the residual add fused; larger steps and prefill
  // use cuBLASLt. 0: cuBLASLt everywhere.
  int64_t small_batch_linear_rows = 3;
  // Per-head sparse prefill patterns; its layers and heads must match the model.
  std::optional<SparseConfig> sparse;
  // 0: one GPU (the current device), no NCCL. N >= 1: prefill tensor parallel over GPUs
  // 0 .. N-1 through NCCL (libnccl.so.2, loaded then), N dividing the heads, KV heads and
  // intermediate_size; Forward, Prefill (without a K/V sink) and PrefillExport only, no K/V
  // pool. 1 runs that path on one GPU.
  int64_t gpus = 0;
};

// What the sparse path did since the engine was loaded (for logs and benchmarks).
struct SparsePrefillStats {
  int64_t sparse_prefills = 0;  // Prompts that took the sparse path.
  int64_t dense_prefills = 0;   // Prompts from position 0 that ran dense.
};

// Decode graphs since the engine was loaded: captures made and graphs kept now.
struct DecodeGraphStats {
  int64_t captures = 0;
  int64_t cached = 0;
};

// Device memory, bytes. `allocated` counts this engine's cudaMallocs (comparable to torch's
// memory_allocated); `device_used` is total minus free from cudaMemGetInfo (every process and
// the CUDA context included). Peaks are high-water marks since the last ResetPeakMemory().
// Over several GPUs, `weights` and the device figures are the largest of any one GPU and
// `allocated` sums them all.
struct CudaMemoryStats {
  int64_t weights = 0;
  int64_t allocated = 0;
  int64_t peak_allocated = 0;
  int64_t device_used = 0;
  int64_t peak_device_used = 0;
};

class LlamaCuda : public LanguageModel, public SequenceModel {
 public:
  static absl::StatusOr<std::unique_ptr<LlamaCuda>> Load(const std::string& model_dir,
                                                         const LlamaCudaOptions& options = {});
  ~LlamaCuda() override;

  const ModelConfig& config() const override;
  KvShape kv_shape() const override;
  absl::Status Forward(absl::Span<const SequenceChunk> batch, std::vector<float>* logits) override;

  // One layer's K and V of the whole prompt on the device: bf16 rows [tokens][kv_heads *
  // head_dim], valid only during the call. An error stops the prefill.
  struct DeviceLayerKv {
    int64_t layer = 0;
    int64_t num_tokens = 0;
    const void* k = nullptr;
    const void* v = nullptr;
  };
  using LayerKvSink = std::function<absl::Status(const DeviceLayerKv&)>;

  // Prefills `tokens` from position 0; `sink` (may be empty) sees each layer's K/V; the last
  // token's logits (fp32, vocab_size) go to `last_logits` when it is not null.
  absl::Status Prefill(absl::Span<const int32_t> tokens, const LayerKvSink& sink,
                       std::vector<float>* last_logits);

  // LanguageModel::PrefillExport beside the compute: each layer's K/V (bf16, the exporter's
  // dtype must be bf16) is copied to the exporter's slots on a copy stream while the next
  // layer computes in the other of two one-layer buffers.
  absl::Status PrefillExport(absl::Span<const int32_t> tokens, KvExporter* exporter,
                             std::vector<float>* last_logits) override;
  // What page-locks exporter memory for this engine's copies (cudaHostRegister).
  static std::unique_ptr<HostMemoryPinner> NewHostMemoryPinner();

  // One layer's prompt Q (after RoPE), K and V on the device, bf16, row p at position p: Q rows
  // of [heads][head_dim] at q_stride, K/V rows of [kv_heads][head_dim] at kv_stride, as the
  // kernels of kernels/cuda/ read them. Valid during the call; work on other streams must
  // finish (or wait for `stream`, where the data was written) before the call returns.
  struct DeviceLayerQkv {
    int64_t layer = 0;
    int64_t num_tokens = 0;
    const uint16_t* q = nullptr;
    int64_t q_stride = 0;
    const uint16_t* k = nullptr;
    const uint16_t* v = nullptr;
    int64_t kv_stride = 0;
    void* stream = nullptr;
  };
  using LayerQkvObserver = std::function<absl::Status(const DeviceLayerQkv&)>;

  // A dense prefill of `tokens` from position 0 (no K/V kept, no logits) that shows each
  // layer's Q/K/V to `observer` before the layer's attention: the pattern search's calibration
  // (model/pattern_search_cuda.h). An error from the observer stops it.
  absl::Status ObservePrefill(absl::Span<const int32_t> tokens, const LayerQkvObserver& observer);

  // Device-resident sequences (needs options.kv_pool_tokens > 0). StartSequence prefills the
  // prompt into the pool and returns the sequence id.
  absl::StatusOr<int64_t> StartSequence(absl::Span<const int32_t> prompt,
                                        std::vector<float>* last_logits);
  // A new sequence with a copy of `id`'s K/V (same length).
  absl::StatusOr<int64_t> ForkSequence(int64_t id);
  // Appends tokens[i] to sequence ids[i] (one token each, all in one batch) and writes their
  // logits to `logits` ([ids.size()][vocab_size]).
  absl::Status DecodeStep(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens,
                          std::vector<float>* logits);
  // Like DecodeStep, then samples each sequence's next token on the GPU
  // (cuda::SampleTokens: same picks as SampleTokenCpu for params[i] at draw steps[i]).
  absl::Status DecodeAndSample(absl::Span<const int64_t> ids, absl::Span<const int32_t> tokens,
                               absl::Span<const SamplingParams> params,
                               absl::Span<const uint64_t> steps,
                               std::vector<int32_t>* next) override;
  absl::Status EndSequence(int64_t id) override;
  int64_t SequenceLength(int64_t id) const;

  CudaMemoryStats MemoryStats() const;
  // Lock-free (a scrape during a prefill does not wait for it).
  std::optional<DeviceMemoryStats> DeviceMemory() const override;
  void ResetDevicePeak() override;
  SparsePrefillStats SparseStats() const;
  DecodeGraphStats DecodeGraphs() const;
  void ResetPeakMemory();
  // Waits for queued device work (for timing).
  absl::Status Synchronize();

  // SequenceModel over the device pool (needs options.kv_pool_tokens > 0).
  int64_t kv_block_tokens() const override;
  int64_t kv_pool_blocks() const override;
  int64_t kv_block_bytes() const override;
  // A sequence of `length` positions whose K/V WriteKv fills, e.g. from a prefill service.
  absl::StatusOr<int64_t> ImportSequence(int64_t length) override;
  // bf16 rows go to the pool as they are; fp32 rows are rounded to bf16 (nearest even) on the
  // device. Thread-safe without the engine lock: rows are staged in page-locked memory and
  // uploaded on a stream of their own while decode steps run (a step waits, on the device,
  // for the uploads queued before it). Only between ImportSequence and FinishImport.
  absl::Status WriteKv(int64_t id, int64_t layer, int64_t first, int64_t count, KvDtype dtype,
                       const void* k, const void* v) override;
  absl::Status FinishImport(int64_t id) override;

 private:
  struct State;
  explicit LlamaCuda(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace sparseaccel

#endif  // SPARSEACCEL_MODEL_CUDA_LLAMA_CUDA_H_
