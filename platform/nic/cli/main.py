"""The `nic` command: every stage is `nic <stage> --config FILE [--set key=value ...]`.

Stages are registered by name with their config model and entry function (imported lazily, so
`nic --help` is instant and a broken stage does not break the others). Each top-level scalar field
of a stage's config model becomes a flag with the field's description as help, so `--help` always
matches what the config accepts.

Start-up matters here (issue 16: a user's first command is one slide, where a fixed second is
noticed): `nic --help` imports no config model, pydantic, numpy, torch or ray, and `nic <stage>`
imports only its own stage's config model before parsing (tests/test_cli_startup.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nic.storage import local_path

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pydantic import BaseModel


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function(config) -> int"
    help: str


STAGES: list[Stage] = [
    Stage("tile", "nic.config.tile:TileConfig", "nic.tiling.stage:run_tile",
          "Detect tissue and write each slide's tile grid, thumbnail and a manifest."),
    Stage("synth", "nic.config.synth:SynthConfig", "nic.synth.stage:run_synth",
          "Generate a synthetic cohort with known ground truth: slides, labels, patch datasets."),
    Stage("train-encoder", "nic.config.encoder:TrainEncoderConfig", "nic.train.encoder_stage:run_train_encoder",
          "Train a patch encoder (supervised multitask or an unsupervised baseline) on Ray Train."),
    Stage("compress", "nic.config.compress:CompressConfig", "nic.compress.stage:run_compress",
          "Encode every tissue tile of every slide into Parquet feature grids on Ray Data."),
    Stage("train-downstream", "nic.config.downstream:TrainDownstreamConfig",
          "nic.train.downstream_stage:run_train_downstream",
          "Train and evaluate slide-level models on feature grids on Ray Train."),
    Stage("tune", "nic.config.tune:TuneConfig", "nic.tune.stage:run_tune",
          "Search task subsets and hyperparameters with Ray Tune."),
    Stage("pipeline", "nic.config.pipeline:PipelineConfig", "nic.pipeline:run_pipeline",
          "Run synth -> encoders -> compress -> downstream -> report from one config."),
]

# Extra command groups that are not config-driven stages, e.g. `nic grids show`.
COMMAND_GROUPS: dict[str, str] = {
    "grids": "nic.grids.cli:add_commands",
}


def _import(spec: str) -> Any:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def _flag_type(annotation: Any) -> tuple[str, Any] | None:
    """('scalar'|'list'|'bool', python type or choices) for annotations a flag can express."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _flag_type(args[0])
    if annotation is bool:
        return ("bool", bool)
    if annotation in (str, int, float, Path):
        return ("scalar", annotation)
    if origin is Literal:
        return ("choice", [str(a) for a in typing.get_args(annotation)])
    if origin in (list, tuple) and args and args[0] in (str, Path, int, float):
        return ("list", args[0])
    return None


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> list[str]:
    names = []
    group = parser.add_argument_group("config fields (flags override the YAML file)")
    for name, field in model.model_fields.items():
        kind = _flag_type(field.annotation)
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        helptext = (field.description or "") + (f" [default: {default}]" if default not in (None, [], "") else "")
        if kind[0] == "bool":
            group.add_argument(flag, dest=f"field__{name}", action=argparse.BooleanOptionalAction,
                               default=None, help=helptext)
        elif kind[0] == "list":
            group.add_argument(flag, dest=f"field__{name}", nargs="+", default=None, help=helptext)
        elif kind[0] == "choice":
            group.add_argument(flag, dest=f"field__{name}", choices=kind[1], default=None, help=helptext)
        else:
            group.add_argument(flag, dest=f"field__{name}", default=None, help=helptext)
        names.append(name)
    return names


def _nested_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key below the top level, with default and description, for `--help`."""
    from nic.config.base import unwrap_model

    lines = []
    for name, field in model.model_fields.items():
        sub = unwrap_model(field.annotation)
        key = prefix + name
        if sub is not None:
            lines.extend(_nested_keys(sub, key + "."))
        elif prefix:
            default = field.get_default(call_default_factory=True)
            text = f"  {key} = {default!r}: {field.description or ''}"
            lines.append(textwrap.fill(text, width=100, subsequent_indent="      "))
    return lines


def requested_command(argv: Sequence[str]) -> str | None:
    """The command `argv` asks for: its first word that is not an option (the top-level parser
    has no option taking a value), or None for a bare `nic` / `nic --help`."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `nic` parser. With `argv`, only the stage it names gets the flags of its config model
    (importing that model alone); the other stages are listed with their help but parse only the
    common flags, which they never do since argparse runs one subcommand. Without `argv`, every
    stage gets its flags (for tests and tools that parse several commands with one parser)."""
    wanted = requested_command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog="nic",
        description="Neural Image Compression for whole-slide images, on Ray. "
        "Each stage reads and writes files; run `nic <stage> --help` for its options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for stage in STAGES:
        model = None
        if argv is None or stage.name == wanted:
            try:
                model = _import(stage.config)
            except (ImportError, AttributeError):
                model = None
        epilog = None
        if model is not None and _nested_keys(model):
            epilog = "nested keys (YAML sections; set with --set key=value):\n" + "\n".join(_nested_keys(model))
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(stage=stage)
        p.add_argument("--config", type=local_path, help="YAML config file for this stage (a path or a URI).")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="Override any config key, dotted for nested keys (e.g. slide.tile_px=256). Repeatable.")
        p.add_argument("--address", default=None,
                       help="Ray cluster address (default: RAY_ADDRESS, else an embedded local instance).")
        p.add_argument("--num-cpus", type=int, default=None, help="CPUs for an embedded local Ray instance.")
        p.add_argument("--print-config", action="store_true", help="Print the resolved config and exit.")
        if model is None:
            p.set_defaults(flag_names=[])
            continue
        p.set_defaults(flag_names=_add_model_flags(p, model))
    for name, spec in COMMAND_GROUPS.items():
        if argv is not None and wanted is not None and wanted in (stage.name for stage in STAGES):
            continue  # a stage's run never needs another command group's parser
        try:
            adder = _import(spec)
        except (ImportError, AttributeError):
            continue
        adder(sub, name)
    return parser


def config_from_args(args: argparse.Namespace) -> Any:
    from nic.config.base import load_config

    stage: Stage = args.stage
    model = _import(stage.config)
    values: dict[str, Any] = {}
    for name in args.flag_names:
        value = getattr(args, f"field__{name}")
        if value is not None:
            values[name] = value
    if args.address is not None:
        values["ray.address"] = args.address
    if args.num_cpus is not None:
        values["ray.num_cpus"] = args.num_cpus
    return load_config(model, args.config, args.overrides, values)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from nic.config.base import ConfigError

    try:
        if hasattr(args, "handler"):
            return int(args.handler(args) or 0)
        config = config_from_args(args)
        if args.print_config:
            from nic.config.base import dump_config

            _check_sections(args.command, config)
            print(dump_config(config), end="")
            return 0
        run = _import(args.stage.run)
        return int(run(config) or 0)
    except ConfigError as exc:
        print(f"nic {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _abort_trainers()
        print(f"nic {args.command}: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ != "ResourceError":
            raise
        _abort_trainers()
        print(f"nic {args.command}: {exc}", file=sys.stderr)
        return 3


def _check_sections(command: str, config: Any) -> None:
    """Stages made of other stages validate each section as they would run it, so --print-config
    catches a typo in a study's `downstream:` before the run is an hour in (ConfigError)."""
    if command == "pipeline":
        from nic.pipeline import plan_pipeline

        plan_pipeline(config)
    elif command == "tune":
        from nic.tune.stage import check_sections

        check_sections(config)


def _abort_trainers() -> None:
    """Stop any Ray Train run this process started (their workers hold the cluster's CPUs)."""
    if "nic.train.trainer" in sys.modules:  # nothing to stop if no trainer was ever imported
        from nic.train.trainer import abort_running_trainers

        abort_running_trainers()


if __name__ == "__main__":
    sys.exit(main())
