"""The TOML model catalog: a bad file is refused at start with an error that names the field and the problem."""

from __future__ import annotations

import pytest

from quotagate.config import ConfigError, parse_config


def model(upstream: str) -> str:
    return f'[[models]]\nid = "m"\nupstreams = ["{upstream}"]\n'


def test_a_good_upstream_keeps_its_path_without_the_trailing_slash() -> None:
    config = parse_config(model("https://llm.example.com:8443/v1/"))
    assert config.models["m"].upstreams == ("https://llm.example.com:8443/v1",)


@pytest.mark.parametrize(("upstream", "needle"), [
    ("ftp://host/v1", "must be an http:// or https:// base URL"),
    ("127.0.0.1:8000/v1", "must be an http:// or https:// base URL"),
    ("http:///v1", "has no host"),
    ("http://host:99999/v1", "has an invalid port"),
    ("http://host:port/v1", "has an invalid port"),
    ("http://user:secret@host/v1", "name an env var holding the upstream's API key"),
    ("http://host/v1?key=abc", "without a query or fragment"),
    ("http://host/my models/v1", "has a space, control or non-ASCII character in its path"),
    ("http://host/modèles/v1", "has a space, control or non-ASCII character in its path"),
])
def test_a_bad_upstream_url_is_refused_by_name(upstream: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(model(upstream), source="models.toml")
    assert str(info.value).startswith("models.toml: models.0.upstreams: ")
    assert needle in str(info.value)


def test_other_mistakes_name_the_field() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[[models]\n")
    with pytest.raises(ConfigError, match="appears twice"):
        parse_config(model("http://a/v1") + model("http://b/v1"))
    with pytest.raises(ConfigError, match=r"models\.0\.timeout_seconds"):
        parse_config(model("http://a/v1") + "timeout_seconds = 0\n")
    with pytest.raises(ConfigError, match=r"models\.0\.upsteams: Extra inputs are not permitted"):
        parse_config('[[models]]\nid = "m"\nupstreams = ["http://a/v1"]\nupsteams = []\n')
