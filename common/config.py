"""The base of every config section: a frozen pydantic model whose errors are ConfigErrors
(docs/conventions.md §4-5), the `key=value` override syntax, and the table of keys that
`dlm CMD --help` prints. It sits below all packages, like the error types.

A section's fields are its only defaults; `Field(ge=..)` and `Literal[..]` state what is
allowed, so the checks, the messages and the help text all come from the same declaration.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass

import annotated_types
import yaml
from dlm_pretrain.common.errors import ConfigError
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


class Section(BaseModel):
    """A config section: frozen, unknown keys refused, every value checked on construction.

    Nested sections are validated by the outermost one, so an error names the full dotted
    key (`train.micro_batch`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **values: object) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(describe_errors(type(self), e)) from None

    # Marked as pydantic's own __init__, so that a nested section is validated by the
    # outermost one's schema (its errors then carry the full key) rather than by calling this.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def one_or_many(value: object) -> object:
    """A `field_validator(..., mode="before")` for tuple fields: one string is a tuple of one,
    so that `key=a` and `key=[a, b]` both work."""
    return (value,) if isinstance(value, str) else value


def describe_errors(cls: type[Section], error: ValidationError) -> str:
    """One line per bad value: the key, the value, what is allowed (and the closest key or
    choice when that helps)."""
    return "\n".join(_describe(cls, e) for e in error.errors())


def _describe(cls: type[Section], e: dict) -> str:
    loc = [str(part) for part in e["loc"]]
    key, value, kind = ".".join(loc), e.get("input"), e["type"]
    if kind == "extra_forbidden":
        names = list(_section_at(cls, loc[:-1]).model_fields)
        close = difflib.get_close_matches(loc[-1], names, n=1)
        prefix = key.removesuffix(loc[-1])
        hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(names)}"
        return f"unknown config key {key}; {hint}"
    if kind == "missing":
        return f"{key} is required; give {key}=VALUE"
    if kind == "literal_error":
        choices = [str(c) for c in typing.get_args(_field_at(cls, loc).annotation)]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}={value!r} is not one of {e['ctx']['expected']}{hint}"
    if kind.endswith(("_parsing", "_type")):
        return f"{key}={value!r} is not a valid {kind.split('_')[0]}"
    rule = e["msg"].replace("Input should be", "must be")
    return f"{key}={value!r} is out of range: {rule}"


def _section_at(cls: type[Section], loc: list[str]) -> type[Section]:
    for name in loc:
        cls = _base_type(cls.model_fields[name].annotation)
    return cls


def _field_at(cls: type[Section], loc: list[str]) -> FieldInfo:
    return _section_at(cls, loc[:-1]).model_fields[loc[-1]]


def _base_type(annotation: object) -> object:
    """`X | None` -> X; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def apply_overrides(cls: type[Section], tree: dict, overrides: list[str]) -> dict:
    """`key=value` items (dotted keys for nested sections) applied to a YAML-like tree.

    A value is read as YAML (`true`, `3e-4`, `[a.jsonl, b.txt]`), except for a text field,
    which takes it as written; the section then converts it to its type or refuses it (an
    unknown key included, with the closest valid one)."""
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r} is not key=value (e.g. train.steps=100)")
        *path, name = key.split(".")
        node, section = tree, cls
        for part in path:
            field = section.model_fields.get(part) if section else None
            section = field.annotation if field and _is_section(field.annotation) else None
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        field = section.model_fields.get(name) if section else None
        if field is not None and _is_section(field.annotation):
            raise ConfigError(f"{key} is a section; give {key}.KEY=VALUE")
        node[name] = _parse(field, raw)
    return tree


def _parse(field: FieldInfo | None, raw: str) -> object:
    if raw == "" or (field is not None and _base_type(field.annotation) is str):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:  # e.g. a glob starting with `*`: the text as written
        return raw


@dataclass(frozen=True)
class Key:
    """One row of `dlm CMD --help`."""

    name: str  # dotted
    type: str  # int, float, str, bool, ...
    default: str  # as it would be written in key=value ('' when required)
    allowed: str  # '>= 1', 'exact|reference', ...
    help: str


def keys(cls: type[Section], prefix: str = "") -> Iterator[Key]:
    """Every key of `cls`, sections first-to-last in declaration order."""
    for name, field in cls.model_fields.items():
        if _is_section(field.annotation):
            yield from keys(field.annotation, f"{prefix}{name}.")
            continue
        yield Key(
            f"{prefix}{name}",
            _type_name(field.annotation),
            "" if field.is_required() else format_value(_default(field)),
            _allowed(field),
            field.description or "",
        )


def _default(field: FieldInfo) -> object:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def format_value(value: object) -> str:
    """A value as `key=value` takes it."""
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).split("\n")[0]
    return str(value) if value != "" else "''"


def _type_name(annotation: object) -> str:
    base = _base_type(annotation)
    if typing.get_origin(base) is typing.Literal:
        return "str"
    if typing.get_origin(base) is tuple:
        return "list"
    name = getattr(base, "__name__", str(base))
    return f"{name}|null" if base is not annotation else name


def _allowed(field: FieldInfo) -> str:
    base = _base_type(field.annotation)
    if typing.get_origin(base) is typing.Literal:
        return "one of " + ", ".join(c if c != "" else "''" for c in typing.get_args(base))
    bounds = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [
        f"{symbol} {getattr(rule, name)}"
        for rule in field.metadata
        for name, symbol in bounds.items()
        if isinstance(rule, annotated_types.BaseMetadata) and hasattr(rule, name)
    ]
    return ", ".join(parts)
