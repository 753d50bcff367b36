"""`nanovllm <subcommand>`: each subcommand is a parser builder in SUBCOMMANDS plus the module whose
`run(args)` it calls, imported only when chosen (so `nanovllm --help` needs no optional extra).

Every engine setting is a kebab-case flag derived from Config's dataclass fields, so a new Config
field appears here without editing this file; a flag left out keeps Config's default.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from dataclasses import MISSING, fields

from nanovllm.config import Config


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field (--max-model-len, --enforce-eager / --no-enforce-eager, ...)."""
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("engine settings (nanovllm.config.Config)")
    for f in fields(Config):
        if not f.init or f.name == "model":
            continue
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f"default: {f.default}" if f.default is not MISSING else "required"
        if bool in typing.get_args(kind) or kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=default)
        else:
            scalar = next(t for t in (int, float, str) if kind is t or t in typing.get_args(kind))
            group.add_argument(flag, type=scalar, default=None, help=default)


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The engine settings given on the command line (Config supplies the rest)."""
    names = [f.name for f in fields(Config) if f.init and f.name != "model"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _serve_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (needs the `serve` extra)",
                                   description="Serve MODEL over an OpenAI-compatible HTTP API.")
    parser.add_argument("model", help="local Hugging Face model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the name clients pass as `model` (default: MODEL as given)")
    parser.add_argument("--api-key", default=os.environ.get("NANOVLLM_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1/* (default: $NANOVLLM_API_KEY)")
    parser.add_argument("--max-waiting", type=int, default=None, help="requests allowed to wait for a batch before 503 (default: unbounded)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 (default: 1 MiB)")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="on SIGTERM, seconds in-flight requests may finish before they are aborted (default: 5)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(parser)
    parser.set_defaults(entry="nanovllm.entrypoints.serve")


def _batch_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("batch", help="run a JSONL file of prompts offline (replicas > 1 need the `ray` extra)",
                                   description="Run every line of --input through MODEL and write one result per line to --output.")
    parser.add_argument("model", help="local Hugging Face model folder")
    parser.add_argument("--input", required=True, help='JSONL: one {"prompt": text or token ids, sampling fields...} a line')
    parser.add_argument("--output", required=True, help="JSONL written with one result (or error) per input line, in order")
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas; more than 1 (or --address) runs them on Ray (default: 1)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster when --replicas > 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows handed to a replica at a time (default: 256)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica (default: 1)")
    parser.add_argument("--batch-timeout", type=float, default=None,
                        help="seconds after which a replica stuck on one batch is killed and the batch re-run (default: none)")
    parser.add_argument("--max-restarts", type=int, default=None, help="replacements for replicas that die (default: --replicas)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(parser)
    parser.set_defaults(entry="nanovllm.entrypoints.batch")


SUBCOMMANDS = [_serve_parser, _batch_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="nanovllm command line")
    subparsers = parser.add_subparsers(title="subcommands", required=True, metavar="SUBCOMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args.entry).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
