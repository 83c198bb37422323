"""Typed, strict configuration: pydantic models, YAML files and dotted command-line overrides.

Every entry point has one root config composed of small sub-configs. Unknown keys and bad values
fail at load time with a message naming the field (``optimizer.lr: Input should be greater than
0``), never later from deep inside JAX; a misspelt key gets the closest valid one suggested.

    cfg = load_config(TrainConfig, "launch/configs/train_tiny.yaml", ["optimizer.lr=3e-4"])

Each field says what changing it does to a run's result (:class:`Effect`, given as
``Field(..., json_schema_extra=EXECUTION)``); which fields a resume may change, which a
pipeline's version hash leaves out and which a generation's fingerprint covers are all derived
from that one marking (:func:`fields_with`), never listed by hand.
"""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from dictlearn.errors import UserError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ConfigError(UserError):
    """A config file or override is malformed; the message names the file and field."""


class Effect(StrEnum):
    """What changing a config field does to a run's result; every field has one (default RESULT).

    The rules that follow from it: a pipeline stage's version hash and a generation's
    fingerprint cover RESULT, LENGTH and RECOVERY fields (EVALUATION too, except in a pipeline's
    train stage, where the eval stage reports the result); a resumed run may change every kind
    but RESULT; a branch (``init.from_checkpoint``) may change EXECUTION, EVALUATION and LENGTH;
    a sweep re-run may change EXECUTION only.
    """

    RESULT = "result"
    """Decides what is computed (the SAE, the activations, the metrics)."""
    EXECUTION = "execution"
    """Where or how it runs (cluster, mesh, paths, cadence, logging): the numbers stay the same,
    up to float rounding when a mesh changes the order of sums."""
    EVALUATION = "evaluation"
    """What held-out evaluation during training reports, never the trained state."""
    LENGTH = "length"
    """Where the lr schedule ends (its length, its decay): a resumed or branched run may change
    it while its steps already run keep their lr, i.e. before the decay starts (checked)."""
    RECOVERY = "recovery"
    """The lr's peak and warm-up: a resumed run may change them (the remedy for a divergence;
    the result then differs from an uninterrupted run); a branch may not."""


def marked(effect: Effect) -> dict[str, str]:
    """``json_schema_extra`` that marks a field: ``Field(2, json_schema_extra=marked(...))``."""
    return {"effect": effect.value}


EXECUTION = marked(Effect.EXECUTION)
EVALUATION = marked(Effect.EVALUATION)
LENGTH = marked(Effect.LENGTH)
RECOVERY = marked(Effect.RECOVERY)


def effect_of(field: FieldInfo) -> Effect:
    """A field's :class:`Effect` (RESULT where unmarked)."""
    extra = field.json_schema_extra
    return Effect(extra.get("effect", Effect.RESULT)) if isinstance(extra, dict) else Effect.RESULT


def model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The config classes a field's annotation can hold: ``X``, ``X | None``, a union of
    architectures, ``Annotated[...]`` (lists and dicts of models are leaves)."""
    if get_origin(annotation) is Annotated:
        return model_classes(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return [cls for arg in get_args(annotation) for cls in model_classes(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def iter_fields(cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo, type]]:
    """Every field of ``cls`` and its sub-configs, depth first: ``(dotted name, field, owner)``.

    A section (a field holding configs) comes before its fields; a union of configs (``sae``)
    yields each member's fields, so a name can come more than once (with different owners); the
    fields of a list of configs (a group's members) are named ``group[].name``.
    """
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        yield dotted, field, cls
        for sub in model_classes(field.annotation):
            yield from iter_fields(sub, f"{dotted}.")
        if get_origin(field.annotation) is list:
            for item in model_classes(get_args(field.annotation)[0]):
                yield from iter_fields(item, f"{dotted}[].")


def fields_with(cls: type[BaseModel], effects: set[Effect]) -> tuple[str, ...]:
    """Dotted names of the fields of ``cls`` marked with one of ``effects``, sorted; a marked
    section is named once, not field by field. What :func:`without_fields` takes."""
    found: set[str] = set()
    for dotted, field, _ in iter_fields(cls):
        if effect_of(field) in effects and not any(dotted.startswith(f + ".") for f in found):
            found.add(dotted)
    return tuple(sorted(f for f in found if not any(f.startswith(g + ".") for g in found)))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value (``3e-4`` → float)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.sub=value`` override set (creating sub-dicts)."""
    result: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: {part!r} is a value, not a section, so it has no fields"
                )
            node = child
        node[path[-1]] = value
    return result


def without_fields(data: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` without the fields and sections named by dotted paths (``"a.b"``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in dotted:
            continue
        nested = tuple(d[len(key) + 1 :] for d in dotted if d.startswith(key + "."))
        out[key] = without_fields(value, nested) if isinstance(value, dict) and nested else value
    return out


class WhereSibling(NamedTuple):
    """A value for :func:`without_values_from_before` that applies only in sections whose field
    ``key`` holds ``equals``: a field one architecture gained later that another always had."""

    key: str
    equals: Any
    value: Any


def without_values_from_before(data: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` without the dotted fields of ``before`` that hold the value ``before``
    gives: the value every config had before the field existed. Version hashes and run
    comparisons go through this, so that a config written before a field was added and one that
    sets the field to that value are the same run (a config dump still holds every field)."""
    out = dict(data)
    for dotted, value in before.items():
        head, _, rest = dotted.partition(".")
        if head not in out:
            continue
        if rest and isinstance(out[head], dict):
            out[head] = without_values_from_before(out[head], {rest: value})
        elif rest:
            continue
        elif isinstance(value, WhereSibling):
            if out.get(value.key) == value.equals and out[head] == value.value:
                del out[head]
        elif out[head] == value:
            del out[head]
    return out


def differences(
    saved: dict[str, Any], current: dict[str, Any], saved_as: str = "checkpoint", prefix: str = ""
) -> list[str]:
    """Fields (dotted) where two resolved configs differ, one line each:
    ``sae.k: checkpoint has 32, config has 64`` (``saved_as`` names the older one)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += differences(a, b, saved_as, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {saved_as} has {a!r}, config has {b!r}")
    return diffs


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URL."""
    try:
        with fsspec.open(str(path), "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def validate(cls: type[ConfigT], data: dict[str, Any], source: str = "config") -> ConfigT:
    """Build ``cls`` from a dict; a failure lists every bad field by its dotted name.

    Raises:
        ConfigError: one line per bad field; an unknown key names the closest valid one.
    """
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, cls)) from None


def format_validation_error(
    error: ValidationError, source: str = "config", cls: type[BaseModel] | None = None
) -> str:
    """``invalid <source>:`` then one line per bad field (``  optimizer.lr: ... (got -1)``);
    with the root ``cls``, an unknown key suggests the closest valid key at its place."""
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            hint = _closest_key(cls, err["loc"]) if cls is not None else None
            advice = f"did you mean {hint!r}?" if hint else "check the spelling;"
            lines.append(f"  {field}: unknown key ({advice} `dictlearn config` lists the fields)")
        else:
            # A model-level check (several fields at once) names its fields in its message;
            # echoing the whole section back as "got" would bury it.
            message = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            got = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  {field}: {message}{got}" if err["loc"] else f"  {message}")
    return f"invalid {source}:\n" + "\n".join(lines)


def _closest_key(cls: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The valid key closest to the unknown ``loc[-1]`` among its siblings (difflib), or None.

    ``loc`` is pydantic's path: section names, list indices, and a union member's tag
    (``sae.topk.kk``), which selects that member.
    """
    owners: list[type[BaseModel]] = [cls]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an index into a list of configs: same owners
        tagged = [o for o in owners if _tag(o) == part]
        if tagged:
            owners = tagged
            continue
        owners = [
            sub
            for o in owners
            if part in o.model_fields
            for sub in model_classes(_item_type(o.model_fields[part].annotation))
        ]
    keys = sorted({k for o in owners for k in o.model_fields})
    matches = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _item_type(annotation: Any) -> Any:
    """``list[X]`` -> ``X`` (a list of configs, e.g. a group's members); anything else as is."""
    if get_origin(annotation) is list:
        return get_args(annotation)[0]
    return annotation


def _tag(cls: type[BaseModel]) -> str | None:
    """A union member's discriminator value (``architecture: Literal["topk"]``), if any."""
    field = cls.model_fields.get("architecture")
    args = get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None
) -> ConfigT:
    """Load ``cls`` from an optional YAML file plus dotted overrides; defaults fill the rest."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    return validate(cls, data, source=f"config {path}" if path else "config")


def to_yaml(config: BaseModel) -> str:
    """The fully resolved config as YAML (what every run directory records)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Describing configs: what `dictlearn config` prints and the README's field tables


@dataclass(frozen=True)
class FieldDoc:
    """One row of a config's reference: a field by its dotted name."""

    name: str
    type: str
    default: str
    description: str
    effect: Effect


REQUIRED = "required"


def field_docs(
    cls: type[BaseModel],
    default: BaseModel | None = None,
    *,
    prefix: str = "",
    collapse: tuple[str, ...] = (),
) -> list[FieldDoc]:
    """Every field of ``cls`` and its sub-configs, depth first, with type, default, description.

    Args:
        cls: the root config.
        default: an instance whose values are the defaults to show (a pipeline's embedded
            defaults differ from its sections' own); None: each field's own default.
        prefix: prepended to every name.
        collapse: dotted names of sections listed as one row, not field by field.

    A union of configs (``sae``) lists the union of its members' fields; a field only some
    members have says which, and defaults that differ are given per member. A list of configs
    (a group's members) lists the members' fields as ``name[].field``.
    """
    docs: list[FieldDoc] = []
    for name, field in cls.model_fields.items():
        dotted = f"{prefix}{name}"
        value = getattr(default, name) if default is not None else _own_default(field)
        subs = model_classes(field.annotation)
        is_list = get_origin(field.annotation) is list
        items = model_classes(get_args(field.annotation)[0]) if is_list else []
        effect = effect_of(field)
        row = FieldDoc(
            dotted,
            _type_name(field.annotation, field),
            _show(value),
            field.description or "",
            effect,
        )
        if dotted in collapse or not (subs or items):
            docs.append(row)
        elif len(subs) > 1:
            docs += _union_docs(subs, value, f"{dotted}.", effect)
        else:
            if value is None or value is _REQUIRED or items:
                docs.append(row)  # an optional section (null by default), or a list of configs
            inner = value if isinstance(value, BaseModel) else None
            child = f"{dotted}[]." if items else f"{dotted}."
            docs += [
                _inherit(d, effect)
                for d in field_docs((items or subs)[0], inner, prefix=child, collapse=collapse)
            ]
    return docs


def _inherit(doc: FieldDoc, section: Effect) -> FieldDoc:
    """A field inside a marked section has the section's effect."""
    if section is Effect.RESULT or doc.effect is not Effect.RESULT:
        return doc
    return FieldDoc(doc.name, doc.type, doc.default, doc.description, section)


def _union_docs(
    members: list[type[BaseModel]], value: Any, prefix: str, section: Effect
) -> list[FieldDoc]:
    """The rows of a union of configs chosen by a tag (``sae.architecture``)."""
    per_member = {
        _tag(m) or m.__name__: {
            d.name: d for d in field_docs(m, value if type(value) is m else None, prefix=prefix)
        }
        for m in members
    }
    names = list(dict.fromkeys(n for rows in per_member.values() for n in rows))
    docs = []
    for name in names:
        having = {tag: rows[name] for tag, rows in per_member.items() if name in rows}
        first = next(iter(having.values()))
        if name == f"{prefix}architecture":
            tags = " | ".join(having)
            default = _show(getattr(value, "architecture", _REQUIRED))
            what = "Which architecture; a field only some have names them, e.g. (topk)."
            docs.append(FieldDoc(name, tags, default, what, first.effect))
            continue
        defaults = {tag: d.default for tag, d in having.items()}
        shown = (
            first.default
            if len(set(defaults.values())) == 1
            else ", ".join(f"{tag}: {d}" for tag, d in defaults.items())
        )
        docs.append(
            _inherit(
                FieldDoc(
                    name,
                    _per_member(having, "type"),
                    shown,
                    _per_member(having, "description", every=len(having) == len(per_member)),
                    first.effect,
                ),
                section,
            )
        )
    return docs


def _per_member(having: dict[str, FieldDoc], attr: str, every: bool = True) -> str:
    """A union field's type or description: one text where its members agree, else each
    member's, named (so a description is never read as another architecture's). ``every``:
    all members have the field; else even one shared text names the members that have it."""
    texts: dict[str, list[str]] = {}
    for tag, doc in having.items():
        texts.setdefault(getattr(doc, attr), []).append(tag)
    if len(texts) == 1:
        (text,) = texts
        return text if every else f"({', '.join(having)}) {text}"
    return " ".join(f"({', '.join(tags)}) {text}" for text, tags in texts.items())


class _Required:
    def __repr__(self) -> str:
        return REQUIRED


_REQUIRED = _Required()


def _own_default(field: FieldInfo) -> Any:
    if field.is_required():
        return _REQUIRED
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def _show(value: Any) -> str:
    """A default as a user would write it in YAML."""
    if value is _REQUIRED:
        return REQUIRED
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, StrEnum):
        value = value.value
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, separators=(", ", ": ")).replace('"', "")


def _type_name(annotation: Any, field: FieldInfo | None = None) -> str:
    """``int > 0``, ``float | null``, ``auto | never``, ``list[int]``, ``section``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        name = _type_name(args[0])
    elif origin in (Union, types.UnionType):
        name = " | ".join(_type_name(a) for a in args)
    elif origin is Literal:
        name = " | ".join(str(a) for a in args)
    elif origin in (list, tuple, dict):
        name = f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    elif annotation is type(None):
        name = "null"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        name = "section"
    elif annotation is Any:
        name = "any"
    elif isinstance(annotation, type):
        name = annotation.__name__
    else:
        name = str(annotation)
    bounds = [_bound(m) for m in (field.metadata if field is not None else [])]
    return " ".join([name, *(b for b in bounds if b)])


def _bound(meta: Any) -> str:
    for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if hasattr(meta, attr) and type(meta).__name__.lower() == attr:
            return f"{sign} {getattr(meta, attr)}"
    if type(meta).__name__ == "MinLen":
        return f"(at least {meta.min_length})"
    return ""


def docs_as_text(docs: list[FieldDoc]) -> str:
    """Rows for a terminal: ``name  type  = default  [effect]`` and the description below."""
    width = max((len(d.name) for d in docs), default=0)
    lines = []
    for d in docs:
        mark = "" if d.effect is Effect.RESULT else f"  [{d.effect.value}]"
        lines.append(f"{d.name:<{width}}  {d.type}  = {d.default}{mark}")
        if d.description:
            lines.append(f"{'':<{width}}    {d.description}")
    return "\n".join(lines)


def docs_as_markdown(docs: list[FieldDoc]) -> str:
    """A Markdown table: field, type, default, kind (the effect), description."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| field | type | default | kind | description |", "|---|---|---|---|---|"]
    rows += [
        f"| `{d.name}` | {cell(d.type)} | `{cell(d.default)}` | {d.effect.value} | "
        f"{cell(d.description)} |"
        for d in docs
    ]
    return "\n".join(rows)
