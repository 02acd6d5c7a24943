"""Stage 1: train expert networks on real data and store their parameter trajectories.

Public entry point: :func:`build_buffer`. Each expert is one HDF5 file written
atomically, so a crash loses at most the expert in progress, and a re-run
skips every finished expert. Expert ``i`` draws all of its randomness from
``derive_seed(seed, i)``: results do not depend on how experts are sharded
across torchrun processes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from . import dp
from .augment import Augment
from .batched import StackedModels, predict_batched, train_batched
from .config import BufferConfig, check_ranges
from .data import Preprocessing, RealData, fit_preprocessing, load_data
from .medical import ReadOptions
from .distributed import World
from .errors import DistillError, FormatError
from .formats.buffer_config import write_buffer_config
from .formats.dp_record import DP_STATS_FILE, DPRecord, dp_path, read_dp_record
from .formats.trajectory import (PREPROCESSING_FILE, SHAPING_SETTINGS, TrajectoryMeta, expert_path, numbering_gaps,
                                 read_buffer_preprocessing, read_expert, shaping_settings, write_buffer_preprocessing,
                                 write_expert)
from .io import atomic_path, check_writable_dir, output_lock, remove_stale_temps, software_versions
from .lifecycle import stage
from .models import create_model, flatten_params, param_spec, resolve_model
from .precision import autocast, resolve_precision
from .progress import progress
from .reference_defaults import NETWORK_LR
from .seeding import generator, seeded
from .train import TrainRecipe, accuracy, predict, train_network
from .workers import resolve_workers, run_jobs

log = logging.getLogger(__name__)

MODEL_SEED_KEY, DATA_SEED_KEY = 0, 1  # sub-streams of one expert's seed
# workers = 0 (auto) starts worker processes only when each expert has at least this many image
# passes: a worker's start (importing torch) costs a few CPU seconds, about 500 image passes of a
# 28 px ConvNet-3 on one core.
AUTO_WORKERS_MIN_PASSES = 5_000


def validate(cfg: BufferConfig) -> None:
    check_ranges(cfg)
    try:
        Augment.parse(cfg.augment)
    except ValueError as e:
        raise DistillError(str(e)) from None
    validate_dp(cfg)


def validate_dp(cfg: BufferConfig) -> None:
    """DP settings that make sense only together; the budget against n is checked once the data is loaded."""
    defaults = BufferConfig()
    if cfg.dp_epsilon is None:
        given = [f"--{k.replace('_', '-')}" for k in ("dp_delta", "dp_clip", "dp_shards", "dp_accountant", "dp_init",
                                                            "dp_stats_fraction")
                 if getattr(cfg, k) != getattr(defaults, k)]
        if given:
            raise DistillError(f"{given[0]} applies to DP experts only; add --dp-epsilon E or leave it out.")
        return
    if cfg.zca:
        raise DistillError("ZCA whitening is fitted on the private images and would leak them; DP experts "
                           "(--dp-epsilon) need --no-zca.")
    if cfg.batch_experts > 1 or cfg.bf16:
        raise DistillError("DP experts train one at a time in float32; leave out --batch-experts and --bf16.")
    if cfg.dp_init != "class-means" and cfg.dp_stats_fraction != defaults.dp_stats_fraction:
        raise DistillError("--dp-stats-fraction is the class means' part of the budget; add --dp-init class-means "
                           "or leave it out.")


def _check_dp_mixture(cfg: BufferConfig, out: Path) -> None:
    """A folder holds DP experts or non-DP experts, never both: the budget would describe only some of them."""
    has_dp = dp_path(out).exists()
    has_buffer = (out / PREPROCESSING_FILE).exists() or any(out.glob("expert_*"))
    if cfg.dp_epsilon is not None and has_buffer and not has_dp:
        raise DistillError(f"{out} already holds experts trained without DP; choose another --out folder for DP experts.")
    if cfg.dp_epsilon is None and has_dp:
        raise DistillError(f"{out} holds DP experts ({dp_path(out).name}); add the same --dp-epsilon to resume "
                           "it, or choose another --out folder.")


def dp_plan(cfg: BufferConfig, n: int, out: Path) -> tuple[dp.DPPlan, DPRecord]:
    """The budget of a DP buffer, solved from its settings; a resumed buffer must find the same plan on disk."""
    import opacus

    delta = dp.check_budget(cfg.dp_epsilon, cfg.dp_delta, n)
    plan = dp.plan_budget(epsilon=cfg.dp_epsilon, delta=delta, n=n, batch_size=cfg.batch_size, epochs=cfg.epochs,
                          experts=cfg.experts, shards=cfg.dp_shards, clip=cfg.dp_clip, accountant=cfg.dp_accountant,
                          stats=cfg.dp_init == "class-means", stats_fraction=cfg.dp_stats_fraction)
    old = read_dp_record(out)
    if old is None:
        return plan, plan.record(opacus.__version__)
    # The budget was fixed for the planned experts when the buffer started: resuming spends nothing new.
    same = (old.experts, old.shards, old.steps, old.clip, old.accountant, old.delta, old.extra.get("epsilon_budget"),
            old.stats) == (plan.experts, plan.shards, plan.steps, plan.clip, plan.accountant, plan.delta,
                           plan.epsilon, "class_means" if plan.stats_noise_multiplier is not None else None)
    same = same and old.extra.get("stats_fraction") == plan.stats_fraction
    if not same or abs(old.noise_multiplier - plan.noise_multiplier) > 1e-9:
        raise DistillError(f"{out} holds DP experts planned as {old.experts} expert(s) at epsilon "
                           f"{old.extra.get('epsilon_budget')} ({dp_path(out).name}); resume with the settings it "
                           "was started with, or choose another --out folder.")
    return plan, old


AUTO_BATCH_EXPERTS = 16  # experts per vmapped group on CUDA when --batch-experts is left at 0 (auto)


def resolve_batch_experts(cfg: BufferConfig, device: torch.device, model: torch.nn.Module) -> int:
    """``cfg.batch_experts``, with 0 (auto) made concrete: batched on CUDA, one at a time elsewhere.

    Off CUDA one at a time keeps runs bit-for-bit equal to the reference loop (batching changes the
    rounding); a model with buffers (batch norm) cannot be batched, so auto trains it one at a time.
    """
    if cfg.batch_experts:
        return cfg.batch_experts
    if cfg.dp_epsilon is not None:
        return 1  # per-image gradients (Opacus) for one network at a time
    if device.type != "cuda" or any(True for _ in model.buffers()):
        return 1
    return max(1, min(cfg.experts, AUTO_BATCH_EXPERTS))


def prepare_data(cfg: BufferConfig, world: World, out: Path) -> tuple[RealData, Preprocessing | None]:
    """Load data and check it against the buffer's preprocessing; a new buffer's is fitted (rank 0), not yet written.

    Returns (data, the fitted preprocessing to write once every check has passed, or None).
    """
    read = ReadOptions(cfg.on_bad_file, cfg.nifti_axis, cfg.nifti_slice).record()
    data = load_data(cfg.data, size=cfg.size, split_seed=cfg.seed, read=read)
    if not (out / PREPROCESSING_FILE).exists():
        if cfg.dp_epsilon is not None:  # constants: nothing fitted on the private images (distill/dp.py)
            return data, dp.fixed_preprocessing(data.channels, data.size) if world.main else None
        return data, fit_preprocessing(data.train.images, zca=cfg.zca) if world.main else None
    pre, fingerprint, _ = read_buffer_preprocessing(out)
    if fingerprint["sha256"] != data.source_sha256 or pre.zca != cfg.zca or pre.size != data.size:
        raise DistillError(
            f"{out} already holds a buffer for other data or preprocessing ({fingerprint['name']}, "
            f"{pre.channels}x{pre.size}x{pre.size}, zca={pre.zca}) than asked ({data.name}, "
            f"{data.channels}x{data.size}x{data.size}, zca={cfg.zca}); choose another --out folder or match --size/--zca."
        )
    return data, None


def _expert_done(path: Path, cfg: BufferConfig) -> bool:
    if not path.exists():
        return False
    try:
        e = read_expert(path)  # checks the snapshots' checksum too
    except FormatError as err:
        log.warning("%s will be trained again: %s", path.name, err)
        return False
    made = shaping_settings(e)
    asked = {**{k: getattr(cfg, k) for k in SHAPING_SETTINGS if hasattr(cfg, k)},
             "batched": cfg.batch_experts > 1 or cfg.bf16}
    differs = [k for k, v in made.items() if v is not None and v != asked[k]]  # older files lack some
    if e.train.get("precision", "fp32") != cfg.precision:  # files from before --precision ran in fp32
        made["precision"] = e.train.get("precision", "fp32")
        differs.append("precision")
    if differs:  # its config.toml would no longer describe the finished experts
        raise DistillError(f"{path} was made with other settings ({', '.join(f'{k} {made[k]!r}' for k in differs)}); "
                           "rerun with those or choose another --out folder.")
    return True


def _new_expert(index: int, cfg: BufferConfig, data: RealData, device: torch.device) -> torch.nn.Module:
    """Expert ``index``'s freshly initialised network: its init depends on (seed, index) alone."""
    with seeded(cfg.seed, index, MODEL_SEED_KEY):
        model = create_model(cfg.model, data.num_classes, data.channels, data.size)
    return model.to(device)


def _recipe(cfg: BufferConfig) -> TrainRecipe:
    return TrainRecipe(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, decay_at_half=False, augment=Augment.parse(cfg.augment))


def _write_trajectory(index: int, cfg: BufferConfig, data: RealData, pre_sha: str, spec, snaps: list[torch.Tensor],
                      steps: list[int], history: list[dict], val_acc: list[float], steps_per_epoch: int,
                      dp_train: dict | None = None) -> Path:
    path = expert_path(cfg.out, index)
    if not (Path(cfg.out) / PREPROCESSING_FILE).is_file():  # writing would make a new, half buffer
        raise DistillError(f"{cfg.out} or its {PREPROCESSING_FILE} disappeared while the experts trained; restore "
                           "it or choose another --out folder, then run the command again.")
    write_expert(
        path, torch.stack(snaps), steps, snapshot_dtype=cfg.snapshot_dtype,
        history={"train_loss": [h["loss"] for h in history], "train_acc": [h["acc"] for h in history], "val_acc": val_acc},
        meta=TrajectoryMeta(
            model=cfg.model, num_classes=data.num_classes, channels=data.channels, size=data.size,
            param_names=list(spec.names), param_shapes=[list(s) for s in spec.shapes], expert_index=index,
            seed=cfg.seed, snapshot_every=cfg.snapshot_every, steps_per_epoch=steps_per_epoch,
            preprocessing_sha256=pre_sha, model_kwargs={}, fingerprint=data.fingerprint(), software=software_versions(),
            train={"epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                   "batch_size": cfg.batch_size, "augment": cfg.augment,
                   # How the experts were computed: batching changes rounding, bf16 changes more.
                   "batch_experts": cfg.batch_experts, "bf16": cfg.bf16, "precision": cfg.precision,
                   "workers": cfg.workers, **(dp_train or {})}),
    )
    return path


def train_expert(index: int, cfg: BufferConfig, data: RealData, pre: Preprocessing, pre_sha: str,
                 device: torch.device, x_train: torch.Tensor, x_val: torch.Tensor, on_epoch=None,
                 plan: dp.DPPlan | None = None) -> Path:
    """Train expert ``index`` and write its trajectory file; returns the path.

    With a DP ``plan`` the expert trains with DP-SGD on its shard (``index % plan.shards``).
    """
    model = _new_expert(index, cfg, data, device)
    gen = generator(cfg.seed, index, DATA_SEED_KEY)
    y_train = data.train.labels.to(device)
    snaps, steps = [flatten_params(model).cpu()], [0]
    val_acc: list[float] = []

    def after_step(step):
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            snaps.append(flatten_params(model).cpu())
            steps.append(step)

    def after_epoch(epoch, stats):
        if not cfg.snapshot_every:
            snaps.append(flatten_params(model).cpu())
            steps.append(epoch * steps_per_epoch)
        # A DP expert's file holds nothing but DP outputs: no accuracy on the private images.
        val_acc.append(accuracy(predict(model, x_val), data.val.labels) if len(x_val) and plan is None
                       else float("nan"))
        if on_epoch is not None:
            on_epoch()

    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    train, dp_train = train_network, None
    if plan is not None:
        shard = index % plan.shards
        rows = dp.shard_indices(len(x_train), plan.shards, cfg.seed)[shard].to(device)
        x_train, y_train, train = x_train[rows], y_train[rows], dp.dp_trainer(plan)
        steps_per_epoch = plan.steps_per_epoch
        dp_train = {"dp_noise_multiplier": plan.noise_multiplier, "dp_clip": plan.clip,
                    "dp_sample_rate": plan.sample_rate, "dp_shard": shard, "dp_shards": plan.shards}
    with autocast(cfg.precision, device):  # the parameters and the optimiser's state stay fp32
        history = train(model, x_train, y_train, _recipe(cfg), gen, after_step=after_step, after_epoch=after_epoch)
    if plan is not None:  # loss and accuracy on the private training batches are not DP: not stored
        history = [{"loss": float("nan"), "acc": float("nan")} for _ in history]
    return _write_trajectory(index, cfg, data, pre_sha, param_spec(model), snaps, steps, history, val_acc,
                             steps_per_epoch, dp_train)


def train_experts_batched(indices: list[int], cfg: BufferConfig, data: RealData, pre_sha: str, device: torch.device,
                          x_train: torch.Tensor, x_val: torch.Tensor, on_epoch=None) -> list[Path]:
    """Train the experts ``indices`` at once (:mod:`distill.batched`) and write one trajectory file each.

    Expert i gets the same initialisation and generator as :func:`train_expert` gives it, so its
    trajectory equals the one-at-a-time one up to floating-point rounding (or bf16, if asked for).
    """
    models = [_new_expert(i, cfg, data, device) for i in indices]
    spec = param_spec(models[0])
    gens = [generator(cfg.seed, i, DATA_SEED_KEY) for i in indices]
    y_train = data.train.labels.to(device)
    snaps = [[row] for row in torch.stack([flatten_params(m) for m in models]).cpu()]
    steps = [0]
    val_acc: list[list[float]] = [[] for _ in indices]

    def keep(stacked: StackedModels, step: int) -> None:
        for row, flat in zip(snaps, stacked.flat().cpu()):
            row.append(flat)
        steps.append(step)

    def after_step(step, stacked):
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            keep(stacked, step)

    def after_epoch(epoch, stats, stacked):
        if not cfg.snapshot_every:
            keep(stacked, epoch * steps_per_epoch)
        probs = predict_batched(stacked, x_val) if len(x_val) else None
        for j in range(len(indices)):
            val_acc[j].append(accuracy(probs[j], data.val.labels) if probs is not None else float("nan"))
        if on_epoch is not None:
            for _ in indices:
                on_epoch()

    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    _, history = train_batched(models, x_train, y_train, _recipe(cfg), gens, bf16=cfg.bf16,
                               after_step=after_step, after_epoch=after_epoch)
    return [_write_trajectory(i, cfg, data, pre_sha, spec, snaps[j], steps, [h[j] for h in history], val_acc[j],
                              steps_per_epoch)
            for j, i in enumerate(indices)]


def _workers(cfg: BufferConfig, device: torch.device, world: World, plan: dp.DPPlan | None, jobs: int,
             n_train: int) -> int:
    """Worker processes for the one-at-a-time experts: 1 for DP experts, under torchrun and on a GPU;
    ``cfg.workers`` = 0 (auto) is one per core where each expert repays a process start."""
    if plan is not None or world.size > 1:
        if cfg.workers > 1:  # asked for, so say why it is not used
            log.info("--workers %d ignored: %s train in one process.", cfg.workers,
                     "DP experts" if plan is not None
                     else "experts under torchrun")
        return 1
    if cfg.workers == 0 and cfg.epochs * n_train < AUTO_WORKERS_MIN_PASSES:
        return 1
    return resolve_workers(cfg.workers, device, jobs)


def _expert_job(index: int, cfg: BufferConfig, data: RealData, pre: Preprocessing, pre_sha: str,
                x_train: torch.Tensor, x_val: torch.Tensor) -> Path:
    """One expert in a worker process (module level, so that it can be sent to one)."""
    return train_expert(index, cfg, data, pre, pre_sha, torch.device("cpu"), x_train, x_val)


def build_buffer(cfg: BufferConfig) -> list[Path]:
    """Train the experts of ``cfg`` that are not on disk yet (this rank's share under torchrun)."""
    with stage(check=lambda: validate(cfg), device=cfg.device, tidy=cfg.out) as st:
        world, device, lock = st.world, st.device, st.locks
        out = check_writable_dir(cfg.out)
        if world.main:
            lock.enter_context(output_lock(out))  # one writer per buffer folder
            # A hard kill (SIGKILL, power loss) can leave temporary files; under the lock nobody owns them.
            remove_stale_temps(out)
        # Everything is checked before anything is written: a refused command leaves the folder as it was.
        _check_dp_mixture(cfg, out)
        data, new_pre = prepare_data(cfg, world, out)
        if resolve_model(cfg.model, data.size) != cfg.model:  # the files record the depth that ran
            cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model, data.size))
            log.info("Experts are %s: the ConvNet depth for %d px images.", cfg.model, data.size)
        try:
            probe = create_model(cfg.model, data.num_classes, data.channels, data.size)
        except ValueError as e:
            raise DistillError(str(e)) from None
        plan = record = None
        if cfg.dp_epsilon is not None:
            dp.check_model(probe, cfg.model)
            plan, record = dp_plan(cfg, len(data.train), out)
        if cfg.lr is None:  # DP experts' clipped gradients want a longer step (dp.DP_LR); recorded resolved
            cfg = dataclasses.replace(cfg, lr=dp.DP_LR if cfg.dp_epsilon is not None else NETWORK_LR)
        requested = cfg  # config.toml keeps what was asked for (0 = auto), the experts record what ran
        cfg = dataclasses.replace(cfg, batch_experts=resolve_batch_experts(cfg, device, probe),
                                  precision=resolve_precision(cfg.precision, device, dp=plan is not None))
        mine = world.shard(list(range(cfg.experts)))
        todo = [i for i in mine if not _expert_done(expert_path(out, i), cfg)]
        gaps = [i for i in numbering_gaps(out) if i in todo]
        if gaps and world.main:
            log.info("The expert numbering of %s has a gap (%s missing); those experts are trained now.", out,
                     ", ".join(expert_path(out, i).name for i in gaps))
        if world.main:
            if record is not None and not dp_path(out).exists():  # first: a DP folder is known as one from the start
                with atomic_path(dp_path(out)) as tmp:
                    tmp.write_text(record.to_json(), encoding="utf-8")
            write_buffer_config(requested, out)
            if new_pre is not None:
                write_buffer_preprocessing(out, new_pre, data.fingerprint(), split_indices=data.split_indices)
        world.barrier()
        pre, _, pre_sha = read_buffer_preprocessing(out)
        if len(todo) < len(mine):
            log.info("Skipping %d finished expert(s) in %s.", len(mine) - len(todo), out)
        x_train = pre(data.train.images).to(device)
        x_val = pre(data.val.images).to(device)
        if plan is not None and plan.stats_noise_multiplier is not None and world.main \
                and not (out / DP_STATS_FILE).exists():
            means, counts = dp.noised_class_means(x_train, data.train.labels, data.num_classes,
                                                  plan.stats_noise_multiplier)
            dp.write_dp_stats(out / DP_STATS_FILE, means, counts, plan)
        if record is not None and world.main:
            log.info("DP experts: %s (sigma %.3g, q %.3g, %d steps per expert, %s accountant).", record.sentence(),
                     plan.noise_multiplier, plan.sample_rate, plan.steps, plan.accountant)
        batched = cfg.batch_experts > 1 or cfg.bf16
        cfg = dataclasses.replace(cfg, workers=1 if batched else _workers(cfg, device, world, plan, len(todo), len(x_train)))
        written = []
        t0 = time.perf_counter()
        with progress(range(len(todo) * cfg.epochs), label=f"experts (rank {world.rank})" if world.size > 1 else "experts",
                      length=len(todo) * cfg.epochs) as bar:
            tick = (lambda: bar.update(1)) if hasattr(bar, "update") else None
            if batched:
                for j in range(0, len(todo), cfg.batch_experts):
                    written += train_experts_batched(todo[j:j + cfg.batch_experts], cfg, data, pre_sha, device,
                                                     x_train, x_val, on_epoch=tick)
            else:
                if cfg.workers > 1:
                    log.info("Training %d expert(s) in %d worker processes.", len(todo), cfg.workers)
                    ticks = (lambda _: [tick() for _ in range(cfg.epochs)]) if tick else None
                    written += run_jobs(_expert_job, [(i, cfg, data, pre, pre_sha, x_train, x_val) for i in todo],
                                        cfg.workers, on_done=ticks)
                else:
                    for i in todo:
                        written.append(train_expert(i, cfg, data, pre, pre_sha, device, x_train, x_val, on_epoch=tick,
                                                    plan=plan))
        dt = time.perf_counter() - t0
        if todo:
            n_img = len(todo) * cfg.epochs * len(x_train)
            log.info("Trained %d expert(s) in %.1f s (%.0f images/s).", len(todo), dt, n_img / max(dt, 1e-9))
        world.barrier()
        return written

