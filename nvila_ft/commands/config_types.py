"""Config values checked against the annotations of the objects they build, before anything is built.

A node with `_target_` builds that class or function; each of its keys is an argument, annotated in the
signature. A value of the wrong kind (`trainer.max_steps=abc`) or a required value left unset (`???`) is a
`ConfigError` naming the full key, instead of a TypeError deep inside a constructor.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from nvila_ft.training.config import ConfigError

_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_node(node: Any, where: str) -> None:
    """Raise ConfigError for the first key of `node` (and of nodes inside it) whose value cannot be right."""
    if not isinstance(node, DictConfig):
        return
    hints = _argument_hints(node.get("_target_")) if "_target_" in node else {}
    _check_mapping(node, hints, where)


def _check_mapping(node: DictConfig, hints: dict[str, Any], where: str) -> None:
    for key in node:
        if key == "_target_":
            continue
        full = f"{where}.{key}"
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{full} is required: set it on the command line ({full}=...)")
        try:
            value = node[key]
        except MissingMandatoryValue as err:  # an interpolation pointing at an unset value
            raise ConfigError(f"{full} is required ({err.msg.splitlines()[0]})") from None
        if isinstance(value, DictConfig) and "_target_" in value:
            check_node(value, full)
        elif isinstance(value, ListConfig):
            for index, item in enumerate(value):
                check_node(item, f"{full}[{index}]")
        if str(key) in hints:
            _check_value(value, hints[str(key)], full)


def _check_value(value: Any, hint: Any, where: str) -> None:
    if _matches(value, hint):
        nested = _dataclass_of(hint)
        if nested is not None and isinstance(value, DictConfig) and "_target_" not in value:
            _check_mapping(value, _argument_hints(nested), where)
        return
    shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    raise ConfigError(f"{where} = {shown!r}: expected {_describe(hint)}")


def _argument_hints(target: Any) -> dict[str, Any]:
    """Parameter annotations of what a `_target_` builds ({} when it cannot be resolved or has none)."""
    if isinstance(target, str):
        from hydra.utils import get_object

        try:
            target = get_object(target)
        except Exception:  # noqa: BLE001 - Hydra reports an unknown target itself, with its own message
            return {}
    try:
        if dataclasses.is_dataclass(target):
            hints = typing.get_type_hints(target)
            return {f.name: hints[f.name] for f in dataclasses.fields(target) if f.init and f.name in hints}
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # noqa: BLE001 - unresolvable annotations are not checked
        return {}
    hints.pop("return", None)
    return hints


def _dataclass_of(hint: Any) -> type | None:
    for option in _options(hint):
        if dataclasses.is_dataclass(option):
            return option
    return None


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint) or hint
    if inspect.isclass(origin) and issubclass(origin, Mapping):
        return isinstance(value, (DictConfig, dict))
    if inspect.isclass(origin) and issubclass(origin, Sequence) and origin is not str:
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        arguments = typing.get_args(hint)
        return not arguments or all(_matches(item, arguments[0]) for item in value)
    if dataclasses.is_dataclass(origin):
        return isinstance(value, (DictConfig, dict, origin))
    return True  # anything else (paths, objects built elsewhere) is the constructor's to check


def _describe(hint: Any) -> str:
    options = [o for o in _options(hint) if o is not type(None)]
    words = []
    for option in options:
        origin = typing.get_origin(option) or option
        if option in _KIND_NAMES:
            words.append(_KIND_NAMES[option])
        elif inspect.isclass(origin) and issubclass(origin, Mapping) or dataclasses.is_dataclass(origin):
            words.append("a mapping of settings")
        elif inspect.isclass(origin) and issubclass(origin, Sequence):
            words.append("a list ([...])")
        else:
            words.append(getattr(option, "__name__", str(option)))
    text = " or ".join(words)
    return text + (" or null" if len(options) < len(_options(hint)) else "")
