"""Help on the field: every config dataclass field carries its help, and the CLI makes every field a flag."""

import argparse
import dataclasses
import importlib
import pkgutil

import pytest

from activations.devices import resolve_device
from cli import _config, add_config_flags, build_parser, field_default, field_help

PACKAGES = ("activations", "vsae", "evals", "dashboards", "pipeline")
# Modules that need an optional extra (pyproject's `gpu`): skipped where it is not installed. They define no config.
OPTIONAL = {"triton"}
# Commands whose flags are generated from config dataclasses (cache-info only reads a directory).
GENERATED = ("build-tiny-model", "harvest", "train", "eval", "dashboard", "compare", "study", "demo", "serve", "synth")


def _config_classes() -> dict[str, type]:
    """Every dataclass named *Config defined in our packages, found by importing each module."""
    found = {}
    for package in PACKAGES:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."):
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as e:
                if e.name in OPTIONAL:
                    continue
                raise
            for name, obj in vars(module).items():
                if name.endswith("Config") and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                    found[f"{obj.__module__}.{name}"] = obj
    return found


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


CONFIGS = _config_classes()


def test_every_config_the_cli_exposes_is_found():
    exposed = {cls for p in _commands().values() for cls in p.get_default("configs") or ()}
    assert exposed <= set(CONFIGS.values())
    names = {cls.__name__ for cls in CONFIGS.values()}
    assert {"HarvestConfig", "TinyModelConfig", "SAEConfig", "TrainConfig", "EvalConfig", "DashboardConfig",
            "CompareConfig", "GatherConfig", "StudyConfig", "DemoConfig"} <= names


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_has_help(name):
    cls = CONFIGS[name]
    missing = [f.name for f in dataclasses.fields(cls)
               if not isinstance(f.metadata.get("help"), str) or not f.metadata["help"].strip()]
    assert not missing, f"{name}: fields without help: {', '.join(missing)}"


@pytest.mark.parametrize("command", GENERATED)
def test_every_field_is_a_flag_with_the_field_help(command):
    p = _commands()[command]
    configs = p.get_default("configs")
    assert configs, f"{command}: no config dataclass behind its flags"
    by_dest = {a.dest: a for a in p._actions if a.option_strings}
    for cls in configs:
        for f in dataclasses.fields(cls):
            action = by_dest.get(f.name)
            assert action is not None, f"vsae {command}: {cls.__name__}.{f.name} has no flag"
            flag = f.name.replace("_", "-")
            assert {f"--{flag}", f"--no-{flag}"} & set(action.option_strings)
            assert field_help(cls, f) in action.help


@pytest.mark.parametrize("command", GENERATED)
def test_flag_defaults_are_the_field_defaults(command):
    p = _commands()[command]
    argv = [command]
    for a in p._actions:
        if not a.option_strings and a.dest not in ("help",):
            argv.append("x")  # a positional (run directories)
        elif a.required:
            argv += [a.option_strings[0], "x"]
    args = build_parser().parse_args(argv)
    required = {a.dest for a in p._actions if a.required}
    for cls in p.get_default("configs"):
        cfg = _config(cls, args)
        for f in dataclasses.fields(cls):
            value = getattr(cfg, f.name)
            if f.name in required:
                assert value == "x"
                continue
            default = field_default(f)
            if f.name == "device":
                default = resolve_device(default)  # configs resolve `auto` when they are made
            if isinstance(default, list) and isinstance(value, str):
                value = value.split(",")  # a comma-list flag the command parses
            assert value == default, f"vsae {command} --{f.name}: {value!r} != {default!r}"


def test_a_field_without_help_is_refused():
    @dataclasses.dataclass
    class Bad:
        documented: int = dataclasses.field(default=1, metadata={"help": "has help"})
        bare: int = 2

    with pytest.raises(TypeError, match="Bad.bare has no help"):
        add_config_flags(argparse.ArgumentParser(), Bad)
