"""Configuration files and command lines for any dataclass config, and the one-line error path of every recipe.

    cfg = load_config(GRPOConfig, sys.argv[1:])      # YAML (--config FILE) over the defaults, the command line on top
    sys.exit(run_cli(main))                          # a user mistake: one line naming it, exit 2

`load_config` reads `--config FILE.yaml` (if given) into the dataclass (every value type-checked, unknown keys named),
then lets tyro parse the rest of the command line against it, so every field is typed, documented in `--help` and
overridable without a hand-written parser.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is not None:  # tuple[str, ...], dict[str, float], ...
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _check_value(value, hint, where: str):
    """`value` (from YAML) as the type `hint` says, or a ValueError naming the key, the value and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ValueError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arm, where)
            except ValueError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{where}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list ({_type_name(hint)}), got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values ({_type_name(hint)}), got {value!r}")
        return tuple(_check_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping ({_type_name(hint)}), got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {_check_value(k, key_t, f"{where} key"): _check_value(v, val_t, f"{where}.{k}")
                for k, v in value.items()}
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", base: T | None = None) -> T:
    """Build dataclass `cls` from nested dicts (over `base`'s values when given), checking every value's
    type; unknown keys and wrong types raise a ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        maybe = "; ".join(f"{k!r}: did you mean {m[0]!r}?" for k, m in hints.items() if m)
        raise ValueError(f"{where}: unknown key(s) {unknown}" + (f" ({maybe})" if maybe else "")
                         + f"; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value, f"{where}.{name}",
                                     getattr(base, name) if base is not None else None)
        else:
            kwargs[name] = _check_value(value, hint, f"{where}.{name}")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ValueError as err:  # a dataclass's own validation (e.g. PolicyLossConfig)
        raise ValueError(f"{where}: {err}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    with path.open() as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model:, rollout:, ...), got {type(data).__name__}")
    return data


def load_yaml(cls: type[T], path: str | Path, base: T | None = None) -> T:
    return from_dict(cls, read_yaml(path), str(path), base)


def pop_config_arg(args: list[str]) -> tuple[str | None, list[str]]:
    """(the YAML path of `--config FILE` or `--config=FILE`, the other arguments)."""
    rest, path = [], None
    it = iter(args)
    for a in it:
        if a == "--config":
            path = next(it, None)
            if path is None:
                raise ValueError("--config needs a YAML file path")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return path, rest


CONFIG_HELP = ("Every option below can also come from a YAML file: `--config FILE.yaml` (sections as the option "
               "prefixes, e.g. `loss: {beta: 0.001}`); options given on the command line win over the file.")


def load_config(cls: type[T], args: list[str] | None = None, default: T | None = None,
                description: str | None = None) -> T:
    """YAML (from `--config FILE`) over `default`, then the rest of the command line as typed overrides."""
    import tyro

    path, args = pop_config_arg(list(sys.argv[1:] if args is None else args))
    default = default if default is not None else cls()
    if path is not None:
        default = load_yaml(cls, path, base=default)
    return tyro.cli(cls, args=args, default=default,
                    description="\n\n".join(x for x in (description, CONFIG_HELP) if x))


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# bad input a recipe reports as one line: config/data/checkpoint mistakes (ValueError) and paths that are missing,
# of the wrong kind or not accessible; other errors (a bug, a disk failing mid-run) keep their traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_cli(main, *args) -> int:
    """Run a recipe's main; a USER_ERRORS exception (whose message names the file, key, row or flag) prints as one
    line instead of a traceback and exits with 2. R1_DEBUG=1 keeps the traceback."""
    try:
        main(*args)
    except USER_ERRORS as err:
        if os.environ.get("R1_DEBUG") == "1":
            raise
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line per rank
        print(f"{prefix}error: {message} [R1_DEBUG=1 shows the traceback]", file=sys.stderr, flush=True)
        return 2
    return 0


def refuse_recipe_owned(section: str, config: Any, default: Any, fields: Sequence[str], owner: str) -> None:
    """A recipe's stage section holds fields the recipe sets itself (a stage's model, data path, template, out):
    a value other than the default would be silently replaced, so it is one line naming the flag instead. `fields`
    are dotted paths into the section ("data.template"; "model" compares the whole sub-config)."""
    for path in fields:
        got, want = config, default
        for name in path.split("."):
            got, want = getattr(got, name), getattr(want, name)
        if got == want:
            continue
        flag = f"--{section}.{path}"
        if dataclasses.is_dataclass(got):  # name the first field that differs
            name = next(f.name for f in dataclasses.fields(got) if getattr(got, f.name) != getattr(want, f.name))
            flag, got = f"{flag}.{name}", getattr(got, name)
        raise ValueError(f"{flag.replace('_', '-')}={got!r}: set by the recipe ({owner}); give it there instead")


@dataclasses.dataclass
class RecipeConfig:
    """What resolve_recipe_config found: the config, whether the embedded (tiny) world runs, the defaults it was
    resolved over (the preset's or the at-scale ones), and given(key): whether a dotted option was set on the
    command line or in the YAML."""

    config: Any
    embedded: bool
    default: Any
    given: Any


def resolve_recipe_config(cls: type[T], argv: Sequence[str] | None, *, preset: Any, description: str,
                          aliases: dict[str, str] | None = None, named_by: Sequence[str] = ("model.path",)
                          ) -> RecipeConfig:
    """The one config resolver of the recipes: short flags expanded (`--model DIR` -> `--model.path DIR`), the YAML of
    `--config FILE` over the defaults, the command line over both. The defaults are the embedded world's
    (`preset()`) unless one of `named_by` (a model, a teacher, ...) is given on the command line or in the YAML, then
    the class's own (a real run's)."""
    aliases = aliases or {}
    args = []
    for a in (sys.argv[1:] if argv is None else argv):
        flag, eq, value = a.partition("=")
        args.append(aliases[flag] + eq + value if flag in aliases else a)
    path, args = pop_config_arg(args)
    yaml_data = read_yaml(path) if path else {}

    def given(key: str) -> bool:
        flags = {f"--{key}", f"--{key.replace('_', '-')}"}
        if any(a in flags or a.split("=", 1)[0] in flags for a in args):
            return True
        node: Any = yaml_data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return node is not None

    embedded = not any(given(key) for key in named_by)
    default = preset() if embedded else cls()
    if path:
        default = from_dict(cls, yaml_data, path, base=default)
    return RecipeConfig(load_config(cls, args, default=default, description=description), embedded, default, given)


def spread_over_ranks(resolved: RecipeConfig, field: str = "tensor_parallel") -> Any:
    """The embedded world under `torchrun --nproc_per_node=N` with no layout given: the tiny model is split over
    every rank (model.<field> = WORLD_SIZE / pipeline_parallel; tensor_parallel, or expert_parallel for the tiny
    mixture of experts). A named model keeps the layout it was given."""
    cfg = resolved.config
    layout = ("model.tensor_parallel", "model.expert_parallel")
    if not resolved.embedded or any(resolved.given(key) for key in layout):
        return cfg
    ranks = int(os.environ.get("WORLD_SIZE", "1")) // cfg.model.pipeline_parallel
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{field: ranks}))
