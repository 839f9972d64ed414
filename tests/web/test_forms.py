"""The API's validation messages as the web console's forms show them."""

from __future__ import annotations

from quotagate.keys.schemas import KeyCreate
from quotagate.web import forms


def test_every_problem_at_once_by_field_in_the_apis_words() -> None:
    body, errors = forms.validate(KeyCreate, {"name": "", "rpm": -5, "tpm": "lots", "token_limit": 0})
    assert body is None
    assert errors == {"rpm": "Input should be greater than 0", "tpm": "Input should be a valid integer",
                      "token_limit": "Input should be greater than 0",
                      "name": "String should have at least 1 character"}


def test_numbers_as_the_json_api_would_get_them() -> None:
    assert [forms.number(s) for s in ("-5", "1,000", "2_000", " 7 ", "2.5", "lots", "")] == \
        [-5, 1000, 2000, 7, "2.5", "lots", ""]


def test_messages_lose_the_apis_field_names() -> None:
    assert forms.wording("rpm: Input should be greater than 0", "rpm") == "Input should be greater than 0"
    assert forms.wording("token_limit_period: token_limit and token_limit_period come together; give both "
                         "or neither", "token_limit_period") == \
        "Token budget and budget period come together; give both or neither"
    assert forms.wording("allowed_models: 'x' not available to this project", "allowed_models") == \
        "'x' not available to this project"
    assert forms.budget_pair_error({"token_limit": 5}, {}) == {
        "token_limit_period": "Token budget and budget period come together; give both or neither"}
    assert forms.budget_pair_error({"token_limit": 5}, {"token_limit": "x"}) == {"token_limit": "x"}
