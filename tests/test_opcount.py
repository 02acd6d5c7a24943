"""Operator calls per MTT iteration and per expert step stay within committed bounds (a count, not a timing).

The bounds are about 10 % above the counts measured when they were set (torch 2.11-2.14 on CPU,
2026-12-01); a change that adds per-step work, a host round trip or a Python loop over
trajectories pushes a count over its bound. benchmarks/opcount.py explains the counter, and
benchmarks/speed.py --sections opcount prints the full-size table.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from opcount import Problem, Setting, count_ops  # noqa: E402

SETTING = Setting(syn_steps=5)  # ConvNet-3, 1x28x28, 2 classes x 10 images, whole set each step, DSA
# (T, gradient) -> bound; measured 3964, 5179, 6206, 8406 (T = 4 vmapped, as on CUDA).
MTT_BOUNDS = {(1, "full"): 4360, (1, "checkpoint"): 5700, (4, "full"): 6830, (4, "checkpoint"): 9250}
# A replayed graph's host work is copying the iteration's inputs in and its outputs out: 14 tensors here.
# That is counted from the engine's signature, not from a replay (no GPU in CI); engine_check.py measures it.
CAPTURED_BOUND = 16
EXPERT_BOUND = 312  # measured 284 (5bd3815: 357)


def test_the_counter_sees_forward_and_backward_operators():
    x = torch.ones(3, requires_grad=True)
    c = count_ops(lambda: (x * 2).sum().backward())
    assert c.by_name["mul"] >= 2 and c.by_name["sum"] == 1  # the backward's mul is counted too


@pytest.fixture(scope="module")
def problems():
    return {t: Problem(SETTING, t) for t in (1, 4)}


@pytest.mark.parametrize("key", sorted(MTT_BOUNDS))
def test_mtt_iteration_stays_within_its_operator_budget(problems, key):
    t, gradient = key
    count = count_ops(lambda: problems[t].new_iteration(gradient)).total
    assert count <= MTT_BOUNDS[key], f"{count} aten calls for T={t}, {gradient}; the bound is {MTT_BOUNDS[key]}"


def test_vmapped_trajectories_cost_far_fewer_operators_than_a_loop(problems):
    """Four trajectories in one vmapped call against today's Python loop (git 5bd3815) over them."""
    old = count_ops(problems[4].old_iteration).total
    new = count_ops(lambda: problems[4].new_iteration("full")).total
    assert new < 0.5 * old, (new, old)


def test_the_captured_iterations_inputs_and_outputs_do_not_grow_with_trajectories(problems):
    # What the test can check without a GPU: the tensors copied around a replay are the same for T = 1 and 4.
    assert problems[1].captured_host_ops() == problems[4].captured_host_ops() <= CAPTURED_BOUND


def test_expert_step_stays_within_its_operator_budget(problems):
    count = count_ops(lambda: problems[1].expert_step(old=False)).total
    assert count <= EXPERT_BOUND, f"{count} aten calls for one expert step; the bound is {EXPERT_BOUND}"
