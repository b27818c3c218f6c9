// Writes a deterministic random-weight Llama checkpoint in Hugging Face's layout.
//   make_checkpoint --out DIR --preset tiny|small|llama-3.1-8b [--dtype bfloat16] [--seed 1]
//                   [--layers N --hidden N --heads N --kv_heads N --intermediate N --vocab N ...]

#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "common/log.h"
#include "model/checkpoint/checkpoint_maker.h"

ABSL_FLAG(std::string, out, "", "Output directory (created if needed).");
ABSL_FLAG(std::string, preset, "tiny", "Base shape: tiny, small or llama-3.1-8b.");
ABSL_FLAG(int64_t, layers, 0, "Override num_hidden_layers.");
ABSL_FLAG(int64_t, hidden, 0, "Override hidden_size.");
ABSL_FLAG(int64_t, heads, 0, "Override num_attention_heads.");
ABSL_FLAG(int64_t, kv_heads, 0, "Override num_key_value_heads.");
ABSL_FLAG(int64_t, head_dim, 0, "Override head_dim (default hidden / heads).");
ABSL_FLAG(int64_t, intermediate, 0, "Override intermediate_size.");
ABSL_FLAG(int64_t, vocab, 0,
          "Override vocab_size (default: the preset's, or 128256 with --tokenizer_json).");
ABSL_FLAG(int64_t, max_position, 0, "Override max_position_embeddings.");
ABSL_FLAG(double, rope_theta, 0, "Override rope_theta.");
ABSL_FLAG(double, rms_norm_eps, 0, "Override rms_norm_eps.");
ABSL_FLAG(bool, rope_scaling, true, "Use llama3 rope scaling (as the preset sets it).");
ABSL_FLAG(double, rope_factor, 0, "Override rope_scaling.factor.");
ABSL_FLAG(double, rope_low_freq_factor, 0, "Override rope_scaling.low_freq_factor.");
ABSL_FLAG(double, rope_high_freq_factor, 0, "Override rope_scaling.high_freq_factor.");
ABSL_FLAG(int64_t, rope_original_max_position, 0,
          "Override rope_scaling.original_max_position_embeddings.");
ABSL_FLAG(bool, tie_embeddings, false, "Tie lm_head to the embedding (Llama 3.2 style).");
ABSL_FLAG(std::string, dtype, "float32", "float32, bfloat16 or float16.");
ABSL_FLAG(uint64_t, seed, 1, "Weights are a pure function of the seed and the shape.");
ABSL_FLAG(double, init_std, 0.02, "Standard deviation of the weights.");
ABSL_FLAG(uint64_t, shard_max_bytes, 0, "Shard into files of at most this size (0: one file).");
ABSL_FLAG(std::string, tokenizer_json, "",
          "tokenizer.json to copy in (tokenizer_config.json beside it is copied too).");

namespace sparseaccel {
namespace {

int Run() {
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    LogError("make_checkpoint.usage", {{"error", "--out is required"}});
    return 2;
  }
  absl::StatusOr<ModelConfig> preset = PresetConfig(absl::GetFlag(FLAGS_preset));
  if (!preset.ok()) {
    LogError("make_checkpoint.usage", {{"error", preset.status().ToString()}});
    return 2;
  }
  ModelConfig c = *preset;
  // 0 keeps the preset's value; anything else (negative included, to be rejected with the
  // field's name when the config is validated) replaces it.
  auto override_int = [](int64_t flag, int64_t* field) {
    if (flag != 0) *field = flag;
  };
  override_int(absl::GetFlag(FLAGS_layers), &c.num_hidden_layers);
  override_int(absl::GetFlag(FLAGS_hidden), &c.hidden_size);
  override_int(absl::GetFlag(FLAGS_heads), &c.num_attention_heads);
  override_int(absl::GetFlag(FLAGS_kv_heads), &c.num_key_value_heads);
  override_int(absl::GetFlag(FLAGS_intermediate), &c.intermediate_size);
  override_int(absl::GetFlag(FLAGS_max_position), &c.max_position_embeddings);
  if (absl::GetFlag(FLAGS_head_dim) != 0) {
    c.head_dim = absl::GetFlag(FLAGS_head_dim);
  } else if (c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0) {
    c.head_dim = c.hidden_size / c.num_attention_heads;
  } else {
    LogError("make_checkpoint.usage",
             {{"error", "--heads must divide --hidden (or give --head_dim)"}});
    return 2;
  }
  CheckpointOptions options;
  options.tokenizer_json = absl::GetFlag(FLAGS_tokenizer_json);
  if (!options.tokenizer_json.empty()) c.vocab_size = 128256;
  override_int(absl::GetFlag(FLAGS_vocab), &c.vocab_size);
  auto override_double = [](double flag, double* field) {
    if (flag != 0) *field = flag;
  };
  override_double(absl::GetFlag(FLAGS_rope_theta), &c.rope_theta);
  override_double(absl::GetFlag(FLAGS_rms_norm_eps), &c.rms_norm_eps);
  override_double(absl::GetFlag(FLAGS_rope_factor), &c.rope_scaling.factor);
  override_double(absl::GetFlag(FLAGS_rope_low_freq_factor), &c.rope_scaling.low_freq_factor);
  override_double(absl::GetFlag(FLAGS_rope_high_freq_factor), &c.rope_scaling.high_freq_factor);
  override_int(absl::GetFlag(FLAGS_rope_original_max_position),
               &c.rope_scaling.original_max_position_embeddings);
  if (!absl::GetFlag(FLAGS_rope_scaling)) c.rope_scaling = RopeScaling();
  c.tie_word_embeddings = absl::GetFlag(FLAGS_tie_embeddings);
  // Llama 3's special ids where the vocabulary has them; the last ids otherwise.
  if (c.vocab_size >= 128256) {
    c.bos_token_id = 128000;
    c.eos_token_ids = {128001, 128008, 128009};
  } else {
    c.bos_token_id = c.vocab_size - 2;
    c.eos_token_ids = {c.vocab_size - 1};
  }
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype == "float32") {
    options.dtype = DType::kF32;
  } else if (dtype == "bfloat16") {
    options.dtype = DType::kBF16;
  } else if (dtype == "float16") {
    options.dtype = DType::kF16;
  } else {
    LogError("make_checkpoint.usage", {{"error", "--dtype must be float32, bfloat16 or float16"}});
    return 2;
  }
  c.torch_dtype = dtype;
  options.config = c;
  options.seed = absl::GetFlag(FLAGS_seed);
  options.init_std = absl::GetFlag(FLAGS_init_std);
  options.shard_max_bytes = absl::GetFlag(FLAGS_shard_max_bytes);
  absl::Status status = WriteRandomCheckpoint(out, options);
  if (!status.ok()) {
    LogError("make_checkpoint.failed", {{"error", status.ToString()}});
    return 1;
  }
  LogInfo("make_checkpoint.done", {{"out", out},
                                   {"layers", absl::StrCat(c.num_hidden_layers)},
                                   {"hidden", absl::StrCat(c.hidden_size)},
                                   {"vocab", absl::StrCat(c.vocab_size)},
                                   {"dtype", dtype}});
  return 0;
}

}  // namespace
}  // namespace sparseaccel

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return sparseaccel::Run();
}
