"""What a config field may hold: its domain, declared once beside the field (core.config.param).

A domain is the one description of a value's allowed set, used in three places: the CLI parses a
typed flag with it (a bad value is a one-line usage error naming the flag), the TOML loader and a
config's __post_init__ check values with it (a TOML file gives ints, strings and lists of any kind),
and the fuzz test of the CLI draws values outside it. Each domain answers:

- parse(text): the value of a flag's text; raises ValueError(what is allowed) when malformed;
- coerce(value): a TOML or Python value in the field's canonical form (lists -> tuples, ints ->
  floats, text of a pair -> the pair); a value it cannot convert is returned as is, for check;
- check(value): None when allowed, else "must be <allowed>, got <value>".

This module has the general domains (numbers, names, flags, texts, JSON); the domains of a topic
live with it: paths in core/paths.py, scales and views in data/views.py, devices in
core/runtime.py.
"""

from __future__ import annotations

import json
import math

MAX_SEED = 2**32 - 1  # numpy's and torch's common seed range


def quote(value) -> str:
    """A value as an error message quotes it (at most 60 characters)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Domain:
    """The allowed values of one field. Subclasses set `allowed` (words) and `metavar` (help)."""

    allowed = "a value"
    metavar = "TEXT"

    def parse(self, text: str):
        return text

    def coerce(self, value):
        if isinstance(value, str):
            try:
                return self.parse(value)
            except ValueError:
                return value
        return value

    def valid(self, value) -> bool:
        return True

    def check(self, value) -> str | None:
        return None if self.valid(value) else f"must be {self.allowed}, got {quote(value)}"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Range(Domain):
    """An integer (integer=True) or a finite number within [low, high]; open ends exclude the bound."""

    def __init__(self, low: float | None, high: float | None, integer: bool = True, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.integer = low, high, integer
        self.low_open, self.high_open = low_open, high_open
        kind = "an integer" if integer else "a number"
        if low is not None and high is not None and not (low_open or high_open) and integer:
            self.allowed = f"{kind} in {int(low)}..{int(high)}"
        else:
            left = "(" if low_open or low is None else "["
            right = ")" if high_open or high is None else "]"
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            self.allowed = f"{kind} in {left}{lo}, {hi}{right}"
        self.metavar = f"{'INT' if integer else 'FLOAT'} {self.allowed.split(' in ', 1)[1]}"

    def parse(self, text: str):
        text = text.strip()
        try:
            return int(text) if self.integer else float(text)
        except ValueError:
            raise ValueError(f"must be {self.allowed}, got {quote(text)}") from None

    def coerce(self, value):
        if not self.integer and is_int(value) and self.valid(float(value)):
            return float(value)  # an int outside the range stays as written, for check to quote
        return super().coerce(value)

    def valid(self, value) -> bool:
        if not (is_int(value) if self.integer else is_number(value)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


class OneOf(Domain):
    """One of a few names (or integers: ResNet depths)."""

    def __init__(self, *choices):
        self.choices = tuple(choices)
        self.allowed = "one of " + ", ".join(str(c) for c in self.choices)
        self.metavar = "[" + "|".join(str(c) for c in self.choices) + "]"

    def parse(self, text: str):
        text = text.strip()
        if all(is_int(c) for c in self.choices):
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"must be {self.allowed}, got {quote(text)}") from None
        return text

    def valid(self, value) -> bool:
        return any(type(value) is type(c) and value == c for c in self.choices)


class Flag(Domain):
    """true or false (a TOML boolean; on the command line --name / --no-name)."""

    allowed = "true or false"
    metavar = ""
    WORDS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}

    def parse(self, text: str):
        try:
            return self.WORDS[text.strip().lower()]
        except KeyError:
            raise ValueError(f"must be {self.allowed}, got {quote(text)}") from None

    def coerce(self, value):
        return value  # a TOML boolean only; words are for the command line (a sweep grid's values)

    def valid(self, value) -> bool:
        return isinstance(value, bool)


class Text(Domain):
    """Free text; empty text only where the field's default is empty."""

    def __init__(self, allowed: str = "non-empty text", empty: bool = False, metavar: str = "TEXT"):
        self.allowed, self.empty, self.metavar = allowed, empty, metavar

    def valid(self, value) -> bool:
        return isinstance(value, str) and (self.empty or bool(value.strip()))


class Texts(Domain):
    """A list of texts, each in the item domain (a repeated flag, each value an item; a TOML array)."""

    def __init__(self, item: Domain | None = None):
        self.item = item or Text()
        self.allowed = f"a list of {self.item.allowed} values"

    def coerce(self, value):
        return tuple(value) if isinstance(value, list) else value

    def check(self, value) -> str | None:
        if not isinstance(value, tuple):
            return f"must be {self.allowed}, got {quote(value)}"
        return next((p for p in map(self.item.check, value) if p), None)


class Ints(Domain):
    """A comma list of integers, each in a Range (e.g. lr steps 8,11)."""

    def __init__(self, each: Range, example: str):
        self.each = each
        self.allowed = f"a comma list of {each.allowed.replace('an integer', 'integers')} such as {example}"
        self.metavar = "N,N,..."

    def parse(self, text: str):
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"must be {self.allowed}, got {quote(text)}")
        return tuple(self.each.parse(p) for p in parts)

    def coerce(self, value):
        if isinstance(value, list):
            return tuple(value)
        if is_int(value):
            return (value,)
        return super().coerce(value)

    def valid(self, value) -> bool:
        return isinstance(value, tuple) and len(value) > 0 and all(self.each.valid(v) for v in value)


class JsonObject(Domain):
    """A JSON object (fsspec storage options), e.g. '{"endpoint_url": "http://127.0.0.1:9000"}'."""

    allowed = "a JSON object such as '{\"anon\": false}'"
    metavar = "JSON"

    def parse(self, text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"must be {self.allowed}, got {quote(text)}") from None
        if not isinstance(value, dict):
            raise ValueError(f"must be {self.allowed}, got {quote(text)}")
        return value

    def valid(self, value) -> bool:
        return isinstance(value, dict)


class Table(Domain):
    """A table of values checked elsewhere (the [model] table of a dump's architecture)."""

    allowed = "a table"

    def valid(self, value) -> bool:
        return isinstance(value, dict)


class Nested(Domain):
    """A config embedded in another (its TOML table as a dict, or the config itself)."""

    def __init__(self, cls: type):
        self.cls, self.allowed = cls, f"a {cls.__name__} table"

    def coerce(self, value):
        return self.cls(**value) if isinstance(value, dict) else value

    def valid(self, value) -> bool:
        return isinstance(value, self.cls)
