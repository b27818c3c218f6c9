// Prints the ids the services' tokenizer gives a text, comma-separated on one line, so a
// tokenizer.json written elsewhere (bench/retrieval/passkey.py) can be checked against the
// encoder it is meant to reproduce.
//   encode_text MODEL_DIR < prompt.txt

#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_join.h"
#include "model/text/tokenizer.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR < text\n", argv[0]);
    return 2;
  }
  absl::StatusOr<std::unique_ptr<sparseaccel::Tokenizer>> tokenizer =
      sparseaccel::Tokenizer::Load(argv[1]);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "%s\n", tokenizer.status().ToString().c_str());
    return 1;
  }
  const std::string text((std::istreambuf_iterator<char>(std::cin)),
                         std::istreambuf_iterator<char>());
  const std::vector<int32_t> ids = (*tokenizer)->Encode(text);
  sparseaccel::DecodeOptions plain;
  plain.skip_special_tokens = true;
  plain.clean_up_tokenization_spaces = sparseaccel::DecodeOptions::CleanUp::kOff;
  absl::StatusOr<std::string> decoded = (*tokenizer)->Decode(ids, plain);
  if (!decoded.ok() || *decoded != text) {
    std::fprintf(stderr, "decoding the ids does not give the text back\n");
    return 1;
  }
  std::printf("%s\n", absl::StrJoin(ids, ",").c_str());
  std::fprintf(stderr, "vocab_size=%d bos=%d eos=%d\n", (*tokenizer)->vocab_size(),
               (*tokenizer)->bos_token_id(), (*tokenizer)->eos_token_id());
  return 0;
}
