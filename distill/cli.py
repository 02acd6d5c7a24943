"""The ``distill`` command line. Each command parses flags, builds a config and calls one stage.

User errors (:class:`~distill.errors.DistillError`) become one sentence on
stderr and exit code 1; Ctrl-C exits 130 and keeps all finished work.
"""
from __future__ import annotations

import logging
import sys

import click

from .errors import DistillError

log = logging.getLogger("distill")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="distill")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Dataset distillation for sharing medical images.

    \b
    The pipeline:
      distill buffer   train expert networks on real data, store their trajectories
      distill run      learn a tiny synthetic set by matching those trajectories
      distill audit    measure whether the synthetic set leaks its patients
      distill export   write the self-describing .h5 share
      distill inspect  validate and summarise a share
      distill eval     train on a share and test on your own real data
    """
    _setup_logging(verbose)


DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                      help="Where to compute (default auto: a GPU when there is one).")
SEED = click.option("--seed", type=int, default=None, help="Seed; the same seed gives the same result.")
CONFIG = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                      help="TOML file with defaults for this command; flags override it.")


def _layers(config_file: str | None, **flags) -> list[dict]:
    from .config import load_toml

    return [load_toml(config_file) if config_file else {}, flags]


@cli.command()
@click.option("--data", required=True, help="MedMNIST name (e.g. pneumoniamnist), a MedMNIST-layout .npz, or a folder with one sub-folder per class.")
@click.option("--out", default=None, help="Output folder for the trajectories (default buffers/).")
@click.option("--model", default=None, help="Registered model name (default convnet3).")
@click.option("--experts", type=int, default=None, help="Number of experts (default 10).")
@click.option("--epochs", type=int, default=None, help="Epochs per expert (default 50).")
@click.option("--lr", type=float, default=None, help="Expert SGD learning rate (default 0.01).")
@click.option("--batch-size", type=int, default=None, help="Expert batch size (default 256).")
@click.option("--augment", default=None, help="Comma list of color,crop,cutout,flip,scale,rotate, or none.")
@click.option("--zca/--no-zca", default=None, help="ZCA-whiten the images (kornia); stored with the buffer.")
@click.option("--size", type=int, default=None, help="Resize images to SIZE x SIZE.")
@click.option("--snapshot-every", type=int, default=None, help="Snapshot every N optimiser steps (default 0: once per epoch).")
@click.option("--snapshot-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Storage precision of the snapshots (default float32).")
@click.option("--batch-experts", type=int, default=None,
              help="Train K experts at once in one vmapped network, same trajectories to rounding "
                   "(default 0 = auto: up to 16 on CUDA, 1 on CPU).")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast for the experts' forward pass (changes trajectories).")
@SEED
@DEVICE
@CONFIG
def buffer(config_file, **flags):
    """Train expert networks on real data and store their trajectories."""
    from .buffer import build_buffer
    from .config import BufferConfig, build

    cfg = build(BufferConfig, *_layers(config_file, **flags))
    written = build_buffer(cfg)
    click.echo(f"{len(written)} expert(s) written to {cfg.out}")


@cli.command("eval")
@click.argument("shares", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--test", default=None, help="Real data whose test split is scored (MedMNIST name, .npz or folder); default: --train.")
@click.option("--train", default=None, help="Real data whose train split feeds the baselines; default: --test.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(["random-real", "full", "none"]),
              help="Baseline(s) under the same protocol; repeatable. Default beside a share: random-real and full.")
@click.option("--ipc", type=int, default=None, help="Random-real images per class (default: as many as the share has).")
@click.option("--model", default=None, help="Registered model to train (default: the share's recipe, else convnet3).")
@click.option("--runs", type=int, default=None, help="Networks trained per row (default 5).")
@click.option("--epochs", type=int, default=None, help="Override the epochs of every row (default: the recipe's; full data 30).")
@click.option("--lr", type=float, default=None, help="Override the shares' learned step size (default: their geometric mean).")
@click.option("--zca/--no-zca", default=None, help="Baselines without a share: ZCA-whiten as `distill buffer --zca` does.")
@click.option("--size", type=int, default=None, help="Resize real images to SIZE x SIZE (default: the share's size).")
@click.option("--json", "json", type=click.Path(dir_okay=False), default=None, help="Write the full report as JSON here.")
@click.option("--match-classes-by-position", "match_by_position", is_flag=True, default=None,
              help="Accept real data whose class names differ from the share's, pairing classes by index.")
@SEED
@DEVICE
@CONFIG
def eval_(config_file, shares, baselines, **flags):
    """Train fresh networks on one or more shares (their union) and test them on real data."""
    from .config import build
    from .evaluate import EvalConfig, evaluate, format_report

    cfg = build(EvalConfig, *_layers(config_file, shares=tuple(shares) or None, baselines=tuple(baselines) or None,
                                     **flags))
    click.echo(format_report(evaluate(cfg)))


@cli.command()
@click.option("--buffer", default=None, help="Buffer folder made by 'distill buffer' (default buffers/).")
@click.option("--out", default=None, help="Run folder for checkpoints, metrics, grids and synthetic.h5 (default runs/run).")
@click.option("--ipc", type=int, default=None, help="Synthetic images per class (default 10).")
@click.option("--iterations", type=int, default=None, help="Distillation iterations (default 1000).")
@click.option("--syn-steps", type=int, default=None, help="Student SGD steps per iteration (default 20).")
@click.option("--expert-epochs", type=int, default=None,
              help="Snapshot intervals the target lies ahead of the start (default 2; see docs/method.md).")
@click.option("--max-start-epoch", type=int, default=None, help="Latest start snapshot, inclusive (default 20).")
@click.option("--init", default=None, help="Initial images: real (random training images) or noise (default real).")
@click.option("--hard-labels/--soft-labels", default=None, help="Class-id labels instead of learned soft labels.")
@click.option("--trajectories-per-iter", type=int, default=None,
              help="Expert trajectories matched and averaged per iteration (default 1; split across torchrun ranks).")
@click.option("--data", default=None, help="Real data for --init real and validation (default: the buffer's).")
@click.option("--gradient", type=click.Choice(["full", "checkpoint"]), default=None,
              help="full: keep the whole unroll (reference math); checkpoint: exact, memory independent of --syn-steps.")
@click.option("--fast", type=click.Choice(["auto", "graphs", "compile", "eager"]), default=None,
              help="auto (default): each iteration one captured CUDA graph on CUDA, eager elsewhere; "
                   "compile: torch.compile, then captured; eager: no capture.")
@click.option("--batch-syn", type=int, default=None, help="Synthetic images per student step (default 0: all).")
@click.option("--eval-every", type=int, default=None, help="Validate on real data every N iterations (default 100).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@SEED
@DEVICE
@CONFIG
def run(config_file, resume, **flags):
    """Learn a small synthetic set by matching the buffer's expert trajectories (MTT)."""
    from .config import RunConfig, build
    from .mtt import distill_run

    cfg = build(RunConfig, *_layers(config_file, **flags))
    out = distill_run(cfg, resume=resume)
    click.echo(f"Synthetic set written to {out / 'synthetic.h5'}")


@cli.command("export")
@click.argument("rundir")
@click.option("--out", required=True, help="The share to write, e.g. shares/pneumonia-ipc10.h5.")
@click.option("--license", "license_", default="CC-BY-4.0", show_default=True, help="SPDX licence identifier.")
@click.option("--description", default="", help="What the share holds and what it is for.")
@click.option("--cite", "citation", default="", help="How to cite the share or the work behind it.")
@click.option("--force", is_flag=True, help="Export although the privacy audit is missing or failed (recorded in the share).")
def export_cmd(rundir, out, license_, description, citation, force):
    """Write the self-describing .h5 share of a finished, audited run."""
    from .export import export_share

    path = export_share(rundir, out, license=license_, description=description, citation=citation, force=force)
    click.echo(f"Share written to {path}")


@cli.command("inspect")
@click.argument("share")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--grid", default=None, help="Also draw the images, one row per class, into this PNG.")
def inspect_cmd(share, as_json, grid):
    """Validate a share, summarise it and optionally draw its images."""
    import json
    import warnings

    from .formats import load_share

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_share(share)
    for w in caught:
        click.echo(f"Warning: {w.message}", err=True)
    click.echo(json.dumps(s.summary(), indent=2, sort_keys=True) if as_json else s.describe())
    if grid:
        click.echo(f"Grid written to {s.save_grid(grid)}", err=as_json)  # stdout stays pure JSON


@cli.command()
@click.argument("source")
@click.option("--data", required=True, help="The real data the set was made from (MedMNIST name, .npz or folder).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the full report (summary and per-image results) here; it names real images: keep it local.")
@click.option("--pairs-png", type=click.Path(dir_okay=False), default=None,
              help="Side-by-side PNG of the closest pairs (default RUNDIR/audit_pairs.png); it shows real images: keep it local.")
@click.option("--holdout", type=click.Choice(["val", "test", "val+test"]), default=None,
              help="Real non-members: the split(s) held out from training (default val).")
@click.option("--networks", type=int, default=None, help="Networks per side of the membership attack (default 2).")
@click.option("--epochs", type=int, default=None, help="Epochs of those networks (default: the share's recipe).")
@click.option("--expert", type=click.Path(dir_okay=False), default=None,
              help="An expert trajectory file from the buffer, for feature similarity (default: train one here).")
@click.option("--expert-epochs", type=int, default=None, help="Epochs of the feature network trained here (default 2).")
@click.option("--bootstrap", type=int, default=None, help="Bootstrap resamples for the confidence intervals (default 200).")
@click.option("--pairs", type=int, default=None, help="Rows in the pairs PNG (default 16; 0 for none).")
@SEED
@DEVICE
def audit(source, data, **flags):
    """Measure whether a run folder's synthetic set (or a share) leaks its patients.

    Writes RUNDIR/audit.json, which 'distill export' embeds in the share.
    """
    from .privacy import run_audit

    report = run_audit(source, data, **{k: v for k, v in flags.items() if v is not None})
    click.echo(report.text())


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Interrupted; finished work is kept on disk.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted; finished work is kept on disk.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except DistillError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
