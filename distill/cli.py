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
