"""Forms as the JSON API's bodies, and the API's validation messages as a form shows them: every field's
problem at once, next to that field, in words without the API's field names."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData

from quotagate.errors import QuotagateError
from quotagate.keys.schemas import check_budget_pair
from quotagate.validation import problems

M = TypeVar("M", bound=BaseModel)

LIMIT_FIELDS = ("rpm", "tpm", "token_limit")
# The API's field names as the forms label them, for messages that mention another field.
LABELS = {"token_limit_period": "budget period", "token_limit": "token budget", "rpm": "requests per minute",
          "tpm": "tokens per minute", "allowed_models": "allowed models", "expires_at": "expiry",
          "grace_period_seconds": "grace period", "allowed_networks": "allowed networks", "metadata": "metadata",
          "model_limits": "per-model limits"}
_NAMES = re.compile(r"\b(" + "|".join(sorted(LABELS, key=len, reverse=True)) + r")\b")
_INTEGER = re.compile(r"[+-]?\d+")
Errors = dict[str, str]


def wording(message: str, field: str | None) -> str:
    """The API's message for a form: without the ``field:`` it starts with, other fields by their labels."""
    if field and message.startswith(f"{field}:"):
        message = message[len(field) + 1:].strip()
    elif ":" in message and message.split(":", 1)[0].split("[")[0] in LABELS:
        message = message.split(":", 1)[1].strip()
    message = _NAMES.sub(lambda m: LABELS[m.group(1)], message)
    return message[:1].upper() + message[1:]


def field_error(exc: QuotagateError) -> Errors:
    """A service's error as the form's: next to the field it names, else above the form."""
    field = (exc.field or "form").split(".")[0].split("[")[0]
    return {field: wording(exc.message, exc.field)}


def validate(model: type[M], data: dict[str, Any],
             lines: dict[str, int] | None = None) -> tuple[M | None, Errors]:
    """``data`` as ``model`` (the JSON API's validation), or every field's problem at once. ``lines``: the
    per-model limits box's line of each model, for its messages."""
    try:
        return model.model_validate(data), {}
    except ValidationError as exc:
        errors = {field: wording(msg, None) for field, msg in problems(exc).items()}
        for err in exc.errors():
            # A metadata entry's problem (a key that breaks the pattern, a value too long): the API's message
            # does not say which entry, which the form (one line per entry) must.
            loc = err["loc"]
            if len(loc) >= 2 and loc[0] == "metadata" and isinstance(loc[1], str):
                errors["metadata"] = f"{loc[1][:64]!r}: {wording(problems_of(err), None)}"
                break
        for err in exc.errors():
            # A per-model limit's problem: the form (one line per model) names the line and the limit.
            loc = err["loc"]
            if len(loc) >= 2 and loc[0] == "model_limits" and isinstance(loc[1], str):
                line = (lines or {}).get(loc[1])
                where = f"Line {line} ({loc[1][:40]!r})" if line else repr(loc[1][:40])
                limit = f", {loc[2]}" if len(loc) >= 3 else ""
                errors["model_limits"] = f"{where}{limit}: {problems_of(err)}"
                break
        return None, errors


def problems_of(err: Any) -> str:
    return str(err["msg"]).removeprefix("Value error, ")


def number(raw: str) -> int | str:
    """A form's number as the JSON API would get it: "1,000" is 1000 and "-5" is -5 (so the API's
    "greater than 0" is the message, not "not a valid integer"); anything else stays text."""
    cleaned = raw.strip().replace(",", "").replace("_", "")
    return int(cleaned) if _INTEGER.fullmatch(cleaned) and len(cleaned) <= 30 else raw.strip()


def key_fields(form: FormData, *, partial: bool) -> dict[str, Any]:
    """A key form as the JSON API's body: numbers as ints, blanks as absent (or null when editing)."""
    # The name as typed: the API strips it and says what is wrong with a blank one.
    data: dict[str, Any] = {"name": str(form.get("name", ""))}
    for field in LIMIT_FIELDS:
        raw = str(form.get(field, "")).strip()
        if raw:
            data[field] = number(raw)
        elif partial:
            data[field] = None
    period = str(form.get("token_limit_period", "")).strip()
    if period:
        data["token_limit_period"] = period
    elif partial:
        data["token_limit_period"] = None
    models = [str(m) for m in form.getlist("allowed_models")]
    if models:
        data["allowed_models"] = models
    elif partial:
        data["allowed_models"] = None
    expires = str(form.get("expires_at", "")).strip()
    if expires:
        # <input type="datetime-local"> has no zone; the form labels it UTC.
        data["expires_at"] = expires if expires.endswith("Z") or "+" in expires else expires + "Z"
    elif partial:
        data["expires_at"] = None
    return data


def networks_text(networks: Any) -> str:
    """A key's allowed networks as the form's text: one a line."""
    return "\n".join(networks or ())


def metadata_text(metadata: dict[str, str] | None) -> str:
    """A key's metadata as the form's text: ``key=value``, one a line."""
    return "\n".join(f"{k}={v}" for k, v in sorted((metadata or {}).items()))


def parse_networks(raw: str) -> list[str]:
    """The networks a user typed, one a line (or separated by commas or spaces)."""
    return [n for n in re.split(r"[\s,]+", raw) if n]


def parse_metadata(raw: str) -> tuple[dict[str, str], str | None]:
    """``key=value`` lines as a dict (blank lines skipped, blanks around key and value dropped), or the
    problem with the first line that is not such a pair."""
    found: dict[str, str] = {}
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name:
            return found, f"Line {number} ({line.strip()[:40]!r}) is not key=value"
        if name in found:
            return found, f"Line {number}: {name[:64]!r} is given twice"
        found[name] = value.strip()
    return found, None


def restrictions(form: FormData, data: dict[str, Any], *, current: Any | None) -> Errors:
    """Put the form's allowed networks and metadata into ``data`` (the API's body); a problem with the
    form's own line format is returned as the field's error. Editing (``current``: the key), a field whose
    text is what the form was given is left out, so that a value the form cannot show exactly (a line
    break set through the API) is kept as it is."""
    errors: Errors = {}
    networks = str(form.get("allowed_networks", "")).strip()
    if current is not None and networks == networks_text(current.allowed_networks):
        pass
    elif networks:
        data["allowed_networks"] = parse_networks(networks)
    elif current is not None:
        data["allowed_networks"] = None
    raw = str(form.get("metadata", "")).strip()
    if current is None or raw.replace("\r\n", "\n") != metadata_text(current.metadata):
        metadata, problem = parse_metadata(raw)
        if problem:
            errors["metadata"] = problem
        elif metadata:
            data["metadata"] = metadata
        elif current is not None:
            data["metadata"] = None
    return errors


def model_limits(form: FormData, data: dict[str, Any], *, current: Any | None) -> tuple[Errors, dict[str, int]]:
    """Put the form's per-model limits into ``data`` as ``restrictions`` does the networks (a box left as
    it was, editing, is not sent); also each model's line, for the API's messages."""
    raw = str(form.get("model_limits", "")).strip().replace("\r\n", "\n")
    if current is not None and raw == model_limits_text(current.model_limits):
        return {}, {}
    found, lines, problem = parse_model_limits(raw)
    if problem:
        return {"model_limits": problem}, lines
    if found:
        data["model_limits"] = found
    elif current is not None:
        data["model_limits"] = None
    return {}, lines


def budget_pair_error(data: dict[str, Any], errors: Errors) -> Errors:
    """The budget needs its period and the other way round: checked with the fields' own problems, so
    that the form shows it with them rather than after they are fixed."""
    if "token_limit" in errors or "token_limit_period" in errors:
        return errors
    try:
        check_budget_pair(data.get("token_limit"), data.get("token_limit_period"))
    except QuotagateError as exc:
        return {**errors, **field_error(exc)}
    return errors


def typed(form: FormData) -> dict[str, Any]:
    """What the user typed (and ticked), to put back into the form with its errors."""
    values: dict[str, Any] = {k: str(v) for k, v in form.items() if k not in ("csrf", "allowed_models")}
    values["allowed_models"] = [str(m) for m in form.getlist("allowed_models")]
    return values


# A per-model limits line: ``chat rpm=60 tpm=10000 token_limit=50000/day``.
MODEL_LIMIT_NAMES = ("rpm", "tpm", "token_limit")


def model_limits_text(limits: Any) -> str:
    """A key's per-model limits (``Limits`` or the API's dicts, by model) as the form's lines."""
    out = []
    for model, lim in sorted((limits or {}).items()):
        get = lim.get if isinstance(lim, dict) else lambda name, lim=lim: getattr(lim, name)
        parts = [model]
        for name in MODEL_LIMIT_NAMES:
            value = get(name)
            if value is not None:
                parts.append(f"{name}={value}" + (f"/{get('token_limit_period')}" if name == "token_limit" else ""))
        out.append(" ".join(parts))
    return "\n".join(out)


def parse_model_limits(raw: str) -> tuple[dict[str, dict[str, Any]], dict[str, int], str | None]:
    """Lines of ``MODEL name=value …`` as the API's ``model_limits`` (numbers as the API would get them,
    for its own messages), each model's line number, and the problem with the first line the format
    does not allow (its number and text named). Blank lines are skipped."""
    found: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    for at, line in enumerate(raw.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        model, shown = words[0], f"Line {at} ({line.strip()[:40]!r})"
        if model in found:
            return found, lines, f"{shown}: {model[:64]!r} is given twice"
        limits: dict[str, Any] = {}
        for word in words[1:]:
            name, sep, value = word.partition("=")
            if not sep or name not in MODEL_LIMIT_NAMES:
                return found, lines, f"{shown}: {word[:40]!r} is not rpm=N, tpm=N or token_limit=N/period"
            if name in limits:
                return found, lines, f"{shown}: {name} is given twice"
            if name == "token_limit":
                amount, slash, period = value.partition("/")
                if not slash or not period:
                    return found, lines, f"{shown}: a token budget needs its period, e.g. token_limit={value}/day"
                limits["token_limit"], limits["token_limit_period"] = number(amount), period
            else:
                limits[name] = number(value)
        if not limits:
            return found, lines, f"{shown}: give at least one of rpm=, tpm=, token_limit= (or leave the model out)"
        found[model], lines[model] = limits, at
    return found, lines, None


def project_limit_fields(form: FormData) -> dict[str, Any]:
    """The project limits form as ``PATCH /v1/projects/{id}``'s body: every limit present, blank as null
    (no limit)."""
    data: dict[str, Any] = {}
    for field in LIMIT_FIELDS:
        raw = str(form.get(field, "")).strip()
        data[field] = number(raw) if raw else None
    data["token_limit_period"] = str(form.get("token_limit_period", "")).strip() or None
    return data
