// The service pair end to end on loopback, on the CPU engine with a tiny generated model:
// split prefill/decode equals one in-process engine, and every failure path ends in a clear
// status with all KV memory returned.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/grpc_util.h"
#include "common/metrics.h"
#include "common/tls.h"
#include "decode_service/decode_server.h"
#include "decode_service/step_metrics.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "kernels/sampling.h"
#include "kv_stream/kv_stream.h"
#include "model/checkpoint/checkpoint_maker.h"
#include "model/checkpoint/fingerprint.h"
#include "model/checkpoint/safetensors.h"
#include "model/host_sequence_model.h"
#include "model/llama_cpu.h"
#include "model/sparse/sparse_prefill.h"
#include "model/text/tokenizer.h"
#include "nlohmann/json.hpp"
#include "prefill_service/prefill_server.h"
#include "tests/test_certs.h"

namespace sparseaccel {
namespace {

using v1::GenerateRequest;
using v1::GenerateResponse;

// Built once: a tiny GQA model with llama3 rope scaling and fresh weights per run.
struct Model {
  std::string dir;
  std::unique_ptr<LlamaCpu> llama;
  std::string fingerprint;
};

Model& SharedModel() {
  static Model* model = [] {
    auto* m = new Model();
    const char* tmp = getenv("TEST_TMPDIR");
    m->dir = std::string(tmp ? tmp : "/tmp") + "/service_model";
    CheckpointOptions options;
    options.config = PresetConfig("tiny").value();
    options.seed = std::random_device{}();
    options.init_std = 0.08;
    EXPECT_TRUE(WriteRandomCheckpoint(m->dir, options).ok());
    m->llama = LlamaCpu::Load(m->dir).value();
    m->fingerprint = ModelFingerprint(m->dir).value();
    return m;
  }();
  return *model;
}

// Tokens of prompt + generation by the engine alone, sampled exactly as the services do.
// `bf16_prompt_kv`: the prompt's K/V are rounded to bf16 after the prefill, as when they
// travel as bf16.
std::vector<int32_t> GenerateAlone(const std::vector<int32_t>& prompt,
                                   const v1::SamplingParams& sampling, int max_tokens,
                                   bool bf16_prompt_kv = false) {
  LlamaCpu& model = *SharedModel().llama;
  ContiguousKvStore kv(model.kv_shape(), prompt.size() + max_tokens);
  SamplingParams params{sampling.temperature(), sampling.top_k(),
                        sampling.top_p() == 0 ? 1.0f : sampling.top_p(), sampling.seed()};
  std::vector<float> logits;
  EXPECT_TRUE(model.Forward({SequenceChunk{prompt, 0, &kv, LogitsFor::kLast}}, &logits).ok());
  for (int64_t layer = 0; bf16_prompt_kv && layer < model.kv_shape().num_layers; ++layer) {
    KvLayerView view = kv.Layer(layer, prompt.size()).value();
    for (size_t p = 0; p < prompt.size(); ++p) {
      for (int64_t i = 0; i < view.row_size; ++i) {
        view.KRow(p)[i] = Bf16ToFloat(FloatToBf16(view.KRow(p)[i]));
        view.VRow(p)[i] = Bf16ToFloat(FloatToBf16(view.VRow(p)[i]));
      }
    }
  }
  std::vector<int32_t> out;
  const int64_t vocab = model.config().vocab_size;
  for (int step = 0; step < max_tokens; ++step) {
    out.push_back(SampleTokenCpu(logits.data() + logits.size() - vocab, vocab, params, step));
    if (step + 1 == max_tokens) break;
    std::vector<int32_t> one = {out.back()};
    logits.clear();
    EXPECT_TRUE(model
                    .Forward({SequenceChunk{one, static_cast<int64_t>(prompt.size()) + step, &kv,
                                            LogitsFor::kLast}},
                             &logits)
                    .ok());
  }
  return out;
}

// Polls `done` every `period` until it holds or `timeout` has passed; what it last returned.
bool PollUntil(const std::function<bool()>& done, std::chrono::milliseconds timeout,
               std::chrono::milliseconds period = std::chrono::milliseconds(10)) {
  const auto give_up = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= give_up) return false;
    std::this_thread::sleep_for(period);
  }
  return true;
}

std::vector<int32_t> RandomPrompt(int n, std::mt19937* rng) {
  std::vector<int32_t> p(n);
  for (int32_t& t : p) t = static_cast<int32_t>((*rng)() % 500);
  return p;
}

struct Outcome {
  grpc::Status status;
  std::vector<int32_t> tokens;
  std::string text;  // The text deltas, concatenated.
  v1::GenerateResult result;
};

struct ServiceOptions {
  PrefillEngineOptions prefill;
  DecodeEngineOptions decode;
  int64_t kv_block_tokens = 16;
  int64_t kv_blocks = 4096;
  bool start_prefill = true;
  std::string decode_fingerprint;          // Empty: the model's.
  LanguageModel* prefill_model = nullptr;  // Null: the shared model.
  const Tokenizer* tokenizer = nullptr;    // Null: token-id prompts only.
  int32_t kv_streams = 3;                  // Streams the decode side reads KV over.
  int64_t max_streams_per_connection = 64;
  // TLS of the two ports and of the calls to them (common/tls.h); null: plaintext.
  std::shared_ptr<grpc::ServerCredentials> prefill_tls, decode_tls;
  std::shared_ptr<grpc::ChannelCredentials> to_prefill_tls, client_tls;
};

// Both services on loopback ports; `prefill_front` optionally stands between them.
class ServicePair {
 public:
  explicit ServicePair(ServiceOptions options = {}, grpc::Service* prefill_front = nullptr) {
    Model& model = SharedModel();
    prefill_engine_ =
        *PrefillEngine::Create(options.prefill_model ? options.prefill_model : model.llama.get(),
                               model.fingerprint, options.prefill, /*pinner=*/nullptr);
    prefill_service_ = std::make_unique<PrefillServer>(prefill_engine_.get(), &prefill_registry_);
    if (options.start_prefill) {
      prefill_server_ = StartGrpcServer("127.0.0.1:0", prefill_service_.get(), &prefill_port_,
                                        options.prefill_tls);
    } else {
      prefill_port_ = 1;  // Nothing listens on port 1.
    }
    std::string prefill_address = "127.0.0.1:" + std::to_string(prefill_port_);
    if (prefill_front != nullptr) {
      front_server_ = StartGrpcServer("127.0.0.1:0", prefill_front, &front_port_);
      prefill_address = "127.0.0.1:" + std::to_string(front_port_);
    }
    decode_model_ = std::make_unique<HostSequenceModel>(model.llama.get(), options.kv_block_tokens,
                                                        options.kv_blocks);
    step_metrics_ = std::make_unique<DecodeStepMetrics>(&decode_registry_);
    if (!options.decode.on_step) {
      options.decode.on_step = [this](const DecodeStepTiming& t) { step_metrics_->Observe(t); };
    }
    decode_engine_ = std::make_unique<DecodeEngine>(decode_model_.get(), options.decode);
    DecodeServerOptions decode_options;
    decode_options.prefill_addresses = {prefill_address};
    decode_options.model_fingerprint =
        options.decode_fingerprint.empty() ? model.fingerprint : options.decode_fingerprint;
    decode_options.max_prompt_tokens = 1000;
    decode_options.max_new_tokens = 64;
    decode_options.tokenizer = options.tokenizer;
    decode_options.kv_streams = options.kv_streams;
    decode_options.max_streams_per_connection = options.max_streams_per_connection;
    decode_options.prefill_credentials = options.to_prefill_tls;
    decode_service_ = std::make_unique<DecodeServer>(decode_engine_.get(), model.llama->config(),
                                                     decode_options, &decode_registry_);
    decode_server_ =
        StartGrpcServer("127.0.0.1:0", decode_service_.get(), &decode_port_, options.decode_tls);
    stub_ = v1::DecodeService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(decode_port_),
        options.client_tls ? options.client_tls : grpc::InsecureChannelCredentials()));
  }

  ~ServicePair() {
    decode_server_->Shutdown();
    if (front_server_) front_server_->Shutdown();
    if (prefill_server_) prefill_server_->Shutdown();
  }

  Outcome Generate(const GenerateRequest& request, int cancel_after_tokens = -1) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto reader = stub_->Generate(&context, request);
    Outcome outcome;
    GenerateResponse response;
    while (reader->Read(&response)) {
      if (response.has_token()) {
        outcome.tokens.push_back(response.token().token_id());
        outcome.text += response.token().text();
        if (static_cast<int>(outcome.tokens.size()) == cancel_after_tokens) context.TryCancel();
      }
      if (response.has_result()) outcome.result = response.result();
    }
    outcome.status = reader->Finish();
    return outcome;
  }

  // True once all KV blocks are back in the pool (none reserved, none held by a sequence) and
  // nothing runs (waits up to 5 s).
  bool Drained() {
    return PollUntil(
        [this] {
          return decode_engine_->free_blocks() == decode_engine_->num_blocks() &&
                 decode_model_->free_blocks() == decode_model_->kv_pool_blocks() &&
                 decode_engine_->running() == 0 && prefill_service_->active_requests() == 0 &&
                 decode_service_->active_requests() == 0;
        },
        std::chrono::seconds(5));
  }

  int prefill_port() const { return prefill_port_; }
  int decode_port() const { return decode_port_; }
  PrefillServer* prefill_service() { return prefill_service_.get(); }
  DecodeServer* decode_service() { return decode_service_.get(); }
  prometheus::Registry& prefill_registry() { return prefill_registry_; }
  prometheus::Registry& decode_registry() { return decode_registry_; }
  v1::DecodeService::Stub* stub() { return stub_.get(); }
  // A client of the prefill service itself, as the decode service is (plaintext unless
  // `credentials` are given).
  std::unique_ptr<v1::PrefillService::Stub> PrefillStub(
      std::shared_ptr<grpc::ChannelCredentials> credentials = nullptr) const {
    return v1::PrefillService::NewStub(
        grpc::CreateChannel("127.0.0.1:" + std::to_string(prefill_port_),
                            credentials ? credentials : grpc::InsecureChannelCredentials()));
  }

 private:
  prometheus::Registry prefill_registry_, decode_registry_;
  std::unique_ptr<PrefillEngine> prefill_engine_;
  std::unique_ptr<PrefillServer> prefill_service_;
  std::unique_ptr<grpc::Server> prefill_server_, front_server_, decode_server_;
  std::unique_ptr<DecodeStepMetrics> step_metrics_;  // Outlives the engine that calls it.
  std::unique_ptr<HostSequenceModel> decode_model_;
  std::unique_ptr<DecodeEngine> decode_engine_;
  std::unique_ptr<DecodeServer> decode_service_;
  std::unique_ptr<v1::DecodeService::Stub> stub_;
  int prefill_port_ = 0, front_port_ = 0, decode_port_ = 0;
};

// A version 1 Prefill request (no kv_streams, no kv_checksum).
v1::PrefillRequest PrefillRequestOf(const std::vector<int32_t>& prompt) {
  v1::PrefillRequest request;
  *request.mutable_token_ids() = {prompt.begin(), prompt.end()};
  return request;
}

GenerateRequest MakeRequest(const std::vector<int32_t>& prompt, int max_tokens,
                            float temperature = 0, int top_k = 0, float top_p = 0,
                            uint64_t seed = 0) {
  GenerateRequest request;
  *request.mutable_token_ids()->mutable_ids() = {prompt.begin(), prompt.end()};
  request.set_max_tokens(max_tokens);
  request.mutable_sampling()->set_temperature(temperature);
  request.mutable_sampling()->set_top_k(top_k);
  request.mutable_sampling()->set_top_p(top_p);
  request.mutable_sampling()->set_seed(seed);
  return request;
}

TEST(ServiceTest, SplitPrefillDecodeEqualsOneEngine) {
  ServicePair services;
  std::mt19937 rng(std::random_device{}());
  const std::vector<GenerateRequest> requests = {
      MakeRequest(RandomPrompt(5, &rng), 12),
      MakeRequest(RandomPrompt(37, &rng), 10, 0.8f, 50, 0, 7),
      MakeRequest(RandomPrompt(150, &rng), 9, 1.2f, 0, 0.9f, 99),
      MakeRequest(RandomPrompt(1, &rng), 6, 0.5f, 3, 0.5f, 1),
  };
  for (const GenerateRequest& request : requests) {
    Outcome outcome = services.Generate(request);
    ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
    std::vector<int32_t> prompt(request.token_ids().ids().begin(), request.token_ids().ids().end());
    EXPECT_EQ(outcome.tokens, GenerateAlone(prompt, request.sampling(), request.max_tokens()));
    EXPECT_EQ(outcome.result.finish_reason(), v1::FINISH_REASON_LENGTH);
    EXPECT_EQ(outcome.result.completion_tokens(), request.max_tokens());
    const KvShape shape = SharedModel().llama->kv_shape();
    EXPECT_EQ(outcome.result.kv_transfer_bytes(),
              2 * shape.num_layers * shape.RowSize() * 4 * static_cast<int64_t>(prompt.size()));
    EXPECT_GT(outcome.result.time_to_first_token_seconds(), 0);
  }
  EXPECT_TRUE(services.Drained());
}

// K/V as bf16 on the wire (what a GPU prefill service sends) into the CPU decode path. Rule:
// the tokens are exactly those of one engine whose prompt K/V are rounded to bf16 (nearest
// even) after its prefill, since that is all that differs; the first token, sampled on the
// prefill side from fp32 logits, equals the all-fp32 path's. Agreement with the all-fp32 path
// after that is reported, not asserted: a 2^-9 relative change in K/V may flip a near tie.
TEST(ServiceTest, Bf16KvOnTheWire) {
  ServiceOptions options;
  options.prefill.kv_dtype = KvDtype::kBf16;
  ServicePair services(options);
  std::mt19937 rng(std::random_device{}());
  const std::vector<GenerateRequest> requests = {
      MakeRequest(RandomPrompt(5, &rng), 12),
      MakeRequest(RandomPrompt(37, &rng), 10, 0.8f, 50, 0, 7),
      MakeRequest(RandomPrompt(150, &rng), 9),
  };
  int same = 0, total = 0;
  for (const GenerateRequest& request : requests) {
    Outcome outcome = services.Generate(request);
    ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
    std::vector<int32_t> prompt(request.token_ids().ids().begin(), request.token_ids().ids().end());
    EXPECT_EQ(outcome.tokens, GenerateAlone(prompt, request.sampling(), request.max_tokens(),
                                            /*bf16_prompt_kv=*/true));
    const std::vector<int32_t> fp32 =
        GenerateAlone(prompt, request.sampling(), request.max_tokens());
    ASSERT_FALSE(outcome.tokens.empty());
    EXPECT_EQ(outcome.tokens[0], fp32[0]);
    for (size_t i = 0; i < fp32.size() && i < outcome.tokens.size() && fp32[i] == outcome.tokens[i];
         ++i) {
      ++same;
    }
    total += request.max_tokens();
    const KvShape shape = SharedModel().llama->kv_shape();
    EXPECT_EQ(outcome.result.kv_transfer_bytes(),
              2 * shape.num_layers * shape.RowSize() * 2 * static_cast<int64_t>(prompt.size()));
  }
  std::printf("bf16 KV on the wire: %d of %d tokens equal to the all-fp32 path\n", same, total);
  EXPECT_TRUE(services.Drained());
}

TEST(ServiceTest, ConcurrentClientsAllServedCorrectly) {
  ServiceOptions options;
  options.decode.max_batch = 6;  // Fewer than the clients: round robin across steps.
  ServicePair services(options);
  std::mt19937 rng(std::random_device{}());
  constexpr int kClients = 8, kRequestsEach = 4;
  std::vector<GenerateRequest> requests;
  std::vector<std::vector<int32_t>> expected;
  for (int i = 0; i < kClients * kRequestsEach; ++i) {
    std::vector<int32_t> prompt = RandomPrompt(3 + static_cast<int>(rng() % 60), &rng);
    requests.push_back(MakeRequest(prompt, 4 + i % 9, i % 2 ? 0.9f : 0, 0, 0, rng()));
    expected.push_back(GenerateAlone(prompt, requests.back().sampling(), 4 + i % 9));
  }
  std::vector<Outcome> outcomes(requests.size());
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      for (int r = 0; r < kRequestsEach; ++r) {
        const int i = c * kRequestsEach + r;
        outcomes[i] = services.Generate(requests[i]);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(outcomes[i].status.ok()) << i << ": " << outcomes[i].status.error_message();
    EXPECT_EQ(outcomes[i].tokens, expected[i]) << "request " << i;
  }
  EXPECT_TRUE(services.Drained());
}

// Sparse prefill on the prefill side (every head an A-shape of 64 sink + 128 window tokens
// above 128 tokens), dense decode: runs end to end; how far its tokens are from dense is
// reported, not asserted (random weights have no attention structure to preserve).
TEST(ServiceTest, SparsePrefillRunsEndToEnd) {
  std::unique_ptr<LlamaCpu> sparse_model = LlamaCpu::Load(SharedModel().dir).value();
  const ModelConfig& config = sparse_model->config();
  SparseConfig sparse;
  sparse.num_layers = config.num_hidden_layers;
  sparse.num_heads = config.num_attention_heads;
  sparse.dense_below_tokens = 128;
  sparse.heads.assign(
      sparse.num_layers,
      std::vector<HeadPattern>(sparse.num_heads, HeadPattern{HeadPattern::Kind::kAShape, 64, 128}));
  auto attention = SparsePrefillAttention::Create(config, sparse);
  ASSERT_TRUE(attention.ok());
  sparse_model->SetAttentionOverride(attention->get());
  ServiceOptions options;
  options.prefill_model = sparse_model.get();
  ServicePair services(options);
  std::mt19937 rng(std::random_device{}());
  int same = 0, total = 0;
  for (int trial = 0; trial < 3; ++trial) {
    GenerateRequest request = MakeRequest(RandomPrompt(400, &rng), 8);
    Outcome outcome = services.Generate(request);
    ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
    ASSERT_EQ(outcome.tokens.size(), 8u);
    std::vector<int32_t> prompt(request.token_ids().ids().begin(), request.token_ids().ids().end());
    std::vector<int32_t> dense = GenerateAlone(prompt, request.sampling(), 8);
    // Tokens agree until the first divergence (after it the contexts differ).
    for (size_t i = 0; i < dense.size() && dense[i] == outcome.tokens[i]; ++i) ++same;
    total += 8;
  }
  EXPECT_LT((*attention)->MeanDensity(), 0.9);
  RecordProperty("sparse_vs_dense_token_agreement", std::to_string(double(same) / total));
  std::printf("sparse prefill (density %.3f): %d of %d greedy tokens equal to dense\n",
              (*attention)->MeanDensity(), same, total);
  EXPECT_TRUE(services.Drained());
}

TEST(ServiceTest, MalformedRequestsAreInvalidArgument) {
  ServicePair services;
  std::mt19937 rng(std::random_device{}());
  const std::vector<int32_t> prompt = RandomPrompt(8, &rng);
  std::vector<std::pair<std::string, GenerateRequest>> cases = {
      {"empty prompt", MakeRequest({}, 4)},
      {"max_tokens 0", MakeRequest(prompt, 0)},
      {"max_tokens too large", MakeRequest(prompt, 65)},
      {"negative temperature", MakeRequest(prompt, 4, -1.0f)},
      {"nan temperature", MakeRequest(prompt, 4, std::nanf(""))},
      {"top_p above 1", MakeRequest(prompt, 4, 1.0f, 0, 1.5f)},
      {"negative top_k", MakeRequest(prompt, 4, 1.0f, -2)},
      {"unknown token id", MakeRequest({1, 2, 512}, 4)},
      {"negative token id", MakeRequest({-1}, 4)},
      {"over-long prompt", MakeRequest(RandomPrompt(1001, &rng), 4)},
  };
  // Over the per-request limits (checked before the tokenizer is needed).
  GenerateRequest limit = MakeRequest(prompt, 4);
  limit.set_request_id(std::string(kMaxRequestIdBytes + 1, 'r'));
  cases.push_back({"long request_id", limit});
  limit = MakeRequest(prompt, 4);
  for (int i = 0; i <= kMaxStopStrings; ++i) limit.add_stop("s");
  cases.push_back({"too many stop strings", limit});
  limit = MakeRequest(prompt, 4);
  limit.add_stop(std::string(kMaxStopStringBytes + 1, 'x'));
  cases.push_back({"long stop string", limit});
  limit = MakeRequest(prompt, 4);
  for (int i = 0; i <= kMaxStopTokenIds; ++i) limit.add_stop_token_ids(i);
  cases.push_back({"too many stop token ids", limit});
  for (auto& [name, request] : cases) {
    Outcome outcome = services.Generate(request);
    EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << name;
    EXPECT_FALSE(outcome.status.error_message().empty()) << name;
    EXPECT_TRUE(outcome.tokens.empty()) << name;
  }
  // At the limits a request is served.
  GenerateRequest at_limits = MakeRequest(prompt, 4);
  at_limits.set_request_id(std::string(kMaxRequestIdBytes, 'r'));
  for (int i = 0; i < kMaxStopTokenIds; ++i) at_limits.add_stop_token_ids(i);
  EXPECT_TRUE(services.Generate(at_limits).status.ok());
  // Without a tokenizer only token ids are understood.
  GenerateRequest text;
  text.set_text("hello");
  text.set_max_tokens(4);
  EXPECT_EQ(services.Generate(text).status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  GenerateRequest stop = MakeRequest(prompt, 4);
  stop.add_stop("x");
  EXPECT_EQ(services.Generate(stop).status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(services.Drained());
}

// The byte-level BPE alphabet: byte b as the character tokenizer.json's vocabulary uses.
std::string ByteLevelChar(int b) {
  const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
  int code = b;
  if (!printable) {
    code = 256;
    for (int c = 0; c < b; ++c) {
      if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || c >= 174)) ++code;
    }
  }
  std::string utf8;
  if (code < 0x80) {
    utf8 += static_cast<char>(code);
  } else {
    utf8 += static_cast<char>(0xC0 | (code >> 6));
    utf8 += static_cast<char>(0x80 | (code & 0x3F));
  }
  return utf8;
}

// A Llama-3-shaped tokenizer over the tiny model's 512 ids: the 256 bytes, two-letter words
// (ids 256..507, decodable only) and four special tokens, with the Llama 3 chat template.
std::unique_ptr<Tokenizer> MakeTinyTokenizer() {
  using Json = nlohmann::json;
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteLevelChar(b)] = b;
  for (int i = 0; i < 252; ++i) {
    vocab[std::string{static_cast<char>('a' + i / 26), static_cast<char>('a' + i % 26)}] = 256 + i;
  }
  const std::vector<std::string> specials = {"<|begin_of_text|>", "<|eot_id|>",
                                             "<|start_header_id|>", "<|end_header_id|>"};
  Json added = Json::array();
  for (int i = 0; i < 4; ++i) {
    added.push_back({{"id", 508 + i},
                     {"content", specials[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  Json split = {{"type", "Split"},
                {"pattern", {{"Regex", R"( ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+)"}}},
                {"behavior", "Isolated"},
                {"invert", false}};
  Json byte_level = {{"type", "ByteLevel"},
                     {"add_prefix_space", false},
                     {"trim_offsets", true},
                     {"use_regex", false}};
  Json bos = {{"SpecialToken", {{"id", specials[0]}, {"type_id", 0}}}};
  Json sequence = {{"Sequence", {{"id", "A"}, {"type_id", 0}}}};
  Json tokenizer = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", {split, byte_level}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {bos, sequence}},
        {"special_tokens", {{specials[0], {{"id", specials[0]}, {"ids", {508}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", Json::array()}}}};
  const std::string chat_template =
      "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
      "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
      "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% "
      "endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
      "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
  Json config = {{"bos_token", specials[0]},
                 {"eos_token", specials[1]},
                 {"clean_up_tokenization_spaces", false},
                 {"chat_template", chat_template}};
  auto loaded = Tokenizer::FromJson(tokenizer.dump(), config.dump());
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return loaded.ok() ? *std::move(loaded) : nullptr;
}

GenerateRequest TextRequest(const std::string& text, int max_tokens) {
  GenerateRequest request;
  request.set_text(text);
  request.set_max_tokens(max_tokens);
  request.set_ignore_eos(true);
  return request;
}

ServiceOptions WithTokenizer(const Tokenizer* tokenizer) {
  ServiceOptions options;
  options.tokenizer = tokenizer;
  return options;
}

// A service pair that takes text prompts (the tiny tokenizer).
struct TextServicePair {
  std::unique_ptr<Tokenizer> tokenizer = MakeTinyTokenizer();
  ServicePair services{WithTokenizer(tokenizer.get())};
};

TEST(ServiceTest, TextAndChatPromptsStreamTextDeltas) {
  TextServicePair text_pair;
  ASSERT_NE(text_pair.tokenizer, nullptr);
  const std::unique_ptr<Tokenizer>& tokenizer = text_pair.tokenizer;
  ServicePair& services = text_pair.services;
  DecodeOptions plain;
  plain.skip_special_tokens = true;
  plain.clean_up_tokenization_spaces = DecodeOptions::CleanUp::kOff;

  const std::string text = "The quick brown fox, 42 times.";
  GenerateRequest request = TextRequest(text, 16);
  request.mutable_sampling()->set_temperature(0.8f);
  request.mutable_sampling()->set_seed(7);
  Outcome outcome = services.Generate(request);
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  const std::vector<int32_t> prompt = tokenizer->Encode(text);
  EXPECT_EQ(outcome.result.prompt_tokens(), static_cast<int32_t>(prompt.size()));
  EXPECT_EQ(outcome.tokens, GenerateAlone(prompt, request.sampling(), 16));
  EXPECT_EQ(outcome.text, tokenizer->Decode(outcome.tokens, plain).value());

  GenerateRequest chat;
  chat.set_max_tokens(8);
  chat.set_ignore_eos(true);
  const std::vector<ChatMessage> messages = {{"system", "Be brief."}, {"user", "Hi there"}};
  for (const ChatMessage& message : messages) {
    v1::ChatMessage* added = chat.mutable_chat()->add_messages();
    added->set_role(message.role);
    added->set_content(message.content);
  }
  outcome = services.Generate(chat);
  ASSERT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  EXPECT_EQ(outcome.tokens, GenerateAlone(tokenizer->EncodeChat(messages).value(), {}, 8));
  EXPECT_EQ(outcome.text, tokenizer->Decode(outcome.tokens, plain).value());

  chat.mutable_chat()->mutable_messages(0)->set_role("wizard");
  EXPECT_EQ(services.Generate(chat).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(services.Generate(TextRequest("", 4)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(services.Drained());
}

// What both services log for requests (good ones, a bad token id, text with stop strings) holds
// lengths, ids of requests and status codes, never prompt text, stop strings or token ids.
TEST(ServiceTest, LogsCarryNoPromptTextStopStringsOrTokenIds) {
  TextServicePair text_pair;
  ASSERT_NE(text_pair.tokenizer, nullptr);
  ServicePair& services = text_pair.services;
  const std::string secret = "Wombat passkey 73919";
  ::testing::internal::CaptureStderr();
  GenerateRequest text = TextRequest(secret, 6);
  text.add_stop("zebracrossing");
  const Outcome good = services.Generate(text);
  const Outcome good_ids = services.Generate(MakeRequest({487, 499, 503}, 4));
  const Outcome bad_id = services.Generate(MakeRequest({5, 88888, 6}, 4));
  const std::string logs = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(good.status.ok()) << good.status.error_message();
  ASSERT_TRUE(good_ids.status.ok()) << good_ids.status.error_message();
  ASSERT_EQ(bad_id.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(bad_id.status.error_message().find("88888"), std::string::npos)
      << "the client is told which id";
  EXPECT_NE(logs.find("generate.done"), std::string::npos) << logs;
  EXPECT_NE(logs.find("INVALID_ARGUMENT"), std::string::npos) << logs;
  for (const std::string& leak :
       {std::string("Wombat"), std::string("73919"), std::string("zebracrossing"),
        std::string("4242"), std::string("88888")}) {
    EXPECT_EQ(logs.find(leak), std::string::npos) << leak << " in the logs:\n" << logs;
  }
}

TEST(ServiceTest, StopStringEndsTheTextBeforeIt) {
  TextServicePair text_pair;
  ASSERT_NE(text_pair.tokenizer, nullptr);
  ServicePair& services = text_pair.services;
  std::mt19937 rng(std::random_device{}());
  // Prompts of letters: the continuation then holds many two-letter words.
  std::string text;
  for (int i = 0; i < 24; ++i) text += static_cast<char>('a' + rng() % 26);
  Outcome full = services.Generate(TextRequest(text, 32));
  ASSERT_TRUE(full.status.ok()) << full.status.error_message();
  ASSERT_GE(full.text.size(), 12u);
  // A stop string of two characters from the middle of the text (whole UTF-8 characters, as
  // proto strings must be); generation ends at its first occurrence.
  const auto is_continuation = [&](size_t i) {
    return i < full.text.size() && (static_cast<unsigned char>(full.text[i]) & 0xC0) == 0x80;
  };
  size_t begin = full.text.size() / 3, end = begin;
  while (is_continuation(begin)) ++begin;
  end = begin;
  for (int chars = 0; chars < 2; ++chars) {
    ++end;
    while (is_continuation(end)) ++end;
  }
  const std::string stop = full.text.substr(begin, end - begin);
  const size_t at = full.text.find(stop);
  GenerateRequest request = TextRequest(text, 32);
  request.add_stop(stop);
  request.add_stop("\x01\x02\x03 never appears");
  Outcome stopped = services.Generate(request);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.result.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(stopped.text, full.text.substr(0, at));
  ASSERT_LE(stopped.tokens.size(), full.tokens.size());
  EXPECT_TRUE(std::equal(stopped.tokens.begin(), stopped.tokens.end(), full.tokens.begin()));
  EXPECT_LT(stopped.tokens.size(), full.tokens.size());

  // A stop token id ends generation right after that token.
  GenerateRequest by_id = TextRequest(text, 32);
  by_id.add_stop_token_ids(full.tokens[3]);
  Outcome id_stopped = services.Generate(by_id);
  ASSERT_TRUE(id_stopped.status.ok());
  EXPECT_EQ(id_stopped.result.finish_reason(), v1::FINISH_REASON_STOP);
  const size_t first =
      std::find(full.tokens.begin(), full.tokens.end(), full.tokens[3]) - full.tokens.begin();
  EXPECT_EQ(id_stopped.tokens.size(), first + 1);
  EXPECT_TRUE(services.Drained());
}

// The status of a Prefill call of `prompt` through `stub`, its stream read to the end.
grpc::StatusCode PrefillCallStatus(v1::PrefillService::Stub* stub,
                                   const std::vector<int32_t>& prompt) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub->Prefill(&context, PrefillRequestOf(prompt));
  v1::PrefillResponse response;
  while (reader->Read(&response)) {
  }
  return reader->Finish().error_code();
}

// Certificates made here: the prefill port requires a client certificate from the cluster CA
// (the decode service has one), the public port serves TLS. The tokens equal a plaintext
// pair's; a caller without a client certificate, or in plaintext, gets nothing from Prefill.
TEST(ServiceTest, MutualTlsBetweenTheServicesServesTheSameTokens) {
  TestCa ca("cluster ca");
  const std::string dir = ::testing::TempDir() + "/service_tls_";
  const auto write = [&](const std::string& name, const Pem& pem) {
    WriteFileOrDie(dir + name + ".crt", pem.cert);
    WriteFileOrDie(dir + name + ".key", pem.key);
    return dir + name;
  };
  const std::string prefill = write("prefill", ca.Issue("prefill")),
                    decode = write("decode", ca.Issue("decode")),
                    decode_client = write("decode_client", ca.Issue("decode-client"));
  const std::string roots = dir + "ca.crt";
  WriteFileOrDie(roots, ca.cert_pem());
  ServiceOptions options;
  options.prefill_tls = *MakeServerCredentials({prefill + ".crt", prefill + ".key", roots});
  options.to_prefill_tls =
      *MakeChannelCredentials({roots, decode_client + ".crt", decode_client + ".key"});
  options.decode_tls = *MakeServerCredentials({decode + ".crt", decode + ".key", ""});
  options.client_tls = *MakeChannelCredentials({roots});
  ServicePair secure(options);
  ServicePair plain;
  std::mt19937 rng(7);
  const std::vector<int32_t> prompt = RandomPrompt(40, &rng);
  const Outcome over_tls = secure.Generate(MakeRequest(prompt, 8));
  ASSERT_TRUE(over_tls.status.ok()) << over_tls.status.error_message();
  EXPECT_EQ(over_tls.tokens, plain.Generate(MakeRequest(prompt, 8)).tokens);
  EXPECT_EQ(PrefillCallStatus(secure.PrefillStub(*MakeChannelCredentials({roots})).get(), prompt),
            grpc::StatusCode::UNAVAILABLE)
      << "no client certificate";
  EXPECT_EQ(PrefillCallStatus(secure.PrefillStub().get(), prompt), grpc::StatusCode::UNAVAILABLE)
      << "plaintext";
  EXPECT_TRUE(secure.Drained());
}

// Two calls hold a connection's two slots (decoding is paused in on_step); a third on the same
// connection is RESOURCE_EXHAUSTED at once, one on a new connection is served.
TEST(ServiceTest, StreamsPerConnectionAreLimited) {
  absl::Notification release;
  ServiceOptions options;
  options.max_streams_per_connection = 2;
  options.decode.on_step = [&](const DecodeStepTiming&) { release.WaitForNotification(); };
  ServicePair services(options);
  const GenerateRequest request = MakeRequest({1, 2, 3, 4}, 8);
  std::vector<Outcome> held(2);
  std::vector<std::thread> threads;
  for (Outcome& outcome : held) {
    threads.emplace_back([&services, &request, &outcome] { outcome = services.Generate(request); });
  }
  PollUntil([&] { return services.decode_service()->active_requests() >= 2; },
            std::chrono::seconds(5));
  ASSERT_EQ(services.decode_service()->active_requests(), 2);
  const Outcome refused = services.Generate(request);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(refused.status.error_message().find("per connection"), std::string::npos)
      << refused.status.error_message();
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // A connection of its own.
  auto other = v1::DecodeService::NewStub(
      grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(services.decode_port()),
                                grpc::InsecureChannelCredentials(), args));
  grpc::Status other_status;
  std::thread other_call([&] {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto reader = other->Generate(&context, request);
    GenerateResponse response;
    while (reader->Read(&response)) {
    }
    other_status = reader->Finish();
  });
  PollUntil([&] { return services.decode_service()->active_requests() >= 3; },
            std::chrono::seconds(5));
  EXPECT_EQ(services.decode_service()->active_requests(), 3) << "the new connection was refused";
  release.Notify();
  for (std::thread& t : threads) t.join();
  other_call.join();
  for (const Outcome& outcome : held)
    EXPECT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  EXPECT_TRUE(other_status.ok()) << other_status.error_message();
  EXPECT_TRUE(services.Drained());
}

// A request message over the 64 MiB limit is refused by gRPC itself, before the service.
TEST(ServiceTest, OversizedRequestIsResourceExhausted) {
  ServicePair services;
  GenerateRequest request;
  request.set_text(std::string((64 << 20) + 1024, 'a'));
  request.set_max_tokens(1);
  const Outcome outcome = services.Generate(request);
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << outcome.status.error_message();
  EXPECT_EQ(services.decode_service()->active_requests(), 0);
}

TEST(ServiceTest, PrefillServiceDownIsUnavailable) {
  ServiceOptions options;
  options.start_prefill = false;
  ServicePair services(options);
  Outcome outcome = services.Generate(MakeRequest({1, 2, 3}, 4));
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << outcome.status.error_message();
  EXPECT_TRUE(services.Drained());
}

TEST(ServiceTest, ModelMismatchIsRefused) {
  ServiceOptions options;
  options.decode_fingerprint = "0123456789abcdef";
  ServicePair services(options);
  Outcome outcome = services.Generate(MakeRequest({1, 2, 3}, 4));
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION)
      << outcome.status.error_message();
  EXPECT_TRUE(services.Drained());
}

// Forwards the real prefill stream, then breaks it: flips a byte of chunk `corrupt_chunk`, or
// fails with UNAVAILABLE after `die_after` messages (a prefill process dying mid-stream). With
// `hold_kv` it sends the header and the trailer first and the chunks only once `hold_kv` is
// notified (or after 10 s; `held_until_notified` says which). With `fetch_never_joins` it asks
// for the streams the caller asked for, but its FetchKv calls never reach the prefill service:
// they wait until cancelled (at most 20 s), as a stream whose connection never comes up, and the
// Prefill stream's chunks follow once all of them are waiting (at most 5 s).
class FaultyPrefill final : public v1::PrefillService::Service {
 public:
  int target_port = 0;
  int corrupt_chunk = -1;
  int die_after = -1;
  absl::Notification* hold_kv = nullptr;
  std::atomic<bool> held_until_notified{false};
  bool fetch_never_joins = false;
  std::atomic<int> fetch_calls{0};

  grpc::Status FetchKv(grpc::ServerContext* context, const v1::KvFetchRequest*,
                       grpc::ServerWriter<v1::PrefillResponse>*) override {
    ++fetch_calls;
    PollUntil([context] { return context->IsCancelled(); }, std::chrono::seconds(20),
              std::chrono::milliseconds(5));
    return grpc::Status(grpc::StatusCode::CANCELLED, "never joined");
  }

  grpc::Status Prefill(grpc::ServerContext* context, const v1::PrefillRequest* request,
                       grpc::ServerWriter<v1::PrefillResponse>* writer) override {
    auto stub = v1::PrefillService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(target_port), grpc::InsecureChannelCredentials()));
    grpc::ClientContext upstream;
    // Every chunk on this one stream (the proxied FetchKv streams never join).
    v1::PrefillRequest one_stream = *request;
    if (!fetch_never_joins) one_stream.set_kv_streams(1);
    auto reader = stub->Prefill(&upstream, one_stream);
    v1::PrefillResponse message;
    if (hold_kv != nullptr) return TrailerFirst(reader.get(), writer, &upstream);
    int sent = 0, chunks = 0;
    while (reader->Read(&message)) {
      if (sent == die_after) {
        upstream.TryCancel();
        reader->Finish();
        return grpc::Status(grpc::StatusCode::UNAVAILABLE, "prefill process died");
      }
      if (message.has_kv() && chunks++ == corrupt_chunk) {
        std::string* k = message.mutable_kv()->mutable_k();
        (*k)[k->size() / 2] ^= 0x40;
      }
      if (!writer->Write(message)) break;
      // Past the header, the rest waits until the caller's fetch calls are all here.
      if (++sent == 1 && fetch_never_joins) {
        const int calls = request->kv_streams() - 1;
        PollUntil([&] { return fetch_calls >= calls; }, std::chrono::seconds(5),
                  std::chrono::milliseconds(1));
      }
    }
    return reader->Finish();
  }

 private:
  grpc::Status TrailerFirst(grpc::ClientReader<v1::PrefillResponse>* reader,
                            grpc::ServerWriter<v1::PrefillResponse>* writer,
                            grpc::ClientContext* upstream) {
    std::vector<v1::PrefillResponse> chunks;
    v1::PrefillResponse message;
    while (reader->Read(&message)) {
      if (message.has_kv()) {
        chunks.push_back(message);
      } else if (!writer->Write(message)) {
        upstream->TryCancel();
        break;
      }
    }
    held_until_notified = hold_kv->WaitForNotificationWithTimeout(absl::Seconds(10));
    for (const v1::PrefillResponse& chunk : chunks) {
      if (!writer->Write(chunk)) break;
    }
    return reader->Finish();
  }
};

// The first token reaches the client before the KV cache has all arrived (the trailer comes
// first); the rest of the tokens are those of one engine. A generation that ends with its
// first token stops the transfer and frees everything.
TEST(ServiceTest, FirstTokenStreamsBeforeTheKvArrives) {
  ServicePair reference;
  FaultyPrefill front;
  front.target_port = reference.prefill_port();
  ServicePair services({}, &front);
  std::mt19937 rng(std::random_device{}());
  for (int max_tokens : {6, 1}) {
    absl::Notification first_token;
    front.hold_kv = &first_token;
    const std::vector<int32_t> prompt = RandomPrompt(30, &rng);
    const GenerateRequest request = MakeRequest(prompt, max_tokens);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto reader = services.stub()->Generate(&context, request);
    std::vector<int32_t> tokens;
    GenerateResponse response;
    while (reader->Read(&response)) {
      if (!response.has_token()) continue;
      tokens.push_back(response.token().token_id());
      if (!first_token.HasBeenNotified()) first_token.Notify();
    }
    EXPECT_TRUE(reader->Finish().ok());
    EXPECT_EQ(tokens, GenerateAlone(prompt, request.sampling(), max_tokens));
    EXPECT_TRUE(front.held_until_notified) << "max_tokens " << max_tokens;
    EXPECT_TRUE(services.Drained());
    EXPECT_TRUE(reference.Drained());
  }
}

// FetchKv streams that never join (their connections not up, say) hold nothing back: the
// Prefill stream carries every chunk, and once all rows are in the open fetch calls are
// cancelled instead of waited for until the deadline.
TEST(ServiceTest, FetchStreamsThatNeverJoinHoldNothingBack) {
  ServicePair reference;
  FaultyPrefill front;
  front.target_port = reference.prefill_port();
  front.fetch_never_joins = true;
  ServicePair services({}, &front);
  std::mt19937 rng(std::random_device{}());
  const std::vector<int32_t> prompt = RandomPrompt(40, &rng);
  const GenerateRequest request = MakeRequest(prompt, 6);
  const Outcome outcome = services.Generate(request);
  EXPECT_TRUE(outcome.status.ok()) << outcome.status.error_message();
  EXPECT_EQ(outcome.tokens, GenerateAlone(prompt, request.sampling(), 6));
  EXPECT_EQ(front.fetch_calls, 2);  // kv_streams 3: the Prefill stream and two fetches.
  EXPECT_TRUE(services.Drained());
  EXPECT_TRUE(reference.Drained());
}

TEST(ServiceTest, CorruptedKvChunkIsDataLoss) {
  ServicePair reference;  // Provides a real prefill service to proxy.
  FaultyPrefill faulty;
  faulty.target_port = reference.prefill_port();
  faulty.corrupt_chunk = 1;  // The second layer's chunk.
  ServicePair services({}, &faulty);
  std::mt19937 rng(std::random_device{}());
  Outcome outcome = services.Generate(MakeRequest(RandomPrompt(20, &rng), 4));
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::DATA_LOSS)
      << outcome.status.error_message();
  EXPECT_TRUE(outcome.tokens.empty());
  EXPECT_TRUE(services.Drained());
  EXPECT_TRUE(reference.Drained());
}

TEST(ServiceTest, PrefillDyingMidStreamIsUnavailable) {
  ServicePair reference;
  FaultyPrefill faulty;
  faulty.target_port = reference.prefill_port();
  faulty.die_after = 2;  // The header and one chunk.
  ServicePair services({}, &faulty);
  std::mt19937 rng(std::random_device{}());
  Outcome outcome = services.Generate(MakeRequest(RandomPrompt(20, &rng), 4));
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << outcome.status.error_message();
  EXPECT_TRUE(services.Drained());
  EXPECT_TRUE(reference.Drained());
}

TEST(ServiceTest, ReceiverLeavingMidTransferStopsThePrefill) {
  ServiceOptions options;
  options.prefill.chunk_bytes = 256;         // Many small chunks per layer,
  options.prefill.host_buffer_bytes = 4096;  // and few may wait for the network.
  ServicePair services(options);
  auto stub = services.PrefillStub();
  std::mt19937 rng(std::random_device{}());
  const v1::PrefillRequest request = PrefillRequestOf(RandomPrompt(400, &rng));
  grpc::ClientContext context;
  auto reader = stub->Prefill(&context, request);
  v1::PrefillResponse message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_header());
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_kv());
  context.TryCancel();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(services.Drained());
  // The prefill ended as cancelled rather than running to completion.
  const std::string text = SerializeMetrics(services.prefill_registry());
  EXPECT_NE(text.find("sparseaccel_prefill_requests_total{outcome=\"cancelled\"} 1"),
            std::string::npos)
      << text;
}

// A KV wire version 1 caller (no kv_streams, no kv_checksum) gets every chunk on the Prefill
// stream with zlib CRC-32, as before; FetchKv of an unknown transfer is NOT_FOUND.
TEST(ServiceTest, Version1CallerGetsCrc32ChunksOnOneStream) {
  ServicePair services;
  auto stub = services.PrefillStub();
  std::mt19937 rng(std::random_device{}());
  const v1::PrefillRequest request = PrefillRequestOf(RandomPrompt(40, &rng));
  grpc::ClientContext context;
  auto reader = stub->Prefill(&context, request);
  v1::PrefillResponse message;
  ASSERT_TRUE(reader->Read(&message));
  ASSERT_TRUE(message.has_header());
  EXPECT_TRUE(message.header().kv_transfer_id().empty());
  EXPECT_EQ(message.header().kv_streams(), 1);
  EXPECT_EQ(message.header().layout().checksum(), v1::KV_CHECKSUM_CRC32);
  int64_t rows = 0;
  bool trailer = false;
  while (reader->Read(&message)) {
    if (message.has_kv()) {
      EXPECT_EQ(message.kv().crc32(), KvChunkCrc32(message.kv().k(), message.kv().v()));
      EXPECT_EQ(message.kv().checksum(), 0u);
      rows += message.kv().num_positions();
    }
    trailer = trailer || message.has_trailer();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_TRUE(trailer);
  EXPECT_EQ(rows, 40 * SharedModel().llama->kv_shape().num_layers);

  grpc::ClientContext fetch_context;
  v1::KvFetchRequest fetch;
  fetch.set_kv_transfer_id("0123456789abcdef0123456789abcdef");
  auto fetched = stub->FetchKv(&fetch_context, fetch);
  EXPECT_FALSE(fetched->Read(&message));
  EXPECT_EQ(fetched->Finish().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(services.Drained());
}

TEST(ServiceTest, ClientCancellingMidDecodeFreesEverything) {
  ServicePair services;
  std::mt19937 rng(std::random_device{}());
  Outcome outcome = services.Generate(MakeRequest(RandomPrompt(30, &rng), 60), 3);
  EXPECT_EQ(outcome.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(services.Drained());
}

TEST(ServiceTest, FullKvPoolIsResourceExhausted) {
  ServiceOptions options;
  options.kv_block_tokens = 16;
  options.kv_blocks = 4;  // 64 positions.
  options.decode.max_waiting = 0;
  ServicePair services(options);
  std::mt19937 rng(std::random_device{}());
  Outcome too_big = services.Generate(MakeRequest(RandomPrompt(60, &rng), 10));
  EXPECT_EQ(too_big.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(services.Drained());
}

TEST(DecodeEngineTest, AdmissionWaitsInABoundedQueue) {
  HostSequenceModel model(SharedModel().llama.get(), /*block_tokens=*/8, /*num_blocks=*/4);
  DecodeEngineOptions options;
  options.max_waiting = 1;
  DecodeEngine engine(&model, options);
  auto never = [] { return false; };
  auto first = engine.Admit(24, 8, absl::InfiniteFuture(), never);
  ASSERT_TRUE(first.ok());
  // Every block is reserved: one request may wait; it times out at its deadline.
  auto waited = engine.Admit(4, 4, absl::Now() + absl::Milliseconds(50), never);
  EXPECT_EQ(waited.status().code(), absl::StatusCode::kDeadlineExceeded);
  // The queue holds one: a second waiter is refused at once.
  std::atomic<bool> stop_waiting{false};
  std::thread waiter([&] {
    auto third = engine.Admit(4, 4, absl::InfiniteFuture(), [&] { return stop_waiting.load(); });
    EXPECT_EQ(third.status().code(), absl::StatusCode::kCancelled);
  });
  while (engine.waiting() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(engine.Admit(4, 4, absl::InfiniteFuture(), never).status().code(),
            absl::StatusCode::kResourceExhausted);
  stop_waiting = true;
  waiter.join();
  // A waiter gets its blocks as soon as they are released.
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    first->reset();
  });
  auto second = engine.Admit(8, 8, absl::Now() + absl::Seconds(10), never);
  release.join();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(engine.free_blocks(), 2);
  // Only the prompt's block is taken so far; the rest come as decoding reaches them.
  EXPECT_EQ(model.free_blocks(), 3);
  second->reset();
  EXPECT_EQ(engine.free_blocks(), 4);
  EXPECT_EQ(model.free_blocks(), 4);
}

TEST(ServiceTest, MetricsAreServedOverHttp) {
  ServicePair services;
  std::mt19937 rng(std::random_device{}());
  ASSERT_TRUE(services.Generate(MakeRequest(RandomPrompt(10, &rng), 5)).status.ok());
  auto registry = std::shared_ptr<prometheus::Registry>(&services.decode_registry(),
                                                        [](prometheus::Registry*) {});
  // The last blocks return to the pool just after the response; gauges refresh on scrape.
  ASSERT_TRUE(services.Drained());
  auto server = MetricsServer::Start("127.0.0.1", 0, registry,
                                     [&services] { services.decode_service()->UpdateGauges(); });
  ASSERT_TRUE(server.ok());
  httplib::Client client("127.0.0.1", (*server)->port());
  auto response = client.Get("/metrics");
  ASSERT_TRUE(response);
  EXPECT_EQ(response->status, 200);
  for (const char* expected :
       {"sparseaccel_time_to_first_token_seconds_count{context=\"<4K\"} 1",
        "sparseaccel_inter_token_latency_seconds_count{context=\"<4K\"} 4",
        // The first token comes with the prefill: 4 decode steps, 3 intervals between them.
        "sparseaccel_decode_step_seconds_count{batch=\"1\"} 4",
        "sparseaccel_decode_step_interval_seconds_count{batch=\"1\"} 3",
        "sparseaccel_generate_requests_total{finish_reason=\"length\",outcome=\"ok\"} 1",
        "sparseaccel_kv_transfer_bytes_count{context=\"<4K\"} 1",
        "sparseaccel_kv_pool_blocks{state=\"used\"} 0", "sparseaccel_decode_queue_depth 0"}) {
    EXPECT_NE(response->body.find(expected), std::string::npos) << expected;
  }
  const std::string prefill = SerializeMetrics(services.prefill_registry());
  EXPECT_NE(prefill.find("sparseaccel_prefill_duration_seconds_count{context=\"<4K\"} 1"),
            std::string::npos);
  EXPECT_EQ(DecodeStepMetrics::BatchBucket(1), "1");
  EXPECT_EQ(DecodeStepMetrics::BatchBucket(4), "2-4");
  EXPECT_EQ(DecodeStepMetrics::BatchBucket(5), "5-8");
  EXPECT_EQ(DecodeStepMetrics::BatchBucket(32), "17-32");
  EXPECT_EQ(DecodeStepMetrics::BatchBucket(65), "65+");
  EXPECT_EQ(ContextBucket(4095), "<4K");
  EXPECT_EQ(ContextBucket(16384), "16-32K");
  EXPECT_EQ(ContextBucket(131072), ">=128K");
}

}  // namespace
}  // namespace sparseaccel
