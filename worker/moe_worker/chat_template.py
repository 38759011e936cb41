"""Chat messages -> prompt text with the checkpoint's own chat template (`tokenizer_config.json`).

The template is Jinja, rendered as Hugging Face transformers renders it: a sandboxed environment
with trim_blocks and lstrip_blocks, the loop-control extension, `raise_exception` and
`strftime_now`, and the special tokens the config names (bos_token, eos_token, ...) as variables.
The rendered text already holds the special tokens it needs, so it is encoded without adding any.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template raised, or the messages are malformed)."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], origin: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{origin}: chat_template does not compile: {e}") from None
        self.special_tokens = special_tokens
        self.origin = origin

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def _token_text(v: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def load_chat_template(checkpoint_dir: str | Path | None) -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has no tokenizer_config.json or no
    `chat_template` in it. A file that is there but unreadable is an error naming it."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{path}: not readable JSON ({e})") from None
    source = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    if source is None:
        return None
    if not isinstance(source, str):
        raise ChatTemplateError(f"{path}: chat_template must be a string or a list of named templates")
    specials = {k: t for k, v in cfg.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
    return ChatTemplate(source, specials, str(path))
