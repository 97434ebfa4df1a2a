"""Campaign message templates: compile once, render per recipient."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaignd.render import MAX_VARIABLE_LENGTH, RenderError, Template, TemplateError


def test_placeholders_with_and_without_spaces_are_filled() -> None:
    template = Template({"text": "Hi {{name}}, code {{ code }}!"})

    assert template.render({"name": "Ada", "code": "X1"}) == {"text": "Hi Ada, code X1!"}


def test_placeholders_in_nested_dicts_and_lists_are_filled() -> None:
    message = {
        "text": "{{greeting}}",
        "meta": {"lang": "en", "parts": ["static", "to {{ name }}", {"deep": ["{{name}}-{{greeting}}"]}]},
    }
    template = Template(message)

    rendered = template.render({"name": "Bo", "greeting": "Hello"})

    assert rendered == {
        "text": "Hello",
        "meta": {"lang": "en", "parts": ["static", "to Bo", {"deep": ["Bo-Hello"]}]},
    }


def test_non_string_leaves_are_left_untouched() -> None:
    message = {
        "text": "{{name}}",
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "list": [1, False],
    }

    rendered = Template(message).render({"name": "Cy"})

    assert rendered == {
        "text": "Cy",
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "list": [1, False],
    }
    assert rendered["flag"] is True
    assert rendered["nothing"] is None


def test_same_template_renders_each_recipient_independently() -> None:
    template = Template({"text": "Hi {{name}}"})

    first = template.render({"name": "A"})
    second = template.render({"name": "B"})

    assert (first, second) == ({"text": "Hi A"}, {"text": "Hi B"})


def test_repeated_placeholder_is_filled_everywhere() -> None:
    assert Template({"t": "{{x}}{{x}} {{ x }}"}).render({"x": "ab"}) == {"t": "abab ab"}


def test_variables_lists_every_placeholder_name() -> None:
    template = Template({"a": "{{first}} {{ second }}", "b": ["{{third}}", {"c": "{{first}}"}], "d": "plain"})

    assert template.variables == frozenset({"first", "second", "third"})


def test_template_without_placeholders_has_no_variables() -> None:
    assert Template({"text": "hello"}).variables == frozenset()


def test_placeholder_names_may_hold_dots_and_dashes() -> None:
    template = Template({"t": "{{user.first-name}}"})

    assert template.variables == frozenset({"user.first-name"})
    assert template.render({"user.first-name": "Di"}) == {"t": "Di"}


def test_extra_variables_are_ignored() -> None:
    assert Template({"t": "{{a}}"}).render({"a": "1", "b": "2"}) == {"t": "1"}


@pytest.mark.parametrize("variables", [{}, {"name": None}, {"other": "x"}])
def test_missing_or_null_variable_is_missing_variable_error(variables: dict[str, Any]) -> None:
    template = Template({"text": "Hi {{name}}"})

    with pytest.raises(RenderError) as caught:
        template.render(variables)

    assert caught.value.code == "missing_variable"
    assert "name" in str(caught.value)


@pytest.mark.parametrize("value", [{"a": 1}, ["a"], ("a",), {1, 2}, b"bytes"])
def test_structured_variable_value_is_bad_variable_error(value: Any) -> None:
    with pytest.raises(RenderError) as caught:
        Template({"text": "{{v}}"}).render({"v": value})

    assert caught.value.code == "bad_variable"
    assert "v" in str(caught.value)


def test_variable_longer_than_limit_is_bad_variable_error() -> None:
    template = Template({"text": "{{v}}"})

    with pytest.raises(RenderError) as caught:
        template.render({"v": "x" * (MAX_VARIABLE_LENGTH + 1)})

    assert caught.value.code == "bad_variable"


def test_variable_at_length_limit_is_accepted() -> None:
    value = "x" * MAX_VARIABLE_LENGTH

    assert Template({"text": "{{v}}"}).render({"v": value}) == {"text": value}


@pytest.mark.parametrize(
    ("value", "text"),
    [(7, "7"), (-2, "-2"), (2.5, "2.5"), (True, "true"), (False, "false"), (0, "0"), ("", "")],
)
def test_numbers_and_booleans_render_as_text(value: Any, text: str) -> None:
    assert Template({"t": "[{{v}}]"}).render({"v": value}) == {"t": f"[{text}]"}


@pytest.mark.parametrize(
    "text",
    ["Hi {{name", "Hi name}}", "{{ 1bad }}", "}}", "{{", "{{}}", "{{ name with space }}", "{{na$me}}"],
)
def test_malformed_placeholder_is_template_error(text: str) -> None:
    with pytest.raises(TemplateError):
        Template({"text": text})


def test_malformed_placeholder_deep_in_message_is_template_error() -> None:
    with pytest.raises(TemplateError):
        Template({"a": {"b": ["ok {{x}}", {"c": "broken {{x"}]}})


def test_single_braces_are_plain_text() -> None:
    message = {"text": "json-ish {a} and } and {"}

    assert Template(message).render({}) == message


@pytest.mark.parametrize("message", [None, "text", ["a"], 3, {}])
def test_message_that_is_not_a_non_empty_object_is_template_error(message: Any) -> None:
    with pytest.raises(TemplateError):
        Template(message)


@pytest.mark.parametrize("leaf", [("tuple",), {1, 2}, b"bytes", object()])
def test_message_holding_non_json_value_is_template_error(leaf: Any) -> None:
    with pytest.raises(TemplateError):
        Template({"x": leaf})


def _nested(levels: int) -> dict[str, Any]:
    message: dict[str, Any] = {"leaf": "{{v}}"}
    for _ in range(levels):
        message = {"n": message}
    return message


def test_nesting_deeper_than_32_is_template_error() -> None:
    with pytest.raises(TemplateError, match="32"):
        Template(_nested(40))


def test_deeply_nested_list_is_template_error() -> None:
    node: Any = "x"
    for _ in range(40):
        node = [node]

    with pytest.raises(TemplateError):
        Template({"n": node})


def test_moderate_nesting_renders() -> None:
    rendered = Template(_nested(20)).render({"v": "ok"})

    for _ in range(20):
        rendered = rendered["n"]
    assert rendered == {"leaf": "ok"}


@pytest.mark.parametrize("variables", [None, "name=x", ["x"], 3])
def test_non_mapping_variables_is_render_error_when_template_has_placeholders(variables: Any) -> None:
    with pytest.raises(RenderError) as caught:
        Template({"text": "{{name}}"}).render(variables)

    assert caught.value.code == "bad_variable"


@pytest.mark.parametrize("variables", [None, "name=x", ["x"], 3])
def test_non_mapping_variables_is_fine_when_template_has_no_placeholders(variables: Any) -> None:
    assert Template({"text": "static"}).render(variables) == {"text": "static"}


def test_render_does_not_change_the_source_message() -> None:
    message = {"text": "{{a}}", "list": ["{{a}}", 1]}
    before = copy.deepcopy(message)
    template = Template(message)

    template.render({"a": "filled"})

    assert message == before


# Lone surrogates excluded: PostgreSQL's jsonb rejects them, so no campaign message holds one
# (and no request body could carry one; see the test below).
_no_brace_text = st.text(
    alphabet=st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)), max_size=30
)
_json_leaves = (
    st.none()
    | st.booleans()
    # What a message can carry to a provider: JSON integers within 64 bits (see below).
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _no_brace_text
)
_json_values = st.recursive(
    _json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_no_brace_text, children, max_size=4),
    max_leaves=20,
)


@given(
    message=st.dictionaries(_no_brace_text, _json_values, min_size=1, max_size=5),
    variables=st.dictionaries(_no_brace_text, _no_brace_text, max_size=3),
)
def test_message_without_braces_renders_unchanged(message: dict[str, Any], variables: dict[str, str]) -> None:
    template = Template(message)

    assert template.variables == frozenset()
    assert template.render(variables) == message


def test_a_message_of_megabytes_cannot_compile() -> None:
    from campaignd.render import MAX_MESSAGE_BYTES

    with pytest.raises(TemplateError, match="bytes, more than"):
        Template({"text": "x" * (MAX_MESSAGE_BYTES + 1)})
    assert Template({"text": "x" * 1000}).render({}) == {"text": "x" * 1000}


def test_a_message_that_cannot_be_encoded_for_a_provider_cannot_compile() -> None:
    # Such a number is valid JSON but no request body can carry it: the campaign fails with a
    # reason instead of every recipient failing one by one at send time.
    with pytest.raises(TemplateError, match="cannot be encoded"):
        Template({"amount": 2**70})


def test_a_message_with_a_lone_surrogate_cannot_compile() -> None:
    with pytest.raises(TemplateError, match="cannot be encoded"):
        Template({"text": "broken \ud800 text"})
