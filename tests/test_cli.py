"""`nanovllm` command line: engine flags derived from Config; no optional extra imported to parse them."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

from nanovllm.config import Config
from nanovllm.entrypoints.cli import build_parser, engine_kwargs


def test_every_config_field_is_a_kebab_case_flag() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    for f in fields(Config):
        if f.init and f.name != "model":
            assert "--" + f.name.replace("_", "-") in flags, f.name


def test_given_flags_become_engine_kwargs_and_the_rest_keep_config_defaults() -> None:
    args = build_parser().parse_args(["serve", "/m", "--max-model-len", "512", "--no-enable-prefix-caching", "--enforce-eager",
                                      "--gpu-memory-utilization", "0.5", "--device", "cpu", "--port", "9000"])
    assert engine_kwargs(args) == {"max_model_len": 512, "enable_prefix_caching": False, "enforce_eager": True,
                                   "gpu_memory_utilization": 0.5, "device": "cpu"}
    assert (args.model, args.host, args.port) == ("/m", "127.0.0.1", 9000)


def test_parsing_the_command_line_imports_no_server_package() -> None:
    code = ("import sys, nanovllm, nanovllm.entrypoints.cli as cli; cli.build_parser().parse_args(['serve', 'm']); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
