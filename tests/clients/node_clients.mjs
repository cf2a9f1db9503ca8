// Drives the Node `ollama` and `openai` packages as their READMEs show, against the
// server at process.argv[2], with the picture at process.argv[3]; prints one JSON line
// of what each answered (tests/clients/test_node_clients.py reads it).
import { readFileSync } from "node:fs";
import { Ollama } from "ollama";
import OpenAI from "openai";

const [host, picturePath] = process.argv.slice(2);
const question = "What digit is this?";
const picture = readFileSync(picturePath).toString("base64");
const out = {};

const ollama = new Ollama({ host });
const message = { role: "user", content: question, images: [picture] };
const whole = await ollama.chat({ model: "demo", messages: [message], options: { temperature: 0 } });
out.ollama_chat = whole.message.content;
let streamed = "";
let last = null;
for await (const part of await ollama.chat({
  model: "demo", messages: [message], options: { temperature: 0 }, stream: true,
})) {
  streamed += part.message.content;
  last = part;
}
out.ollama_stream = streamed;
out.ollama_eval_count = last.eval_count;
const generated = await ollama.generate({
  model: "demo", prompt: question, images: [picture], options: { temperature: 0 },
});
out.ollama_generate = generated.response;

const openai = new OpenAI({ baseURL: `${host}/v1`, apiKey: "none", maxRetries: 0 });
const content = [
  { type: "text", text: question },
  { type: "image_url", image_url: { url: `data:image/png;base64,${picture}` } },
];
const completion = await openai.chat.completions.create({
  model: "demo", messages: [{ role: "user", content }], temperature: 0,
});
out.openai_chat = completion.choices[0].message.content;
const stream = await openai.chat.completions.create({
  model: "demo", messages: [{ role: "user", content }], temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}
out.openai_stream = text;
out.openai_completion_tokens = usage?.completion_tokens ?? null;
console.log(JSON.stringify(out));
