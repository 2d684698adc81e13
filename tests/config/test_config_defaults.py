"""The YAML files under conf/ do not restate the schema's defaults (lit_lora/config/schema.py: "Defaults live here
and nowhere else; the YAML files only say what differs").

A group (``conf/<group>/``) is checked against the dataclass its field has in a command's schema
(``TrainConfig.data`` -> ``DataConfig``, ``MergeConfig.quant`` -> ``QuantConfig``...), nested dataclasses
(``data.fields``) key by key. Groups that are plain dicts in the schema (callbacks, logger) and Hydra's own
folders are free-form and not checked. ``${...}`` interpolations are never compared.

- The default option of a group (named in the ``defaults`` list of train.yaml, merge.yaml, evaluate.yaml or
  generate.yaml) is what runs without overrides, so the schema must describe it: it sets no key at all. A key
  with another value than the schema means the schema lies about what runs (move the value into the
  schema, then give the old value to the other options that relied on it); a key with the same value is
  redundant. Exception: a group whose schema has a required field (``ModelConfig.name_or_path``) has no
  default in the schema; its default option is checked like any other option.
- Any other option (and the default option of such a group): a key set to exactly the schema default (or
  to the value of the option it extends through its own ``defaults`` list) is redundant; other values are
  the point of a preset.
- The commands' own keys (``_self_`` of train.yaml, merge.yaml...) are what runs by default too: none may
  restate the schema or differ from it.
- Experiments (``# @package _global_``) are recipes applied after every group option, so a value equal to
  the default is not redundant there (``experiment=mistral7b_qlora lora=all-linear`` keeps the recipe's
  ``lora.alpha=16``); they are only checked to name schema keys.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from lit_lora.config.apps import EvaluateConfig, GenerateConfig, MergeConfig
from lit_lora.config.schema import TrainConfig
from tests.helpers import ROOT

CONF = ROOT / "conf"
COMMANDS = {
    "train": TrainConfig,
    "merge": MergeConfig,
    "evaluate": EvaluateConfig,
    "generate": GenerateConfig,
}
FREE_FORM = {"defaults", "hydra"}  # Hydra's own keys in a command file


def _rel(path: Path) -> str:
    return path.relative_to(CONF.parent).as_posix() if path.is_relative_to(CONF.parent) else str(path)


def _group_schemas() -> dict[str, type]:
    """Group folder -> the dataclass of that field, from the commands' schemas."""
    groups: dict[str, type] = {}
    for command in COMMANDS.values():
        for f in dataclasses.fields(command):
            if f.default_factory is dataclasses.MISSING:
                continue
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                assert groups.setdefault(f.name, type(default)) is type(default), f"{f.name}: two schemas"
    return groups


def _default_options() -> dict[str, set[str]]:
    """Group -> the options the commands' ``defaults`` lists choose."""
    chosen: dict[str, set[str]] = {}
    for name in COMMANDS:
        for entry in OmegaConf.load(CONF / f"{name}.yaml").get("defaults", []):
            if isinstance(entry, DictConfig):
                for group, option in entry.items_ex(resolve=False):
                    if option is not None and " " not in str(group):  # "override hydra/...": Hydra's own
                        chosen.setdefault(str(group), set()).add(str(option))
    return chosen


GROUPS = _group_schemas()
DEFAULT_OPTIONS = _default_options()
GROUP_FILES = sorted(p for group in GROUPS for p in (CONF / group).glob("*.yaml"))
EXPERIMENTS = sorted((CONF / "experiment").glob("*.yaml"))


def _has_required_field(schema: type) -> bool:
    return any(OmegaConf.is_missing(OmegaConf.structured(schema), f.name) for f in dataclasses.fields(schema))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1 in Python, not in a config
        return type(a) is type(b) and a == b
    return a == b


def _own_keys(path: Path) -> DictConfig:
    """The keys a file sets itself (its ``defaults`` list aside), uninterpreted."""
    node = OmegaConf.load(path)
    return (
        OmegaConf.masked_copy(node, [k for k in node if k not in FREE_FORM]) if node else OmegaConf.create()
    )


def _baseline(path: Path, schema: type) -> DictConfig:
    """The schema's defaults, with the options ``path`` extends through its own ``defaults`` list merged in."""
    base = OmegaConf.structured(schema)
    node = OmegaConf.load(path) or {}
    for entry in node.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            parent = path.parent / f"{entry}.yaml"
            base = OmegaConf.merge(_baseline(parent, schema), _own_keys(parent))
    return base


def _drift(path: Path, node: DictConfig, base: DictConfig, prefix: str, strict: bool) -> list[str]:
    """One line per key of ``node`` that restates ``base`` (or, with ``strict``, that it sets at all).

    ``base`` is a structured (typed) node: YAML values are merged into it first, so that ``5.0e-4`` and
    ``0.0005``, or ``precision: 32`` and ``"32"``, compare as the schema stores them."""
    found = []
    schema_name = OmegaConf.get_type(base).__name__
    for key in node:
        where = f"{_rel(path)}: {prefix}{key}"
        if key not in set(base):  # `key in base` is false for a required (???) field
            found.append(f"{where} is not a field of {schema_name}")
            continue
        if OmegaConf.is_interpolation(node, key):
            continue
        child = base._get_node(key)
        child_type = OmegaConf.get_type(child) if isinstance(child, DictConfig) else None
        if (
            isinstance(node._get_node(key), DictConfig)
            and child_type is not None
            and dataclasses.is_dataclass(child_type)
        ):
            found += _drift(path, node[key], base[key], f"{prefix}{key}.", strict)
            continue
        if OmegaConf.is_missing(node, key):  # merging ??? would keep the default
            value = "???"
        else:
            value = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.masked_copy(node, [key])))[key]
        default = OmegaConf.to_container(base)[key]
        ref = f"{schema_name}.{key}"
        if _same(value, default):
            found.append(
                f"{where}: {value!r} restates the schema default {default!r} ({ref}); delete the key"
            )
        elif strict:
            found.append(
                f"{where}: {value!r} but the schema default is {default!r} ({ref}); this file is what runs by "
                "default: set the default in the schema and give the old value to the other options that "
                "relied on it"
            )
    return found


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: p.relative_to(CONF).as_posix())
def test_group_option_does_not_restate_the_schema(path):
    group = path.parent.name
    schema = GROUPS[group]
    is_default = path.stem in DEFAULT_OPTIONS.get(group, set()) and not _has_required_field(schema)
    found = _drift(path, _own_keys(path), _baseline(path, schema), "", strict=is_default)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "name",
    list(COMMANDS),
)
def test_command_file_does_not_restate_the_schema(name):
    path = CONF / f"{name}.yaml"
    found = _drift(path, _own_keys(path), OmegaConf.structured(COMMANDS[name]), "", strict=True)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_names_schema_keys(path):
    assert OmegaConf.load(path) is not None
    assert path.read_text().lstrip().startswith("# @package _global_"), f"{_rel(path)}: not a global package"
    found = [
        line
        for line in _drift(path, _own_keys(path), OmegaConf.structured(TrainConfig), "", strict=False)
        if "is not a field of" in line
    ]
    assert not found, "\n".join(found)


def test_every_schema_group_is_checked():
    """The group map comes from the schemas: a new dataclass group gets checked without editing this file."""
    assert {"model", "quant", "lora", "data", "optim", "trainer"} <= set(GROUPS)
    assert DEFAULT_OPTIONS["data"] == {"demo"} and DEFAULT_OPTIONS["lora"] == {"default"}
    assert all(
        (CONF / group / f"{option}.yaml").is_file() for group in GROUPS for option in DEFAULT_OPTIONS[group]
    )


def test_the_check_catches_drift(tmp_path):
    """A restated default and a differing default option are both reported with file, key, value, default."""
    (tmp_path / "data").mkdir()
    preset = tmp_path / "data" / "x.yaml"
    preset.write_text("batch_size: 8\nmax_seq_len: 512\nfields:\n  prompt: prompt\n  completion: label\n")
    base = OmegaConf.structured(GROUPS["data"])
    found = _drift(preset, _own_keys(preset), base, "", strict=False)
    assert len(found) == 2 and "batch_size: 8 restates the schema default 8" in found[0]
    assert "fields.prompt: 'prompt' restates" in found[1]
    strict = _drift(preset, _own_keys(preset), base, "", strict=True)
    assert any("max_seq_len: 512 but the schema default is 256" in line for line in strict)
