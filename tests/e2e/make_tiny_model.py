#!/usr/bin/env python3
"""Build a tiny model that real `vllm serve` can load, fully offline.

A randomly initialised Llama (~0.5 M parameters) and a byte-level BPE tokenizer trained here
on an embedded corpus, with a ChatML/Hermes chat template that renders `tools`.  Its text is
gibberish by design; what matters is that vLLM's own server, wire format, tool parser and
metrics run for real.

    python make_tiny_model.py OUT_DIR [--force]

Deterministic (fixed seeds) and idempotent: a complete OUT_DIR is left alone unless --force.
Run it with the vLLM venv's Python (it needs torch, tokenizers and transformers).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Hermes tool tags are added tokens but not special ones, so they survive
# skip_special_tokens detokenisation and vLLM's hermes parser can see them.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

WORDS = """the a an of to and in is it that for on with as was by at be this from or are not
have has had but which you were they their one all would there can will what when who more out
up so about into than them some could time only other then these two may first way like use
water long little very after words called just where most know get through back much before go
good new write our used me man too any day same right look think also around another came come
work three word must because does part even place well such here take why help put different
away again off went old number great tell men say small every found still between name should
home big give air line set own under read last never us left end along while might next sound
below saw something thought both few those always show large often together asked house world
going want school important until form food keep children feet land side without boy once
animal life enough took four head above kind began almost live page got earth need far hand
high year mother light country father let night picture being study second soon story since
white ever paper hard near sentence better best across during today however sure knew try told
young sun thing whole hear example heard several change answer room sea against top turned
learn point city play toward five himself usually money seen car morning body upon family later
turn move face door cut done group true leave proxy server model token stream request response
hello world weather Paris London Tokyo function call tool json api key chat completion
assistant user system""".split()

# ChatML with a Hermes-style tools block (as Qwen2.5 / Hermes models render it).
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for tc in message.tool_calls %}"
    "{%- if tc.function is defined %}{%- set tc = tc.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tc.name + '\", \"arguments\": ' }}"
    "{%- if tc.arguments is string %}{{- tc.arguments }}"
    "{%- else %}{{- tc.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content']"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if message['content'] is string %}{%- set c = message['content'] %}"
    "{%- else %}{%- set c = message['content'] | map(attribute='text') | select('defined')"
    " | join('') %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + c + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus(rng: random.Random) -> list[str]:
    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        words[0] = words[0].capitalize()
        text = " ".join(words) + rng.choice(".,?!")
        return text + (f" {rng.randint(0, 10000)}" if rng.random() < 0.1 else "")

    lines = [" ".join(sentence() for _ in range(5)) for _ in range(3000)]
    # JSON punctuation must tokenise compactly: structured (tool) output is JSON.
    lines += ['{"name": "get_weather", "arguments": {"city": "Paris"}}',
              "def f(x):\n    return x + 1\n", "0123456789 +-*/=()[]{}<>\"'`~@#$%^&|\\_"]
    return lines


def build(out: Path) -> None:
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    rng = random.Random(1234)
    torch.manual_seed(1234)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(rng), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=["<|im_start|>"], model_max_length=2048,
        clean_up_tokenization_spaces=False)
    hf_tok.chat_template = CHAT_TEMPLATE
    vocab = len(hf_tok)

    # The model may only emit tokens that decode alone to printable ASCII: no partial
    # UTF-8 bytes, no EOS, no tool tags.  So plain generation always runs to max_tokens
    # (tests can predict chunk and token counts), while structured output (named tool
    # choice), whose grammar masks everything but EOS at the end, still terminates.
    def emittable(i: int) -> bool:
        s = hf_tok.decode([i])
        return bool(s) and all(32 <= ord(ch) < 127 for ch in s)

    allowed = torch.tensor([emittable(i) for i in range(vocab)])
    for t in SPECIAL + TOOL_TOKENS:
        allowed[hf_tok.convert_tokens_to_ids(t)] = False

    ids = {t: hf_tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32: supported by vLLM's CPU attention
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
        # Llama's lm_head has no bias, so make one: hidden channel 0 is +8 in every
        # embedding and no layer writes to it (zero rows in o_proj/down_proj), hence it
        # stays > 0 after the final norm, and lm_head column 0 works as a per-token bias.
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, 1.0)
        emb[:, 0] = 8.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        lm = model.lm_head.weight
        lm.normal_(0.0, 0.25)
        lm[:, 0] = 0.0
        lm[~allowed, 0] = -1000.0
        # Self-check: sampling must never pick a masked token.
        seq = torch.tensor([hf_tok("Hello there, how are you?")["input_ids"]])
        for _ in range(64):
            nxt = torch.multinomial(torch.softmax(model(seq).logits[0, -1], -1), 1)
            assert allowed[nxt], f"sampled masked token {int(nxt)}"
            seq = torch.cat([seq, nxt[None]], 1)

    # Write into a temp dir beside OUT and rename: a crash never leaves a half model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tinymodel-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    hf_tok.save_pretrained(tmp)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(tmp)
    (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    tmp.chmod(0o755)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)

    check = PreTrainedTokenizerFast.from_pretrained(out)
    prompt = check.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                       add_generation_prompt=True)
    assert check.decode(check(prompt)["input_ids"]) == prompt
    info = {"out": str(out), "vocab": vocab, "emittable": int(allowed.sum()),
            "params": sum(p.numel() for p in model.parameters()),
            "sample": hf_tok.decode(seq[0])[:80]}
    print(f"[make_tiny_model] {json.dumps(info)}")


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--force"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(args[0]).resolve()
    if "--force" not in argv and all((out / f).exists() for f in REQUIRED):
        print(f"[make_tiny_model] {out} already complete", file=sys.stderr)
        return 0
    build(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
