"""Chat template: turns ``messages`` into the prompt text, with jinja2 in a sandbox.

The template is configuration (``--chat-template FILE``, else ``chat_template.jinja`` in the model
dir, else :data:`DEFAULT_TEMPLATE`), but the messages it renders are user input, so it runs in
jinja2's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute access to Python
internals, no mutation of the data), like Hugging Face's ``apply_chat_template``. It sees
``messages`` (each with ``role`` and ``content``), ``add_generation_prompt``, ``bos_token`` and
``eos_token``, and may call ``raise_exception(message)`` to reject a conversation (answered 400).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Plain text the reference models can read: their character vocabulary comes from a text corpus.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
MODEL_DIR_TEMPLATE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The template does not compile, or refused to render a conversation."""


def _raise(message: str) -> NoReturn:
    raise ChatTemplateError(message)


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def load(cls, path: str | Path | None, model_dir: str | Path) -> ChatTemplate:
        """The template of ``path``, else the model dir's ``chat_template.jinja``, else the default."""
        if path is None and (Path(model_dir) / MODEL_DIR_TEMPLATE).is_file():
            path = Path(model_dir) / MODEL_DIR_TEMPLATE
        if path is None:
            return cls(DEFAULT_TEMPLATE)
        try:
            return cls(Path(path).read_text())
        except OSError as exc:
            raise ChatTemplateError(f"cannot read chat template {path}: {exc}") from exc

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``; :class:`ChatTemplateError` if the template refuses them."""
        context: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            **self._specials,
        }
        try:
            return self._template.render(context)
        except ChatTemplateError:
            raise
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc
