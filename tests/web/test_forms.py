"""The API's validation messages as the web console's forms show them."""

from __future__ import annotations

from types import SimpleNamespace

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


def test_networks_and_metadata_text() -> None:
    assert forms.parse_networks(" 10.0.0.0/8,2001:db8::/32\n\n192.168.1.1 ") == ["10.0.0.0/8", "2001:db8::/32",
                                                                               "192.168.1.1"]
    assert forms.parse_metadata(" team = search \n\ncost-center=4=2\nempty=") == (
        {"team": "search", "cost-center": "4=2", "empty": ""}, None)
    assert forms.parse_metadata("team=a\nnot a pair")[1] == "Line 2 ('not a pair') is not key=value"
    assert forms.parse_metadata("=x")[1] == "Line 1 ('=x') is not key=value"
    assert forms.parse_metadata("team=a\nteam=b")[1] == "Line 2: 'team' is given twice"
    assert forms.metadata_text({"b": "2", "a": "1"}) == "a=1\nb=2"
    assert forms.networks_text(("10.0.0.0/8", "::1/128")) == "10.0.0.0/8\n::1/128"
    assert forms.metadata_text(None) == forms.networks_text(None) == ""


def test_a_metadata_entrys_problem_names_the_entry() -> None:
    _body, errors = forms.validate(KeyCreate, {"name": "k", "metadata": {"bad key": "x"},
                                               "allowed_networks": ["10.0.0.5/8"]})
    assert errors == {"metadata": "'bad key': String should match pattern '^[A-Za-z0-9_.:/-]+$'",
                      "allowed_networks": "'10.0.0.5/8' has host bits set; the network is 10.0.0.0/8"}
    _body, errors = forms.validate(KeyCreate, {"name": "k", "metadata": {"team": "v" * 257}})
    assert errors == {"metadata": "'team': String should have at most 256 characters"}


_KEY = SimpleNamespace(allowed_networks=("10.0.0.0/8",), metadata={"note": "two\nlines"})


def test_an_unchanged_box_is_not_sent_when_editing() -> None:
    from starlette.datastructures import FormData

    shown = FormData([("allowed_networks", "10.0.0.0/8"), ("metadata", "note=two\r\nlines")])
    data: dict[str, object] = {}
    assert forms.restrictions(shown, data, current=_KEY) == {} and data == {}
    cleared = FormData([("allowed_networks", ""), ("metadata", " ")])
    assert forms.restrictions(cleared, data, current=_KEY) == {}
    assert data == {"allowed_networks": None, "metadata": None}
    created: dict[str, object] = {}
    assert forms.restrictions(cleared, created, current=None) == {} and created == {}


def test_per_model_limits_lines() -> None:
    from quotagate.keys.models import Limits

    found, lines, problem = forms.parse_model_limits("chat rpm=60 tpm=1,000 token_limit=50000/day\n\nbge-m3 rpm=5")
    assert problem is None and lines == {"chat": 1, "bge-m3": 3}
    assert found == {"chat": {"rpm": 60, "tpm": 1000, "token_limit": 50000, "token_limit_period": "day"},
                     "bge-m3": {"rpm": 5}}
    assert forms.parse_model_limits("chat rpm=1\nx burst=2")[2] == \
        "Line 2 ('x burst=2'): 'burst=2' is not rpm=N, tpm=N or token_limit=N/period"
    assert forms.parse_model_limits("chat token_limit=5")[2] == \
        "Line 1 ('chat token_limit=5'): a token budget needs its period, e.g. token_limit=5/day"
    assert forms.parse_model_limits("chat")[2] == \
        "Line 1 ('chat'): give at least one of rpm=, tpm=, token_limit= (or leave the model out)"
    assert forms.parse_model_limits("chat rpm=1\nchat tpm=2")[2] == "Line 2 ('chat tpm=2'): 'chat' is given twice"
    assert forms.parse_model_limits("chat rpm=1 rpm=2")[2] == "Line 1 ('chat rpm=1 rpm=2'): rpm is given twice"
    # The API's own message for a value, with the model's line and the limit.
    _body, errors = forms.validate(KeyCreate, {"name": "k", "model_limits": {"a": {"rpm": 1}, "b": {"tpm": 0}}},
                                   {"a": 1, "b": 3})
    assert errors == {"model_limits": "Line 3 ('b'), tpm: Input should be greater than 0"}
    # Shown as lines again, in the same format (the record's Limits or the API's dicts).
    assert forms.model_limits_text({"chat": Limits(rpm=60, token_limit=5, token_limit_period="day"),
                                    "bge-m3": {"rpm": None, "tpm": 7, "token_limit": None,
                                               "token_limit_period": None}}) == \
        "bge-m3 tpm=7\nchat rpm=60 token_limit=5/day"


def test_an_unchanged_per_model_box_is_not_sent_when_editing() -> None:
    from starlette.datastructures import FormData

    from quotagate.keys.models import Limits

    key = SimpleNamespace(model_limits={"chat": Limits(rpm=60)})
    data: dict[str, object] = {}
    assert forms.model_limits(FormData([("model_limits", "chat rpm=60\r\n")]), data, current=key)[0] == {}
    assert data == {}
    assert forms.model_limits(FormData([("model_limits", "")]), data, current=key)[0] == {}
    assert data == {"model_limits": None}
    created: dict[str, object] = {}
    assert forms.model_limits(FormData([("model_limits", "")]), created, current=None)[0] == {} and created == {}
