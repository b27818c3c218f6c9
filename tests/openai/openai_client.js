#!/usr/bin/env node
// The official openai npm client (package-lock.json pins it) against the decode service's
// OpenAI-compatible HTTP API; tests/openai_api_test.py starts the services and runs this.
//
//   node tests/openai/openai_client.js --base_url http://127.0.0.1:8000/v1 --model tiny \
//       --prompt "The capital of France is" --max_tokens 12
//
// Checks text completions and chat, whole and streamed (the same greedy text both ways, usage
// in the last chunk with stream_options.include_usage), stop strings (a string and an array),
// seeds, the model list, and that bad requests raise the client's error classes with the right
// status. Then starts a long stream and leaves it after two chunks (the service must cancel
// it). Prints one JSON line {completion, chat, abandoned_id} for the Python side, which compares
// `completion` with the gRPC client's text. Exits 1 listing what failed.
"use strict";

const {OpenAI, BadRequestError, NotFoundError} = require("openai");

function parseFlags(argv) {
  const flags = {max_tokens: "12"};
  for (let i = 0; i < argv.length; i += 2) {
    const match = /^--([a-z_]+)$/.exec(argv[i]);
    if (!match || i + 1 >= argv.length) throw new Error(`unexpected argument ${argv[i]}`);
    flags[match[1]] = argv[i + 1];
  }
  for (const name of ["base_url", "model", "prompt"]) {
    if (flags[name] === undefined) throw new Error(`--${name} is required`);
  }
  return flags;
}

const failures = [];
function check(condition, what) {
  if (!condition) failures.push(what);
  return condition;
}

function checkUsage(usage, maxTokens, what) {
  check(usage && usage.prompt_tokens > 0 && usage.completion_tokens === maxTokens &&
            usage.total_tokens === usage.prompt_tokens + usage.completion_tokens,
        `${what}: usage ${JSON.stringify(usage)}`);
}

// Reads a stream to its end: the text, the finish reason, the usage chunk's usage, and the chunks.
async function drain(stream, textOf) {
  let text = "", finish = null, usage = null;
  const chunks = [];
  for await (const chunk of stream) {
    chunks.push(chunk);
    for (const choice of chunk.choices) {
      text += textOf(choice) || "";
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  return {text, finish, usage, chunks};
}

async function checkCompletions(client, flags, maxTokens) {
  const request = {model: flags.model, prompt: flags.prompt, max_tokens: maxTokens, temperature: 0};
  const whole = await client.completions.create(request);
  check(whole.object === "text_completion" && whole.id.startsWith("cmpl-") &&
            whole.model === flags.model && whole.choices.length === 1,
        `completion shape: ${JSON.stringify(whole)}`);
  const text = whole.choices[0].text;
  check(whole.choices[0].finish_reason === "length", "completion finish_reason");
  checkUsage(whole.usage, maxTokens, "completion");
  const streamed = await drain(await client.completions.create(
      {...request, stream: true, stream_options: {include_usage: true}}), (c) => c.text);
  check(streamed.text === text, `streamed completion ${JSON.stringify(streamed.text)} != ` +
                                    `${JSON.stringify(text)}`);
  check(streamed.finish === "length", "streamed completion finish_reason");
  checkUsage(streamed.usage, maxTokens, "streamed completion");
  check(JSON.stringify(streamed.usage) === JSON.stringify(whole.usage), "streamed usage differs");
  const last = streamed.chunks[streamed.chunks.length - 1];
  check(last.choices.length === 0 && last.usage, "the usage chunk is not the last one");
  return text;
}

async function checkChat(client, flags, maxTokens) {
  const request = {model: flags.model, max_tokens: maxTokens, temperature: 0, messages: [
    {role: "system", content: "You are terse."}, {role: "user", content: flags.prompt}]};
  const whole = await client.chat.completions.create(request);
  check(whole.object === "chat.completion" && whole.id.startsWith("chatcmpl-") &&
            whole.choices[0].message.role === "assistant",
        `chat shape: ${JSON.stringify(whole)}`);
  const text = whole.choices[0].message.content;
  check(whole.choices[0].finish_reason === "length", "chat finish_reason");
  checkUsage(whole.usage, maxTokens, "chat");
  const streamed = await drain(await client.chat.completions.create(
      {...request, stream: true, stream_options: {include_usage: true}}), (c) => c.delta.content);
  check(streamed.text === text,
        `streamed chat ${JSON.stringify(streamed.text)} != ${JSON.stringify(text)}`);
  check(streamed.chunks[0].object === "chat.completion.chunk" &&
            streamed.chunks[0].choices[0].delta.role === "assistant",
        "the first chat chunk does not carry the assistant role");
  checkUsage(streamed.usage, maxTokens, "streamed chat");
  // The official client's helper that assembles a stream into a message.
  const final = await client.chat.completions.stream(request).finalChatCompletion();
  check(final.choices[0].message.content === text, "chat.completions.stream() text differs");
  return text;
}

// Stop strings, as an array (whole) and as a string (streamed): the text ends before the
// first occurrence, finish_reason "stop".
async function checkStop(client, flags, text, maxTokens) {
  const chars = Array.from(text);
  if (!check(chars.length >= 4, `greedy text too short for a stop string: ${text}`)) return;
  const stop = chars.slice(Math.floor(chars.length / 2), Math.floor(chars.length / 2) + 2).join("");
  const expected = text.slice(0, text.indexOf(stop));
  const request = {model: flags.model, prompt: flags.prompt, max_tokens: maxTokens, temperature: 0};
  const whole = await client.completions.create({...request, stop: ["\u0001never", stop]});
  check(whole.choices[0].text === expected && whole.choices[0].finish_reason === "stop",
        `stop array ${JSON.stringify(stop)}: ${JSON.stringify(whole.choices[0])}`);
  const streamed = await drain(await client.completions.create({...request, stop, stream: true}),
                               (c) => c.text);
  check(streamed.text === expected && streamed.finish === "stop",
        `stop string ${JSON.stringify(stop)}: ${JSON.stringify(streamed.text)} ${streamed.finish}`);
}

async function checkSeeds(client, flags) {
  const request = {model: flags.model, prompt: flags.prompt, max_tokens: 8, temperature: 1};
  const texts = [];
  for (const seed of [7, 7, undefined, undefined]) {
    texts.push((await client.completions.create({...request, seed})).choices[0].text);
  }
  check(texts[0] === texts[1], "the same seed gave different texts");
  check(texts[2] !== texts[3], "two unseeded sampled requests gave the same text");
}

async function checkModels(client, flags) {
  const models = [];
  for await (const model of client.models.list()) models.push(model.id);
  check(JSON.stringify(models) === JSON.stringify([flags.model]), `models: ${models}`);
  check((await client.models.retrieve(flags.model)).id === flags.model, "models.retrieve");
}

// Each bad request must reject with `errorClass` and `status`.
async function checkErrors(client, flags) {
  const messages = [{role: "user", content: "hi"}];
  const base = {model: flags.model, prompt: "hi", max_tokens: 4};
  const cases = [
    ["max_tokens 0", () => client.completions.create({...base, max_tokens: 0}),
     BadRequestError, 400],
    ["max_tokens over the server's limit",
     () => client.completions.create({...base, max_tokens: 1000000}), BadRequestError, 400],
    ["max_tokens not an integer", () => client.completions.create({...base, max_tokens: "4"}),
     BadRequestError, 400],
    ["temperature of the wrong type",
     () => client.completions.create({...base, temperature: "hot"}), BadRequestError, 400],
    ["no prompt", () => client.completions.create({model: flags.model}), BadRequestError, 400],
    ["two prompts", () => client.completions.create({...base, prompt: ["a", "b"]}),
     BadRequestError, 400],
    ["stop of the wrong type", () => client.completions.create({...base, stop: 5}),
     BadRequestError, 400],
    ["n 2", () => client.completions.create({...base, n: 2}), BadRequestError, 400],
    ["unknown model", () => client.completions.create({...base, model: "no-such-model"}),
     NotFoundError, 404],
    ["streamed, max_tokens 0",
     () => client.completions.create({...base, max_tokens: 0, stream: true}), BadRequestError, 400],
    ["no messages", () => client.chat.completions.create({model: flags.model, messages: []}),
     BadRequestError, 400],
    ["unknown chat role", () => client.chat.completions.create(
         {model: flags.model, messages: [{role: "wizard", content: "hi"}]}), BadRequestError, 400],
    ["chat, unknown model",
     () => client.chat.completions.create({model: "gpt-4o", messages, stream: true}),
     NotFoundError, 404],
    ["chat, top_p out of range",
     () => client.chat.completions.create({model: flags.model, messages, top_p: 3}),
     BadRequestError, 400],
    ["retrieve an unknown model", () => client.models.retrieve("no-such-model"),
     NotFoundError, 404],
  ];
  for (const [what, call, errorClass, status] of cases) {
    try {
      await call();
      failures.push(`${what}: no error`);
    } catch (error) {
      check(error instanceof errorClass && error.status === status && error.error &&
                typeof error.error.message === "string" && "type" in error.error &&
                "param" in error.error && "code" in error.error,
            `${what}: ${error.constructor.name} ${error.status} ${JSON.stringify(error.error)}`);
      if (errorClass === NotFoundError && what !== "retrieve an unknown model") {
        check(error.code === "model_not_found", `${what}: code ${error.code}`);
      }
    }
  }
}

// A long stream left after two chunks: leaving the loop aborts the HTTP request.
async function abandonStream(client, flags) {
  const stream = await client.completions.create(
      {model: flags.model, prompt: flags.prompt, max_tokens: 4000, temperature: 0, stream: true});
  let id = null, chunks = 0;
  for await (const chunk of stream) {
    id = chunk.id;
    if (++chunks === 2) break;
  }
  return id;
}

async function main() {
  const flags = parseFlags(process.argv.slice(2));
  const maxTokens = Number(flags.max_tokens);
  const client = new OpenAI({baseURL: flags.base_url, apiKey: "unused", maxRetries: 0,
                             timeout: 60000});
  await checkModels(client, flags);
  const completion = await checkCompletions(client, flags, maxTokens);
  const chat = await checkChat(client, flags, maxTokens);
  await checkStop(client, flags, completion, maxTokens);
  await checkSeeds(client, flags);
  await checkErrors(client, flags);
  const abandoned = await abandonStream(client, flags);
  console.log(JSON.stringify({completion, chat, abandoned_id: abandoned}));
  for (const failure of failures) console.error(`FAIL: ${failure}`);
  process.exit(failures.length ? 1 : 0);
}

main().catch((error) => {
  console.error(`openai client test: ${error.stack || error}`);
  process.exit(1);
});
