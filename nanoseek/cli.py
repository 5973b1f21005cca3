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
    "mtp-refresh": ("nanoseek.train.mtp_refresh", "MTPRefreshConfig:mtp_refresh"),
    "distill": ("nanoseek.distill.train", "DistillConfig:distill"),
    "cost": ("nanoseek.cost", "CostConfig:cost"),
    "report": ("nanoseek.report", "ReportConfig:report"),
    "compress": ("nanoseek.compress", "CompressConfig:compress_cmd"),
    "export": ("nanoseek.export.gguf", "ExportConfig:export"),
}
# groups: `nanoseek tokenizer train`, `nanoseek data prepare`; a group that is also a command
# (`nanoseek distill` and `nanoseek distill traces`) runs the command when no sub-command is named
GROUPS: dict[str, dict[str, tuple[str, str]]] = {
    "tokenizer": {"train": ("nanoseek.tokenizer", "TokenizerTrainConfig:train_tokenizer")},
    "data": {"prepare": ("nanoseek.data.prepare", "PrepareConfig:prepare")},
    "distill": {"traces": ("nanoseek.distill.traces", "TracesConfig:traces")},
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


def _parse_json(s: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {s!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (the usage block it prints first is what `--help` is for),
    so every bad command line, caught by argparse or by a config check, reads the same."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field. Defaults stay out of the parsed namespace (argparse.SUPPRESS): what is
    there was given on the command line, which `--resume` needs to know (given flags override the
    run's saved config). A command with `resume` checks its required fields after that merge."""
    hints = typing.get_type_hints(cls)
    resumable = any(f.name == "resume" for f in dataclasses.fields(cls))
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
        if f.metadata.get("positional"):  # `nanoseek report RUN`
            parser.add_argument(f.name, metavar=f.name.upper(), help=help_.replace("%", "%%"))
            continue
        kw: dict[str, Any] = dict(dest=f.name, help=help_.replace("%", "%%"), required=required and not resumable,
                                  default=argparse.SUPPRESS)
        if tp is bool:
            kw.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif tp in (dict, Any) or typing.get_origin(tp) is dict:
            kw.update(type=_parse_json, metavar="JSON")
        else:
            kw.update(type=tp if tp in (int, float, str) else str)
            if is_list:
                kw["nargs"] = "*"
                if f.metadata.get("repeatable"):  # --key a --key b → [a, b] (a plain list keeps the last);
                    kw.update(action="extend", nargs="+")  # a bare --key is an error, not an empty list
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def _load(spec: tuple[str, str]):
    mod = importlib.import_module(spec[0])
    cls_name, fn_name = spec[1].split(":")
    return getattr(mod, cls_name), getattr(mod, fn_name)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanoseek", description="The DeepSeek system, small.")
    _add_debug(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, spec in COMMANDS.items():
        cls, fn = _load(spec)
        p = commands[name] = sub.add_parser(name, help=(fn.__doc__ or "").strip().split("\n")[0])
        add_dataclass_args(p, cls)
        _add_debug(p)
        p.set_defaults(_spec=spec)
    for group, cmds in GROUPS.items():
        top = commands.get(group) or sub.add_parser(group, help=f"{group} commands")
        g = top.add_subparsers(dest="sub", required=group not in commands, metavar="{" + ",".join(cmds) + "}")
        for name, spec in cmds.items():
            cls, fn = _load(spec)
            p = g.add_parser(name, help=(fn.__doc__ or "").strip().split("\n")[0])
            add_dataclass_args(p, cls)
            _add_debug(p)
            p.set_defaults(_spec=spec)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not overwrite a --debug given before the command
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of its one-line message")


# what a user can cause (a bad flag value, a missing or unreadable file, an occupied --out): one
# line, exit 2. Anything else is a bug in nanoseek and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (USER_ERRORS) is one line on stderr and exit status 2;
    `--debug` (before or after the command) re-raises it, traceback and all."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    cls, fn = _load(args._spec)
    command = args.command + (f" {args.sub}" if getattr(args, "sub", None) else "")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    try:
        if values.get("resume"):
            values = resume_values(cls, values)
        missing = [n for n, f in fields.items() if n not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError("the following arguments are required: "
                             + ", ".join("--" + n.replace("_", "-") for n in missing))
        cfg = cls(**values)
        fn(cfg)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"nanoseek {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(e: BaseException) -> str:
    """The message of `e` on one line (an OSError's own str names the file: errno, text, path)."""
    text = str(e) or type(e).__name__
    return " ".join(text.split("\n")).strip()


def resume_values(cls: type, given: dict[str, Any]) -> dict[str, Any]:
    """`--resume`: the run's saved RUN/config.json, overridden by the flags given. A run without
    a saved config (never started) takes the flags as they are."""
    from .train.rundir import CONFIG, read_run_config

    out = given.get("out", next((f.default for f in dataclasses.fields(cls) if f.name == "out"), None))
    if out is None or not (Path(out) / CONFIG).is_file():
        return given
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {**{k: v for k, v in read_run_config(out).items() if k in names}, **given}


if __name__ == "__main__":
    sys.exit(main())
