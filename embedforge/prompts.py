"""Prompt templates: load and validate strictly, render to chat messages, hash.

A prompt is a TOML file with `system` (instructions), `user` (a `string.Template` that must
use `$passage` and may use `$title`, `$n` and `$delimiter`) and optional `[[examples]]`
(`passage` + `answer`), which become few-shot chat turns: small local models follow a shown
answer far better than a described one. Instructions live only in the system message; the
passage goes in the user message between random per-run delimiters.
"""

from __future__ import annotations

import string
import tomllib
from dataclasses import dataclass
from pathlib import Path

from embedforge.errors import EmbedforgeError
from embedforge.files import sha256_file

ALLOWED_KEYS = {"description", "system", "user", "examples"}
ALLOWED_VARIABLES = {"passage", "title", "n", "delimiter"}
REQUIRED_VARIABLES = {"passage"}


@dataclass(frozen=True)
class Prompt:
    path: Path
    sha256: str
    system: str
    user: str
    examples: tuple[tuple[str, str], ...]


def template_variables(template: str) -> set[str]:
    names = set()
    for match in string.Template.pattern.finditer(template):
        name = match.group("named") or match.group("braced")
        if name:
            names.add(name)
        elif match.group("invalid") is not None:
            raise ValueError(f"a stray '$' at offset {match.start('invalid')} (write $$ for a literal dollar)")
    return names


def load_prompt(path: Path) -> Prompt:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise EmbedforgeError("Prompt file not found", where=str(path), fix="check --prompt, or copy one from prompts/") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise EmbedforgeError(f"The prompt file is not valid TOML ({error})", where=str(path), fix="fix its syntax") from error
    unknown = set(data) - ALLOWED_KEYS
    if unknown:
        raise EmbedforgeError(f"Unknown keys in prompt: {', '.join(sorted(unknown))}", where=str(path), fix=f"use only {', '.join(sorted(ALLOWED_KEYS))}")
    for key in ("system", "user"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise EmbedforgeError(f"The prompt needs a non-empty `{key}` string", where=str(path), fix=f"add `{key} = \"...\"`")
    for key in ("system", "user"):
        try:
            used = template_variables(data[key])
        except ValueError as error:
            raise EmbedforgeError(f"Bad template in `{key}`: {error}", where=str(path), fix="escape literal dollars as $$") from error
        unknown_variables = used - ALLOWED_VARIABLES
        if unknown_variables:
            raise EmbedforgeError(
                f"Unknown variables in `{key}`: {', '.join('$' + v for v in sorted(unknown_variables))}",
                where=str(path),
                fix=f"use only {', '.join('$' + v for v in sorted(ALLOWED_VARIABLES))}",
            )
    missing = REQUIRED_VARIABLES - template_variables(data["user"])
    if missing:
        raise EmbedforgeError(
            f"Missing variables: {', '.join('$' + v for v in sorted(missing))}", where=f"{path}, `user`", fix="put $passage where the passage goes"
        )
    examples = []
    for index, example in enumerate(data.get("examples", [])):
        if not isinstance(example, dict) or set(example) != {"passage", "answer"}:
            raise EmbedforgeError(
                "Each [[examples]] entry needs exactly `passage` and `answer`", where=f"{path}, example {index + 1}", fix="fix that entry"
            )
        examples.append((str(example["passage"]), str(example["answer"])))
    return Prompt(path=path, sha256=sha256_file(path), system=data["system"], user=data["user"], examples=tuple(examples))


CHARACTERS_PER_TOKEN = 4  # the usual rule of thumb for English BPE tokenizers: no tokenizer of the endpoint is at hand


def clip_passage(text: str, max_tokens: int) -> str:
    """The passage cut at a word boundary to about `max_tokens` tokens, for the prompt only (the
    stored passage is unchanged): one 200,000-character record must not exceed the LLM's context."""
    limit = max_tokens * CHARACTERS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind(" ")] if " " in cut[limit // 2 :] else cut


def render_messages(prompt: Prompt, passage: str, title: str, n: int, delimiter: str, user_queries: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Chat messages for one passage: system instructions, few-shot turns, then the passage.

    `user_queries` (real queries from the users of this collection) are shown for style only.
    """
    values = {"n": str(n), "delimiter": delimiter, "title": title}
    system = string.Template(prompt.system).substitute(values, passage="")
    if user_queries:
        system += "\n\nReal queries from users of this collection, for style only:\n" + "\n".join(f"- {q}" for q in user_queries)
    messages = [{"role": "system", "content": system}]
    for example_passage, answer in prompt.examples:
        messages.append({"role": "user", "content": string.Template(prompt.user).substitute(values, passage=example_passage, title="")})
        messages.append({"role": "assistant", "content": answer})
    # The passage is data, never instructions: strip any delimiter it contains so it cannot close the block early.
    safe_passage = passage.replace(delimiter, "")
    messages.append({"role": "user", "content": string.Template(prompt.user).substitute(values, passage=safe_passage)})
    return messages
