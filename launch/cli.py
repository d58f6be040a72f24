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

from data_pipeline import PrepareConfig, prepare_dataset, verify_dataset
from dlm_errors import DlmError

log = logging.getLogger("dlm")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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
    return parser


def _add_command(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    config_cls: type,
    run: Callable[[argparse.Namespace], int],
) -> None:
    """A subcommand whose options are the fields of `config_cls`."""
    cmd = sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.")
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
