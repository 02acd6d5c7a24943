"""Issue 28 on the CPU: --precision (bf16 autocast) and --gradient auto with --max-memory."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_arrays
from distill import memory, precision
from distill.augment import Augment
from distill.buffer import build_buffer
from distill.config import BufferConfig, EvalConfig, RunConfig, load_toml
from distill.errors import DistillError
from distill.evaluate import evaluate
from distill.formats.trajectory import read_expert
from distill.models import create_model, flatten_params, param_spec
from distill.mtt import compute_grads, distill_run
from distill.mtt.unroll import make_plan, student_step
from distill.seeding import generator, seeded

CPU = torch.device("cpu")
HAS_BF16 = precision.native_bf16(CPU)


def _problem():
    """A depth-2 ConvNet (width 32) on 20 images of 1x16x16, 2 classes, 8 student steps of 10 images, DSA."""
    with seeded(0, 1):
        model = create_model("convnet", 2, 1, 16, width=32, depth=2)
    spec = param_spec(model)
    g = generator(0, 2)
    start = flatten_params(model)
    target = start + 0.02 * torch.randn(start.shape, generator=g)
    images = torch.randn(20, 1, 16, 16, generator=g)
    labels = torch.arange(20) % 2
    augment = Augment.parse("color,crop,cutout,flip,scale,rotate")
    plan = make_plan(20, 8, 10, g, augment=augment, size=(16, 16))
    return model, spec, start, target, images, labels, torch.tensor(math.log(0.05)), plan, augment


def _grads(prec: str):
    with precision.autocast(prec, CPU):
        loss, g_images, _, g_log_lr, end = compute_grads(*_problem())
    return loss, g_images, g_log_lr, end


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
def test_bf16_meta_gradient_points_where_fp32_does():
    loss32, img32, lr32, end32 = _grads("fp32")
    loss16, img16, lr16, end16 = _grads("bf16")
    assert img16.dtype == torch.float32 and end16.dtype == torch.float32  # what is learned stays fp32
    cos = float(torch.nn.functional.cosine_similarity(img16.flatten(), img32.flatten(), dim=0))
    assert cos >= 0.99, cos
    assert float(lr16) * float(lr32) > 0  # the step size is pushed the same way
    assert abs(float(loss16) - float(loss32)) < 0.05 * abs(float(loss32))
    assert not torch.equal(img16, img32)  # bf16 really ran: the result is not fp32's to the bit


def test_fp32_is_bit_reproducible_and_unchanged_by_the_precision_switch():
    a, b = _grads("fp32"), _grads("fp32")
    _, plain_images, _, _, plain_end = compute_grads(*_problem())  # no precision context at all, as before
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a[1], plain_images) and torch.equal(a[3], plain_end)


def test_auto_is_fp32_and_bf16_is_refused_where_it_cannot_run(monkeypatch):
    assert precision.resolve_precision("auto", CPU) == "fp32"
    assert precision.resolve_precision("auto", CPU, dp=True) == "fp32"
    with pytest.raises(DistillError, match="DP experts"):
        precision.resolve_precision("bf16", CPU, dp=True)
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.raises(DistillError, match="no native bf16"):
        precision.resolve_precision("bf16", CPU)


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    assert not precision.native_bf16(CPU)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert precision.native_bf16(CPU)


# ----------------------------------------------------------------------------- --gradient auto


def test_choose_gradient_keeps_the_full_unroll_only_where_it_fits():
    step = 100 * 2**20  # 100 MiB saved per step
    fits = memory.choose_gradient(step, syn_steps=10, at_once=1, budget_bytes=10 * 2**30)
    assert fits.gradient == "full" and fits.estimate_bytes == pytest.approx(memory.FULL_UNROLL_FACTOR * 10 * step)
    over = memory.choose_gradient(step, syn_steps=40, at_once=1, budget_bytes=10 * 2**30)
    assert over.gradient == "checkpoint" and "constant-memory" in over.sentence()
    assert memory.choose_gradient(step, 40, 1, None).gradient == "full"  # unknown free memory: as before


def test_saved_bytes_grow_with_the_batch():
    model, spec, start, _, images, labels, _, _, augment = _problem()
    def one(n):
        theta = start.clone().requires_grad_(True)
        x = images[:n].clone().requires_grad_(True)
        return memory.saved_bytes(lambda: student_step(model, spec, theta, x, labels[:n], torch.tensor(0.05), None,
                                                       None, create_graph=True))

    small, large = one(5), one(20)
    assert 0 < small < large


@pytest.fixture(scope="module")
def tiny_buffer(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cpu")
    np.savez(root / "tiny.npz", **make_tiny_arrays())
    out = root / "buffer"
    build_buffer(BufferConfig(data=str(root / "tiny.npz"), out=str(out), experts=1, epochs=2, batch_size=5,
                              snapshot_every=2, augment="crop,flip", device="cpu"))
    return out


def _run(buffer: Path, out: Path, **kw) -> Path:
    base = dict(buffer=str(buffer), out=str(out), ipc=2, iterations=2, syn_steps=3, expert_epochs=1, max_start_epoch=1,
                hard_labels=True, eval_models=0, device="cpu")
    return distill_run(RunConfig(**{**base, **kw}))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("budget, chosen", [(1e-6, "checkpoint"), (64.0, "full")])
def test_gradient_auto_follows_max_memory_and_says_so(tiny_buffer, tmp_path, budget, chosen):
    out = _run(tiny_buffer, tmp_path / "run", gradient="auto", max_memory=budget)
    assert load_toml(out / "config.toml")["gradient"] == chosen
    (mem,) = [r for r in _records(out) if r["kind"] == "memory"]
    assert mem["gradient"] == chosen and mem["max_memory_gib"] == pytest.approx(budget, rel=1e-2)
    assert all(r["peak_rss_mb"] > 0 for r in _records(out) if r["kind"] == "iteration")


def test_gradient_auto_gives_the_numbers_of_the_mode_it_chose(tiny_buffer, tmp_path):
    auto = _run(tiny_buffer, tmp_path / "auto", gradient="auto", max_memory=1e-6)
    named = _run(tiny_buffer, tmp_path / "named", gradient="checkpoint")
    losses = lambda out: [r["loss"] for r in _records(out) if r["kind"] == "iteration"]  # noqa: E731
    assert losses(auto) == losses(named)


def test_run_records_the_precision_it_used(tiny_buffer, tmp_path):
    out = _run(tiny_buffer, tmp_path / "run")
    assert load_toml(out / "config.toml")["precision"] == "fp32"


# ----------------------------------------------------------------------------- --workers


def _buffer(root: Path, name: str, **kw) -> list[torch.Tensor]:
    if not (root / "tiny.npz").exists():
        np.savez(root / "tiny.npz", **make_tiny_arrays())
    out = root / name
    paths = build_buffer(BufferConfig(data=str(root / "tiny.npz"), out=str(out), experts=3, epochs=2, batch_size=5,
                                      snapshot_every=2, augment="crop,flip", device="cpu", **kw))
    assert sorted(p.name for p in paths) == [f"expert_000{i}.h5" for i in range(3)]
    experts = [read_expert(p) for p in sorted(paths)]
    assert {e.train["workers"] for e in experts} == {kw.get("workers", 1)}
    return [e.snapshots() for e in experts]


@pytest.fixture
def one_thread():
    """One thread in this process, as each of two workers on two cores runs; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_buffer_workers_are_deterministic_and_equal_one_process(tmp_path, one_thread):
    two = _buffer(tmp_path, "two", workers=2)
    again = _buffer(tmp_path, "again", workers=2)
    one = _buffer(tmp_path, "one", workers=1)
    for a, b, c in zip(two, again, one):
        assert torch.equal(a, b)
        assert torch.equal(a, c)  # each expert's randomness is its own: the worker count changes nothing here


def test_eval_workers_give_the_numbers_of_one_process(tmp_path, one_thread):
    np.savez(tmp_path / "tiny.npz", **make_tiny_arrays())
    reports = [evaluate(EvalConfig(train=str(tmp_path / "tiny.npz"), baselines=("random-real",), real_per_class=2, runs=2,
                                   epochs=3, device="cpu", workers=w)) for w in (2, 1)]
    assert [r["workers"] for r in reports] == [2, 1] and reports[0]["precision"] == "fp32"
    strip = lambda r: [[{k: v for k, v in run.items() if k != "train_seconds"} for run in row["runs"]]  # noqa: E731
                       for row in r["results"]]
    assert strip(reports[0]) == strip(reports[1])


def _fail_on_rank_1(tmp: str) -> None:
    import os
    import time

    if os.environ["RANK"] == "1":
        raise DistillError("rank 1 found a bad input.")
    time.sleep(120)  # rank 0 would wait for rank 1 in a collective: it must be stopped, not waited for
    Path(tmp, "rank0-finished").write_text("")


def test_run_ranks_stop_at_the_first_failure_and_raise_it(tmp_path):
    import time

    from distill.workers import run_ranks

    t0 = time.perf_counter()
    with pytest.raises(DistillError, match="rank 1 found a bad input"):
        run_ranks(_fail_on_rank_1, (str(tmp_path),), 2)
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "rank0-finished").exists()


def _exit_on_rank_1() -> None:
    import os
    import time

    if os.environ["RANK"] == "1":
        os._exit(3)  # as a process the kernel kills: no exception, no message
    time.sleep(120)


def test_run_ranks_notice_a_rank_that_died_without_a_word():
    from distill.workers import run_ranks

    with pytest.raises(DistillError, match="exit code 3"):
        run_ranks(_exit_on_rank_1, (), 2)


def test_run_workers_default_to_one_per_trajectory_and_core(tiny_buffer, tmp_path, monkeypatch):
    from distill.mtt import distiller

    cfg = RunConfig(buffer=str(tiny_buffer), out=str(tmp_path / "r"), device="cpu")
    monkeypatch.setattr("distill.workers.usable_cores", lambda: 4)
    assert distiller._rank_count(cfg) == 1  # one trajectory per iteration: nothing to split
    assert distiller._rank_count(RunConfig(**{**cfg.__dict__, "trajectories_per_iter": 3})) == 3
    assert distiller._rank_count(RunConfig(**{**cfg.__dict__, "trajectories_per_iter": 8})) == 4
    assert distiller._rank_count(RunConfig(**{**cfg.__dict__, "trajectories_per_iter": 8, "workers": 1})) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun the ranks exist already
    assert distiller._rank_count(RunConfig(**{**cfg.__dict__, "trajectories_per_iter": 8})) == 1


def test_the_quickstart_exports_only_a_share_that_passed_the_audit():
    script = (Path(__file__).resolve().parents[1] / "scripts" / "quickstart.sh").read_text()
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    commands = "\n".join(lines)
    assert "--force" not in commands
    audit = next(i for i, line in enumerate(lines) if "$D audit" in line)
    export = next(i for i, line in enumerate(lines) if "$D export" in line)
    assert audit < export
    command = lines[audit] + (lines[audit + 1] if lines[audit].rstrip().endswith("\\") else "")
    assert "|| true" not in command and "|| status=$?" in command  # the audit's exit status is kept
    gate = "\n".join(lines[audit:export])
    assert '"$status" -eq 3' in gate and "exit 3" in gate  # a FAIL stops the script before export
