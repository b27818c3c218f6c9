// A command-line Generate client: sends a text prompt or token ids, prints the text (or, for an
// id prompt, the token ids) as it streams in, then the timings of the final message.
//   generate_client --server 127.0.0.1:50052 --prompt "Hello" --max_tokens 32
//   generate_client --server 127.0.0.1:50052 --prompt_ids 1,2,3 --max_tokens 32

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "common/tls.h"
#include "grpcpp/grpcpp.h"
#include "proto/sparseaccel.grpc.pb.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50052", "Decode service address.");
ABSL_FLAG(std::string, prompt, "", "Text prompt (the served model needs tokenizer.json).");
ABSL_FLAG(std::string, prompt_ids, "", "Comma-separated prompt token ids (instead of --prompt).");
ABSL_FLAG(std::vector<std::string>, stop, {}, "Comma-separated stop strings.");
ABSL_FLAG(int32_t, max_tokens, 32, "Tokens to generate.");
ABSL_FLAG(float, temperature, 0, "0: greedy.");
ABSL_FLAG(int32_t, top_k, 0, "Top-k cut (0: none).");
ABSL_FLAG(float, top_p, 1, "Nucleus cut.");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed.");
ABSL_FLAG(int32_t, timeout_seconds, 60, "Deadline of the call.");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA of the decode service's certificate: connect over TLS (empty: plaintext).");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  sparseaccel::v1::GenerateRequest request;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_prompt_ids), ',', absl::SkipEmpty())) {
    int32_t id;
    if (!absl::SimpleAtoi(part, &id)) {
      std::fprintf(stderr, "bad --prompt_ids\n");
      return 2;
    }
    request.mutable_token_ids()->add_ids(id);
  }
  const bool text_prompt = !absl::GetFlag(FLAGS_prompt).empty();
  if (text_prompt) request.set_text(absl::GetFlag(FLAGS_prompt));
  for (const std::string& stop : absl::GetFlag(FLAGS_stop)) request.add_stop(stop);
  request.set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
  request.mutable_sampling()->set_temperature(absl::GetFlag(FLAGS_temperature));
  request.mutable_sampling()->set_top_k(absl::GetFlag(FLAGS_top_k));
  request.mutable_sampling()->set_top_p(absl::GetFlag(FLAGS_top_p));
  request.mutable_sampling()->set_seed(absl::GetFlag(FLAGS_seed));
  sparseaccel::ChannelTlsFiles tls;
  tls.ca = absl::GetFlag(FLAGS_tls_ca);
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
      sparseaccel::MakeChannelCredentials(tls);
  if (!credentials.ok()) {
    std::fprintf(stderr, "%s\n", credentials.status().ToString().c_str());
    return 2;
  }
  auto stub = sparseaccel::v1::DecodeService::NewStub(
      grpc::CreateChannel(absl::GetFlag(FLAGS_server), *credentials));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(absl::GetFlag(FLAGS_timeout_seconds)));
  auto reader = stub->Generate(&context, request);
  sparseaccel::v1::GenerateResponse response;
  std::printf(text_prompt ? "text: " : "tokens:");
  while (reader->Read(&response)) {
    if (response.has_token()) {
      if (text_prompt) {
        std::printf("%s", response.token().text().c_str());
      } else {
        std::printf(" %d", response.token().token_id());
      }
      std::fflush(stdout);
    } else if (response.has_result()) {
      const auto& r = response.result();
      std::printf(
          "\nfinish=%s prompt_tokens=%d completion_tokens=%d ttft_ms=%.2f "
          "mean_itl_ms=%.2f prefill_ms=%.2f kv_transfer_ms=%.2f kv_bytes=%lld "
          "total_ms=%.2f\n",
          sparseaccel::v1::FinishReason_Name(r.finish_reason()).c_str(), r.prompt_tokens(),
          r.completion_tokens(), 1e3 * r.time_to_first_token_seconds(),
          1e3 * r.mean_inter_token_latency_seconds(), 1e3 * r.prefill_seconds(),
          1e3 * r.kv_transfer_seconds(), static_cast<long long>(r.kv_transfer_bytes()),
          1e3 * r.total_seconds());
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) {
    std::fprintf(stderr, "\nGenerate failed: %d %s\n", status.error_code(),
                 status.error_message().c_str());
    return 1;
  }
  return 0;
}
