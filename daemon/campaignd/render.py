"""Campaign message templates: ``{{name}}`` placeholders in JSON string values.

A campaign's message is compiled once; rendering a recipient is then a walk over
pre-split string parts, with no parsing per message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")
MAX_VARIABLE_LENGTH = 4096
MAX_MESSAGE_BYTES = 1_000_000


class TemplateError(ValueError):
    """The campaign's message cannot be compiled: the whole campaign fails with this reason."""


class RenderError(ValueError):
    """One recipient's variables cannot fill the template: that recipient is skipped."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


Renderer = Callable[[Mapping[str, Any]], Any]


class UnreadableJson:
    """A json or jsonb value PostgreSQL accepted and this client cannot decode: a number
    beyond a double's range (1e400), nesting deeper than 1,024 levels. The database codecs
    return it instead of raising, which would fail the whole statement (a claim already
    committed, every campaign of the sender); the message or recipient it belongs to is then
    refused with the reason, like any other that cannot be sent."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnreadableJson({self.reason!r})"


def _variable_text(variables: Mapping[str, Any], name: str) -> str:
    value = variables.get(name)
    if value is None:
        raise RenderError("missing_variable", f"missing variable: {name}")
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        text = str(value)
    else:
        raise RenderError(
            "bad_variable", f"variable {name} is a {type(value).__name__}, not text or a number"
        )
    if len(text) > MAX_VARIABLE_LENGTH:
        raise RenderError("bad_variable", f"variable {name} is longer than {MAX_VARIABLE_LENGTH} characters")
    return text


def _compile_string(text: str, names: set[str]) -> Renderer | str:
    pieces: list[str | tuple[str]] = []
    position = 0
    for match in _PLACEHOLDER.finditer(text):
        pieces.append(text[position : match.start()])
        pieces.append((match.group(1),))
        names.add(match.group(1))
        position = match.end()
    pieces.append(text[position:])
    literal_parts = [p for p in pieces if isinstance(p, str)]
    if any("{{" in part or "}}" in part for part in literal_parts):
        raise TemplateError(f"malformed placeholder in {text[:80]!r}: use {{{{name}}}} with a plain name")
    if len(pieces) == 1:
        return text
    # The literal parts stay in place; each render fills a copy's variable slots.
    template = [piece if isinstance(piece, str) else "" for piece in pieces]
    slots = tuple((index, piece[0]) for index, piece in enumerate(pieces) if not isinstance(piece, str))

    def render(variables: Mapping[str, Any]) -> str:
        parts = template.copy()
        for index, name in slots:
            value = variables.get(name)
            # Text within the limit, as nearly every variable is, goes in without a call.
            if type(value) is str and len(value) <= MAX_VARIABLE_LENGTH:
                parts[index] = value
            else:
                parts[index] = _variable_text(variables, name)
        return "".join(parts)

    return render


def _compile_node(node: Any, names: set[str], depth: int) -> Renderer | Any:
    if depth > 32:
        raise TemplateError("message nests deeper than 32 levels")
    if isinstance(node, str):
        return _compile_string(node, names)
    if isinstance(node, list):
        items = [_compile_node(item, names, depth + 1) for item in node]
        dynamic_items = tuple((index, item) for index, item in enumerate(items) if callable(item))
        if not dynamic_items:
            return node

        def render_list(variables: Mapping[str, Any]) -> list[Any]:
            rendered = items.copy()
            for index, item in dynamic_items:
                rendered[index] = item(variables)
            return rendered

        return render_list
    if isinstance(node, dict):
        fields = {key: _compile_node(value, names, depth + 1) for key, value in node.items()}
        dynamic_fields = tuple((key, value) for key, value in fields.items() if callable(value))
        if not dynamic_fields:
            return node

        def render_dict(variables: Mapping[str, Any]) -> dict[str, Any]:
            # A copy of the compiled fields keeps the message's key order.
            rendered = fields.copy()
            for key, value in dynamic_fields:
                rendered[key] = value(variables)
            return rendered

        return render_dict
    if node is None or isinstance(node, (bool, int, float)):
        return node
    raise TemplateError(f"message holds a {type(node).__name__}, which is not JSON")


class Template:
    """A compiled campaign message."""

    def __init__(self, message: Any) -> None:
        if isinstance(message, UnreadableJson):
            raise TemplateError(f"message cannot be read: {message.reason}")
        if not isinstance(message, dict) or not message:
            raise TemplateError("message must be a non-empty JSON object")
        names: set[str] = set()
        self._compiled = _compile_node(message, names, 0)
        # No provider takes a message of megabytes; sending one thousands of times would only
        # burn the rate limit on certain rejections.
        try:
            size = len(orjson.dumps(message))
        except orjson.JSONEncodeError as exc:
            raise TemplateError(f"message cannot be encoded as JSON: {exc}") from None
        if size > MAX_MESSAGE_BYTES:
            raise TemplateError(f"message is {size} bytes, more than the {MAX_MESSAGE_BYTES} allowed")
        self.variables: frozenset[str] = frozenset(names)

    def render(self, variables: Any) -> Any:
        # type() first: isinstance against the Mapping ABC is slow, and it is a dict every time.
        if type(variables) is not dict and not isinstance(variables, Mapping):
            if isinstance(variables, UnreadableJson):
                raise RenderError("bad_variable", f"variables cannot be read: {variables.reason}")
            if self.variables:
                raise RenderError("bad_variable", "variables must be a JSON object")
            variables = {}
        compiled = self._compiled
        return compiled(variables) if callable(compiled) else compiled
