"""Prompt files and chat formatting.

Prompt files: ``.txt`` (one prompt per line; blank lines skipped) or ``.jsonl`` (one JSON object per line
with a ``"prompt"`` field). Formatting applies the tokenizer's chat template when it has one (a single user
turn plus the generation prompt); ``prefill`` text then starts the assistant turn (the prefilling attack of
Qi et al. 2024 — safety alignment is often only a few tokens deep).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PromptFileError


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(
            f"prompt file not found: {path}",
            expected="an existing .txt or .jsonl file",
            found="no such file",
            fix="check the path",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(
            f"cannot read prompt file {path}",
            expected="a UTF-8 text file",
            found=type(exc).__name__,
            fix="save the file as UTF-8 text",
        ) from None
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise PromptFileError(
                    f"{path}:{n} is not JSON",
                    expected='{"prompt": "..."} per line',
                    found=line[:80],
                    fix="write one JSON object per line",
                ) from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise PromptFileError(
                    f"{path}:{n} has no string 'prompt' field",
                    expected='{"prompt": "..."}',
                    found=line[:80],
                    fix="add a prompt field to every line",
                )
            prompts.append(obj["prompt"])
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(
            f"prompt file {path} is empty",
            expected="at least one prompt",
            found="no prompts",
            fix="add prompts, one per line (.txt) or JSON lines (.jsonl)",
        )
    return prompts


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, *, chat: bool = True, prefill: str | None = None) -> str:
    """The exact text fed to the model for ``prompt`` (chat template applied when asked and available)."""
    if chat and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    if prefill:
        text = text + prefill
    return text
