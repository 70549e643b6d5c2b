"""Command line: `python -m dsv3 <command> ...`.

Commands:
  info       a preset's (or a transformers folder's) config, parameter counts (total / active per token),
             KV-cache size and weight memory
  train      phase 1 on a preset, or phase 2 with --resume (also under torchrun for data parallelism)
  generate   continue a prompt from a checkpoint or a transformers folder (latent-cache decoding, sampling,
             streaming)
  export-hf  write a checkpoint as a Hugging Face transformers model folder
  bench      benchmark training and decoding against transformers and the machine's peak
Each command's arguments are listed by `python -m dsv3 <command> --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_info(args) -> int:
    import torch

    from .config import FIELD_FLAGS, ModelConfig, SettingError
    from .model import DeepSeekV3, count_params

    if args.hf is not None and args.checkpoint is not None:
        raise ValueError("give --hf or --checkpoint, not both")
    if args.hf is not None:
        from .hf import hf_model_config

        cfg, name = hf_model_config(args.hf), f"hf {args.hf}"
    elif args.checkpoint is not None:  # the config a trained checkpoint was saved with; no weights are read
        from .checkpoint import read_meta, resolve_checkpoint

        try:
            ckpt = resolve_checkpoint(args.checkpoint, best=args.best)
            cfg, name = ModelConfig.from_dict(read_meta(ckpt)["config"]), f"checkpoint {ckpt}"
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"--checkpoint: {e}") from None
    else:
        try:
            cfg = ModelConfig.preset(args.preset, **({"n_mtp_layers": args.mtp_layers} if args.mtp_layers else {}))
        except SettingError as e:  # "--mtp-layers must be >= 0", not the field's name
            raise ValueError(e.named(FIELD_FLAGS.get)) from None
        name = f"preset {args.preset}"
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = DeepSeekV3(cfg)
    counts = count_params(model)
    cache = {"cache_values_per_token_per_layer": cfg.cache_values_per_token,
             "cache_bytes_per_token_bf16": cfg.cache_values_per_token * cfg.n_layers * 2,
             "weight_bytes_bf16": 2 * counts["total"]}
    if args.json:
        source = {"hf": str(args.hf)} if args.hf is not None else \
            {"checkpoint": name.split(" ", 1)[1]} if args.checkpoint is not None else {"preset": args.preset}
        print(json.dumps({**source, "config": cfg.to_dict(), "params": counts, **cache}, indent=2))
        return 0
    print(name)
    for title, values in cfg.sections().items():  # only the fields that apply to this architecture
        print(f"  {title}")
        for k, v in values.items():
            print(f"    {k:<25} {v}")
    print("parameters")
    for k, v in counts.items():
        print(f"  {k:<26} {v:>13,}")
    print(f"  {'active share':<26} {counts['active'] / counts['total']:>13.1%}")
    print("kv cache")
    print(f"  {'values/token/layer':<26} {cache['cache_values_per_token_per_layer']:>13,}")
    print(f"  {'bytes/token (bf16)':<26} {cache['cache_bytes_per_token_bf16']:>13,}")
    print("weights")
    print(f"  {'bytes (bf16)':<26} {cache['weight_bytes_bf16']:>13,}  ({cache['weight_bytes_bf16'] / 2**30:.1f} GiB)")
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default: argparse's "(default: X)", unless the help text states it already
    (options whose default is None describe it in words) or the option is an on/off switch."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.nargs == 0:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's errors in one line, like every other bad input (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .train import TrainConfig

    parser = Parser(prog="python -m dsv3", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, formatter_class=HelpFormatter, **k)
    p = sub.add_parser("info", help="print a preset's config and parameter counts")
    p.add_argument("--preset", default=TrainConfig.preset, choices=list(PRESETS), help="model preset (as train's)")
    p.add_argument("--hf", metavar="PATH", default=None, help="a transformers model folder instead of a preset "
                   "(its config.json is enough) (default: none, use --preset)")
    p.add_argument("--checkpoint", metavar="PATH", default=None, help="a trained checkpoint or run folder (its "
                   "newest) instead of a preset: the config it was saved with (default: none, use --preset)")
    p.add_argument("--best", action="store_true", help="with --checkpoint: the run's best/ instead of its newest")
    p.add_argument("--json", action="store_true", help="machine-readable output (the full config)")
    p.add_argument("--mtp-layers", type=int, default=0, metavar="D",
                   help="count D multi-token prediction modules too (as `train --mtp-layers D` builds)")
    p.set_defaults(func=cmd_info)
    from .train import add_cli_args, cmd_train

    p = sub.add_parser("train", help="train a preset (phase 1) or resume a run (phase 2)")
    add_cli_args(p)
    p.set_defaults(func=cmd_train)
    from .generate import add_cli_args as add_generate_args
    from .generate import cmd_generate

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)
    from .export_hf import cmd_export_hf

    p = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face transformers model folder")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--best", action="store_true", help="the run's best checkpoint (RUN/best) instead of its newest")
    p.add_argument("--out", required=True, help="folder for config.json, model.safetensors, generation_config.json")
    p.set_defaults(func=cmd_export_hf)
    bench = bench_harness()
    if bench is not None:
        p = sub.add_parser("bench", help="benchmark training and decoding against transformers and the machine's peak")
        bench.add_cli_args(p)
        p.set_defaults(func=bench.cmd_bench)
    else:  # every argument taken as it comes ('\0': no option flags), so the answer is the one line below
        p = sub.add_parser("bench", help="(a source checkout's benchmarks/bench.py)", prefix_chars="\0", add_help=False)
        p.add_argument("args", nargs="*")
        p.set_defaults(func=_no_bench_harness)
    return parser


def _no_bench_harness(args) -> int:
    print("error: python -m dsv3 bench runs benchmarks/bench.py of a source checkout (git clone, then "
          "pip install -e .); this install has none", file=sys.stderr)
    return 2


def bench_harness():
    """The benchmark harness, benchmarks/bench.py beside this package in a source checkout (lab code, not part of
    the package); None where there is none (an installed wheel)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    if "dsv3_bench" not in sys.modules and path.is_file():
        spec = importlib.util.spec_from_file_location("dsv3_bench", path)
        sys.modules["dsv3_bench"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules.get("dsv3_bench")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "no_kernels", False):
        from . import kernels

        kernels.set_enabled(False)  # the reference model for this whole run
    try:
        from .devices import check_device

        check_device(getattr(args, "device", None))
        return args.func(args)
    except BrokenPipeError:  # `... | head` closed our stdout: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as e:  # bad input, a missing file (data.MissingFile: offline), an unwritable folder
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
