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
from distill.privacy.rmia import (choose_temperature, offline_prior, out_mean, rate_metrics, rmia_scores,  # noqa: E402
                                  tempered, true_class_prob, true_label)
from distill.privacy.strong import image_signal  # noqa: E402
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
LEAKY_REFERENCES = 8


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


# The shares of the table: (--more key, images per class, row name, `distill run` flags). The first two (key "")
# are always made; the others when --more names their key (each trains its own reference pipelines: the cache key
# holds the images per class and the labels).
VARIANTS = [("", 10, "init real, hard labels", ["--init", "real", "--hard-labels"]),
            ("", 10, "init noise, hard labels", ["--init", "noise", "--hard-labels"]),
            ("soft", 10, "init real, soft labels", ["--init", "real", "--soft-labels"]),
            ("ipc1", 1, "init real, hard labels", ["--init", "real", "--hard-labels"]),
            ("ipc1", 1, "init noise, hard labels", ["--init", "noise", "--hard-labels"])]


def dataset_rows(ds: str, work: Path, device: str, more: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    work.mkdir(parents=True, exist_ok=True)
    times: dict = {}
    buf, refs = work / "buffer", work / "references"
    bcmd = CLI + ["buffer", "--data", ds, "--out", str(buf), "--device", device] + PROFILE["buffer"]
    step(work, "buffer", bcmd, times)
    rows, audits = [], {}
    for key, ipc, tag, extra in [v for v in VARIANTS if v[0] in ("", *more) or f"{ds}:{v[0]}" in more]:
        slug = tag.split(",")[0].replace(" ", "-") if not key else f"{key}-{tag.split(',')[0].replace(' ', '-')}"
        run, share = work / f"run-{slug}", work / f"{slug}.h5"
        rcmd = CLI + ["run", "--buffer", str(buf), "--out", str(run), "--ipc", str(ipc), "--device", device] \
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
        rows.append(_row(f"{ds}, {ipc}/class, {tag}", accuracy_of(work / f"eval-{slug}.json"), mia["rmia"]["share"],
                         mia["share"]["loss"]["auc"]["value"],
                         " && ".join(shown(c) for c in (rcmd, acmd, ecmd))))
        if key:  # its own baseline: a random subset of its size, same references
            rows.append(_row(f"{ds}, random real subset, {ipc}/class (the baseline of the row above)", None,
                             mia["rmia"]["random_subset"], mia["real_subset"]["auc"]["value"],
                             "the same audit's baseline"))
            rows += _image_rows(f"{ds}, {ipc}/class, {tag}", accuracy_of(work / f"eval-{slug}.json"),
                                work / f"audit-{slug}.json", "the same audit")
    first = next(iter(audits.values()))["summary"]["membership"]
    rows.append(_row(f"{ds}, random real subset, 10/class", None, first["rmia"]["random_subset"],
                     first["real_subset"]["auc"]["value"], "the audit's own baseline (same audit commands)"))
    # Audit format 1.2 adds the test on the share's images: the same audits again, under new names (the
    # references are cached, so these cost the audit's networks only; the cost lines below keep the first audits').
    for tag in ("init real", "init noise"):
        slug = tag.replace(" ", "-")
        out = work / f"audit-{slug}-images.json"
        acmd = CLI + ["audit", str(work / f"run-{slug}"), "--data", ds, "--reference-cache", str(refs), "--device",
                      device, "--json", str(out)] + PROFILE["audit"]
        step(work, f"audit-{slug}-images", acmd, times, ok=(0, 3))
        rows += _image_rows(f"{ds}, 10/class, {tag}", accuracy_of(work / f"eval-{slug}.json"), out, shown(acmd))
    rows += _direct_rows(ds, work, refs, first["rmia"]["references"], device)
    costs = {f"{k}_{unit}": seconds(work, step_name, unit) for k, step_name in
             (("buffer", "buffer"), ("run", "run-init-real"), ("audit", "audit-init-real"),
              ("second_audit", "audit-init-noise")) for unit in ("cpu_seconds", "seconds")}
    costs.update({
             "references_trained_in_second_audit":
                 audits.get("init-noise", {}).get("summary", {}).get("membership", {}).get("rmia", {})
                 .get("references", {}).get("trained_now")})
    return rows, costs


def _image_rows(name: str, acc, audit_json: Path, command: str) -> list[dict]:
    """The share and its random-subset baseline under RMIA on the images (audit.json 1.2's ``rmia.image``)."""
    mia = json.loads(audit_json.read_text())["summary"]["membership"]
    image = mia["rmia"].get("image")
    if not image:
        return []
    return [_row(f"{name}, attacked on its images", acc, image["share"], None, command),
            _row(f"{name.split(',')[0]}, random real subset, attacked on its images", None, image["random_subset"],
                 None, "the same audit's baseline")]


def dp_rows(ds: str, work: Path, device: str, runs: list[Path]) -> list[dict]:
    """DP shares of the DP table (issue 23), each audited with RMIA against DP reference pipelines of its budget."""
    rows, times = [], {}
    for run in runs:
        slug = "dp-" + run.parent.name
        out = work / f"audit-{slug}.json"
        acmd = CLI + ["audit", str(run), "--data", ds, "--reference-cache", str(work / "references"), "--device",
                      device, "--json", str(out)] + PROFILE["audit"]
        step(work, f"audit-{slug}", acmd, times, ok=(0, 3))
        doc = json.loads(out.read_text())
        mia = doc["summary"]["membership"]
        eps = mia["rmia"]["references"].get("dp_epsilon")
        acc = accuracy_of(run.parent / "eval.json") if (run.parent / "eval.json").exists() else None
        name = f"{ds}, 10/class, DP share (ε = {eps:g}, `{run.parent.name}` of the DP table; DP references)"
        rows.append(_row(name, acc, mia["rmia"]["share"], mia["share"]["loss"]["auc"]["value"], shown(acmd)))
        rows.append(_row(f"{ds}, random real subset, 10/class (the DP audit's baseline)", None,
                         mia["rmia"]["random_subset"], mia["real_subset"]["auc"]["value"], "the same audit's baseline"))
        rows += _image_rows(name, acc, out, "the same audit")
    return rows


def _direct_rows(ds: str, work: Path, refs: Path, ref_record: dict, device: str) -> list[dict]:
    """Full data and the leaky share, attacked with the references the audits cached."""
    out = work / "direct.json"
    cached = json.loads(out.read_text()) if out.exists() else []
    if len(cached) >= 4:
        return cached
    subject = load_subject(work / "run-init-real")
    data = load_data(ds, split=subject.split) if subject.split else load_data(ds)
    hold, hold_y, _ = holdout_split(data, "val")
    pool_u8, pool_y = torch.cat([data.train.images, hold]), torch.cat([data.train.labels, hold_y])
    keep = {k: v for k, v in ref_record.items() if k in ReferenceSettings.__dataclass_fields__}
    pre, n_mem = subject.preprocessing, len(data.train)
    x_pool, x_test = pre(pool_u8), pre(data.test.images)
    leak = draw_random_real(data.train.labels, data.num_classes, LEAKY_IPC, torch.Generator().manual_seed(1))

    rows = cached[:2]  # the full-data and first leaky rows of an earlier run are kept (their networks are seeded)
    t0 = time.perf_counter()
    if len(rows) < 2:
        sig = reference_signals(pool_u8, pool_y, list(data.class_names), data.fingerprint(),
                                ReferenceSettings(**keep), refs, torch.device(device))
        prior = offline_prior(out_mean(sig["probs"], sig["members"]))

        def attacked(idx: torch.Tensor, recipe: TrainRecipe, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                net = create_model(subject.model, data.num_classes, data.channels, data.size, **subject.model_kwargs)
            train_network(net, x_pool[idx], pool_y[idx], recipe, torch.Generator().manual_seed(seed))
            p = true_class_prob([net], x_pool, pool_y).numpy()
            scores = rmia_scores(p, prior, p[n_mem:], prior[n_mem:])
            loss = -example_losses(net, x_pool, pool_y).numpy()
            acc = float((net.eval()(x_test).argmax(1) == data.test.labels).float().mean())
            return scores, loss, acc

        full = torch.arange(n_mem)
        s, loss, acc = attacked(full, TrainRecipe(epochs=FULL_EPOCHS, lr=0.01), 0)
        rows = [_row(f"{ds}, full data ({FULL_EPOCHS} epochs)", acc, rate_metrics(s[:n_mem], s[n_mem:]),
                     auc(loss[:n_mem], loss[n_mem:]), "python benchmarks/privacy_table.py (full-data row)")]
        s, loss, acc = attacked(leak, subject.recipe, 1)
        # A share of copies exposes the patients it copied: power is read on them against the non-members.
        rows.append(_row(f"{ds}, leaky share ({LEAKY_IPC}/class copies of training images; members = the copies; "
                         "share-pipeline references)", acc,
                         rate_metrics(s[leak.numpy()], s[n_mem:]), auc(loss[leak.numpy()], loss[n_mem:]),
                         "python benchmarks/privacy_table.py (leaky row)"))
    acc, loss_auc = rows[1]["accuracy"], rows[1]["loss_auc"]
    # The same attacked network (network 0 of the leaky set, trained as above) against LEAKY_REFERENCES networks
    # of its own kind, at the temperature that attacks those references best (chosen on them alone).
    folder = work / "leaky"
    y = pool_y.numpy()
    nets = [leaky_network(x_pool, pool_y, data, subject, j, folder) for j in range(LEAKY_REFERENCES + 1)]
    assert np.array_equal(nets[0][1], np.isin(np.arange(len(y)), leak.numpy())), "network 0 is not the leaky share's"
    probs = np.stack([p for p, _ in nets[1:]])
    ins = np.stack([i for _, i in nets[1:]])
    population = np.arange(len(y)) >= n_mem
    t, self_auc = choose_temperature(probs, ins, y, population)
    prior_k = offline_prior(out_mean(true_label(tempered(probs, t), y), ins))
    p_t = true_label(tempered(nets[0][0], t), y)
    s_k = rmia_scores(p_t, prior_k, p_t[n_mem:], prior_k[n_mem:])
    aucs = ", ".join(f"{k:g}: {v:.3f}" for k, v in self_auc.items())
    rows.append(_row(f"{ds}, the same leaky share; {LEAKY_REFERENCES} references of its own kind, temperature {t:g} "
                     f"(chosen on the references, their mean self-attack AUC {aucs})", acc,
                     rate_metrics(s_k[leak.numpy()], s_k[n_mem:]), loss_auc,
                     "python benchmarks/privacy_table.py (leaky row, matched references)"))
    # The released images themselves, against the references' images (each reference's copies).
    pixels = pool_u8.float() / 255.0
    sig_img = np.stack([image_signal(pixels[torch.from_numpy(i)], pixels) for i in ins])
    prior_i = offline_prior(out_mean(sig_img, ins))
    p_i = image_signal(pixels[leak], pixels)
    s_i = rmia_scores(p_i, prior_i, p_i[n_mem:], prior_i[n_mem:])
    rows.append(_row(f"{ds}, the same leaky share, attacked on its images (nearest correlation; the same "
                     f"{LEAKY_REFERENCES} references' images)", acc,
                     rate_metrics(s_i[leak.numpy()], s_i[n_mem:]), loss_auc,
                     "python benchmarks/privacy_table.py (leaky row, images)"))
    (work / "direct-seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    out.write_text(json.dumps(rows))
    return rows


def leaky_network(x_pool: torch.Tensor, pool_y: torch.Tensor, data, subject, j: int,
                  folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Network ``j`` of the leaky experiment: (P, K) class probabilities on the pool and (P,) bool trained-on.

    j = 0 is the attacked leaky share's network (LEAKY_IPC copies per class of training images, seed 1);
    j >= 1 a reference of its kind, trained on LEAKY_IPC per class drawn from one half of the pool (pairs
    (2i+1, 2i+2) split it in complementary halves). Cached as ``folder/net_JJJ.npz`` (logits (P, A, K), the
    first query the image itself; ins (P,)), so a longer list of references reuses the first ones.
    """
    path = folder / f"net_{j:03d}.npz"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        n_pool = len(pool_y)
        if j == 0:
            idx, seed = draw_random_real(data.train.labels, data.num_classes, LEAKY_IPC, torch.Generator().manual_seed(1)), 1
        else:
            pair, side = divmod(j - 1, 2)
            perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(1000 + pair))
            half = perm[:n_pool // 2] if side == 0 else perm[n_pool // 2:]
            seed = 100 + j
            idx = half[draw_random_real(pool_y[half], data.num_classes, LEAKY_IPC, torch.Generator().manual_seed(seed))]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = create_model(subject.model, data.num_classes, data.channels, data.size, **subject.model_kwargs)
        train_network(net, x_pool[idx], pool_y[idx], subject.recipe, torch.Generator().manual_seed(seed))
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(x_pool[i:i + 1024]) for i in range(0, n_pool, 1024)]).double()
        ins = np.zeros(n_pool, dtype=bool)
        ins[idx.numpy()] = True
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, logits=logits[:, None].numpy().astype(np.float32), ins=ins)
        os.replace(tmp, path)
        print(f"leaky network {j} trained", flush=True)
    z = np.load(path)
    logits = torch.from_numpy(z["logits"][:, 0].astype(np.float64))
    return torch.softmax(logits, 1).numpy(), z["ins"]


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
    ap.add_argument("--dp-run", action="append", type=Path, default=[],
                    help="A DP table run folder (benchmarks/dp_table.py) of the first dataset, audited with RMIA too.")
    ap.add_argument("--more", default="", help="comma list of more shares: soft (10/class, soft labels), ipc1 "
                                               "(1/class, init real and init noise); DATASET:KEY for one dataset only")
    a = ap.parse_args()
    more = tuple(k for k in a.more.split(",") if k)
    rows, costs = [], {}
    for ds in a.datasets:
        r, c = dataset_rows(ds, a.work / ds, a.device, more)
        rows += r
        if ds == a.datasets[0] and a.dp_run:
            rows += dp_rows(ds, a.work / ds, a.device, a.dp_run)
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
