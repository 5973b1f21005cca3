"""`nanoseek <command>`: every command is a config dataclass plus a function that runs it.

The flags are derived from the dataclass fields (name, type, default, and the field's
`metadata["help"]`), so the CLI, the saved run config and the Python API never drift apart.
A command is registered in COMMANDS as "name": "module:ConfigClass:function".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module path, "ConfigClass:function")
    "info": ("nanoseek.counting", "InfoConfig:info"),
    "serve": ("nanoseek.serve.api", "ServeConfig:serve"),
    "generate": ("nanoseek.engine.chat", "GenerateConfig:generate_cmd"),
    "chat": ("nanoseek.engine.chat", "ChatConfig:chat"),
    "pretrain": ("nanoseek.train.pretrain", "PretrainConfig:pretrain"),
    "sft": ("nanoseek.train.sft", "SFTConfig:sft"),
    "grpo": ("nanoseek.train.grpo", "GRPOConfig:grpo"),
    "eval": ("nanoseek.eval.tasks", "EvalConfig:eval_task"),
}
# groups: `nanoseek tokenizer train`, `nanoseek data prepare`
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "tokenizer": {"train": ("nanoseek.tokenizer", "TokenizerTrainConfig:train_tokenizer")},
    "data": {"prepare": ("nanoseek.data.prepare", "PrepareConfig:prepare")},
}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type behind Optional/union, whether it is a list)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0] if typing.get_args(tp) else str, True
    return tp, False


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if not required:
            help_ += f" (default: {default})"
        kw: dict[str, Any] = dict(dest=f.name, help=help_, required=required, default=default)
        if tp is bool:
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif tp in (dict, Any) or typing.get_origin(tp) is dict:
            kw.update(type=json.loads, metavar="JSON")
        else:
            kw.update(type=tp if tp in (int, float, str) else str)
            if is_list:
                kw["nargs"] = "*"
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def _load(spec: tuple[str, str]):
    mod = importlib.import_module(spec[0])
    cls_name, fn_name = spec[1].split(":")
    return getattr(mod, cls_name), getattr(mod, fn_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek system, small.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        cls, fn = _load(spec)
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().split("\n")[0])
        add_dataclass_args(p, cls)
        p.set_defaults(_spec=spec)
    for group, cmds in GROUPS.items():
        g = sub.add_parser(group, help=f"{group} commands").add_subparsers(dest="sub", required=True)
        for name, spec in cmds.items():
            cls, fn = _load(spec)
            p = g.add_parser(name, help=(fn.__doc__ or "").strip().split("\n")[0])
            add_dataclass_args(p, cls)
            p.set_defaults(_spec=spec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cls, fn = _load(args._spec)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    try:
        cfg = cls(**values)
        fn(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def save_run_config(cfg: Any, out_dir: str | Path, name: str = "config.json") -> Path:
    """Write the resolved config of a run beside its outputs, so the run can be repeated."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
