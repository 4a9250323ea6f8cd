"""The few places airgate looks inside bodies, all optional and all bounded.

- Request bodies (chat/completions, up to REWRITE_LIMIT): a request naming `[upstream]
  model_alias` is pointed at the model vLLM serves; a streamed request that did not ask for
  usage gets `stream_options.include_usage` so its tokens can be counted (`[metrics] usage`).
- Response bodies: usage, model and finish reason are read with anchored byte searches over the
  last bytes seen, not by parsing JSON; vLLM writes compact JSON, so a key such as
  `"prompt_tokens":` can only appear unescaped as a key, never inside a string value.
- The usage-only chunk that airgate asked for is cut out of the event stream before the client
  sees it: Kibana's stream parsers read `choices[0]` of every chunk and break on `choices: []`.
"""

from __future__ import annotations

import json
import re

from proxy.exchange import Exchange

REWRITE_LIMIT = 4 * 1024 * 1024    # bigger request bodies stream through untouched
USAGE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})

_PROMPT = re.compile(rb'"prompt_tokens":(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens":(\d+)')
_MODEL = re.compile(rb'"model":"([^"\\]{1,256})"')
_FINISH = re.compile(rb'"finish_reason":"([a-z_]{1,32})"')
USAGE_ONLY_MARK = b'"choices":[]'
# A `"stream"` key set to true: an unescaped `"stream"` followed by `:` can only be a key (in a
# string value the quotes are escaped), so this never misses a streamed request. A nested key
# of that name only costs a parse; the top-level value is checked after it.
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


def rewrite_request(body: bytes, *, want_usage: bool, alias: str,
                    served: str) -> tuple[bytes, bool, str]:
    """(body to send, whether airgate added include_usage, the model asked for)."""
    # Parse only when something may change: most requests (Kibana's non-streamed ones) are
    # passed untouched without a JSON parse, which cost ~5% of a short request's CPU.
    if not ((want_usage and _STREAM_TRUE.search(body)) or (alias and alias.encode() in body)):
        return body, False, ""
    try:
        request = json.loads(body)
    except ValueError:
        return body, False, ""  # vLLM answers bad JSON with its own 400
    if not isinstance(request, dict):
        return body, False, ""
    model = request.get("model")
    model = model if isinstance(model, str) else ""
    changed = added_usage = False
    if alias and model == alias and served:
        request["model"] = model = served
        changed = True
    if want_usage and request.get("stream") is True:
        options = request.get("stream_options")
        if options is None:
            request["stream_options"] = {"include_usage": True}
            changed = added_usage = True
        elif isinstance(options, dict) and not options.get("include_usage"):
            options["include_usage"] = True
            changed = added_usage = True
    if not changed:
        return body, False, model
    rewritten = json.dumps(request, separators=(",", ":"), ensure_ascii=False).encode()
    return rewritten, added_usage, model


def read_usage(data: bytes, ex: Exchange) -> None:
    """Fill the exchange's token counts, model and finish reason from the end of an answer."""
    at = data.rfind(b'"usage":{')
    if at >= 0:
        prompt = _PROMPT.search(data, at)
        completion = _COMPLETION.search(data, at)
        if prompt is not None:
            ex.prompt_tokens = int(prompt.group(1))
        if completion is not None:
            ex.completion_tokens = int(completion.group(1))
    if not ex.model:
        model = _MODEL.search(data)
        if model is not None:
            ex.model = model.group(1).decode()
    finish = data.rfind(b'"finish_reason":"')
    if finish >= 0:
        match = _FINISH.match(data, finish)
        if match is not None:
            ex.finish_reason = match.group(1).decode()


def cut_usage_event(events: bytes, ex: Exchange) -> bytes:
    """Remove the usage-only event (`"choices":[]`) from whole SSE events, reading it first."""
    mark = events.find(USAGE_ONLY_MARK)
    if mark < 0:
        return events
    start = events.rfind(b"\n\n", 0, mark)
    start = 0 if start < 0 else start + 2
    stop = events.find(b"\n\n", mark)
    stop = len(events) if stop < 0 else stop + 2
    read_usage(events[start:stop], ex)
    return events[:start] + events[stop:]


def models_with_alias(body: bytes, alias: str) -> bytes:
    """vLLM's /v1/models answer with the alias listed too, as a copy of the served model."""
    try:
        listing = json.loads(body)
        models = listing["data"]
        if models and not any(m.get("id") == alias for m in models):
            models.append({**models[0], "id": alias})
    except (ValueError, KeyError, TypeError, AttributeError):
        return body
    return json.dumps(listing, separators=(",", ":")).encode()
