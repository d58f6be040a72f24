"""The `dlm` command: parse arguments, build a config, call one library function.

Options are generated from the config dataclasses' fields (their `help` metadata), so each
default and description lives in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from dlm_pretrain.common.errors import DlmError
from dlm_pretrain.data_pipeline import PrepareConfig, prepare_dataset, verify_dataset
from dlm_pretrain.launch.launcher import (
    deepspeed_command,
    hostfile_slots,
    run_deepspeed,
    world_size,
)
from dlm_pretrain.launch.train import (
    DEFAULT_DATA,
    add_run_arguments,
    configure_logging,
    load_run_config,
    needs_default_data,
)
from dlm_pretrain.pretrain.config import SamplingConfig
from dlm_pretrain.pretrain.tracking import default_tracking_uri

log = logging.getLogger("dlm")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["smoke"]:  # every option after it is launch.smoke's own
        return _run_smoke(argparse.Namespace(smoke_args=argv[1:]))
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # `dlm train PRESET --nproc 2 a.b=c`: overrides may follow the options
    if extra and getattr(args, "overrides", None) is not None and all("=" in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging()
    try:
        return args.run(args)
    except DlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlm", description="Pretraining of discrete diffusion language models."
    )
    sub = parser.add_subparsers(title="subcommands", required=True, metavar="SUBCOMMAND")
    _add_command(
        sub,
        "prepare",
        "tokenize a corpus into packed webdataset shards with a manifest",
        PrepareConfig,
        _run_prepare,
    )
    verify = sub.add_parser(
        "verify",
        help="check every shard of a dataset against its manifest",
        description="Re-hash and re-read every shard; exit 1 naming each bad shard.",
    )
    verify.add_argument("path", help="dataset directory written by `dlm prepare`")
    verify.set_defaults(run=_run_verify)
    train = sub.add_parser(
        "train",
        help="train one model (default: a small MDLM on the embedded corpus)",
        description="Train one model from a YAML preset plus section.key=value overrides; "
        "resumes automatically from the run directory's latest checkpoint.",
    )
    add_run_arguments(train)
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes on this node (deepspeed launcher; default 1), or per host of "
        "--hostfile (default: every slot)",
    )
    train.add_argument("--hostfile", default=None, help="deepspeed hostfile (`HOST slots=N` lines)")
    train.set_defaults(run=_run_train)

    _add_command(
        sub,
        "sample",
        "write samples from the latest checkpoint of a run",
        SamplingConfig,
        _run_sample,
        positional="run_dir",
    )
    smoke = sub.add_parser(
        "smoke",
        add_help=False,  # `dlm smoke --help` is launch.smoke's own
        help="check a new machine or cluster first: devices, collectives, every Triton kernel, "
        "a short bf16 run, a sample, a resume, tokens/s and MFU",
    )
    smoke.add_argument("smoke_args", nargs=argparse.REMAINDER)  # see main
    return parser


def _add_command(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    config_cls: type,
    run: Callable[[argparse.Namespace], int],
    positional: str | None = None,
) -> None:
    """A subcommand whose options are the fields of `config_cls`."""
    cmd = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
    if positional:
        cmd.add_argument(positional, help="run directory written by `dlm train`")
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        _add_option(cmd, f, hints[f.name])
    cmd.set_defaults(run=run, config_cls=config_cls)


def _add_option(cmd: argparse.ArgumentParser, f: dataclasses.Field, hint: object) -> None:
    flag = "--" + f.name.replace("_", "-")
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    default = None if required else f.default
    text = f.metadata["help"] + (
        "" if required or default in (None, ()) else f" (default: {default})"
    )
    if hint is bool:
        cmd.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
    elif typing.get_origin(hint) is tuple:
        cmd.add_argument(flag, nargs="+", default=default, help=text, metavar="PATH")
    else:
        base = (
            next(a for a in typing.get_args(hint) if a is not type(None))
            if _optional(hint)
            else hint
        )
        cmd.add_argument(flag, type=base, default=default, required=required, help=text)


def _optional(hint: object) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _config(args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(args.config_cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return args.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _run_prepare(args: argparse.Namespace) -> int:
    manifest = prepare_dataset(_config(args))
    train = manifest.splits["train"]
    print(
        f"wrote {args.out}: {train.sequences} train / {manifest.splits['val'].sequences} val "
        f"sequences of {manifest.seq_len} tokens, vocab {manifest.tokenizer['vocab_size']}"
    )
    return 0


def _run_train(args: argparse.Namespace) -> int:
    # deepspeed and megatron-core take seconds to import: only the commands that train do

    cfg = load_run_config(args.preset, args.overrides)  # every check before any work
    slots = hostfile_slots(args.hostfile) if args.hostfile else None
    world = world_size(slots, args.nproc)
    cfg.check_world_size(world)
    if needs_default_data(cfg.data.path):
        print(f"preparing the embedded default dataset in {DEFAULT_DATA.out} (once)")
        prepare_dataset(DEFAULT_DATA)
    if world > 1 or slots:
        hosts = len(slots) if slots else 1
        command = deepspeed_command(args.preset, args.overrides, args.nproc, args.hostfile, hosts)
        print("+ " + " ".join(command))
        code = run_deepspeed(command, hosts)
        if code:
            return code
        run_dir = Path(cfg.train.run_dir)
    else:
        from dlm_pretrain.pretrain.trainer import run  # deepspeed, megatron-core: seconds to import

        run_dir = run(cfg)
    uri = cfg.tracking.uri or default_tracking_uri(run_dir)
    print(f"\ncheckpoints: {run_dir / 'checkpoints'}\nsamples:     {run_dir / 'samples'}")
    print(f"loss curve:  {run_dir / 'loss_curve.png'}\nMLflow:      {uri}")
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri}")
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    from dlm_pretrain.pretrain.run_sampling import sample_run  # deepspeed, megatron-core

    result = sample_run(args.run_dir, _config(args))
    for i, text in enumerate(result.texts):
        print(f"===== sample {i} (step {result.step}) =====\n{text}\n")
    print(f"{result.tokens_per_s:.0f} tokens/s, {result.forward_passes} forward passes")
    return 0


def _run_smoke(args: argparse.Namespace) -> int:
    from dlm_pretrain.launch.smoke import main as smoke  # deepspeed, megatron-core, triton

    return smoke(args.smoke_args)


def _run_verify(args: argparse.Namespace) -> int:
    problems = verify_dataset(args.path)
    for problem in problems:
        print(f"BAD {problem}")
    if problems:
        print(f"{len(problems)} bad shard(s) in {args.path}", file=sys.stderr)
        return 1
    print(f"{args.path}: every shard matches the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
