"""Chat as a plain-text transcript: GPT-2 was never trained on a chat format, so we write a script it knows.

A template is Jinja text (the format Hugging Face chat templates use) rendered with `messages` (each with
`role`, `content`, `name`); the model continues the text after the final "Assistant:". A template ends the
reply at the next turn by setting `stop`, a list of up to two turn markers, at its top level:
`{%- set stop = ["\\nUser:"] -%}`. Where a model folder has `chat_template.txt`, that template is used;
else the file named by CHAT_TEMPLATE; else DEFAULT_TEMPLATE.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from serving.chat.schema import Message

TEMPLATE_FILE = "chat_template.txt"

# A system message is a plain paragraph; the turns are "User: ..." and "Assistant: ..." lines.
DEFAULT_TEMPLATE = """\
{%- set stop = ["\\nUser:", "\\nAssistant:"] -%}
{%- for m in messages -%}
{%- if m.role in ("system", "developer") -%}
{{ m.content }}{{ "\\n\\n" }}
{%- elif m.role == "user" -%}
User: {{ m.content }}{{ "\\n" }}
{%- else -%}
Assistant: {{ m.content }}{{ "\\n" }}
{%- endif -%}
{%- endfor -%}
Assistant:"""

_env = ImmutableSandboxedEnvironment(keep_trailing_newline=True, autoescape=False)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    source: str = DEFAULT_TEMPLATE
    origin: str = "default"  # where the template came from, for error messages

    def __post_init__(self) -> None:
        try:
            _env.from_string(self.source)
        except TemplateError as e:
            raise ValueError(f"chat template {self.origin}: {e}") from e

    def render(self, messages: Sequence[Message]) -> tuple[str, tuple[str, ...]]:
        """The prompt text for `messages`, and the turn markers that end the reply."""
        template = _env.from_string(self.source)
        module = template.make_module({"messages": [dataclasses.asdict(m) for m in messages]})
        stop = getattr(module, "stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        return str(module), tuple(s for s in stop if isinstance(s, str) and s)


def load_template(model_dir: str | os.PathLike | None, fallback: str | None = None) -> ChatTemplate:
    """The model folder's chat_template.txt, else the file `fallback` (CHAT_TEMPLATE), else the default."""
    if model_dir is not None and (Path(model_dir) / TEMPLATE_FILE).is_file():
        path = Path(model_dir) / TEMPLATE_FILE
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    if fallback:
        path = Path(fallback)
        if not path.is_file():
            raise FileNotFoundError(f"CHAT_TEMPLATE={fallback}: no such file")
        return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
    return ChatTemplate()
