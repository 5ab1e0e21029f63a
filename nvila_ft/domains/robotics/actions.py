"""Discretised robot actions as one line of text, e.g. `x=+1 y=0 grip=close`, and back.

The text format: `field=value` tokens separated by spaces, one per field, in the format's field order.
A numeric field `{low, high, bins}` (bins odd, so that 0 is a bin of its own) clips a value to [low, high],
cuts the range into `bins` equal bins and writes the bin's signed offset from the middle one: with
`{low: -1, high: 1, bins: 3}`, -0.7 -> `-1`, 0.1 -> `0`, 1.0 -> `+1`. A categorical field `{values: [...]}`
writes its value as given (`grip=open`). Parsing never raises for a model's output: it returns the values it
could read and one problem per missing, unknown, repeated or invalid field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedAction:
    """What `parse_action_text` / `ActionFormat.parse` read: field -> value text, and what was wrong."""

    values: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_action_text(text: str) -> ParsedAction:
    """`field=value` tokens -> ParsedAction (any field names; a token without "=", an empty name or value, or a
    repeated field is a problem). Values are canonical: numbers as signed integers ("1" -> "+1", "-0" -> "0"),
    anything else lower-cased."""
    parsed = ParsedAction()
    if not isinstance(text, str) or not text.strip():
        parsed.problems.append("empty output (no field=value tokens)")
        return parsed
    for token in text.split():
        name, sep, value = token.partition("=")
        if not sep or not name or not value:
            parsed.problems.append(f"{token!r} is not field=value")
            continue
        name = name.lower()
        if name in parsed.values:
            parsed.problems.append(f"field {name!r} given twice")
            continue
        parsed.values[name] = canonical_value(value)
    return parsed


def canonical_value(value: str) -> str:
    """"+1"/"1" -> "+1", "-0"/"0" -> "0", "-2" -> "-2"; other text lower-cased."""
    try:
        number = int(value)
    except ValueError:
        return value.lower()
    return f"{number:+d}" if number else "0"


class ActionFormat:
    """The fields of a discretised action and how each is written. `fields`: {name: {low, high, bins}} for a
    numeric field or {name: {values: [...]}} for a categorical one, in output order."""

    def __init__(self, fields: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(fields, Mapping) or not fields:
            raise ValueError("action_fields: give at least one field, e.g. {x: {low: -1, high: 1, bins: 3}}")
        self.fields: dict[str, dict[str, Any]] = {}
        for name, spec in fields.items():
            where = f"action_fields.{name}"
            if not isinstance(name, str) or not name or "=" in name or " " in name or name != name.lower():
                raise ValueError(f"{where}: a field name is a lower-case word without '=' or spaces")
            if not isinstance(spec, Mapping):
                raise ValueError(f"{where}: expected {{low, high, bins}} or {{values: [...]}}, got {spec!r}")
            if "values" in spec:
                given = spec["values"]
                # a bare string would be read letter by letter ("open" -> o, p, e, n)
                values = [str(v).lower() for v in given] if isinstance(given, Sequence) and not isinstance(given, str) else []
                if not values or len(set(values)) != len(values) or any(" " in v or "=" in v or not v for v in values):
                    raise ValueError(f"{where}.values: a list of distinct non-empty words without '=', got {spec['values']!r}")
                self.fields[name] = {"values": values}
                continue
            try:
                low, high, bins = float(spec["low"]), float(spec["high"]), int(spec["bins"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: a numeric field needs low, high and bins, got {dict(spec)!r}") from None
            if not low < high or bins < 1 or bins % 2 == 0:
                raise ValueError(f"{where}: needs low < high and an odd number of bins (0 is the middle bin), "
                                 f"got low={low:g} high={high:g} bins={bins}")
            self.fields[name] = {"low": low, "high": high, "bins": bins}

    def tokens(self, name: str) -> list[str]:
        """Every value text field `name` may take."""
        spec = self.fields[name]
        if "values" in spec:
            return list(spec["values"])
        half = spec["bins"] // 2
        return [canonical_value(str(i)) for i in range(-half, half + 1)]

    def encode_value(self, name: str, value: Any) -> str:
        """One field's value as its token; ValueError naming the field when it cannot be."""
        spec = self.fields[name]
        if "values" in spec:
            text = str(value).lower() if isinstance(value, (str, bool)) else None
            if text not in spec["values"]:
                raise ValueError(f"{name}: {value!r} is not one of {spec['values']}")
            return text
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        low, high, bins = spec["low"], spec["high"], spec["bins"]
        index = min(max(math.floor((value - low) / (high - low) * bins), 0), bins - 1)
        return canonical_value(str(index - bins // 2))

    def format(self, action: Mapping[str, Any]) -> str:
        """{field: value} -> "x=+1 y=0 grip=close"; ValueError naming the missing or invalid field."""
        if not isinstance(action, Mapping):
            raise ValueError(f"expected a dict of {list(self.fields)}, got {type(action).__name__}")
        missing = [name for name in self.fields if name not in action]
        if missing:
            raise ValueError(f"missing field(s) {missing} (the action format has {list(self.fields)})")
        return " ".join(f"{name}={self.encode_value(name, action[name])}" for name in self.fields)

    def parse(self, text: str) -> ParsedAction:
        """A model's output -> ParsedAction; problems name each missing, unknown or out-of-range field."""
        parsed = parse_action_text(text)
        invalid = set()
        for name, value in list(parsed.values.items()):
            if name not in self.fields:
                parsed.problems.append(f"unknown field {name!r} (fields: {list(self.fields)})")
            elif value not in self.tokens(name):
                parsed.problems.append(f"field {name!r}: {value!r} is not one of {self.tokens(name)}")
                invalid.add(name)
            else:
                continue
            del parsed.values[name]
        parsed.problems += [f"missing field {name!r}" for name in self.fields if name not in parsed.values and name not in invalid]
        return parsed
