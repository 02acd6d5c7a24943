"""The privacy table of issue 24 -> docs/privacy.md ("The privacy table").

A benchmark script, not a test: CI never runs it. For each dataset it drives the pipeline
through the command line, as a user would, and records every command:

    distill buffer -> distill run (init real / init noise, hard labels) -> distill export --force
    -> distill eval SHARE -> distill audit RUN --attack rmia (cached references, reused by every row)

and adds three rows computed here with the same references: full data (a network trained on
the whole training split), a random real subset of the share's size (the audit's own
baseline), and a deliberately leaky share (copies of real training images), whose power
is read on the images it copied. Each row: accuracy, RMIA AUC and TPR at 1 % FPR with its
Clopper-Pearson interval, the quick loss attack's AUC for comparison, and the command.

    python benchmarks/privacy_table.py --work /tmp/privacy-bench            # CPU profile
    python benchmarks/privacy_table.py --work /tmp/privacy-bench --datasets pneumoniamnist breastmnist

Finished steps are kept in --work and skipped when run again. The script rewrites only the
section between its markers in docs/privacy.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.data import draw_random_real, load_data  # noqa: E402
from distill.metrics import auc  # noqa: E402
from distill.models import create_model  # noqa: E402
from distill.privacy.membership import example_losses  # noqa: E402
from distill.privacy.references import ReferenceSettings, reference_signals  # noqa: E402
from distill.privacy.rmia import offline_prior, out_mean, rate_metrics, rmia_scores, true_class_prob  # noqa: E402
from distill.privacy.subject import holdout_split, load_subject  # noqa: E402
from distill.train import TrainRecipe, train_network  # noqa: E402

DOC = REPO / "docs" / "privacy.md"
BEGIN, END = "<!-- privacy-table:begin -->", "<!-- privacy-table:end -->"
CLI = [sys.executable, "-m", "distill.cli"]

# The CPU profile: small enough for ~30 CPU-minutes per dataset on one thread, far below a paper run.
PROFILE = {
    "buffer": ["--experts", "2", "--epochs", "4"],
    "run": ["--iterations", "50", "--syn-steps", "10", "--expert-epochs", "2"],
    "audit": ["--attack", "rmia", "--references", "2", "--reference-experts", "1", "--reference-epochs", "4",
              "--reference-iterations", "50", "--networks", "1", "--bootstrap", "50", "--pairs", "0"],
    "eval": ["--baseline", "none", "--runs", "1"],
}
FULL_EPOCHS = 10  # of the full-data network trained here (lr 0.01, as the random-real baseline's)
LEAKY_IPC = 50  # copies per class in the leaky share: its power is read on these copies
# References of the leaky share's own kind: networks trained like it (copies of LEAKY_IPC images per class drawn
# from a random half of the pool), in complementary pairs. RMIA calibrates p(x | theta) by p(x) from models
# trained the way the attacked one was; references trained on distilled shares calibrate a network trained on
# 100 real images poorly (the first leaky row shows how poorly).
LEAKY_REFERENCES = 4


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sh(cmd: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> dict:
    """Run a command (one thread), log its output; returns wall and CPU seconds. Raises on an exit status not in ``ok``.

    CPU seconds are the fair cost on a shared machine, where wall time depends on the neighbours.
    """
    t0, c0 = time.perf_counter(), _child_cpu()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc not in ok:
        raise SystemExit(f"{shlex.join(cmd)} failed with exit status {rc}; see {log}.")
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _child_cpu() - c0}


def shown(cmd: list[str]) -> str:
    """A command as a user types it: 'distill ...' instead of the interpreter."""
    return "distill " + shlex.join(cmd[len(CLI):]) if cmd[:len(CLI)] == CLI else shlex.join(cmd)


def step(work: Path, name: str, cmd: list[str], times: dict, ok: tuple[int, ...] = (0,)) -> None:
    """Run ``cmd`` unless step ``name`` finished before (its marker file)."""
    mark = work / f".done-{name}"
    if mark.exists():
        return
    times[name] = sh(cmd, work / "log.txt", ok)
    mark.write_text(json.dumps(times[name]))


def seconds(work: Path, name: str, key: str = "cpu_seconds") -> float | None:
    mark = work / f".done-{name}"
    return json.loads(mark.read_text()).get(key) if mark.exists() else None


def accuracy_of(eval_json: Path) -> float | None:
    doc = json.loads(eval_json.read_text())
    for key in ("arms", "rows", "results"):
        rows = doc.get(key)
        if isinstance(rows, list) and rows:
            return float(rows[0]["mean"]["accuracy"])
    return None


def _row(name: str, acc, rmia: dict, loss_auc, command: str) -> dict:
    t = rmia.get("tpr_at_1pct_fpr") or {}
    return {"row": name, "accuracy": acc, "auc": rmia.get("auc"), "tpr1": t.get("value"), "ci": t.get("ci95"),
            "k": t.get("k"), "n": t.get("n"), "n_non": rmia.get("n_nonmembers"), "loss_auc": loss_auc,
            "command": command}


def dataset_rows(ds: str, work: Path, device: str) -> tuple[list[dict], dict]:
    work.mkdir(parents=True, exist_ok=True)
    times: dict = {}
    buf, refs = work / "buffer", work / "references"
    bcmd = CLI + ["buffer", "--data", ds, "--out", str(buf), "--device", device] + PROFILE["buffer"]
    step(work, "buffer", bcmd, times)
    rows, audits = [], {}
    for tag, extra in (("init real, hard labels", ["--init", "real", "--hard-labels"]),
                       ("init noise, hard labels", ["--init", "noise", "--hard-labels"])):
        slug = tag.split(",")[0].replace(" ", "-")
        run, share = work / f"run-{slug}", work / f"{slug}.h5"
        rcmd = CLI + ["run", "--buffer", str(buf), "--out", str(run), "--ipc", "10", "--device", device] \
            + PROFILE["run"] + extra
        acmd = CLI + ["audit", str(run), "--data", ds, "--reference-cache", str(refs), "--device", device,
                      "--json", str(work / f"audit-{slug}.json")] + PROFILE["audit"]
        ecmd = CLI + ["eval", str(share), "--test", ds, "--json", str(work / f"eval-{slug}.json"),
                      "--device", device] + PROFILE["eval"]
        step(work, f"run-{slug}", rcmd, times)
        step(work, f"audit-{slug}", acmd, times, ok=(0, 3))  # 3 = a FAIL verdict, which is a result here
        step(work, f"export-{slug}", CLI + ["export", str(run), "--out", str(share), "--force", "--overwrite"], times)
        step(work, f"eval-{slug}", ecmd, times)
        doc = json.loads((work / f"audit-{slug}.json").read_text())
        audits[slug] = doc
        mia = doc["summary"]["membership"]
        rows.append(_row(f"{ds}, 10/class, {tag}", accuracy_of(work / f"eval-{slug}.json"), mia["rmia"]["share"],
                         mia["share"]["loss"]["auc"]["value"],
                         " && ".join(shown(c) for c in (rcmd, acmd, ecmd))))
    first = next(iter(audits.values()))["summary"]["membership"]
    rows.append(_row(f"{ds}, random real subset, 10/class", None, first["rmia"]["random_subset"],
                     first["real_subset"]["auc"]["value"], "the audit's own baseline (same audit commands)"))
    rows += _direct_rows(ds, work, refs, first["rmia"]["references"], device)
    costs = {f"{k}_{unit}": seconds(work, step_name, unit) for k, step_name in
             (("buffer", "buffer"), ("run", "run-init-real"), ("audit", "audit-init-real"),
              ("second_audit", "audit-init-noise")) for unit in ("cpu_seconds", "seconds")}
    costs.update({
             "references_trained_in_second_audit":
                 audits.get("init-noise", {}).get("summary", {}).get("membership", {}).get("rmia", {})
                 .get("references", {}).get("trained_now")})
    return rows, costs


def _direct_rows(ds: str, work: Path, refs: Path, ref_record: dict, device: str) -> list[dict]:
    """Full data and the leaky share, attacked with the references the audits cached."""
    out = work / "direct.json"
    cached = json.loads(out.read_text()) if out.exists() else []
    if len(cached) >= 3:
        return cached
    subject = load_subject(work / "run-init-real")
    data = load_data(ds, split=subject.split) if subject.split else load_data(ds)
    hold, hold_y, _ = holdout_split(data, "val")
    pool_u8, pool_y = torch.cat([data.train.images, hold]), torch.cat([data.train.labels, hold_y])
    keep = {k: v for k, v in ref_record.items() if k in ReferenceSettings.__dataclass_fields__}
    sig = reference_signals(pool_u8, pool_y, list(data.class_names), data.fingerprint(), ReferenceSettings(**keep),
                            refs, torch.device(device))
    prior = offline_prior(out_mean(sig["probs"], sig["members"]))
    pre, n_mem = subject.preprocessing, len(data.train)
    x_pool, x_test = pre(pool_u8), pre(data.test.images)

    attacked_nets: list[torch.nn.Module] = []

    def attacked(idx: torch.Tensor, recipe: TrainRecipe, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = create_model(subject.model, data.num_classes, data.channels, data.size, **subject.model_kwargs)
        train_network(net, x_pool[idx], pool_y[idx], recipe, torch.Generator().manual_seed(seed))
        attacked_nets.append(net)
        p = true_class_prob([net], x_pool, pool_y).numpy()
        scores = rmia_scores(p, prior, p[n_mem:], prior[n_mem:])
        loss = -example_losses(net, x_pool, pool_y).numpy()
        acc = float((net.eval()(x_test).argmax(1) == data.test.labels).float().mean())
        return scores, loss, acc

    rows = cached[:1]  # a full-data row from an earlier run is kept (its network is seeded: it would be the same)
    t0 = time.perf_counter()
    if not rows:
        full = torch.arange(n_mem)
        s, loss, acc = attacked(full, TrainRecipe(epochs=FULL_EPOCHS, lr=0.01), 0)
        rows.append(_row(f"{ds}, full data ({FULL_EPOCHS} epochs)", acc, rate_metrics(s[:n_mem], s[n_mem:]),
                         auc(loss[:n_mem], loss[n_mem:]), "python benchmarks/privacy_table.py (full-data row)"))
    leak = draw_random_real(data.train.labels, data.num_classes, LEAKY_IPC, torch.Generator().manual_seed(1))
    s, loss, acc = attacked(leak, subject.recipe, 1)
    # A share of copies exposes the patients it copied: power is read on them against the non-members.
    rows.append(_row(f"{ds}, leaky share ({LEAKY_IPC}/class copies of training images; members = the copies; "
                     "share-pipeline references)", acc,
                     rate_metrics(s[leak.numpy()], s[n_mem:]), auc(loss[leak.numpy()], loss[n_mem:]),
                     "python benchmarks/privacy_table.py (leaky row)"))
    # The same attacked network, its p(x) now from references trained the way it was.
    p_target = true_class_prob_of(attacked_nets[-1], x_pool, pool_y)
    np.savez(work / "leaky-target.npz", p=p_target, leak=leak.numpy(), n_members=n_mem)
    probs, ins = leaky_references(x_pool, pool_y, data, subject, LEAKY_REFERENCES, work / "leaky-references.npz")
    prior_k = offline_prior(out_mean(probs, ins))
    s_k = rmia_scores(p_target, prior_k, p_target[n_mem:], prior_k[n_mem:])
    rows.append(_row(f"{ds}, the same leaky share; {LEAKY_REFERENCES} references of its own kind", acc,
                     rate_metrics(s_k[leak.numpy()], s_k[n_mem:]), auc(loss[leak.numpy()], loss[n_mem:]),
                     "python benchmarks/privacy_table.py (leaky row, matched references)"))
    log_s = time.perf_counter() - t0
    (work / "direct-seconds.txt").write_text(f"{log_s:.1f}\n")
    out.write_text(json.dumps(rows))
    return rows


def true_class_prob_of(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return true_class_prob([net], x, y).numpy()


def leaky_references(x_pool: torch.Tensor, pool_y: torch.Tensor, data, subject, count: int,
                     cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """``count`` networks trained like the leaky share, each on LEAKY_IPC copies per class from a random half.

    Halves come in complementary pairs (as the audit's references do). Returns (probs, ins), each (count, P):
    every network's probability of each pool point's true label, and whether it trained on the point.
    Cached in ``cache``; a cache made with another count is recomputed.
    """
    if cache.exists():
        z = np.load(cache)
        if len(z["probs"]) == count:
            return z["probs"], z["ins"]
    n_pool, g = len(pool_y), torch.Generator().manual_seed(7)
    probs, ins = [], []
    for pair in range(count // 2):
        perm = torch.randperm(n_pool, generator=g)
        for j, half in enumerate((perm[:n_pool // 2], perm[n_pool // 2:])):
            seed = 100 + 2 * pair + j
            idx = half[draw_random_real(pool_y[half], data.num_classes, LEAKY_IPC, torch.Generator().manual_seed(seed))]
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                net = create_model(subject.model, data.num_classes, data.channels, data.size, **subject.model_kwargs)
            train_network(net, x_pool[idx], pool_y[idx], subject.recipe, torch.Generator().manual_seed(seed))
            probs.append(true_class_prob_of(net, x_pool, pool_y))
            member = np.zeros(n_pool, dtype=bool)
            member[idx.numpy()] = True
            ins.append(member)
            print(f"leaky reference {len(probs)}/{count} trained", flush=True)
    probs_a, ins_a = np.stack(probs), np.stack(ins)
    np.savez(cache, probs=probs_a, ins=ins_a)
    return probs_a, ins_a


def _f(v, d=3) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def render(rows: list[dict], costs: dict[str, dict], machine: str) -> str:
    lines = [BEGIN, "", f"Made by `python benchmarks/privacy_table.py` on {machine} (CPU profile: "
             f"buffer `{' '.join(PROFILE['buffer'])}`, run `--ipc 10 {' '.join(PROFILE['run'])}`, audit "
             f"`{' '.join(PROFILE['audit'])}`). These are CPU-feasible settings, far below a paper run; read the "
             "figures as a check of the attack, not as the privacy of a production share.", "",
             "| row | accuracy | RMIA AUC | RMIA TPR at 1 % FPR [95 % CI] (k/n) | non-members | loss-attack AUC | command |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = f"[{_f(r['ci'][0])}, {_f(r['ci'][1])}]" if r.get("ci") else ""
        lines.append(f"| {r['row']} | {_f(r['accuracy'])} | {_f(r['auc'])} | {_f(r['tpr1'])} {ci} "
                     f"({r['k']}/{r['n']}) | {r['n_non']} | {_f(r['loss_auc'])} | `{r['command']}` |")
    lines.append("")
    for ds, c in costs.items():
        for unit, word in (("cpu_seconds", "CPU"), ("seconds", "wall")):
            pipeline = (c.get(f"buffer_{unit}") or 0) + (c.get(f"run_{unit}") or 0)
            audit = c.get(f"audit_{unit}") or 0
            lines.append(f"Cost on {ds} ({word} seconds): one pipeline (buffer + run) {pipeline:.0f} s; the first "
                         f"strong audit (training its references) {audit:.0f} s = "
                         f"{audit / pipeline if pipeline else float('nan'):.2f}x one pipeline; a second audit from "
                         f"the same data {_f(c.get(f'second_audit_{unit}'), 0)} s (references trained: "
                         f"{c.get('references_trained_in_second_audit')}).")
            lines.append("")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--datasets", nargs="+", default=["pneumoniamnist"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-doc", action="store_true", help="Print the table instead of writing docs/privacy.md.")
    a = ap.parse_args()
    rows, costs = [], {}
    for ds in a.datasets:
        r, c = dataset_rows(ds, a.work / ds, a.device)
        rows += r
        costs[ds] = c
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s) per process, torch {torch.__version__}"
    table = render(rows, costs, machine)
    (a.work / "table.md").write_text(table + "\n")
    if a.no_doc:
        print(table)
        return
    text = DOC.read_text()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## The privacy table\n\n" + table + "\n"
    DOC.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
