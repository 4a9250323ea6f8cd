// Requests sent the way Kibana's OpenAI connector (provider "Other") sends them: axios with a
// custom CA through an https.Agent, `Authorization: Bearer`, JSON bodies; the stream read
// with `responseType: 'stream'` and parsed the way Kibana's parser does (only `data: ` lines,
// one JSON per line, `choices[0]` of every chunk).
//
//   node kibana_connector.js MODE   with MODE = test | stream
//   env: E2E_URL (https://host:port), E2E_TOKEN, E2E_CA (PEM file), E2E_MODEL
// Prints one JSON object on stdout; exits non-zero on anything Kibana would reject.
'use strict';
const fs = require('fs');
const https = require('https');
const axios = require('axios');

const { E2E_URL, E2E_TOKEN, E2E_CA, E2E_MODEL } = process.env;
const mode = process.argv[2];
// Kibana: xpack.actions.customHostSettings[].ssl.certificateAuthoritiesFiles -> https.Agent.
const httpsAgent = new https.Agent({ ca: fs.readFileSync(E2E_CA), keepAlive: true });
const client = axios.create({
  httpsAgent,
  proxy: false,
  headers: { Authorization: `Bearer ${E2E_TOKEN}`, 'content-type': 'application/json' },
  timeout: 60000,
});
const url = `${E2E_URL}/v1/chat/completions`;

function fail(message) {
  process.stderr.write(`${message}\n`);
  process.exit(1);
}

// Kibana's RunActionResponseSchema: what "Response validation failed" checks.
function validateRun(data) {
  if (!Array.isArray(data.choices) || data.choices.length === 0) fail('no choices');
  for (const choice of data.choices) {
    if (typeof choice.message?.role !== 'string') fail('choices[].message.role missing');
  }
  const usage = data.usage;
  for (const key of ['prompt_tokens', 'completion_tokens', 'total_tokens']) {
    if (typeof usage?.[key] !== 'number') fail(`usage.${key} missing`);
  }
}

// Kibana's parser: keep `data: ` lines, drop [DONE], JSON per line, choices[0] per chunk.
function parseStream(body) {
  const chunks = body
    .split('\n')
    .filter((line) => line.startsWith('data: ') && !line.endsWith('[DONE]'))
    .map((line) => JSON.parse(line.replace('data: ', '')));
  let text = '';
  for (const chunk of chunks) {
    const delta = chunk.choices[0].delta; // throws on a usage-only chunk, as Kibana does
    text += delta.content || '';
  }
  return { chunks, text };
}

async function connectorTest() {
  // The connector's "test" action: exactly this body.
  const body = { model: E2E_MODEL, messages: [{ role: 'user', content: 'Hello world' }], stream: false };
  const response = await client.post(url, body);
  validateRun(response.data);
  return { status: response.status, role: response.data.choices[0].message.role,
           usage: response.data.usage };
}

async function stream() {
  const body = {
    model: E2E_MODEL, stream: true, max_tokens: 64, temperature: 0.2,
    messages: [{ role: 'system', content: 'You are a helpful assistant.' },
               { role: 'user', content: 'Summarise the last alerts' }],
  };
  const t0 = process.hrtime.bigint();
  const ms = () => Number(process.hrtime.bigint() - t0) / 1e6;
  const response = await client.post(url, body, { responseType: 'stream' });
  let raw = '';
  let firstMs = null;
  let lastMs = null;
  for await (const piece of response.data) {
    raw += piece.toString();
    if (firstMs === null) firstMs = ms();
    lastMs = ms();
  }
  const { chunks, text } = parseStream(raw);
  return { status: response.status, contentType: response.headers['content-type'],
           chunks: chunks.length, text, done: raw.trimEnd().endsWith('data: [DONE]'),
           finishReason: chunks[chunks.length - 1].choices[0].finish_reason, firstMs, lastMs };
}

const modes = { test: connectorTest, stream };
if (!modes[mode]) fail(`unknown mode ${mode}; use ${Object.keys(modes).join(' | ')}`);
modes[mode]()
  .then((result) => process.stdout.write(`${JSON.stringify(result)}\n`))
  .catch((error) => fail(`${error.message} ${JSON.stringify(error.response?.data ?? '')}`));
