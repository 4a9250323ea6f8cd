// The `openai` npm package as Kibana's Security Assistant builds it: baseURL, apiKey, and an
// https.Agent carrying the custom CA.
//   node openai_sdk.js MODE   with MODE = chat | stream
//   env: E2E_URL, E2E_TOKEN, E2E_CA, E2E_MODEL.  Prints one JSON object on stdout.
'use strict';
const fs = require('fs');
const https = require('https');
const OpenAI = require('openai');

const { E2E_URL, E2E_TOKEN, E2E_CA, E2E_MODEL } = process.env;
const openai = new OpenAI({
  apiKey: E2E_TOKEN,
  baseURL: `${E2E_URL}/v1`,
  httpAgent: new https.Agent({ ca: fs.readFileSync(E2E_CA) }),
  maxRetries: 0,
});
const messages = [{ role: 'user', content: 'Hello world' }];

async function chat() {
  const completion = await openai.chat.completions.create({ model: E2E_MODEL, messages, max_tokens: 16 });
  return { role: completion.choices[0].message.role, content: completion.choices[0].message.content,
           usage: completion.usage };
}

async function stream() {
  const events = await openai.chat.completions.create({ model: E2E_MODEL, messages, max_tokens: 16, stream: true });
  let text = '';
  let chunks = 0;
  let finishReason = null;
  for await (const chunk of events) {
    chunks += 1;
    text += chunk.choices[0].delta.content || '';
    finishReason = chunk.choices[0].finish_reason || finishReason;
  }
  return { chunks, text, finishReason };
}

const modes = { chat, stream };
if (!modes[process.argv[2]]) {
  process.stderr.write(`unknown mode ${process.argv[2]}\n`);
  process.exit(2);
}
modes[process.argv[2]]()
  .then((result) => process.stdout.write(`${JSON.stringify(result)}\n`))
  .catch((error) => { process.stderr.write(`${error.status ?? ''} ${error.message}\n`); process.exit(1); });
