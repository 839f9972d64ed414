// The official openai-node SDK calling the gateway, as a browser-less Node app would.
// Usage: node calls.mjs BASE_URL KEY CALL...; prints one JSON line per call: what the SDK returned
// (or the error it raised), for tests/gateway/test_node_sdk.py to check.
import OpenAI from "openai";

const [baseURL, apiKey, ...calls] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });
const messages = [{ role: "user", content: "hi from node" }];

async function streamed(stream, pick) {
  let text = "";
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks += 1;
    text += pick(chunk);
    usage = chunk.usage ?? usage;
  }
  return { text, usage, chunks };
}

const CALLS = {
  chat: async () => {
    const r = await client.chat.completions.create({ model: "chat", messages, max_tokens: 3 });
    return { text: r.choices[0].message.content, usage: r.usage };
  },
  "chat-stream": async () => streamed(
    await client.chat.completions.create({ model: "chat", messages, max_tokens: 3, stream: true,
                                          stream_options: { include_usage: true } }),
    (c) => c.choices[0]?.delta?.content ?? ""),
  completion: async () => {
    const r = await client.completions.create({ model: "chat", prompt: "node says", max_tokens: 3 });
    return { text: r.choices[0].text, usage: r.usage };
  },
  "completion-stream": async () => streamed(
    await client.completions.create({ model: "chat", prompt: "node says", max_tokens: 3, stream: true,
                                     stream_options: { include_usage: true } }),
    (c) => c.choices[0]?.text ?? ""),
  embedding: async () => {
    const r = await client.embeddings.create({ model: "embed", input: ["a", "b"] });
    return { count: r.data.length, usage: r.usage };
  },
  response: async () => {
    const r = await client.responses.create({ model: "chat", input: "hi from node", max_output_tokens: 3 });
    return { text: r.output_text, usage: r.usage, status: r.status };
  },
  "response-stream": async () => {
    const stream = await client.responses.create({ model: "chat", input: "hi from node", max_output_tokens: 3,
                                                   stream: true });
    let text = "";
    let usage = null;
    const types = new Set();
    for await (const event of stream) {
      types.add(event.type);
      if (event.type === "response.output_text.delta") text += event.delta;
      if (event.type === "response.completed" || event.type === "response.incomplete") usage = event.response.usage;
    }
    return { text, usage, types: [...types] };
  },
  models: async () => {
    const ids = [];
    for await (const model of client.models.list()) ids.push(model.id);
    return { ids };
  },
};

for (const name of calls) {
  try {
    const result = await CALLS[name]();
    console.log(JSON.stringify({ call: name, ok: true, ...result }));
  } catch (e) {
    console.log(JSON.stringify({ call: name, ok: false, error: e.constructor.name, status: e.status ?? null,
                                 code: e.code ?? null, requestId: e.requestID ?? null,
                                 retryAfter: e.headers?.get?.("retry-after") ?? null,
                                 message: String(e.message) }));
  }
}
