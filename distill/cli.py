"""The ``distill`` command line. Each command parses flags, builds a config and calls one stage.

User errors (:class:`~distill.errors.DistillError`, and click's own usage
errors such as a folder where a file is expected) become one sentence on
stderr and exit code 1; ``--help`` exits 0; Ctrl-C exits 130 and keeps all
finished work.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import sys
from pathlib import Path

import click

from .config import (ATTACKS, DP_ACCOUNTANTS, DP_INITS, FAST_MODES, FULL_EPOCHS, GRADIENT_MODES, HOLDOUTS, LABEL_PRIORS, SHARE_WEIGHTS,
                     PRECISIONS, SNAPSHOT_DTYPES,
                     AuditSettings, BufferConfig, EvalConfig, ExportConfig, InspectConfig, ReportConfig, RunConfig, SplitConfig, build,
                     default_text, load_toml)
from .errors import DistillError
from .io import fs_error
from .text import LOG_FORMAT, printable, printable_lines

log = logging.getLogger("distill")

AUDIT_FAILED = 3  # exit status of `distill audit` on a FAIL verdict (docs/privacy.md); 1 is an error


class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped: a message may quote a received share's text."""

    def format(self, record: logging.LogRecord) -> str:
        return printable_lines(super().format(record))


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    fmt = LOG_FORMAT
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # basicConfig's own, not a test harness's
            handler.setFormatter(_PrintableFormatter(fmt))


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
      distill report   an HTML review page of a run or a share, for sign-off
      distill inspect  validate and summarise a share
      distill eval     train on a share and test on your own real data
      distill split    split a dataset across N simulated hospitals (docs/hospitals.md)
    """
    _setup_logging(verbose)


DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                      help=f"Where to compute; auto picks a GPU when there is one {default_text(RunConfig, 'device')}.")
SEED = click.option("--seed", type=int, default=None, help="Seed; the same seed gives the same result.")
WORKERS = click.option("--workers", type=int, default=None,
                       help="Processes training experts or networks side by side on a CPU, one thread each; 0 = one "
                            "per core where the work repays starting them, 1 = one after another "
                            f"{default_text(BufferConfig, 'workers')}.")
PRECISION = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                         help="Arithmetic of the networks: bf16 autocast where the processor has native bf16, with "
                              "parameters, images, losses and optimiser state in fp32; auto is fp32 until bf16 is "
                              f"measured to lose no accuracy (docs/performance.md) {default_text(RunConfig, 'precision')}.")
CONFIG = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                      help="TOML file with defaults for this command; flags override it.")


def _layers(config_file: str | None, **flags) -> list[dict]:
    return [load_toml(config_file) if config_file else {}, flags]


@cli.command()
@click.option("--data", required=True, help="MedMNIST name (e.g. pneumoniamnist), a MedMNIST-layout .npz, a folder with one "
                                            "sub-folder per class, or a labels table .csv/.tsv (docs/your-data.md).")
@click.option("--out", default=None, help=f"Output folder for the trajectories {default_text(BufferConfig, 'out')}.")
@click.option("--model", default=None, help=f"Registered model name {default_text(BufferConfig, 'model')}.")
@click.option("--experts", type=int, default=None, help=f"Number of experts {default_text(BufferConfig, 'experts')}.")
@click.option("--epochs", type=int, default=None, help=f"Epochs per expert {default_text(BufferConfig, 'epochs')}.")
@click.option("--lr", type=float, default=None, help="Expert SGD learning rate (default 0.01, the reference's; 0.3 for DP experts, docs/privacy.md).")
@click.option("--batch-size", type=int, default=None, help=f"Expert batch size {default_text(BufferConfig, 'batch_size')}.")
@click.option("--augment", default=None, help=f"Comma list of color,crop,cutout,flip,scale,rotate, or none {default_text(BufferConfig, 'augment')}.")
@click.option("--zca/--no-zca", default=None, help=f"ZCA-whiten the images (kornia); stored with the buffer {default_text(BufferConfig, 'zca')}.")
@click.option("--size", type=int, default=None, help="Resize images to SIZE x SIZE (default: keep their size).")
@click.option("--snapshot-every", type=int, default=None, help=f"Snapshot every N optimiser steps; 0 = once per epoch {default_text(BufferConfig, 'snapshot_every')}.")
@click.option("--snapshot-dtype", type=click.Choice(SNAPSHOT_DTYPES), default=None,
              help=f"Storage precision of the snapshots {default_text(BufferConfig, 'snapshot_dtype')}.")
@click.option("--batch-experts", type=int, default=None,
              help="Train K experts at once in one vmapped network, same trajectories to rounding; "
                   f"0 = auto: up to 16 on CUDA, 1 on CPU {default_text(BufferConfig, 'batch_experts')}.")
@click.option("--bf16/--no-bf16", default=None, help=f"bf16 autocast for the experts' forward pass (changes trajectories) {default_text(BufferConfig, 'bf16')}.")
@click.option("--on-bad-file", type=click.Choice(["stop", "skip"]), default=None,
              help=f"A table's unreadable image file: stop, or skip it and count {default_text(BufferConfig, 'on_bad_file')}.")
@click.option("--nifti-axis", type=click.Choice(["sagittal", "coronal", "axial", "0", "1", "2"]), default=None,
              help="Take one slice of each 3-D NIfTI volume along this axis (recorded with the buffer).")
@click.option("--nifti-slice", type=int, default=None, help="Index of that slice (default: the middle one).")
@click.option("--dp-epsilon", type=float, default=None,
              help="Train the experts with DP-SGD so that the whole buffer is (epsilon, delta)-DP per training image.")
@click.option("--dp-delta", type=float, default=None, help="The delta of --dp-epsilon; below 1/n. Left out: 1/(10 n) for n training images.")
@click.option("--dp-clip", type=float, default=None, help=f"Per-image gradient L2 bound {default_text(BufferConfig, 'dp_clip')}.")
@click.option("--dp-shards", type=int, default=None,
              help=f"Experts train on S disjoint shards, which compose in parallel {default_text(BufferConfig, 'dp_shards')}.")
@click.option("--dp-accountant", type=click.Choice(DP_ACCOUNTANTS), default=None,
              help=f"Opacus accountant {default_text(BufferConfig, 'dp_accountant')}.")
@click.option("--dp-init", type=click.Choice(DP_INITS), default=None,
              help="class-means: also release noised per-class mean images for `distill run --init dp-means`, "
                   f"within the same budget {default_text(BufferConfig, 'dp_init')}.")
@click.option("--dp-stats-fraction", type=float, default=None,
              help="With --dp-init class-means: the part of --dp-epsilon planned for the class means, the rest for "
                   f"DP-SGD {default_text(BufferConfig, 'dp_stats_fraction')}.")
@WORKERS
@SEED
@DEVICE
@PRECISION
@CONFIG
def buffer(config_file, **flags):
    """Train expert networks on real data and store their trajectories."""
    from .buffer import build_buffer

    cfg = build(BufferConfig, *_layers(config_file, **flags))
    written = build_buffer(cfg)
    click.echo(f"{len(written)} expert(s) written to {cfg.out}")


@cli.command("eval")
@click.argument("shares", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--test", default=None, help="Real data whose test split is scored (MedMNIST name, .npz, folder or .csv; a folder "
                                           "or table without splits is all test data); default: --train.")
@click.option("--train", default=None, help="Real data whose train split feeds the baselines; default: --test.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(["random-real", "full", "dp-sgd", "none"]),
              help="Baseline(s) under the same protocol; repeatable. Default beside a share: random-real and full. "
                   "dp-sgd: one network trained on the real data with DP-SGD at --epsilon.")
@click.option("--epsilon", type=float, default=None, help="--baseline dp-sgd: its privacy budget epsilon.")
@click.option("--delta", type=float, default=None, help="--baseline dp-sgd: its delta, below 1/n. Left out: 1/(10 n) for n training images.")
@click.option("--ipc", "--real-per-class", "real_per_class", type=int, default=None,
              help="Random-real images per class (default: as many as the share has).")
@click.option("--model", default=None, help=f"Registered model to train (default: the share's recipe, else {BufferConfig.model}).")
@click.option("--runs", type=int, default=None, help=f"Networks trained per row {default_text(EvalConfig, 'runs')}.")
@click.option("--epochs", type=int, default=None, help=f"Override the epochs of every row (default: the recipe's; full data {FULL_EPOCHS}).")
@click.option("--lr", type=float, default=None, help="Override the shares' learned step size (default: their geometric mean).")
@click.option("--zca/--no-zca", default=None, help="Baselines without a share: ZCA-whiten as `distill buffer --zca` does.")
@click.option("--size", type=int, default=None, help="Resize real images to SIZE x SIZE (default: the share's size).")
@click.option("--json", "json", type=click.Path(dir_okay=False), default=None, help="Write the full report as JSON here.")
@click.option("--match-classes-by-position", "match_by_position", is_flag=True, default=None,
              help="Accept real data whose class names differ from the share's, pairing classes by index.")
@click.option("--label-prior", type=click.Choice(LABEL_PRIORS), default=None,
              help="Class mix the soft labels of several shares are moved to: the sites' counts added up, each "
                   f"site's own, or equal classes {default_text(EvalConfig, 'label_prior')}.")
@click.option("--max-hours", type=float, default=None,
              help="Refuse to start when the estimated training time is longer "
                   f"{default_text(EvalConfig, 'max_hours')}.")
@click.option("--share-weights", type=click.Choice(SHARE_WEIGHTS), default=None,
              help="How several shares' images of one class weigh against each other: by the real images of that "
                   f"class behind each share, or all alike {default_text(EvalConfig, 'share_weights')}.")
@WORKERS
@SEED
@DEVICE
@PRECISION
@CONFIG
def eval_(config_file, shares, baselines, **flags):
    """Train fresh networks on one or more shares (their union) and test them on real data."""
    from .evaluate import evaluate, format_report

    cfg = build(EvalConfig, *_layers(config_file, shares=tuple(shares) or None, baselines=tuple(baselines) or None,
                                     **flags))
    click.echo(printable_lines(format_report(evaluate(cfg))))  # class names and paths come from the shares


@cli.command()
@click.option("--buffer", default=None, help=f"Buffer folder made by 'distill buffer' {default_text(RunConfig, 'buffer')}.")
@click.option("--out", default=None, help=f"Run folder for checkpoints, metrics, grids and synthetic.h5 {default_text(RunConfig, 'out')}.")
@click.option("--ipc", type=int, default=None, help=f"Synthetic images per class {default_text(RunConfig, 'ipc')}.")
@click.option("--iterations", type=int, default=None, help=f"Distillation iterations {default_text(RunConfig, 'iterations')}.")
@click.option("--syn-steps", type=int, default=None, help=f"Student SGD steps per iteration {default_text(RunConfig, 'syn_steps')}.")
@click.option("--expert-epochs", type=int, default=None,
              help=f"Snapshot intervals the target lies ahead of the start (see docs/method.md) {default_text(RunConfig, 'expert_epochs')}.")
@click.option("--max-start-epoch", type=int, default=None,
              help="Latest start snapshot, inclusive (default: auto, later the more images per class; docs/method.md).")
@click.option("--init", default=None, help=f"Initial images: real (random training images), real-or-noise (real; noise tops up a class with "
                   f"fewer than --ipc images), noise, dp-means (a DP buffer's class means) or public:PATH (public images "
                   f"you name); a DP buffer allows only the last three {default_text(RunConfig, 'init')}.")
@click.option("--hard-labels/--soft-labels", default=None,
              help="Hard labels: class ids instead of learned soft labels (default: auto, hard below 10 images per class).")
@click.option("--label-temperature", type=float, default=None,
              help=f"Soft labels are softmax(logits / T) {default_text(RunConfig, 'label_temperature')}.")
@click.option("--min-syn-lr-fraction", type=float, default=None,
              help=f"Floor on the learned step size, as a fraction of its start; 0 = none {default_text(RunConfig, 'min_syn_lr_fraction')}.")
@click.option("--trajectories-per-iter", type=int, default=None,
              help="Expert trajectories matched and averaged per iteration, split across torchrun ranks "
                   f"{default_text(RunConfig, 'trajectories_per_iter')}.")
@click.option("--workers", type=int, default=None,
              help="Processes matching an iteration's trajectories side by side on a CPU (one thread each); 0 = one "
                   "per core, but no more than --trajectories-per-iter; 1 = this process alone "
                   f"{default_text(RunConfig, 'workers')}.")
@click.option("--data", default=None, help="Real data for --init real and validation (default: the buffer's).")
@click.option("--gradient", type=click.Choice(GRADIENT_MODES), default=None,
              help="full: keep the whole unroll (reference math); checkpoint: exact, memory independent of --syn-steps; "
                   f"auto: full where it fits --max-memory, else checkpoint {default_text(RunConfig, 'gradient')}.")
@click.option("--max-memory", type=float, default=None,
              help="GiB the matching gradient may take, for --gradient auto (default: half the memory available at the start).")
@click.option("--fast", type=click.Choice(FAST_MODES), default=None,
              help="auto: each iteration one captured CUDA graph on CUDA, eager elsewhere; "
                   f"compile: torch.compile, then captured; eager: no capture {default_text(RunConfig, 'fast')}.")
@click.option("--batch-syn", type=int, default=None, help=f"Synthetic images per student step; 0 = all {default_text(RunConfig, 'batch_syn')}.")
@click.option("--eval-every", type=int, default=None, help=f"Validate on real data every N iterations {default_text(RunConfig, 'eval_every')}.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@SEED
@DEVICE
@PRECISION
@CONFIG
def run(config_file, resume, **flags):
    """Learn a small synthetic set by matching the buffer's expert trajectories (MTT)."""
    from .formats.synset import SYNSET_FILE
    from .mtt import distill_run

    cfg = build(RunConfig, *_layers(config_file, **flags))
    out = distill_run(cfg, resume=resume)
    click.echo(f"Synthetic set written to {out / SYNSET_FILE}")


@cli.command("export")
@click.argument("rundir")
@click.option("--out", required=True, help="The share to write, e.g. shares/pneumonia-ipc10.h5.")
@click.option("--license", "license", default=None, help=f"SPDX licence identifier {default_text(ExportConfig, 'license')}.")
@click.option("--description", default=None, help="What the share holds and what it is for.")
@click.option("--cite", "citation", default=None, help="How to cite the share or the work behind it.")
@click.option("--force", is_flag=True, default=None,
              help="Export although the privacy audit is missing or failed (recorded in the share).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace the share at --out if it exists.")
@click.option("--report", "report", is_flag=True, help="Also write the in-hospital review page beside the share (SHARE.html).")
@click.option("--format", "fmt", type=click.Choice(["h5", "folder", "npz"]), default="h5",
              help="h5: the share (default); folder: PNGs, labels.csv, soft_labels.npy, recipe.json; npz: MedMNIST layout.")
@CONFIG
def export_cmd(rundir, out, config_file, report, fmt, **flags):
    """Write the self-describing .h5 share of a finished, audited run (or its plain folder/npz form)."""
    from .export import export_share

    cfg = build(ExportConfig, *_layers(config_file, **flags))
    path = export_share(rundir, out, **dataclasses.asdict(cfg), format=fmt)
    if fmt != "h5":
        click.echo(f"Share written as {fmt} to {path}")
        return
    click.echo(f"Share written to {path}")
    page = path.with_suffix(".html")
    if report:
        from .report import write_report

        click.echo(f"Review page written to {write_report(rundir, page, share=path)}")
    else:
        click.echo(f"Review page for sign-off: distill report {rundir} --share {path} --out {page}")


@cli.command("inspect")
@click.argument("share")
@click.option("--json", "json", is_flag=True, default=None, help="Print the summary as JSON.")
@click.option("--grid", default=None, help="Also draw the images, one row per class, into this PNG.")
@CONFIG
def inspect_cmd(share, config_file, **flags):
    """Validate a share, summarise it and optionally draw its images."""
    import json
    import warnings

    from .checks import check_share_recipe
    from .formats import load_share

    cfg = build(InspectConfig, *_layers(config_file, **flags))
    as_json, grid = cfg.json, cfg.grid

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = load_share(share)
    check_share_recipe(s, share)  # the network its recipe builds, estimated before anything is built
    for w in caught:
        click.echo(f"Warning: {printable(w.message)}", err=True)
    click.echo(json.dumps(s.summary(), indent=2, sort_keys=True) if as_json else s.describe())
    if grid:
        click.echo(f"Grid written to {s.save_grid(grid)}", err=as_json)  # stdout stays pure JSON


@cli.command("report")
@click.argument("source")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HTML page to write, e.g. review.html.")
@click.option("--share", default=None, type=click.Path(dir_okay=False),
              help="With a run folder: the share exported from it, for its checksum and text.")
@click.option("--eval", "eval_json", default=None, type=click.Path(dir_okay=False),
              help="A `distill eval --json` report, for accuracy against random real and full data.")
@click.option("--data", default=None,
              help="The real data the set was made from, for the nearest-neighbour pairs (default: the run's).")
@click.option("--public", is_flag=True, default=None,
              help="The receiving side's page: only the share's content, no real image.")
@CONFIG
def report_cmd(source, out, config_file, **flags):
    """Write a self-contained HTML review page of a run folder or a share, for sign-off."""
    from .report import write_report

    cfg = build(ReportConfig, *_layers(config_file, **flags))
    path = write_report(source, out, **dataclasses.asdict(cfg))
    click.echo(f"Review page written to {path}")


@cli.command()
@click.argument("source")
@click.option("--data", required=True, help="The real data the set was made from (MedMNIST name, .npz or folder).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the full report (summary and per-image results) here; it names real images: keep it local.")
@click.option("--pairs-png", type=click.Path(dir_okay=False), default=None,
              help="Side-by-side PNG of the closest pairs (default RUNDIR/audit_pairs.png); it shows real images: keep it local.")
@click.option("--holdout", type=click.Choice(HOLDOUTS), default=None,
              help=f"Real non-members: the split(s) held out from training {default_text(AuditSettings, 'holdout')}.")
@click.option("--networks", type=int, default=None, help=f"Networks per side of the membership attack {default_text(AuditSettings, 'networks')}.")
@click.option("--epochs", type=int, default=None, help="Epochs of those networks (default: the share's recipe).")
@click.option("--expert", type=click.Path(dir_okay=False), default=None,
              help="An expert trajectory file from the buffer, for feature similarity (default: train one here).")
@click.option("--expert-epochs", type=int, default=None, help=f"Epochs of the feature network trained here {default_text(AuditSettings, 'expert_epochs')}.")
@click.option("--bootstrap", type=int, default=None, help=f"Bootstrap resamples for the confidence intervals {default_text(AuditSettings, 'bootstrap')}.")
@click.option("--pairs", type=int, default=None, help=f"Rows in the pairs PNG; 0 for none {default_text(AuditSettings, 'pairs')}.")
@click.option("--attack", type=click.Choice(ATTACKS), default=None,
              help=f"loss (quick) or rmia (offline RMIA with reference pipelines; docs/privacy.md) {default_text(AuditSettings, 'attack')}.")
@click.option("--references", type=int, default=None, help=f"RMIA reference pipelines, an even number {default_text(AuditSettings, 'references')}.")
@click.option("--reference-experts", type=int, default=None, help=f"Experts per reference buffer {default_text(AuditSettings, 'reference_experts')}.")
@click.option("--reference-epochs", type=int, default=None, help=f"Epochs per reference expert {default_text(AuditSettings, 'reference_epochs')}.")
@click.option("--reference-iterations", type=int, default=None, help=f"Iterations per reference run {default_text(AuditSettings, 'reference_iterations')}.")
@click.option("--canaries", type=int, default=None,
              help="With --attack rmia: put N mislabeled held-out images into one more pipeline and report how exposed they are (the worst case).")
@click.option("--reference-cache", default="references", show_default=True,
              help="Folder of the cached reference pipelines; they hold real images: keep it local.")
@SEED
@DEVICE
@CONFIG
def audit(source, data, json_path, pairs_png, expert, device, config_file, reference_cache, **flags):
    """Measure whether a run folder's synthetic set (or a share) leaks its patients.

    Writes RUNDIR/audit.json, which 'distill export' embeds in the share.
    Exit status: 0 when the verdict is PASS, 3 when it is FAIL (so scripts can gate on it),
    1 for an error.
    """
    from .privacy import run_audit
    from .reference_pipeline import train_reference

    settings = build(AuditSettings, *_layers(config_file, **flags))
    report = run_audit(source, data, json_path=json_path, pairs_png=pairs_png, expert=expert, device=device or "auto",
                       reference_cache=reference_cache, train_reference=train_reference,
                       **dataclasses.asdict(settings))
    click.echo(report.text())
    if not report.passed:
        from .privacy.remedies import remedy_text

        click.echo(remedy_text(Path(source) if Path(source).is_dir() else None))
        sys.exit(AUDIT_FAILED)


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _click_sentence(e: click.ClickException) -> str:
    """A click error as one line that ends with a full stop and says where help is."""
    msg = " ".join(e.format_message().split()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    return f"{msg} (see '{ctx.command_path} --help')." if ctx is not None else f"{msg}."


@cli.command("split")
@click.argument("data")
@click.option("--sites", type=int, default=None, help=f"Number of hospitals {default_text(SplitConfig, 'sites')}.")
@click.option("--alpha", default=None,
              help="Dirichlet concentration over classes (small: each class at few sites), or iid "
                   f"{default_text(SplitConfig, 'alpha')}.")
@click.option("--min-per-class", type=int, default=None,
              help=f"Images of every class each site gets first; 0 = plain Dirichlet {default_text(SplitConfig, 'min_per_class')}.")
@click.option("--out", default=None, help=f"Folder for site-I/NAME.npz and split.json {default_text(SplitConfig, 'out')}.")
@SEED
@CONFIG
def split_cmd(data, config_file, **flags):
    """Split DATA's training set across hospitals: one MedMNIST-layout .npz per site, shared val and test."""
    from .sites import split_dataset

    cfg = build(SplitConfig, *_layers(config_file, data=data, **flags))
    click.echo(split_dataset(cfg).describe())


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
    except _NO_ARGS_IS_HELP as e:  # bare `distill`: the overview, as --help gives it
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(0)
    except click.ClickException as e:
        # Click's own errors (a folder where a file is expected, an unknown option) read like ours:
        # one sentence and exit 1, not its usage block and exit 2.
        click.echo(f"Error: {printable(_click_sentence(e))}", err=True)
        sys.exit(1)
    except DistillError as e:
        click.echo(f"Error: {printable(e)}", err=True)  # a message may quote a received share's text
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        click.echo(f"Error: {printable(fs_error(e, e.filename or 'a path').args[0])}", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
