"""Passkey retrieval: the task shared by train_passkey.py and eval.py (standard library only).

A prompt is filler text with one needle holding a six-digit pass key at some depth, ending with
a question whose answer is the key. A model that solves it must attend from the last query to a
few keys anywhere in the context, which is exactly what a sparse attention pattern may drop, so
the exact-match rate over lengths and depths tells whether a pattern keeps what dense attention
finds.

Tokenization is byte-level so the task needs no vocabulary download and a trained model stays
tiny: id = BOS followed by the UTF-8 bytes of the text. write_tokenizer() writes the same mapping
as a Hugging Face tokenizer.json that the services' C++ tokenizer loads.
"""

import json
import os
import random

BOS = 256
EOS = 257
VOCAB_SIZE = 264  # 258..263 are reserved padding, so the embedding rows are a multiple of 8.
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"

FILLER = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
# The question ends with the space before the key, so the key's first digit is the token the
# prefill computes (its last query, over the sparse attention under test); the later digits come
# from decode steps.
QUESTION = " What is the pass key? The pass key is "
ANSWER = "{key}"
ANSWER_TOKENS = 6

# The Llama 3 pre-tokenizer regex. The C++ tokenizer supports this family; with no merges the
# split does not change the ids, it only keeps the file in the supported subset.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| "
    r"?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def encode(text, add_bos=True):
    """Token ids of text: BOS (unless add_bos is false), then its UTF-8 bytes."""
    ids = list(text.encode("utf-8"))
    return [BOS] + ids if add_bos else ids


def decode(ids):
    """Text of ids, special and reserved ids left out (for printing what a model answered)."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def format_key(key):
    """The six digits of a key in 0..999999, zero-padded so every answer has the same length."""
    if not 0 <= key <= 999999:
        raise ValueError("pass key %d is outside 0..999999" % key)
    return "%06d" % key


def prompt_text(num_tokens, depth, key, rng):
    """The text of a prompt of exactly num_tokens ids (BOS included); see make_prompt."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth %r is outside [0, 1]" % depth)
    digits = format_key(key)
    needle = NEEDLE.format(key=digits)
    budget = num_tokens - 1 - len(needle) - len(QUESTION)
    if budget < 0:
        raise ValueError("%d tokens cannot hold the needle and the question (at least %d)" %
                         (num_tokens, num_tokens - budget))
    sentences = []
    length = 0
    while length < budget:
        sentences.append(rng.choice(FILLER))
        length += len(sentences[-1])
    filler = "".join(sentences)[:budget]  # The last sentence is cut to hit the length exactly.
    # Sentence boundaries inside the kept filler; the needle goes to the nearest to the depth.
    boundaries = [0]
    for sentence in sentences:
        if boundaries[-1] + len(sentence) > budget:
            break
        boundaries.append(boundaries[-1] + len(sentence))
    at = min(boundaries, key=lambda b: (abs(b - depth * budget), b))
    return filler[:at] + needle + filler[at:] + QUESTION


def make_prompt(num_tokens, depth, key, rng):
    """One passkey prompt and its answer.

    Args:
      num_tokens: length of the prompt in ids, BOS included.
      depth: where the needle goes, 0 (start) to 1 (just before the question), as a fraction
        of the filler; it is placed at the nearest sentence boundary.
      key: the pass key, an int in 0..999999.
      rng: a random.Random that draws the filler sentences.

    Returns:
      (ids, answer_ids): the prompt's ids (exactly num_tokens of them) and the ids of
      "NNNNNN" (six digits) without BOS, which a greedy model should generate next.
    """
    text = prompt_text(num_tokens, depth, key, rng)
    ids = encode(text)
    assert len(ids) == num_tokens, (len(ids), num_tokens)
    return ids, encode(ANSWER.format(key=format_key(key)), add_bos=False)


def eval_depths(count):
    """count depths spread evenly over [0.05, 0.95] (0.5 for a single prompt)."""
    if count == 1:
        return [0.5]
    return [0.05 + 0.9 * i / (count - 1) for i in range(count)]


def eval_prompts(num_tokens, count, seed):
    """A deterministic list of count (ids, answer_ids) at even depths with random keys.

    The same (num_tokens, count, seed) always gives the same prompts, so runs of eval.py and
    the held-out checks of train_passkey.py are comparable across machines and versions.
    """
    rng = random.Random("passkey-eval/%d/%d/%d" % (num_tokens, count, seed))
    prompts = []
    for depth in eval_depths(count):
        key = rng.randrange(1000000)
        prompts.append(make_prompt(num_tokens, depth, key, rng))
    return prompts


def _byte_level_alphabet():
    """GPT-2's byte-to-unicode table: the character that spells each byte in a vocabulary.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen)
    are moved to code points 256 and up, in byte order, so every token is visible text.
    """
    printable = (set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) |
                 set(range(0xAE, 0xFF + 1)))
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _added_token(token_id, content):
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def tokenizer_json():
    """The tokenizer.json object: byte-level BPE without merges, so each byte is one id."""
    alphabet = _byte_level_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    added = [_added_token(BOS, BOS_TOKEN), _added_token(EOS, EOS_TOKEN)]
    # The reserved ids get tokens too: a model can generate any id below VOCAB_SIZE, and the
    # decode service fails a request whose token has no text in the tokenizer.
    for i, token_id in enumerate(range(EOS + 1, VOCAB_SIZE)):
        added.append(_added_token(token_id, "<|reserved_special_token_%d|>" % i))
    bos_template = {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos_template, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos_template, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS_TOKEN, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [BOS], "tokens": [BOS_TOKEN]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def tokenizer_config_json():
    """tokenizer_config.json: BOS/EOS names; no chat template (prompts are plain text)."""
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer(directory):
    """Writes tokenizer.json and tokenizer_config.json into directory (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    for name, content in (("tokenizer.json", tokenizer_json()),
                          ("tokenizer_config.json", tokenizer_config_json())):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1, ensure_ascii=False)
            f.write("\n")


def main():
    """Prints passkey prompts as lines of token ids (pattern_search --prompt_file input)."""
    import argparse  # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tokens", type=int, required=True, help="prompt length in ids")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--seed", type=int, default=100,
                        help="eval.py uses seed 0; calibrate on others to keep its prompts held out")
    args = parser.parse_args()
    for ids, _ in eval_prompts(args.tokens, args.count, args.seed):
        print(" ".join(str(i) for i in ids))


if __name__ == "__main__":
    main()
