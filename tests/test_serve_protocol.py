"""CompletionRequest's prompt field: its shortcut for token-id lists gives what the plain union gives,
values and errors alike (the shortcut only saves the union's failing tries, id by id, of long prompts)."""
import pytest
from pydantic import TypeAdapter, ValidationError

from nanovllm.entrypoints.protocol import CompletionRequest

UNION = TypeAdapter(str | list[str] | list[int] | list[list[int]])
PROMPTS = [[5] * 600, [0, 7, 2**40], [], "text", ["a", "b"], [[1, 2], [3]], [1, True], [True], [1, "2"], ["1", "2"],
           [1, 2.0], [1, 2.5], [1, None], [1, [2]], 7, None, {"a": 1}]


def _result(validate, prompt):
    try:
        value = validate(prompt)
    except ValidationError as error:
        return "error", [(e["loc"], e["msg"]) for e in error.errors()]
    return "value", value, [type(item) for item in value] if isinstance(value, list) else type(value)


@pytest.mark.parametrize("prompt", PROMPTS, ids=repr)
def test_the_prompt_field_validates_as_the_plain_union(prompt):
    def field(value):
        return CompletionRequest.model_validate({"prompt": value}).prompt

    def union(value):
        try:
            return UNION.validate_python(value)
        except ValidationError as error:  # the same errors, as the model's field reports them
            raise ValidationError.from_exception_data("CompletionRequest", [
                {**e, "loc": ("prompt", *e["loc"])} for e in error.errors()]) from None

    assert _result(field, prompt) == _result(union, prompt)
