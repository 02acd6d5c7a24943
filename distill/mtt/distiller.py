"""The MTT distiller: :func:`distill_run` learns a synthetic set by matching expert trajectories.

One iteration (docs/method.md):

1. A generator derived from ``(seed, iteration)`` draws ``trajectories_per_iter``
   segments (expert, start snapshot t) and one :class:`~.unroll.UnrollPlan` each.
   Every rank draws the same ones, and a resumed run redraws them exactly.
2. Each rank takes its share of the segments and, for all of them at once
   (one vmapped function, captured as a CUDA graph on CUDA: :mod:`.engine`),
   unrolls a student from θ*_t for ``syn_steps`` SGD steps and differentiates
   the matching loss ||θ_student − θ*_{t+M}||² / ||θ*_t − θ*_{t+M}||²
   (:func:`match_segments`).
3. Losses and gradients are summed over ranks and divided by the number of
   segments: the mean over segments, whichever rank matched them.
4. NaN guard, then SGD with momentum on the images, the label logits and the
   log step size, whose change per iteration is bounded.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..augment import Augment
from ..config import FILE_KEYS, GRADIENTS, RunConfig, build, check_ranges, load_toml, save_toml
from ..data import RealData, load_data
from ..distributed import World, resolve_device, world_from_env
from ..errors import DistillError, DivergenceError, FormatError
from ..formats.buffer_config import read_buffer_config, read_buffer_split
from ..formats.dp_record import DPRecord
from ..formats.run import EVAL, ITERATION, KIND, LOSS, SYN_LR, VAL_ACC_MEAN, VAL_MAJORITY
from ..formats.synset import SYNSET_FILE, SyntheticSet, write_synset
from ..io import check_writable_dir, output_lock, remove_stale_temps, software_versions
from ..lifecycle import stage
from ..memory import GradientChoice, budget_bytes, choose_gradient, saved_bytes
from ..models import ParamSpec, param_spec
from ..precision import autocast, resolve_precision
from ..progress import progress
from ..seeding import generator, seeded
from ..train import TrainRecipe, accuracy, predict, train_network
from ..workers import resolve_workers, run_ranks
from .dpmode import NO_PRIVATE_READ, check_dp_init, dp_buffer, public_record
from .experts import ExpertPool, Segment
from .rundir import (CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, MetricsLog, grid_name, has_run, load_checkpoint,
                     clear_run, restartable, save_checkpoint, save_grid)
from .synthetic import (bound_log_step, correctly_classified, floor_log_step, initial_images, initial_logits, list_inits,
                        log_step_size, needs_real_data, soft_targets)
from .engine import Matched, MatchingEngine
from .unroll import UnrollPlan, make_plan, matching_loss, stack_plans, student_step, unroll_student

log = logging.getLogger(__name__)

INIT_KEY, ITER_KEY, EVAL_KEY, MEMORY_KEY = 0, 1, 2, 3  # independent sub-streams of the run seed (distill.seeding)
# Along the expert's own direction a student that moves r times as far ends at normalised loss
# (r - 1)^2: at r = 2 it is no closer than where it started, below r = 0.5 it covers under half
# the way. Outside this range the settings, not the images, dominate the loss.
MOVEMENT_RANGE = (0.5, 2.0)
# The start window by images per class (max_start_epoch = None): (ipc, fraction of the latest legal
# start), interpolated in log(ipc) and held flat beyond the ends. Few images can only reproduce the
# expert's early, large moves; more images can follow its later, finer ones (DATM's difficulty
# alignment). The anchors are the MTT reference's CIFAR-10 windows, 2, 20 and 40 of 50 epochs, with
# 1 image per class raised from 0.04 to 0.1 so that a short buffer still leaves a choice of starts.
START_WINDOW = ((1, 0.1), (10, 0.4), (50, 0.8))
# hard_labels = None: class ids below this many images per class, learned soft labels from it on.
# Measured (docs/method.md, "hard or soft"): at 1/class hard labels won on PneumoniaMNIST, and at
# 10 and 50/class soft labels won on BreastMNIST by more than hard labels won on PneumoniaMNIST.
SOFT_LABELS_FROM_IPC = 10
LABEL_LR_CLASSES = 2  # lr_label is the rate at this many classes (it was measured on BreastMNIST)


# ----------------------------------------------------------------------------- the matching gradient


def matching_objective(model: nn.Module, spec: ParamSpec, start: torch.Tensor, target: torch.Tensor,
                       images: torch.Tensor, labels_or_logits: torch.Tensor, log_lr: torch.Tensor, plan: UnrollPlan,
                       augment: Augment | None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Matching loss (scalar) and student end ``(P,)`` of one segment, differentiable in all three learned inputs.

    images: (N, C, H, W) network space; labels_or_logits: (N,) int64 class ids or (N, K)
    float logits (targets ``softmax(logits / T)``); log_lr: 0-dim log of the step size;
    start/target: (P,) flat θ*_t and θ*_{t+M}.
    """
    soft = labels_or_logits.is_floating_point()
    targets = soft_targets(labels_or_logits, temperature) if soft else labels_or_logits
    end = unroll_student(model, spec, start, images, targets, log_lr.exp(), plan, augment)
    return matching_loss(end, start, target), end


def compute_grads(model: nn.Module, spec: ParamSpec, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
                  labels_or_logits: torch.Tensor, log_lr: torch.Tensor, plan: UnrollPlan, augment: Augment | None, *,
                  temperature: float = 1.0, gradient: str = "full"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Loss and gradients of one segment: ``(loss, d/d images, d/d logits or None, d/d log_lr, student_end)``.

    All results are detached; ``gradient`` is ``"full"`` (through the whole unroll) or ``"checkpoint"``
    (constant memory). The same function as ``distill run`` runs, eagerly, for one trajectory.
    """
    if gradient not in GRADIENTS:
        raise DistillError(f"Unknown gradient mode {gradient!r}; choose one of {', '.join(GRADIENTS)}.")
    engine = MatchingEngine(model, spec, augment, gradient=gradient, temperature=temperature, fast="eager")
    m = engine(start[None], target[None], images, labels_or_logits, log_lr, stack_plans([plan]))
    return m.loss, m.images, m.labels, m.log_lr, m.ends[0]


def match_segments(engine: MatchingEngine, starts: torch.Tensor, targets: torch.Tensor, state: "_State",
                   plans: UnrollPlan) -> Matched:
    """One rank's share of an iteration: T segments (starts, targets (T, P), plans stacked) in one call."""
    return engine(starts, targets, state.images, state.label_input, state.log_lr, plans)


# ----------------------------------------------------------------------------- configuration


def validate(cfg: RunConfig) -> None:
    """Reject impossible settings with one sentence each, before anything is loaded."""
    check_ranges(cfg)  # every range and fixed choice, in config.py
    checks = [
        (cfg.max_start_epoch is None or cfg.min_start_epoch <= cfg.max_start_epoch,
         f"min_start_epoch ({cfg.min_start_epoch}) must not exceed --max-start-epoch ({cfg.max_start_epoch})."),
        (cfg.label_snapshot >= -1, f"label_snapshot must be -1 (the expert's last) or a snapshot index; got {cfg.label_snapshot}."),
        (cfg.init.partition(":")[0] in list_inits(),
         f"--init must be one of {', '.join(list_inits())} (public as public:PATH); got {cfg.init!r}."),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


def auto_max_start(ipc: int, latest: int, min_start: int = 0) -> int:
    """The latest start snapshot for ``ipc`` images per class when ``latest`` is the last legal one.

    A fraction of ``latest`` that grows with ipc (:data:`START_WINDOW`), never below ``min_start``.
    """
    fraction = START_WINDOW[0][1]
    for (k1, f1), (k2, f2) in zip(START_WINDOW, START_WINDOW[1:]):
        if ipc >= k1:
            fraction = f1 + (f2 - f1) * min(1.0, math.log(ipc / k1) / math.log(k2 / k1))
    return min(latest, max(min_start, round(fraction * latest)))


def auto_hard_labels(ipc: int) -> bool:
    """``hard_labels = None``: class ids below :data:`SOFT_LABELS_FROM_IPC` images per class."""
    return ipc < SOFT_LABELS_FROM_IPC


def resolve_config(cfg: RunConfig, pool: ExpertPool) -> RunConfig:
    """Replace ``augment = "expert"`` by the buffer's own augmentation and every "auto" (None) by its value;
    check the segment span and the labelling snapshot."""
    if cfg.augment == "expert":
        cfg = dataclasses.replace(cfg, augment=str(pool.train_recipe.get("augment", "none")))
    try:
        Augment.parse(cfg.augment)
    except ValueError as e:
        raise DistillError(str(e)) from None
    if cfg.max_start_epoch is None:
        latest = pool.num_snapshots - 1 - cfg.expert_epochs
        pool.check_span(cfg.min_start_epoch, max(latest, cfg.min_start_epoch), cfg.expert_epochs)
        cfg = dataclasses.replace(cfg, max_start_epoch=auto_max_start(cfg.ipc, latest, cfg.min_start_epoch))
        log.info("Start snapshots %d to %d for %d image(s) per class (%d is the latest a target allows; docs/method.md).",
                 cfg.min_start_epoch, cfg.max_start_epoch, cfg.ipc, latest)
    pool.check_span(cfg.min_start_epoch, cfg.max_start_epoch, cfg.expert_epochs)
    if cfg.hard_labels is None:
        cfg = dataclasses.replace(cfg, hard_labels=auto_hard_labels(cfg.ipc))
    if cfg.label_snapshot >= pool.num_snapshots:
        raise DistillError(f"label_snapshot {cfg.label_snapshot} does not exist: the experts in {pool.folder} hold "
                           f"{pool.num_snapshots} snapshots (0 to {pool.num_snapshots - 1}); use -1 for the last.")
    return cfg


def load_real_data(cfg: RunConfig, pool: ExpertPool) -> tuple[RealData | None, str]:
    """The buffer's real data (for --init real and validation), or None and the reason it is unavailable.

    The splits are the ones the experts trained on (recorded in the buffer), never a fresh carve,
    so validation images are images no expert has seen.
    """
    spec, size, split_seed = cfg.data, None, 0
    b = read_buffer_config(pool.folder)
    if b is not None:
        spec, size, split_seed = spec or b.data, b.size, b.seed
    if not spec:
        return None, f"{pool.folder} has no config.toml naming its data and no --data was given"
    try:
        record, indices = read_buffer_split(pool.folder)
        # A buffer from before splits were recorded carved with its own seed, which is what this reproduces.
        data = load_data(spec, size=size, split_seed=split_seed, split=record, split_indices=indices)
    except DistillError as e:
        return None, str(e).rstrip(".")
    if data.source_sha256 != pool.fingerprint.get("sha256"):
        return None, f"{spec} is not the data the buffer was trained on (its SHA-256 differs)"
    return data, ""


# ----------------------------------------------------------------------------- run state


@dataclass
class _Run:
    """What stays fixed during a run."""

    cfg: RunConfig
    world: World
    device: torch.device
    out: Path
    pool: ExpertPool
    model: nn.Module
    spec: ParamSpec
    augment: Augment | None
    engine: MatchingEngine
    val: tuple[torch.Tensor, torch.Tensor] | None  # preprocessed validation images and labels, on the device
    metrics: MetricsLog
    dp: DPRecord | None = None  # the buffer's DP record: then nothing here has read a private file
    gradient_choice: GradientChoice | None = None  # what --gradient auto chose, and why


@dataclass
class _State:
    """What the run learns, and where it stands. Tensors live on the run's device."""

    images: torch.Tensor  # (N, C, H, W)
    labels: torch.Tensor  # (N,) int64 class of each image
    logits: torch.Tensor | None  # (N, K), None with hard labels
    log_lr: torch.Tensor  # 0-dim
    optimizers: dict[str, torch.optim.SGD]
    iteration: int = 0  # completed iterations

    def learned(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images, "log_lr": self.log_lr}
        if self.logits is not None:
            out["logits"] = self.logits
        return out

    @property
    def label_input(self) -> torch.Tensor:
        return self.logits if self.logits is not None else self.labels

    @property
    def syn_lr(self) -> float:
        return float(self.log_lr.detach().exp())

    def targets(self, temperature: float) -> torch.Tensor:
        return self.labels if self.logits is None else soft_targets(self.logits.detach(), temperature)


def label_rate(lr_label: float, num_classes: int) -> float:
    """The SGD rate on the label logits: ``lr_label`` per :data:`LABEL_LR_CLASSES` classes.

    Why: the student's loss is a mean over the ipc·K synthetic images, so each image's logit
    gradient shrinks as K grows; scaling by K keeps a K-class set's label steps at the size
    measured on 2 classes (and leaves 2-class datasets exactly as before).
    """
    return lr_label * num_classes / LABEL_LR_CLASSES


def _rates(cfg: RunConfig, num_classes: int) -> dict[str, float]:
    """The SGD learning rate of each learned tensor."""
    return {"images": cfg.lr_img, "log_lr": cfg.lr_lr, "logits": label_rate(cfg.lr_label, num_classes)}


def _make_state(cfg: RunConfig, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None,
                log_lr: torch.Tensor, device: torch.device, num_classes: int) -> _State:
    leaf = lambda t: t.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)  # noqa: E731
    state = _State(images=leaf(images), labels=labels.to(device), logits=None if logits is None else leaf(logits),
                   log_lr=leaf(log_lr), optimizers={})
    rates = _rates(cfg, num_classes)
    state.optimizers = {name: torch.optim.SGD([t], lr=rates[name], momentum=cfg.momentum)
                        for name, t in state.learned().items()}
    return state


def _fresh_state(run: _Run, real: RealData | None, reason: str) -> _State:
    cfg, pool = run.cfg, run.pool
    if needs_real_data(cfg.init) and real is None:
        raise DistillError(f"--init {cfg.init} needs the buffer's training images, but {reason}; pass --data or use --init noise.")
    train = real.train if real is not None else None
    labeller, prefer = None, None
    if not cfg.hard_labels:
        # A well-trained expert's beliefs are the best start for the labels: by default expert 0's last
        # snapshot, not the latest a target can be (with a short start window that one is barely trained).
        index = pool.num_snapshots - 1 if cfg.label_snapshot < 0 else cfg.label_snapshot
        labeller = pool.snapshot(0, index, run.device)
        if cfg.init_correct_only and needs_real_data(cfg.init):
            prefer = correctly_classified(run.model, run.spec, labeller, pool.preprocessing(train.images), train.labels)
            log.info("The labelling expert (snapshot %d) classifies %.1f %% of the training images correctly; "
                     "--init %s draws from those.", index, 100 * float(prefer.float().mean()), cfg.init)
    images, labels = initial_images(cfg.init, cfg.ipc, pool.num_classes, pool.channels, pool.size,
                                    generator(cfg.seed, INIT_KEY), train, pool.preprocessing, prefer=prefer,
                                    buffer=pool.folder)
    images = images.to(run.device)
    logits = None if labeller is None else initial_logits(run.model, run.spec, labeller, images)
    state = _make_state(cfg, images, labels, logits, log_step_size(cfg.syn_lr_init), run.device, pool.num_classes)
    if run.world.size > 1:
        # Ranks must start from bit-identical tensors; rank 0's are the reference.
        with torch.no_grad():
            for t in state.learned().values():
                torch.distributed.broadcast(t, src=0)
    return state


def _resumed_state(run: _Run) -> _State:
    cfg = run.cfg
    ck = load_checkpoint(run.out / CHECKPOINT_FILE, run.device)
    expected = (cfg.ipc * run.pool.num_classes, run.pool.channels, run.pool.size, run.pool.size)
    if tuple(ck["images"].shape) != expected or (ck["logits"] is None) != cfg.hard_labels:
        raise DistillError(f"The checkpoint in {run.out} holds {len(ck['images'])} images "
                           f"({'hard' if ck['logits'] is None else 'soft'} labels); resume it with its own --ipc and label setting.")
    if ck[ITERATION] > cfg.iterations:
        raise DistillError(f"The checkpoint in {run.out} is at iteration {ck[ITERATION]}, beyond --iterations {cfg.iterations}.")
    ignored = {"iterations", "device", "out", "data", "eval_every", "eval_models", "eval_epochs", "checkpoint_every"}
    changed = [f"{k} {v!r} -> {getattr(cfg, k)!r}" for k, v in ck["config"].items()
               if k not in ignored and hasattr(cfg, k) and getattr(cfg, k) != v]
    if changed and run.world.main:
        log.warning("Resuming with changed settings: %s.", "; ".join(changed))
    state = _make_state(cfg, ck["images"], ck["labels"], ck["logits"], ck["log_lr"], run.device, run.pool.num_classes)
    rates = _rates(cfg, run.pool.num_classes)
    for name, opt in state.optimizers.items():
        opt.load_state_dict(ck["optimizers"][name])
        for group in opt.param_groups:  # a resumed run follows today's rates, not the checkpoint's
            group["lr"] = rates[name]
            group["momentum"] = cfg.momentum
    state.iteration = int(ck[ITERATION])
    run.metrics.truncate(int(ck["metrics_offset"]))
    return state


def _payload(run: _Run, state: _State) -> dict:
    """A checkpoint of ``state``: copies, so later updates cannot change it."""
    return {
        ITERATION: state.iteration,
        "images": state.images.detach().cpu().clone(),
        "labels": state.labels.cpu().clone(),
        "logits": None if state.logits is None else state.logits.detach().cpu().clone(),
        "log_lr": state.log_lr.detach().cpu().clone(),
        "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in state.optimizers.items()},
        "metrics_offset": run.metrics.offset(),
        "config": dataclasses.asdict(run.cfg),
    }


# ----------------------------------------------------------------------------- one iteration


class _NonFinite(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _peak_memory(device: torch.device) -> dict:
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _iteration(run: _Run, state: _State, it: int) -> dict:
    """Match ``trajectories_per_iter`` segments, update the state in place; returns the metrics record.

    Raises :class:`_NonFinite` before the state is changed for good (the caller keeps the pre-update copy).
    """
    cfg, device = run.cfg, run.device
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gen = generator(cfg.seed, ITER_KEY, it)
    segments = run.pool.sample(gen, cfg.trajectories_per_iter, cfg.min_start_epoch, cfg.max_start_epoch, cfg.expert_epochs)
    # Every rank draws every plan, so the generator's state (and the plans) do not depend on the rank.
    plans = [make_plan(len(state.images), cfg.syn_steps, cfg.batch_syn, gen, augment=run.augment,
                       size=tuple(state.images.shape[-2:]), device=device) for _ in segments]
    mine = run.world.shard(list(range(len(segments))))
    pairs = [run.pool.pair(segments[j], device) for j in mine]
    with autocast(cfg.precision, device):  # the unrolls' network work; the results and the update stay fp32
        m = match_segments(run.engine, torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]), state,
                           stack_plans([plans[j] for j in mine]))
    learned = state.learned()
    sums = {"images": m.images, "log_lr": m.log_lr} | ({"logits": m.labels} if m.labels is not None else {})
    # One all-reduce for everything, then the mean over all segments, whichever rank matched them.
    flat = torch.cat([m.loss.view(1), m.movement.view(1)] + [sums[k].flatten() for k in learned])
    if run.world.size > 1:
        torch.distributed.all_reduce(flat)
    flat = flat / len(segments)
    parts = flat[2:].split([sums[k].numel() for k in learned])
    grads = {k: part.view_as(sums[k]) for k, part in zip(learned, parts)}
    # One read from the device, after the work, for every number the guard and the log need.
    names = list(grads)
    read = torch.stack([flat[0], flat[1], state.log_lr.detach().exp(), grads["log_lr"]]
                       + [torch.isfinite(g).all().to(flat.dtype) for g in grads.values()]
                       + [g.norm() for g in grads.values()]).tolist()
    loss, movement, used_lr, grad_log_lr = read[:4]
    finite, norms = dict(zip(names, read[4:4 + len(names)])), dict(zip(names, read[4 + len(names):]))
    if not math.isfinite(loss):
        raise _NonFinite("matching loss")
    for k in names:
        if not finite[k]:
            raise _NonFinite(f"gradient for the {k}")

    before = state.log_lr.detach().clone()
    for name, opt in state.optimizers.items():
        learned[name].grad = grads[name]
        opt.step()
        learned[name].grad = None
    clipped = bound_log_step(state.log_lr, before, cfg.max_log_lr_step)
    floored = cfg.min_syn_lr_fraction > 0 and floor_log_step(
        state.log_lr, math.log(cfg.syn_lr_init * cfg.min_syn_lr_fraction))
    finite = torch.stack([torch.isfinite(t).all() for t in learned.values()]).tolist()
    for k, ok in zip(learned, finite):
        if not ok:
            raise _NonFinite(k)
    state.iteration = it + 1
    return {
        KIND: ITERATION, ITERATION: it, LOSS: loss, SYN_LR: used_lr, "log_lr_step_clipped": clipped,
        "syn_lr_floored": floored,
        "grad_norm_images": norms["images"], "grad_log_lr": grad_log_lr, "grad_norm_logits": norms.get("logits"),
        "movement_ratio": movement, "segments": [[s.expert, s.start] for s in segments],
        "seconds": time.perf_counter() - t0, **_peak_memory(device),
    }


def _warn_movement(run: _Run, ratio: float, lr: float) -> None:
    """Say which knob to turn when the student's first move does not fit the expert's (docs/method.md)."""
    low, high = MOVEMENT_RANGE
    if low <= ratio <= high:
        return
    cfg = run.cfg
    steps = run.pool.expert_steps(Segment(0, cfg.min_start_epoch, cfg.min_start_epoch + cfg.expert_epochs))
    expert_lr = run.pool.train_recipe.get("lr", float("nan"))
    setting = (f"{cfg.syn_steps} student steps at {lr:.3g} against {steps} expert steps at {expert_lr:.3g} "
               f"({cfg.expert_epochs} snapshot interval(s))")
    if ratio > high:
        log.warning("The student moved %.1fx as far as the expert in the first iteration (%s); the step size will "
                    "shrink to compensate. Lower --syn-steps or syn_lr_init, or rebuild the buffer with --snapshot-every "
                    "and raise --expert-epochs so that each target spans more expert steps.", ratio, setting)
    else:
        log.warning("The student moved only %.2fx as far as the expert in the first iteration (%s). Raise --syn-steps "
                    "or syn_lr_init, or lower --expert-epochs.", ratio, setting)


# ----------------------------------------------------------------------------- evaluation and output


def _evaluate(run: _Run, state: _State) -> None:
    """Grid PNG, then ``eval_models`` fresh networks trained on the current set and tested on the val split."""
    cfg, it = run.cfg, state.iteration
    save_grid(run.out / grid_name(it), state.images, run.pool.preprocessing, cfg.ipc,
              run.pool.fingerprint.get("class_names"))
    record = {KIND: EVAL, ITERATION: it, SYN_LR: state.syn_lr, "grid": grid_name(it)}
    if run.dp is not None:  # said in every evaluation record, so the metrics show what the run did not do
        record |= {"dp": True, "validation": f"skipped: {NO_PRIVATE_READ}"}
    if run.val is not None and cfg.eval_models > 0:
        x_val, y_val = run.val
        images, targets = state.images.detach(), state.targets(cfg.label_temperature)
        recipe = TrainRecipe(epochs=cfg.eval_epochs, lr=state.syn_lr, augment=run.augment)
        accs = []
        for m in range(cfg.eval_models):
            with seeded(cfg.seed, EVAL_KEY, it, m):
                net = run.pool.build_model().to(run.device)
            train_network(net, images, targets, recipe, generator(cfg.seed, EVAL_KEY, it, m))
            accs.append(accuracy(predict(net, x_val), y_val))
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / len(accs)) ** 0.5
        majority = float(torch.bincount(y_val).max()) / len(y_val)
        record |= {"val_acc": accs, VAL_ACC_MEAN: mean, "val_acc_std": std, VAL_MAJORITY: majority}
        log.info("Iteration %d: validation accuracy %.3f ± %.3f over %d network(s), step size %.4g.",
                 it, mean, std, len(accs), state.syn_lr)
        # Accuracies are multiples of 1/n, computed in float32: within half an image of the majority is at it.
        if it > 0 and mean <= majority + 0.5 / len(y_val):
            # Seen on BreastMNIST at 1 image per class: the step size had collapsed (0.01 -> 3e-5), so the
            # recipe's networks barely left their initialisation. A share like that trains nothing.
            log.warning("At iteration %d networks trained on the synthetic set score %.3f on the validation split, no "
                        "better than always predicting its most frequent class (%.3f); the learned step size is %.3g "
                        "(it started at %.3g). Do not share this set: see the movement-ratio warning of iteration 0 "
                        "and docs/method.md.", it, mean, majority, state.syn_lr, cfg.syn_lr_init)
    run.metrics.write(record)


def _synthetic_set(run: _Run, state: _State) -> SyntheticSet:
    pool = run.pool
    return SyntheticSet(
        images=state.images.detach().cpu(), labels=state.labels.cpu(),
        label_logits=None if state.logits is None else state.logits.detach().cpu(),
        preprocessing=pool.preprocessing, syn_lr=state.syn_lr, label_temperature=run.cfg.label_temperature,
        model=pool.model_name, class_names=list(pool.fingerprint.get("class_names", [])), iteration=state.iteration,
        model_kwargs=pool.model_kwargs, fingerprint=pool.fingerprint,
        method=dataclasses.asdict(run.cfg) | public_record(run.cfg.init, pool.size),
        experts=pool.summary(), software=software_versions(),
        dp=None if run.dp is None else json.loads(run.dp.to_json()),
    )


# ----------------------------------------------------------------------------- the stage


def _autos_as_before(cfg: RunConfig, out: Path) -> RunConfig:
    """A resumed run keeps what its "auto" settings (None) resolved to when it started, as its config.toml
    records: a default that changed since (hard or soft labels, the start window) must not change a run midway."""
    saved_path = out / CONFIG_FILE
    if not saved_path.exists():
        return cfg  # _resumed_state says what is missing
    saved = build(RunConfig, {k: v for k, v in load_toml(saved_path).items()
                              if k in {f.name for f in dataclasses.fields(RunConfig)} | set(FILE_KEYS)})
    autos = {f.name: getattr(saved, f.name) for f in dataclasses.fields(RunConfig)
             if getattr(cfg, f.name) is None and getattr(saved, f.name) is not None}
    for name in ("gradient", "precision"):  # a run keeps the gradient and precision it chose at its start
        if getattr(cfg, name) == "auto" and getattr(saved, name) != "auto":
            autos[name] = getattr(saved, name)
    return dataclasses.replace(cfg, **autos)


def _setup(cfg: RunConfig, world: World, device: torch.device, resume: bool,
           lock: contextlib.ExitStack) -> tuple[_Run, RealData | None, str]:
    pool = ExpertPool(cfg.buffer)
    if resume:
        cfg = _autos_as_before(cfg, Path(cfg.out))
    cfg = resolve_config(cfg, pool)
    if cfg.trajectories_per_iter < world.size:
        raise DistillError(f"With {world.size} processes each needs a trajectory: set trajectories_per_iter to at least {world.size}.")
    out = check_writable_dir(cfg.out)
    if world.main:
        lock.enter_context(output_lock(out))  # one writer per run folder
        remove_stale_temps(out)
    start_over = not resume and has_run(out)
    if start_over and not restartable(out):
        raise DistillError(f"{out} already holds a run; pass --resume to continue it or choose another --out folder.")
    model = pool.build_model().to(device)
    spec = param_spec(model)
    if spec.total != pool.experts[0].num_params or list(spec.names) != list(pool.experts[0].param_names):
        raise FormatError(f"The experts in {pool.folder} do not fit a {pool.model_name} as this version builds it; rebuild the buffer.")
    dp = dp_buffer(pool.folder)
    if dp is not None:
        # Post-processing only: the run must not read the private data at all (docs/privacy.md).
        check_dp_init(cfg.init, dp, pool.folder)
        real, reason = None, NO_PRIVATE_READ
        if world.main:
            log.info("%s; the synthetic set is post-processing of the DP experts: %s", NO_PRIVATE_READ.capitalize(),
                     dp.sentence())
            if cfg.data:
                log.warning("--data %s is not read: %s.", cfg.data, NO_PRIVATE_READ)
    else:
        real, reason = load_real_data(cfg, pool)
    val = None
    if real is not None and len(real.val):
        val = (pool.preprocessing(real.val.images).to(device), real.val.labels.to(device))
    elif cfg.eval_models > 0 and world.main and dp is None:
        log.warning("Validation is skipped: %s.", reason or "the data has an empty validation split")
    augment = Augment.parse(cfg.augment)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))  # recorded as chosen
    choice = None
    if cfg.gradient == "auto":
        choice = _choose_gradient(cfg, pool, model, spec, augment, device, world)
        cfg = dataclasses.replace(cfg, gradient=choice.gradient)  # config.toml records what was chosen
        if world.main:
            log.info("%s", choice.sentence())
    engine = MatchingEngine(model, spec, augment, gradient=cfg.gradient, temperature=cfg.label_temperature, fast=cfg.fast)
    run = _Run(cfg=cfg, world=world, device=device, out=out, pool=pool, model=model, spec=spec,
               augment=augment, engine=engine, val=val, metrics=MetricsLog(out / METRICS_FILE, enabled=world.main),
               dp=dp)
    if start_over and world.main:  # only once every check has passed
        log.info("%s holds a run stopped before its first checkpoint; starting it over.", out)
        clear_run(out)
    run.gradient_choice = choice
    return run, real, reason


def _choose_gradient(cfg: RunConfig, pool: ExpertPool, model: nn.Module, spec: ParamSpec, augment: Augment | None,
                     device: torch.device, world: World) -> GradientChoice:
    """``--gradient auto``: the full unroll where its estimated memory fits ``--max-memory``, else checkpoint.

    One student step of the oracle on random images of the run's shape is traced for the bytes autograd
    keeps (distill/memory.py); the trajectories a rank holds at once multiply it (vmapped on CUDA).
    """
    n = cfg.ipc * pool.num_classes
    batch = n if cfg.batch_syn <= 0 or cfg.batch_syn >= n else cfg.batch_syn
    gen = generator(cfg.seed, MEMORY_KEY)  # its own stream: the run's draws stay as they were
    images = torch.randn(n, pool.channels, pool.size, pool.size, generator=gen).to(device)
    labels = (torch.arange(n) % pool.num_classes).to(device)
    plan = make_plan(n, 1, batch, gen, augment=augment, size=(pool.size, pool.size), device=device)
    idx, aug = plan.step(0)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()]).requires_grad_(True)
    x = images[idx].requires_grad_(True)
    kept = {name: b.clone() for name, b in model.named_buffers()}  # a training-mode pass updates running statistics
    per_step = saved_bytes(lambda: student_step(model, spec, theta, x, labels[idx], torch.tensor(0.01, device=device),
                                                augment, aug, create_graph=True))
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(kept[name])
    mine = -(-cfg.trajectories_per_iter // world.size)
    vmapped = device.type == "cuda" and next(model.buffers(), None) is None  # as MatchingEngine decides
    return choose_gradient(per_step, cfg.syn_steps, mine if vmapped else 1, budget_bytes(cfg.max_memory, device))


def _run_loop(run: _Run, state: _State, fresh: bool) -> None:
    cfg, world = run.cfg, run.world
    remaining = range(state.iteration, cfg.iterations)
    floored = False  # whether this process has said that the step-size floor binds
    with progress(remaining, label="distill", length=len(remaining), enabled=None if world.main else False) as its:
        for it in its:
            if cfg.eval_every and it % cfg.eval_every == 0 and world.main:
                _evaluate(run, state)
            good = _payload(run, state) if world.main else None
            try:
                record = _iteration(run, state, it)
            except KeyboardInterrupt:
                # Ctrl-C must not cost the iterations since the last periodic checkpoint.
                if world.main:
                    save_checkpoint(run.out / CHECKPOINT_FILE, good)
                    log.warning("Interrupted at iteration %d; its state is saved, continue with --resume.", it)
                raise
            except _NonFinite as e:
                where = run.out / CHECKPOINT_FILE
                if world.main:
                    save_checkpoint(where, good)
                raise DivergenceError(
                    f"The {e.what} became NaN or Inf at iteration {it}; the last good state (iteration {it}) is kept "
                    f"in {where}. Lower lr_img, lr_lr or syn_lr_init (or --syn-steps) and continue with --resume."
                ) from None
            run.metrics.write(record)
            if fresh and it == 0 and world.main:
                _warn_movement(run, record["movement_ratio"], record[SYN_LR])
            if record["syn_lr_floored"] and not floored and world.main:
                floored = True
                log.warning("At iteration %d the step size reached its floor, %.3g (min_syn_lr_fraction %g of %.3g), and "
                            "is held there; metrics.jsonl marks every such iteration (syn_lr_floored). The matching "
                            "gradient keeps pushing it down: see the movement-ratio warning and docs/method.md.",
                            it, cfg.syn_lr_init * cfg.min_syn_lr_fraction, cfg.min_syn_lr_fraction, cfg.syn_lr_init)
            if state.iteration % cfg.checkpoint_every == 0 and world.main:
                save_checkpoint(run.out / CHECKPOINT_FILE, _payload(run, state))
                log.info("Iteration %d: matching loss %.4f, step size %.4g, movement ratio %.2f.",
                         state.iteration, record[LOSS], state.syn_lr, record["movement_ratio"])
            world.barrier()  # rank 0 may have evaluated or written; the others wait rather than time out later


def _rank_count(cfg: RunConfig) -> int:
    """Processes for this run: ``cfg.workers`` made concrete on a CPU (see RunConfig.workers); 1 under torchrun,
    which has started the ranks already, and on a GPU."""
    validate(cfg)
    if world_from_env().size > 1:
        return 1
    device = resolve_device(cfg.device)
    n = resolve_workers(cfg.workers, device, cfg.trajectories_per_iter)
    if device.type == "cpu" and cfg.workers > n:
        log.info("%d workers asked for, %d used: one per trajectory matched each iteration (--trajectories-per-iter %d).",
                 cfg.workers, n, cfg.trajectories_per_iter)
    return n


def _distill_rank(cfg: RunConfig, resume: bool) -> None:
    distill_run(cfg, resume=resume)


def distill_run(cfg: RunConfig, *, resume: bool = False) -> Path:
    """Distill a synthetic set from the buffer ``cfg.buffer`` into the run folder ``cfg.out``; returns that folder.

    With ``resume`` the run continues from ``RUNDIR/checkpoint.pt`` exactly where it stopped.
    Under torchrun every rank matches its share of each iteration's trajectories.
    """
    workers = _rank_count(cfg)
    if workers > 1:
        # Every core: the iteration's segments split across processes of one gloo group, as under torchrun.
        run_ranks(_distill_rank, (dataclasses.replace(cfg, workers=workers), resume), workers)
        return Path(cfg.out)
    with stage(check=lambda: validate(cfg), device=cfg.device, tidy=cfg.out) as st:
        world, device = st.world, st.device
        run, real, reason = _setup(cfg, world, device, resume, st.locks)
        state = _resumed_state(run) if resume else _fresh_state(run, real, reason)
        del real  # only the initialisation needed the training split
        if world.main:
            save_toml(run.cfg, run.out / CONFIG_FILE)
            log.info("Distilling %d images (%d per class) from %d expert(s) of %s on %s (%s iterations, gradient %s).",
                     len(state.images), run.cfg.ipc, len(run.pool.experts), run.pool.fingerprint.get("name", "?"),
                     device, {"eager": "eager", "graphs": "captured", "compile": "compiled and captured"}[
                         run.engine.mode(device)], run.cfg.gradient)
            if run.gradient_choice is not None:
                run.metrics.write(run.gradient_choice.record())
        world.barrier()
        _run_loop(run, state, fresh=not resume)
        if world.main:
            save_checkpoint(run.out / CHECKPOINT_FILE, _payload(run, state))
            write_synset(run.out / SYNSET_FILE, _synthetic_set(run, state))
            _evaluate(run, state)
        world.barrier()
        return run.out
