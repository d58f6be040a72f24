"""The `dlm` command: parse arguments, build a config, call one library function.

Every command that takes a config takes it as `key=value` (dotted for nested sections), and
its --help lists every key with its type, default, allowed values and description, generated
from the config models (common.config.keys), so each lives in one place. Options that are not
configuration stay flags. megatron-core, DeepSpeed and Triton take seconds to import: only
train, sample and smoke import them, inside the command.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from dlm_pretrain.common.config import Section, apply_overrides, keys
from dlm_pretrain.common.errors import ConfigError, DlmError
from dlm_pretrain.data_pipeline import PrepareConfig, prepare_dataset, verify_dataset
from dlm_pretrain.evaluation.options import EvalOptions, check_options
from dlm_pretrain.launch.launcher import (
    deepspeed_command,
    hostfile_slots,
    run_deepspeed,
    world_size,
)
from dlm_pretrain.launch.quiet import configure_output, hidden_prints, verbose_requested
from dlm_pretrain.launch.sweep.commands import add_sweep_commands
from dlm_pretrain.launch.train import (
    DEFAULT_DATA,
    add_run_arguments,
    load_run_config,
    needs_default_data,
    split_run_arguments,
)
from dlm_pretrain.pretrain.config import RunConfig, SamplingConfig, preset_names
from dlm_pretrain.pretrain.tracking import default_tracking_uri

log = logging.getLogger("dlm")
VERBOSE = ("-v", "--verbose")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    leading_verbose = argv[:1] in ([v] for v in VERBOSE)
    if argv[int(leading_verbose) : int(leading_verbose) + 1] == ["smoke"]:
        # every option after it is launch.smoke's own
        configure_output(verbose_requested(leading_verbose))
        return _run_smoke(argv[int(leading_verbose) + 1 :])
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # `dlm train PRESET --nproc 2 a.b=c`: settings may follow the options
    if extra and hasattr(args, "settings") and all("=" in e for e in extra):
        args.settings = [*args.settings, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.verbose = verbose_requested(args.verbose)
    configure_output(args.verbose)
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
    _add_verbose(parser, default=False)
    sub = parser.add_subparsers(title="subcommands", required=True, metavar="SUBCOMMAND")
    prepare = _add_command(
        sub,
        "prepare",
        "tokenize a corpus into packed webdataset shards with a manifest",
        "dlm prepare out=data/web corpus='corpus/*.jsonl.gz' seq_len=1024",
        PrepareConfig,
    )
    prepare.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="any key below")
    prepare.set_defaults(run=_run_prepare)

    verify = _add_command(
        sub,
        "verify",
        "check every shard of a dataset against its manifest",
        "Re-hash and re-read every shard; exit 1 naming each bad shard.",
    )
    verify.add_argument("path", help="dataset directory written by `dlm prepare`")
    verify.set_defaults(run=_run_verify)

    train = _add_command(
        sub,
        "train",
        "train one model (default: a small MDLM on the embedded corpus)",
        "dlm train [PRESET] train.steps=1000: the defaults below, then the preset "
        f"(one of {preset_names()} or a YAML file), then the KEY=VALUE settings; resumes "
        "from the run directory's latest checkpoint.",
        RunConfig,
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

    sample = _add_command(
        sub,
        "sample",
        "write samples from the latest checkpoint of a run",
        "dlm sample RUN_DIR steps=64 num_samples=8",
        SamplingConfig,
    )
    sample.add_argument(
        "settings", nargs="*", metavar="RUN_DIR KEY=VALUE", help="a `dlm train` run directory"
    )
    sample.set_defaults(run=_run_sample)

    _add_eval_command(sub)
    _add_release_commands(sub)
    add_sweep_commands(sub, _add_command)

    sub.add_parser(
        "smoke",
        add_help=False,  # `dlm smoke --help` is launch.smoke's own; see main
        help="check a new machine or cluster first: devices, collectives, every Triton kernel, "
        "a short bf16 run, a sample, a resume, tokens/s and MFU",
    )
    return parser


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    """`dlm eval`: every part of evaluation.evaluate as a flag."""
    cmd = _add_command(
        sub,
        "eval",
        "evaluate runs or exports: likelihood, gen-PPL, sampling speed, Pareto, zero-shot tasks",
        "dlm eval TARGET [TARGET ...] [--likelihood] [--gen-ppl --judge AR] [--speed] "
        "[--tasks T1,T2]; with no part named: the likelihood and the speed (and gen-PPL if "
        "--judge is given). Tables are printed; OUT/eval.json, and with gen-PPL and speed "
        "OUT/pareto.csv and OUT/pareto.png, are written; metrics go to each run's MLflow run.",
    )
    cmd.add_argument("targets", nargs="+", help="run directories or `dlm export-hf` folders")
    for part in ("likelihood", "gen-ppl", "speed"):
        cmd.add_argument(f"--{part}", action="store_true", help=f"evaluate the {part}")
    cmd.add_argument("--tasks", default="", help="lm-eval tasks, comma-separated")
    cmd.add_argument("--include-path", default="", help="folder of extra lm-eval task YAMLs")
    cmd.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task")
    cmd.add_argument("--data", default="", help="prepared dataset (default: the run's own)")
    cmd.add_argument("--sequences", type=int, default=256, help="validation sequences")
    cmd.add_argument("--draws", type=int, default=1, help="t draws per validation sequence")
    cmd.add_argument("--task-draws", type=int, default=32, help="t draws per lm-eval request")
    cmd.add_argument("--judge", default="", help="AR run or export, or HF causal LM folder")
    cmd.add_argument("--samples", type=int, default=16, help="samples per sampler setting")
    cmd.add_argument("--steps", default="16,64,128", help="sampler steps, comma-separated")
    cmd.add_argument("--top-p", default="1.0", help="nucleus masses, comma-separated")
    cmd.add_argument("--final-step", default="default", help="final-step rules, comma-separated")
    cmd.add_argument("--batch", type=int, default=16, help="samples per sampler call")
    cmd.add_argument("--repeats", type=int, default=3, help="timed calls per speed figure")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    cmd.add_argument("--out", type=Path, default=Path("runs/eval"), help="results folder")
    cmd.set_defaults(run=_run_eval)


def _add_release_commands(sub: argparse._SubParsersAction) -> None:
    """export-hf, import-hf and reshard: checkpoints in and out of other layouts."""
    export = _add_command(
        sub,
        "export-hf",
        "write a checkpoint as a Hugging Face model folder (any layout, one process)",
        "dlm export-hf RUN_DIR --out DIR [--step N] [--dtype bfloat16]",
    )
    export.add_argument("run_dir", type=Path, help="a `dlm train` run directory")
    export.add_argument("--out", type=Path, required=True, help="the new model folder")
    export.add_argument("--step", type=int, default=None, help="that step's checkpoint")
    export.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    export.set_defaults(run=_run_export)

    imported = _add_command(
        sub,
        "import-hf",
        "turn an exported model folder into a run directory that `dlm train` fine-tunes",
        "dlm import-hf DIR --out RUN_DIR [--tensor T --pipeline P]; training starts from "
        "these weights with a fresh optimizer, schedule and data position.",
    )
    imported.add_argument("folder", type=Path, help="a folder written by `dlm export-hf`")
    imported.add_argument("--out", type=Path, required=True, help="the new run directory")
    _add_layout_flags(imported, required=False)
    imported.set_defaults(run=_run_import)

    reshard = _add_command(
        sub,
        "reshard",
        "convert a run's latest checkpoint to other tensor and pipeline sizes",
        "dlm reshard RUN_DIR --tensor T --pipeline P [--out RUN_DIR2]: the optimizer state, "
        "step, data position and RNG come along. Without --out the converted copy is kept "
        "beside the checkpoint for `dlm train` at the new sizes (which also converts on its "
        "own).",
    )
    reshard.add_argument("run_dir", type=Path, help="a `dlm train` run directory")
    reshard.add_argument("--out", type=Path, default=None, help="write a new run directory")
    _add_layout_flags(reshard, required=True)
    reshard.set_defaults(run=_run_reshard)


def _add_layout_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    default = None if required else 1
    parser.add_argument("--tensor", type=int, required=required, default=default, help="T")
    parser.add_argument("--pipeline", type=int, required=required, default=default, help="P")


def _add_command(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    usage: str,
    config_cls: type[Section] | None = None,
) -> argparse.ArgumentParser:
    """A subcommand; with `config_cls`, its help lists every key of that config."""
    cmd = sub.add_parser(
        name,
        help=summary,
        description=f"{summary[0].upper()}{summary[1:]}. {usage}",
        epilog=config_keys_help(config_cls) if config_cls else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_verbose(cmd, default=argparse.SUPPRESS)  # SUPPRESS: keeps a `dlm -v CMD`
    return cmd


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        *VERBOSE,
        action="store_true",
        default=default,
        help="also show the libraries' own output (megatron-core, DeepSpeed, torch warnings)",
    )


def config_keys_help(config_cls: type[Section]) -> str:
    """`KEY=DEFAULT  type, allowed: description`, one entry per key."""
    rows = list(keys(config_cls))
    width = min(34, max(len(f"{k.name}={k.default}") for k in rows) + 2)
    lines = ["config keys, KEY=DEFAULT (required keys have no default):"]
    for k in rows:
        head = f"  {k.name}={k.default}"
        kind = f"{k.type}, {k.allowed}" if k.allowed else k.type
        text = textwrap.wrap(f"{kind}: {k.help}", 98 - width - 2)
        if len(head) > width:
            lines.append(head)
            head = ""
        lines.append(f"{head:<{width}}  {text[0]}")
        lines += [f"{'':<{width}}    {line}" for line in text[1:]]
    return "\n".join(lines)


def _split(settings: list[str]) -> tuple[list[str], list[str]]:
    """(the arguments without '=', the KEY=VALUE settings)."""
    return [s for s in settings if "=" not in s], [s for s in settings if "=" in s]


def _build(config_cls: type[Section], settings: list[str]) -> Section:
    return config_cls(**apply_overrides(config_cls, {}, settings))


def _run_prepare(args: argparse.Namespace) -> int:
    stray, settings = _split(args.settings)
    if stray:
        raise ConfigError(f"{stray[0]!r} is not KEY=VALUE; `dlm prepare --help` lists the keys")
    cfg = _build(PrepareConfig, settings)
    manifest = prepare_dataset(cfg)
    train = manifest.splits["train"]
    print(
        f"wrote {cfg.out}: {train.sequences} train / {manifest.splits['val'].sequences} val "
        f"sequences of {manifest.seq_len} tokens, vocab {manifest.tokenizer['vocab_size']}"
    )
    return 0


def _run_train(args: argparse.Namespace) -> int:
    preset, overrides = split_run_arguments(args.settings)
    cfg = load_run_config(preset, overrides)  # every check before any work
    slots = hostfile_slots(args.hostfile) if args.hostfile else None
    world = world_size(slots, args.nproc)
    cfg.check_world_size(world)
    if needs_default_data(cfg.data.path):
        print(f"preparing the embedded default dataset in {DEFAULT_DATA.out} (once)")
        prepare_dataset(DEFAULT_DATA)
    if world > 1 or slots:
        hosts = len(slots) if slots else 1
        command = deepspeed_command(preset, overrides, args.nproc, args.hostfile, hosts)
        print("+ " + " ".join(command))
        code = run_deepspeed(command, hosts)  # the workers inherit DLM_VERBOSE
        if code:
            return code
        run_dir = Path(cfg.train.run_dir)
    else:
        with hidden_prints(args.verbose):
            from dlm_pretrain.pretrain.trainer import run  # deepspeed, megatron-core: seconds

            run_dir = run(cfg)
    uri = cfg.tracking.uri or default_tracking_uri(run_dir)
    print(f"\ncheckpoints: {run_dir / 'checkpoints'}\nsamples:     {run_dir / 'samples'}")
    print(f"loss curve:  {run_dir / 'loss_curve.png'}\nMLflow:      {uri}")
    print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri}")
    return 0


def _run_sample(args: argparse.Namespace) -> int:
    run_dirs, settings = _split(args.settings)
    if len(run_dirs) != 1:
        raise ConfigError(f"give one RUN_DIR (a `dlm train` run directory), got {run_dirs}")
    cfg = _build(SamplingConfig, settings)
    with hidden_prints(args.verbose):
        from dlm_pretrain.pretrain.run_sampling import sample_run  # deepspeed, megatron-core

        result = sample_run(run_dirs[0], cfg)
    for i, text in enumerate(result.texts):
        print(f"===== sample {i} (step {result.step}) =====\n{text}\n")
    print(f"{result.tokens_per_s:.0f} tokens/s, {result.forward_passes} forward passes")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    named = args.likelihood or args.gen_ppl or args.speed or bool(args.tasks)
    opts = EvalOptions(
        likelihood=args.likelihood or not named,
        gen_ppl=args.gen_ppl or (not named and bool(args.judge)),
        speed=args.speed or not named,
        tasks=tuple(filter(None, args.tasks.split(","))),
        include_path=args.include_path,
        limit=args.limit,
        data=args.data,
        sequences=args.sequences,
        draws=args.draws,
        task_draws=args.task_draws,
        judge=args.judge,
        samples=args.samples,
        steps=_numbers(args.steps, int, "--steps"),
        top_p=_numbers(args.top_p, float, "--top-p"),
        final_step=tuple(args.final_step.split(",")),
        batch=args.batch,
        repeats=args.repeats,
        seed=args.seed,
        out=args.out,
    )
    check_options(opts)
    with hidden_prints(args.verbose):
        from dlm_pretrain.evaluation.evaluate import evaluate, print_tables  # deepspeed

        result = evaluate(args.targets, opts)
    print_tables(result)
    print(f"\nresults in {opts.out / 'eval.json'}")
    return 0


def _numbers(text: str, kind: type, flag: str) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag}={text!r}: give comma-separated numbers") from None


def _run_export(args: argparse.Namespace) -> int:
    from dlm_pretrain.checkpoints_tools.export_hf import export_hf  # torch: seconds

    out = export_hf(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    print(f"wrote {out}; load it with transformers, see {out / 'README.md'}")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from dlm_pretrain.checkpoints_tools.import_hf import import_hf  # torch: seconds

    cfg = import_hf(args.folder, args.out, tensor=args.tensor, pipeline=args.pipeline)
    print(
        f"wrote {args.out}. Prepare data with its tokenizer, then fine-tune (a fresh "
        f"optimizer):\n  dlm prepare out=DATA corpus=... tokenizer={args.out}/tokenizer.model "
        f"seq_len={cfg.data.seq_len or 'L'}\n  dlm train {args.out}/config.yaml data.path=DATA"
        f" --nproc {args.tensor * args.pipeline}"
    )
    return 0


def _run_reshard(args: argparse.Namespace) -> int:
    with hidden_prints(args.verbose):
        from dlm_pretrain.checkpoints_tools.reshard import reshard  # deepspeed, megatron-core

        cfg = reshard(args.run_dir, args.tensor, args.pipeline, args.out)
    run_dir = Path(cfg.train.run_dir)
    layout = "" if args.out else f" parallel.tensor={args.tensor} parallel.pipeline={args.pipeline}"
    print(
        f"resharded for tensor={args.tensor} pipeline={args.pipeline}; continue with:\n"
        f"  dlm train {run_dir}/config.yaml{layout} --nproc N  (N: a multiple of "
        f"{args.tensor * args.pipeline})"
    )
    return 0


def _run_smoke(smoke_args: list[str]) -> int:
    from dlm_pretrain.launch.smoke import main as smoke  # deepspeed, megatron-core, triton

    return smoke(smoke_args)


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
