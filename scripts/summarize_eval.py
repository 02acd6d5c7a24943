"""Print the verdict of a `distill eval --json` report: the share against random real, full data and
the majority class of the test split, and whether it beats random real by at least MARGIN points.

    python scripts/summarize_eval.py out/quickstart/eval.json [--full eval_full.json] [--margin 5]

--full takes the full-data row from a second report (a separate, shorter `distill eval --baseline full`).

Every number comes from the report; nothing here is fixed in advance.
"""

import argparse
import json


def _row(report: dict, kind: str) -> dict | None:
    return next((r for r in report["results"] if r["kind"] == kind), None)


def _pm(row: dict) -> str:
    return f"{100 * row['mean']['accuracy']:.1f} ± {100 * row['std']['accuracy']:.1f} %"


def summarize(report: dict, margin: float, full_report: dict | None = None) -> list[str]:
    test = report["test"]
    majority = 100 * max(test["class_counts"]) / sum(test["class_counts"])
    distilled, random_real = _row(report, "distilled"), _row(report, "random-real")
    full = _row(full_report or report, "full")
    if distilled is None or random_real is None:
        return ["The report lacks a distilled or a random-real row: no verdict."]
    ipc = random_real["trained_on"]["ipc"]
    parts = [f"distilled {max(distilled['trained_on']['class_counts'])}/class: {_pm(distilled)}",
             f"random real {ipc}/class: {_pm(random_real)}"]
    if full is not None:
        parts.append(f"full data ({full['recipe']['epochs']} epochs): {_pm(full)}")
    parts.append(f"always the majority class: {majority:.1f} %")
    gap = 100 * (distilled["mean"]["accuracy"] - random_real["mean"]["accuracy"])
    above_majority = 100 * distilled["mean"]["accuracy"] > majority
    lines = [f"{test['name']} test split, {report['runs']} runs per row: " + "; ".join(parts) + "."]
    if gap >= margin and above_majority:
        lines.append(f"The share beats random real by {gap:+.1f} points (target: at least +{margin:g}) "
                     f"and the majority class by {100 * distilled['mean']['accuracy'] - majority:+.1f}.")
    else:
        lines.append(f"Target NOT met: the share is {gap:+.1f} points against random real (target: at least "
                     f"+{margin:g}) and {'above' if above_majority else 'not above'} the majority class.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="JSON written by `distill eval --json`")
    parser.add_argument("--full", help="a second report whose full-data row to show")
    parser.add_argument("--margin", type=float, default=5.0, help="points over random real to call it a win")
    args = parser.parse_args()
    with open(args.report, encoding="utf-8") as f:
        report = json.load(f)
    full_report = None
    if args.full:
        with open(args.full, encoding="utf-8") as f:
            full_report = json.load(f)
    print("\n".join(summarize(report, args.margin, full_report)))


if __name__ == "__main__":
    main()
