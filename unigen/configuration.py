"""Configs as nested ``@dataclass(kw_only=True)`` classes, YAML files and CLI overrides.

One source of truth: the dataclass. A YAML (or JSON) file sets any subset of its fields, and
``--section.key=value`` arguments override single fields; every value is checked against the
field's annotation (int, float, bool, str, ``Optional``/``X | None``, ``Literal``, ``Enum``,
``tuple``/``list``, ``dict[str, X]``, nested dataclasses). An unknown key fails with the list
of valid keys, a bad value with the key and the expected type. The dataclass is built last, so
its ``__post_init__`` validation runs on the resolved values. ``save_config`` writes the
resolved config next to a run's outputs.

    cfg = load_config(PretrainConfig, "run.yaml", ["--optim.lr=3e-4", "--data.ratios.qus=0.5"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = ["ConfigError", "config_to_dict", "plain_data", "config_from_dict", "load_config",
           "save_config", "apply_overrides", "parse_override_args", "config_from_argv",
           "check_int", "check_number", "check_choices", "Flag", "config_help", "print_error",
           "run_cli"]

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


class ConfigError(ValueError):
    """A config file or override that does not fit the config dataclass.

    ``kind`` is ``"key"`` (unknown key), ``"value"`` (wrong type/value), ``"missing"`` (a
    required key is absent) or ``"invalid"`` (the dataclass's own validation failed).
    """

    def __init__(self, message: str, kind: str = "value"):
        super().__init__(message)
        self.kind = kind


def check_int(owner: str, name: str, value, *, low: int = 1) -> None:
    """Raise ``ValueError("<owner>.<name> must be an int >= <low>, ...")`` unless it is."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an int >= {low}, got {value!r}")


def check_number(owner: str, name: str, value, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False) -> None:
    """Raise unless ``value`` is a finite number in the range (``low`` exclusive with
    ``low_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = ("" if low is None else f" {'>' if low_open else '>='} {low}") + \
              ("" if high is None else f" and <= {high}")
        raise ValueError(f"{owner}.{name} must be a finite number{rng}, got {value!r}")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(inner) + (" or None" if type(None) in args else "")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.name) for m in tp)
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _unknown_key(key: str, valid: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; valid keys in {where}: "
                       f"{', '.join(sorted(valid))}", kind="key")


def _coerce(value: Any, tp: Any, key: str, *, from_string: bool = False) -> Any:
    """``value`` (parsed YAML, or the raw override string) checked and converted to ``tp``."""

    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"bad value {value!r} for {key!r}: expected {_type_name(tp)}{extra}")

    if from_string and isinstance(value, list):
        inner = _unwrap_optional(tp)
        if not (typing.get_origin(inner) in (tuple, list) or inner in (tuple, list)):
            raise ConfigError(f"{key!r} takes one value, got {len(value)}: {value!r}")
        tp = inner

    if tp is Any or tp is typing.Any:
        return yaml.safe_load(value) if from_string else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if (value is None or (from_string and value.strip().lower() in _NONE)) \
                and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, from_string=from_string)
            except ConfigError:
                continue
        raise bad()
    if origin is typing.Literal:
        for choice in args:
            if value == choice or (from_string and str(choice) == value):
                return choice
        raise bad()
    if _is_dataclass_type(tp):
        if from_string:
            raise ConfigError(f"{key!r} is a section, not a value; set its fields with "
                              f"--{key}.<field>=... (fields: {', '.join(sorted(_fields(tp)))})")
        if not isinstance(value, dict):
            raise bad(f", a mapping of its fields, got {type(value).__name__}")
        return config_from_dict(tp, value, prefix=key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for m in tp:
            if value == m.name or value == m.value or (from_string and str(m.value) == value):
                return m
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad(" (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise bad() from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if from_string:
            return str(value)
        raise bad(f", got {type(value).__name__}")
    if origin in (tuple, list) or tp in (tuple, list):
        items = value
        if from_string and isinstance(value, list):  # --key v1 v2 ... on the command line
            pass
        elif from_string:
            text = value.strip()
            if text.startswith("["):
                items = yaml.safe_load(text)
            else:
                items = [] if not text else [p.strip() for p in text.split(",")]
            from_string = not text.startswith("[")
        if not isinstance(items, (list, tuple)):
            raise bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise bad(f" of length {len(args)}, got {len(items)} items")
            conv = [_coerce(v, a, f"{key}[{i}]", from_string=from_string)
                    for i, (v, a) in enumerate(zip(items, args))]
        else:
            elem = args[0] if args else Any
            conv = [_coerce(v, elem, f"{key}[{i}]", from_string=from_string)
                    for i, v in enumerate(items)]
        return tuple(conv) if (origin is tuple or tp is tuple) else conv
    if origin is dict or tp is dict:
        items = yaml.safe_load(value) if from_string else value
        if not isinstance(items, dict):
            raise bad()
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key} key"): _coerce(v, vt, f"{key}.{k}")
                for k, v in items.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    raise ConfigError(f"{key!r}: unsupported annotation {tp!r}")


def plain_data(v):
    """``v`` as YAML/JSON data: dataclasses become dicts, tuples lists, enums their values (a
    value and its round trip through a saved config compare equal this way)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: plain_data(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (list, tuple)):
        return [plain_data(x) for x in v]
    if isinstance(v, dict):
        return {k: plain_data(x) for k, x in v.items()}
    return v


def config_to_dict(cfg) -> dict:
    """A plain dict (YAML/JSON-ready: tuples become lists, enums their values)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return plain_data(cfg)


PRESET_KEY = "preset"


def _presets(cls) -> dict[str, Any]:
    """A section's named presets: ``cls.config_presets()`` (name → factory), if it has one."""
    make = getattr(cls, "config_presets", None)
    return make() if callable(make) else {}


def _preset_base(cls, name, key: str):
    presets = _presets(cls)
    if name not in presets:
        raise ConfigError(f"bad value {name!r} for {key!r}: expected one of "
                          f"{', '.join(sorted(presets))}")
    return presets[name]()


def config_from_dict(cls, data: dict, *, prefix: str = "", base=None):
    """Build ``cls`` from a (possibly partial) dict; unknown keys and bad values raise.

    Keys the dict leaves out keep their value in ``base`` (an instance of ``cls``) when given,
    else the field's default. A nested section starts from the enclosing default: a field
    declared ``optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5))`` keeps
    ``lr=3e-5`` when a file sets only ``optim.weight_decay``. A section whose class has
    ``config_presets()`` may be a preset's name (``model: tiny``) or hold ``preset: NAME``
    beside fields, which then change that preset.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, "
                          f"got {type(data).__name__}")
    hints, fields = _hints(cls), _fields(cls)
    if PRESET_KEY in data and PRESET_KEY not in fields and _presets(cls):
        data = dict(data)
        base = _preset_base(cls, data.pop(PRESET_KEY),
                            f"{prefix}.{PRESET_KEY}" if prefix else PRESET_KEY)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(key, fields, repr(prefix) if prefix else cls.__name__)
        section = _unwrap_optional(hints[name])
        if _is_dataclass_type(section) and isinstance(value, str) and _presets(section):
            value = {PRESET_KEY: value}
        if _is_dataclass_type(section) and isinstance(value, dict):
            start = getattr(base, name) if base is not None else _field_default(cls, name)
            kwargs[name] = config_from_dict(section, value, prefix=key,
                                            base=start if isinstance(start, section) else None)
        else:
            kwargs[name] = _coerce(value, hints[name], key)
    if base is not None:
        for name in fields:
            if name not in kwargs:
                kwargs[name] = copy.deepcopy(getattr(base, name))
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix or cls.__name__}: missing required key(s) "
                          f"{', '.join(repr(f'{prefix}.{m}' if prefix else m) for m in missing)}",
                          kind="missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{prefix or cls.__name__}: {exc}", kind="invalid") from exc


@dataclass(frozen=True)
class Flag:
    """A command-line alias of a config key, e.g. ``--lr`` for ``optim.lr``; with ``const``,
    the flag takes no value and sets that one (``--resume`` for ``checkpoint.resume=auto``)."""

    key: str
    const: str | None = None


def _alias(aliases, name: str) -> Flag | None:
    a = (aliases or {}).get(name)
    return Flag(a) if isinstance(a, str) else a


def parse_override_args(args: Sequence[str], aliases: Mapping[str, str | Flag] | None = None
                        ) -> list[tuple[str, str | list[str]]]:
    """``["--a.b=1", "--c", "2", "--paths", "x", "y"]`` → ``[("a.b", "1"), ("c", "2"),
    ("paths", ["x", "y"])]``: a key followed by several values is a list. Dashes in keys
    become underscores (``--batch-size``); ``aliases`` maps such a name to its config key."""
    out, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override '--section.key=value', got {arg!r}")
        body = arg[2:]
        name, eq, value = body.partition("=")
        name = name.replace("-", "_")
        values = []
        i += 1
        if not eq:
            while i < len(args) and not args[i].startswith("--"):
                values.append(args[i])
                i += 1
        alias = _alias(aliases, name)
        if alias is not None and alias.const is not None:
            if eq or values:
                raise ConfigError(f"{arg.split('=', 1)[0]} takes no value (it sets "
                                  f"{alias.key}={alias.const})")
            out.append((alias.key, alias.const))
            continue
        if not eq and not values:
            raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE")
        key = alias.key if alias is not None else name
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"malformed override key in {arg!r}")
        out.append((key, value if eq else (values[0] if len(values) == 1 else values)))
    return out


def apply_overrides(cls, data: dict, overrides: Sequence[str] | Sequence[tuple[str, str]]) -> dict:
    """``data`` (a partial dict for ``cls``) with the overrides applied, each type-checked."""
    pairs = parse_override_args(overrides) if overrides and isinstance(overrides[0], str) \
        else list(overrides)
    data = copy.deepcopy(data) if data else {}
    for key, raw in pairs:
        node_cls, node = cls, data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            path = ".".join(parts[: depth + 1])
            fields = _fields(node_cls)
            if part not in fields:
                where = repr(".".join(parts[:depth])) if depth else node_cls.__name__
                raise _unknown_key(path, fields, where)
            tp = _hints(node_cls)[part]
            last = depth == len(parts) - 1
            inner = _unwrap_optional(tp)
            has_presets = _is_dataclass_type(inner) and bool(_presets(inner))
            if _is_dataclass_type(inner) and isinstance(node.get(part), str) and has_presets:
                node[part] = {PRESET_KEY: node[part]}  # ``model: tiny`` in the file
            if last and has_presets and isinstance(raw, str):
                # --model=tiny: the section starts from that preset; its other keys stay
                _preset_base(inner, raw, path)
                section = node.get(part) if isinstance(node.get(part), dict) else {}
                node[part] = {**section, PRESET_KEY: raw}
                break
            if last:
                node[part] = _to_plain(_coerce(raw, tp, path, from_string=True))
                break
            if _is_dataclass_type(inner):
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                if (parts[depth + 1] == PRESET_KEY and depth + 1 == len(parts) - 1
                        and has_presets and PRESET_KEY not in _fields(inner)):
                    _preset_base(inner, raw, f"{path}.{PRESET_KEY}")  # --model.preset=tiny
                    node[part][PRESET_KEY] = raw
                    break
                node_cls, node = inner, node[part]
                continue
            if typing.get_origin(inner) is dict and depth == len(parts) - 2:
                vt = typing.get_args(inner)[1] if typing.get_args(inner) else Any
                current = node.get(part)
                if not isinstance(current, dict):
                    default = _field_default(node_cls, part)
                    current = dict(default) if isinstance(default, dict) else {}
                current[parts[-1]] = _to_plain(_coerce(raw, vt, key, from_string=True))
                node[part] = current
                break
            raise ConfigError(f"{path!r} is a {_type_name(tp)} value, it has no key "
                              f"{parts[depth + 1]!r}; write --{path}=VALUE")
    return data


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_default(cls, name):
    f = _fields(cls)[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _to_plain(v):
    if isinstance(v, enum.Enum):
        return v.name
    if isinstance(v, tuple):
        return [_to_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_plain(x) for x in v]
    return v


EXTENDS_KEY = "extends"
"""A config file's top-level ``extends: OTHER.yaml`` (relative to the file) starts it from
that file: its mappings are merged key by key into the other's, any other value replaces the
other's (an ablation is the paper's preset and the lines that differ)."""


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_file(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path) and not _chain:
        # not a file here: a preset's name (``tiny``, ``configs/tiny.yaml`` from an installed
        # wheel, run from any folder)
        from unigen.presets import find_preset, preset_names

        found = find_preset(path)
        if found is None:
            names = preset_names()
            raise FileNotFoundError(f"config file {path!r} does not exist"
                                    + (f" and is no preset ({', '.join(names)})" if names else ""))
        path = found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist"
                                + (f" (extended by {_chain[-1]})" if _chain else ""))
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot parse config file ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config file must be a mapping")
    if EXTENDS_KEY in data:
        data = dict(data)
        parent = data.pop(EXTENDS_KEY)
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{path}: {EXTENDS_KEY} must name a config file, got {parent!r}")
        parent = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), parent))
        if parent in _chain or parent == os.path.abspath(path):
            raise ConfigError(f"{path}: {EXTENDS_KEY} makes a cycle through {parent}")
        data = _merge(_read_file(parent, _chain + (os.path.abspath(path),)), data)
    return data


def read_config_file(path: str | os.PathLike) -> dict:
    """A config file as a plain dict (``extends`` resolved), for tools that read one section."""
    return _read_file(path)


def load_config(cls, yaml_path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()):
    """Defaults of ``cls`` ← the YAML/JSON file ← ``--section.key=value`` overrides."""
    data = _read_file(yaml_path) if yaml_path is not None else {}
    if overrides:
        # check the file's keys and values first, so its errors name the file; a missing key
        # or a failed validation may still be fixed by the overrides
        try:
            config_from_dict(cls, data)
        except ConfigError as exc:
            if yaml_path is not None and exc.kind in ("key", "value"):
                raise ConfigError(f"{os.fspath(yaml_path)}: {exc}", kind=exc.kind) from None
        data = apply_overrides(cls, data, list(overrides))
    try:
        return config_from_dict(cls, data)
    except ConfigError as exc:
        if yaml_path is not None and not overrides:
            raise ConfigError(f"{os.fspath(yaml_path)}: {exc}", kind=exc.kind) from None
        raise


def save_config(cfg, path: str | os.PathLike) -> str:
    """Write the resolved config as YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
    path = os.fspath(path)
    data = config_to_dict(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith((".yaml", ".yml")):
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    elif path.endswith(".json"):
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        raise ValueError(f"save_config: {path!r} must end in .yaml, .yml or .json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def config_from_argv(cls, argv: Sequence[str], aliases: Mapping[str, str | Flag] | None = None):
    """``--config FILE`` (optional) plus ``--section.key=value`` overrides (and the
    ``aliases``' flags, see :func:`parse_override_args`) → a config."""
    argv, config_path, rest, i = list(argv), None, [], 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file name")
            config_path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config_path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return load_config(cls, config_path, parse_override_args(rest, aliases))


def _field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal after each field)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_help(cls, *, prog: str, description: str = "",
                aliases: Mapping[str, str | Flag] | None = None) -> str:
    """``--help`` text of an entry point: every key of ``cls`` (dotted, with its type, default
    and docstring), then the short flags of ``aliases``."""
    import textwrap

    lines = [f"usage: {prog} [--config FILE.yaml] [--section.key=VALUE ...] [--print-config] "
             "[--version]"]
    if description:
        lines += ["", description.strip()]
    lines += ["", "Keys (a YAML file sets any of them; --key=VALUE overrides one; lists take "
                  "several values or a,b):"]

    def walk(c, base, prefix):
        docs = _field_docs(c)
        hints = _hints(c)
        for name, f in _fields(c).items():
            key = f"{prefix}{name}"
            tp = _unwrap_optional(hints[name])
            default = getattr(base, name) if base is not None else _field_default(c, name)
            if _is_dataclass_type(tp):
                presets = sorted(_presets(tp))
                also = f"Or a preset: --{key}={'|'.join(presets)}." if presets else ""
                text = " ".join(t for t in (docs.get(name, ""), also) if t)
                lines.append(f"  {key}.*  {text}".rstrip())
                walk(tp, default if isinstance(default, tp) else None, key + ".")
                continue
            shown = ("(required)" if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING and base is None
                     else f"= {_to_plain(default)!r}")
            lines.append(f"  --{key}  {_type_name(hints[name])} {shown}")
            if docs.get(name):
                lines.append(textwrap.fill(docs[name], width=96, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))

    walk(cls, None, "")
    if aliases:
        lines += ["", "Short flags (aliases of the keys above):"]
        for name, a in aliases.items():
            a = Flag(a) if isinstance(a, str) else a
            flag = "--" + name.replace("_", "-")
            lines.append(f"  {flag:<20} {a.key}" + (f"={a.const} (takes no value)"
                                                    if a.const is not None else ""))
    return "\n".join(lines)


def check_choices(obj, owner: str) -> None:
    """Raise unless every ``Literal``-typed field of the dataclass ``obj`` holds one of its
    choices: the loader checks them when it reads a file or an override, this catches a config
    built directly in Python."""
    hints = _hints(type(obj))
    for name in _fields(type(obj)):
        tp = _unwrap_optional(hints[name])
        if typing.get_origin(tp) is typing.Literal:
            value = getattr(obj, name)
            if value is None and tp is not hints[name]:
                continue
            if value not in typing.get_args(tp):
                raise ValueError(f"{owner}.{name} must be {_type_name(tp)}, got {value!r}")


def run_cli(cls, run, argv: Sequence[str] | None = None, *, prog: str, description: str = "",
            aliases: Mapping[str, str | Flag] | None = None,
            errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> int:
    """An entry point's front: ``--help`` prints :func:`config_help`; ``--version`` the
    package's version; ``--print-config`` prints the resolved config (defaults ← file ←
    overrides) as YAML and runs nothing; otherwise the config read by :func:`config_from_argv`
    goes to ``run``. The ``errors`` (a bad config, a missing file) print one line and give exit
    status 2; returns the exit status (``run``'s own when it returns an int)."""
    import sys

    from unigen.version import version_line

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cls, prog=prog, description=description, aliases=aliases))
        return 0
    if "--version" in argv:
        print(version_line(prog))
        return 0
    print_only = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    try:
        cfg = config_from_argv(cls, argv, aliases)
        if print_only:
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True),
                  end="")
            return 0
        status = run(cfg)
    except errors as e:
        print_error(prog, e)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def print_error(prog: str, error: BaseException | str) -> None:
    """``<module>: error: <message>`` on stderr, on one line whatever the message (tarfile's,
    for one, spans several): how every entry point reports what stops it."""
    import sys

    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    print(f"{prog.split()[-1]}: error: {message}", file=sys.stderr, flush=True)
