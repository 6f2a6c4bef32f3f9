"""A run config read from a file the user did not write (a checkpoint's, an export's) is data, checked as data.

jsonargparse turns many values into imports: a ``class_path``, a string where a class or callable is
expected (a dotted name, JSON or YAML text, the path of a config file), a mapping under an untyped
setting. So a stored config is never handed to it unchecked. It is walked against the *signatures*
of the classes it may build — `Trainer`, `MiTModule`, the data modules, and every class named inside
— and each value must be of the kind its parameter declares:

- where a class (or a factory of one) is expected: a mapping ``{class_path, init_args}`` whose
  class path is in the closed registry (`mit_lightning.registry`), exactly as written there, and
  whose ``init_args`` are checked against that class's own signature, recursively;
- where Lightning also accepts a name (``strategy: ddp``, ``accelerator: gpu``): one of the names
  Lightning itself registers;
- plain settings (numbers, strings, paths, choices, lists and mappings of them): values of that
  kind, with no class path hidden anywhere inside; untyped settings hold plain data only;
- no key a signature does not declare (no includes, no extra entries).

Anything else is refused with one line naming the key, before anything is imported. The only
classes outside the registry a stored config may name are those the user names themselves, in
their own ``--config`` files or on the command line: that is their code.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib
import inspect
import os
import pathlib
import types
import typing
from collections import abc
from functools import cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from mit_lightning.errors import UserError
from mit_lightning.registry import registered_class

#: the parts of a run's config a checkpoint keeps, and the class each is checked against
STORED_KEYS = ("seed_everything", "trainer", "model", "data")
#: types whose values are written as plain scalars (no import behind them)
_SCALARS = (bool, int, float, str)
_STRING_VALUES = (pathlib.PurePath, os.PathLike, datetime.timedelta)
_SPEC_KEYS = {"class_path", "init_args", "dict_kwargs"}


class RefusedConfig(UserError):
    """A stored config that names something outside the registry, or holds a value its key cannot take."""


class _Refusal(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(key, reason)
        self.key, self.reason = key, reason


# --- what the user names themselves ------------------------------------------------------------------
def option_values(args: Sequence[str], option: str) -> Iterator[str]:
    """Each value given to `option` on a command line, as `--option value` or `--option=value`."""
    for position, arg in enumerate(args):
        if arg == option and position + 1 < len(args):
            yield args[position + 1]
        elif arg.startswith(option + "="):
            yield arg.split("=", 1)[1]


def _strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


def user_named(args: Sequence[str]) -> frozenset[str]:
    """Every value the user wrote: on the command line (``--key=value`` split) and in the config files it names."""
    names = {part for arg in args for part in str(arg).split("=", 1)}
    for value in option_values(args, "--config"):
        path = Path(value)
        if path.is_file():
            try:
                names.update(_strings_in(yaml.safe_load(path.read_text(errors="replace"))))
            except yaml.YAMLError:
                continue
    return frozenset(names)


# --- type hints, read from signatures ----------------------------------------------------------------
def _forwarded_kwargs(cls: type) -> Any:
    """Where a registered class passes ``**kwargs`` other than to its base class (config dumps list those too)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if issubclass(cls, TensorBoardLogger):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter.__init__
    return None


def _own_parameters(function: Any, found: dict[str, Any]) -> bool:
    """Adds `function`'s parameters with their type hints (Any where none) to `found`; whether it takes ``**kwargs``."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation this interpreter cannot resolve: its value is checked as plain data
        hints = {}
    passes_on = False
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind == parameter.VAR_KEYWORD:
            passes_on = True
        elif parameter.name != "self" and parameter.kind != parameter.VAR_POSITIONAL:
            found.setdefault(parameter.name, hints.get(parameter.name, Any))
    return passes_on


@cache
def _parameters(cls: type) -> dict[str, Any]:
    """Each init parameter of `cls` with its type hint, following ``**kwargs`` to the base classes (as the data
    modules pass their settings on) or where the class is known to pass them."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and not _own_parameters(init, found):
            return found
    target = _forwarded_kwargs(cls)
    if target is not None:
        _own_parameters(target, found)
    return found


def _is_class_type(hint: Any) -> bool:
    """A class jsonargparse would build from a class path (not a plain value, dataclass or enum)."""
    return (inspect.isclass(hint) and hint is not type(None) and not issubclass(hint, (*_SCALARS, *_STRING_VALUES))
            and not dataclasses.is_dataclass(hint) and not issubclass(hint, enum.Enum)
            and hint not in (list, tuple, dict, set, frozenset, object))


def _callable_return(hint: Any) -> Any | None:
    """``Callable[..., R]`` → R; None for anything else."""
    if typing.get_origin(hint) is abc.Callable:
        arguments = typing.get_args(hint)
        return arguments[-1] if arguments else Any
    return None


@cache
def _lightning_names() -> dict[type, frozenset[str]]:
    """The names Lightning resolves itself where it accepts a string instead of a class."""
    from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry
    from lightning.pytorch.profilers import Profiler
    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    return {
        Accelerator: frozenset([*AcceleratorRegistry.available_accelerators(), "auto", "gpu"]),
        Strategy: frozenset([*StrategyRegistry.available_strategies(), "auto"]),
        Profiler: frozenset({"simple", "advanced", "pytorch", "xla"}),
    }


# --- the walk ------------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, trusted: frozenset[str]) -> None:
        self.trusted = trusted
        self.class_keys: list[str] = []  # where a class may stand, in the order walked (see `class_settings`)

    def resolve(self, name: Any, key: str) -> type:
        cls = registered_class(name)
        if cls is not None:
            return cls
        shown = repr(name) if not isinstance(name, str) or not name.isascii() else f"'{name}'"
        if isinstance(name, str) and name in self.trusted:
            module, _, attribute = name.rpartition(".")
            try:
                value = getattr(importlib.import_module(module), attribute)  # the user's own code, by their word
            except (ImportError, AttributeError, ValueError):
                raise _Refusal(key, f"names {shown}, which cannot be imported") from None
            if inspect.isclass(value):
                return value
            raise _Refusal(key, f"names {shown}, which is not a class")
        raise _Refusal(key, f"names {shown}, which is not one of the classes a stored config may name "
                            "(mit-lightning's own and the listed PyTorch and Lightning ones)")

    def class_spec(self, value: Any, bases: tuple[type, ...], key: str) -> None:
        """A mapping naming a registered class (a subclass of one of `bases`, when given) with checked init_args."""
        self.class_keys.append(key)
        if not isinstance(value, dict) or "class_path" not in value:
            raise _Refusal(key, f"holds {_kind(value)} where a class is expected; a stored config may only give a "
                                "mapping with class_path and init_args there")
        extra = set(value) - _SPEC_KEYS
        if extra:
            raise _Refusal(f"{key}.{sorted(map(str, extra))[0]}", "is not a key of a class specification")
        cls = self.resolve(value["class_path"], f"{key}.class_path")
        if bases and not any(inspect.isclass(base) and issubclass(cls, base) for base in bases):
            names = " or ".join(base.__name__ for base in bases if inspect.isclass(base))
            raise _Refusal(f"{key}.class_path", f"names {cls.__name__}, which is not a {names}")
        if value.get("dict_kwargs") not in (None, {}):
            raise _Refusal(f"{key}.dict_kwargs", "holds settings outside the class's signature")
        self.arguments(value.get("init_args") or {}, cls, f"{key}.init_args")

    def arguments(self, value: Any, cls: type, key: str) -> None:
        if not isinstance(value, dict):
            raise _Refusal(key, f"holds {_kind(value)} where a mapping of {cls.__name__}'s settings is expected")
        parameters = _parameters(cls)
        for name, item in value.items():
            if name not in parameters:
                raise _Refusal(f"{key}.{name}", f"is not a setting of {cls.__name__}")
            self.value(item, parameters[name], f"{key}.{name}")

    def value(self, value: Any, hint: Any, key: str) -> None:
        origin, arguments = typing.get_origin(hint), typing.get_args(hint)
        if hint is Any or hint is object or hint is inspect.Parameter.empty:
            self.plain(value, key)
        elif origin in (typing.Union, types.UnionType):
            self.union(value, arguments, key)
        elif origin is typing.Literal:
            if not any(type(value) is type(allowed) and value == allowed for allowed in arguments):
                raise _Refusal(key, f"holds {_kind(value)}, not one of {', '.join(map(repr, arguments))}")
        elif (returned := _callable_return(hint)) is not None:
            self.class_spec(value, _class_bases(returned), key)
        elif origin in (list, tuple, set, frozenset, abc.Sequence, abc.Iterable, abc.Collection, abc.MutableSequence):
            if not isinstance(value, list):
                raise _Refusal(key, f"holds {_kind(value)} where a list is expected")
            fixed = origin is tuple and bool(arguments) and arguments[-1] is not Ellipsis
            if fixed and len(value) != len(arguments):
                raise _Refusal(key, f"holds {len(value)} items where {len(arguments)} are expected")
            for index, item in enumerate(value):
                self.value(item, arguments[index] if fixed else (arguments[0] if arguments else Any), f"{key}[{index}]")
        elif origin in (dict, abc.Mapping, abc.MutableMapping):
            if not isinstance(value, dict):
                raise _Refusal(key, f"holds {_kind(value)} where a mapping is expected")
            for name, item in value.items():
                self.value(item, arguments[1] if arguments else Any, f"{key}.{name}")
        elif dataclasses.is_dataclass(hint):
            fields = {field.name: field for field in dataclasses.fields(hint)}
            if not isinstance(value, dict):
                raise _Refusal(key, f"holds {_kind(value)} where a mapping of settings is expected")
            hints = typing.get_type_hints(hint)
            for name, item in value.items():
                if name not in fields:
                    raise _Refusal(f"{key}.{name}", f"is not a setting of {hint.__name__}")
                self.value(item, hints.get(name, Any), f"{key}.{name}")
        elif inspect.isclass(hint) and issubclass(hint, enum.Enum):
            if value not in hint.__members__:
                raise _Refusal(key, f"holds {_kind(value)}, not one of {', '.join(hint.__members__)}")
        elif hint in _SCALARS:
            if not _scalar_of(value, hint):
                raise _Refusal(key, f"holds {_kind(value)} where a {hint.__name__} is expected")
        elif inspect.isclass(hint) and issubclass(hint, _STRING_VALUES):
            if not isinstance(value, str):
                raise _Refusal(key, f"holds {_kind(value)} where a path or text is expected")
        elif _is_class_type(hint):
            self.class_spec(value, (hint,), key)
        else:
            self.plain(value, key)

    def union(self, value: Any, members: tuple[Any, ...], key: str) -> None:
        classes = tuple(member for member in members if _is_class_type(member) or _callable_return(member) is not None)
        if classes and not (isinstance(value, dict) and "class_path" in value):
            self.class_keys.append(key)
        if value is None and type(None) in members:
            return
        if isinstance(value, str) and classes:
            # a string where a class may stand is only ever one of the names Lightning resolves itself
            names = [name for member in classes for base, known in _lightning_names().items()
                     if inspect.isclass(member) and issubclass(member, base) for name in known]
            if value in names:
                return
            raise _Refusal(key, f"holds {_kind(value)} where a class or one of Lightning's names is expected; a "
                                "stored config may only give a mapping with class_path and init_args there")
        if isinstance(value, dict) and "class_path" in value:
            if not classes:
                raise _Refusal(key, "holds a class specification where none is expected")
            self.class_spec(value, tuple(base for member in classes for base in _class_bases(
                _callable_return(member) or member)), key)
            return
        refusals = []
        for member in (m for m in members if m not in classes and m is not type(None)):
            try:
                self.value(value, member, key)
                return
            except _Refusal as refusal:
                refusals.append(refusal)
        if refusals:
            raise max(refusals, key=lambda refusal: len(refusal.key))
        raise _Refusal(key, f"holds {_kind(value)}, which this setting does not take")

    def plain(self, value: Any, key: str) -> None:
        """Untyped settings: plain data only, and no text that jsonargparse would read as a class or a file."""
        if value is None or isinstance(value, (bool, int, float)):
            return
        if isinstance(value, str):
            try:
                loaded = yaml.safe_load(value)
            except yaml.YAMLError:
                return
            if isinstance(loaded, (dict, list)):
                raise _Refusal(key, "holds structured text (YAML or JSON) where plain data is expected")
            return
        if isinstance(value, list):
            for index, item in enumerate(value):
                self.plain(item, f"{key}[{index}]")
        elif isinstance(value, dict):
            if "class_path" in value:
                raise _Refusal(key, "holds a class specification where plain data is expected")
            for name, item in value.items():
                self.plain(item, f"{key}.{name}")
        else:
            raise _Refusal(key, f"holds {_kind(value)}, which is not plain data")


def _class_bases(returned: Any) -> tuple[type, ...]:
    if typing.get_origin(returned) in (typing.Union, types.UnionType):
        return tuple(member for member in typing.get_args(returned) if inspect.isclass(member))
    return (returned,) if inspect.isclass(returned) else ()


def _scalar_of(value: Any, hint: type) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the text {value[:60]!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"the value {value!r}"[:80]


# --- the entry point -----------------------------------------------------------------------------------
def _top_level() -> dict[str, Any]:
    from lightning.pytorch import Trainer

    from mit_lightning.data.base import MiTDataModule
    from mit_lightning.module import MiTModule

    return {"seed_everything": typing.Union[bool, int], "trainer": Trainer, "model": MiTModule,
            "data": MiTDataModule}


def _walk(checker: _Checker, stored: Any) -> None:
    if not isinstance(stored, dict):
        raise _Refusal("(top level)", f"is {_kind(stored)}, not a mapping of settings")
    expected = _top_level()
    for key, value in stored.items():
        if key not in expected:
            raise _Refusal(str(key), f"is not a part of a run config ({', '.join(STORED_KEYS)})")
        hint = expected[key]
        if key == "data":
            checker.class_spec(value, (hint,), key)
        elif inspect.isclass(hint):
            checker.arguments(value, hint, key)
        else:
            checker.value(value, hint, key)


def class_settings(stored: dict[str, Any]) -> list[str]:
    """The keys of an acceptable stored config where a class may stand (for tests that try each)."""
    checker = _Checker(frozenset())
    _walk(checker, stored)
    return checker.class_keys


def check_stored_config(stored: Any, source: str | Path, user_args: Sequence[str] = ()) -> dict[str, Any]:
    """`stored` if every class it names is registered (or named by the user) and every value fits its key.

    Refuses in one line naming the key; imports nothing outside the registry and the user's own classes.
    """
    try:
        try:
            _walk(_Checker(user_named(user_args)), stored)
        except RecursionError:
            raise _Refusal("(top level)", "nests deeper than any run config (or refers to itself)") from None
    except _Refusal as refusal:
        raise RefusedConfig(
            f"The run config stored in '{source}' was not used: {refusal.key} {refusal.reason}. Nothing it names was "
            "imported. If you trust that file's settings, give them yourself in a --config file or on the command line."
        ) from None
    return stored
