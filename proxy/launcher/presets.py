"""Model-family flag sets for vLLM, and the merge of `extra_args` over them.

The seed document hand-types the Mistral flags; a preset names such a set once so that the
configuration says `preset = "mistral"` and the reader still sees every flag in
`airgate launch --print`. `extra_args` is applied last and *replaces* a flag the preset (or the
launcher) already gave, instead of repeating it: vLLM's argparse keeps the last of two repeated
options silently, and a command line with `--tool-call-parser` twice misleads whoever reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

PRESETS: dict[str, tuple[str, ...]] = {
    # From the seed (Mistral Small 3.x model cards).
    "mistral": (
        "--tool-call-parser", "mistral",
        "--tokenizer-mode", "mistral",
        "--config-format", "mistral",
        "--load-format", "mistral",
        "--enable-auto-tool-choice",
    ),
    # Llama 3.1/3.2/3.3 instruct: JSON-style tool calls.
    "llama3": ("--tool-call-parser", "llama3_json", "--enable-auto-tool-choice"),
    # Qwen 2.5/3 and Hermes-style <tool_call> tags.
    "hermes": ("--tool-call-parser", "hermes", "--enable-auto-tool-choice"),
    "none": (),
    "": (),
}


def preset_flags(name: str) -> tuple[str, ...]:
    """The flags of preset `name`; a ValueError names the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(repr(key) for key in PRESETS if key)
        raise ValueError(
            f"launcher.preset {name!r} is unknown: use one of {known}, or \"\" and put the "
            f"flags in launcher.extra_args"
        ) from None


def split_options(args: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Group a vLLM argument list into (option name, tokens) pairs.

    An option is a token starting with `--`; the tokens up to the next option are its values.
    `--name=value` is one token whose name is `--name`. Leading tokens that belong to no option
    (a positional model name) are grouped under the name "".
    """
    groups: list[tuple[str, list[str]]] = []
    for token in args:
        if token.startswith("--") and len(token) > 2:
            groups.append((token.partition("=")[0], [token]))
        elif groups:
            groups[-1][1].append(token)
        else:
            groups.append(("", [token]))
    return groups


def _negated(name: str) -> str:
    # vLLM's boolean flags come in pairs (--enable-prefix-caching / --no-enable-prefix-caching);
    # giving one of the pair in extra_args must drop the other from the preset.
    return "--" + name[5:] if name.startswith("--no-") else "--no-" + name[2:]


def merge_args(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """`base` with `extra` applied: an option in `extra` takes the place of the same option (or
    its `--no-` twin) in `base`; the others are appended. The result still reads like the seed."""
    replacements: dict[str, list[str]] = {}
    appended: list[list[str]] = []
    for name, tokens in split_options(extra):
        if name:
            replacements[name] = replacements[_negated(name)] = tokens
        appended.append(tokens)
    merged: list[str] = []
    used: list[list[str]] = []
    for name, tokens in split_options(base):
        replacement = replacements.get(name)
        if replacement is None:
            merged.extend(tokens)
        elif not any(replacement is done for done in used):
            merged.extend(replacement)
            used.append(replacement)
    for tokens in appended:
        if not any(tokens is done for done in used):
            merged.extend(tokens)
    return merged
