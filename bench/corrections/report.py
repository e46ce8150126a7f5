"""The table of bench/corrections/run.sh, from the journals it left.

usage: python3 report.py OUT [OUT ...]

Reads OUT/tasks.list (the task files run), OUT/PASS/ID.run.json (`keel --json runs
show`) and OUT/PASS/ID.secs; prints markdown: one row per pass, a per-task matrix, the
issue's targets and whether they held. Several OUTs (repeated runs of the same tasks)
are summed: their rows count every run. Everything counted comes from the journal: tokens are each
turn's `charged.tokens` (what the gateway charged the run: the model's reported
usage), a correction turn is one whose input names a `strategy`, a program "run" is a
code step that was executed (an identical resubmission is refused unrun).
"""

import json
import os
import sys

RESUBMITTED = "the program is identical to one that already failed"
PASSES = ["repair", "regenerate", "adaptive-1", "adaptive-2", "blind"]
LABEL = {
    "repair": "repair",
    "regenerate": "regenerate",
    "adaptive-1": "adaptive, pass 1 (prior)",
    "adaptive-2": "adaptive, pass 2 (learned)",
    "blind": "blind retries",
}


def run_summary(path):
    snap = json.load(open(path))["state"]
    steps = sorted(snap["steps"], key=lambda s: s["step"])
    r = {"tokens": 0, "corr_tokens": 0, "turns": 0, "programs": 0, "refused": 0,
         "fixed": False, "fixed_at": None, "strategies": [], "reason": snap["run"].get("reason")}
    attempt = 0
    # What-if: the tokens had a chain stopped at its first identical resubmission
    # (the turn that wrote it is counted, nothing after it).
    r["tokens_if_resubmission_stops"] = None
    for s in steps:
        if s["target"].startswith("model:"):
            if s["status"] != "succeeded":
                continue
            t = (s.get("output") or {}).get("charged", {}).get("tokens", 0)
            r["turns"] += 1
            r["tokens"] += t
            if s["input"].get("strategy"):
                r["corr_tokens"] += t
                r["strategies"].append(s["input"]["strategy"])
        elif isinstance(s.get("input"), dict) and "program" in s["input"]:
            attempt += 1
            if (s.get("message") or "").startswith(RESUBMITTED):
                r["refused"] += 1
                if r["tokens_if_resubmission_stops"] is None:
                    r["tokens_if_resubmission_stops"] = r["tokens"]
                continue
            r["programs"] += 1
            if s["status"] == "succeeded" and not r["fixed"]:
                r["fixed"], r["fixed_at"] = True, attempt
    if r["tokens_if_resubmission_stops"] is None:
        r["tokens_if_resubmission_stops"] = r["tokens"]
    return r


def stop_word(reason):
    if not reason:
        return ""
    if "same error twice" in reason:
        return "repeat"
    if "programs failed in a row" in reason:
        return "cap"
    if "turns" in reason:
        return "turns"
    return "other"


def main():
    outs = sys.argv[1:]
    if not outs:
        sys.exit("usage: report.py OUT [OUT ...]")
    task_files = [l for l in open(os.path.join(outs[0], "tasks.list")).read().splitlines() if l]
    tasks = []
    for f in task_files:
        t = json.load(open(f))
        tasks.append((os.path.basename(f)[:-5], t["solvable"]))
    n_solvable = sum(1 for _, s in tasks if s) * len(outs)
    rows, cells = [], {}
    for p in PASSES:
        if not any(os.path.isdir(os.path.join(o, p)) for o in outs):
            continue
        agg = {"fixed": 0, "fixed_by_correction": 0, "tokens": 0, "corr_tokens": 0, "unsolv_tokens": 0,
               "unsolv_corr_tokens": 0, "programs": 0, "refused": 0, "turns": 0, "secs": 0.0, "done": 0,
               "unsolvable_fixed": 0, "unsolv_if": 0}
        for o in outs:
            d = os.path.join(o, p)
            for tid, solvable in tasks:
                f = os.path.join(d, tid + ".run.json")
                if not os.path.exists(f):
                    continue
                r = run_summary(f)
                agg["done"] += 1
                agg["tokens"] += r["tokens"]
                agg["corr_tokens"] += r["corr_tokens"]
                agg["programs"] += r["programs"]
                agg["refused"] += r["refused"]
                agg["turns"] += r["turns"]
                try:
                    agg["secs"] += float(open(os.path.join(d, tid + ".secs")).read())
                except (OSError, ValueError):
                    pass
                if solvable and r["fixed"]:
                    agg["fixed"] += 1
                    agg["fixed_by_correction"] += int(r["fixed_at"] > 1)
                if not solvable:
                    agg["unsolv_tokens"] += r["tokens"]
                    agg["unsolv_corr_tokens"] += r["corr_tokens"]
                    agg["unsolvable_fixed"] += int(r["fixed"])
                    agg["unsolv_if"] += r["tokens_if_resubmission_stops"]
                if r["fixed"]:
                    cell = f"✓ {r['fixed_at']}"
                else:
                    cell = f"✗ {r['programs'] + r['refused']} ({stop_word(r['reason'])})"
                strat = "".join({"repair": "R", "regenerate": "G"}[s] for s in r["strategies"])
                cell += (f" {strat}" if strat else "") + f", {r['tokens']}"
                cells.setdefault((tid, p), []).append(cell)
        agg["per_k"] = agg["fixed"] * 1000 / agg["tokens"] if agg["tokens"] else 0.0
        rows.append((p, agg))

    print(f"| mode | fixed (of {n_solvable}) | by a correction | tokens | fixed / 1k tokens | "
          "tokens on unsolvable (all turns) | of which correction turns | programs run | "
          "identical resubmissions refused | model turns | wall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p, a in rows:
        partial = "" if a["done"] == len(tasks) * len(outs) else f" (partial: {a['done']} runs)"
        print(f"| {LABEL[p]}{partial} | {a['fixed']} | {a['fixed_by_correction']} | {a['tokens']} | "
              f"{a['per_k']:.2f} | {a['unsolv_tokens']} | {a['unsolv_corr_tokens']} | {a['programs']} | "
              f"{a['refused']} | {a['turns']} | {a['secs'] / 60:.1f} min |")
    print()
    present = [p for p, _ in rows]
    print("Per task: ✓ N = fixed by program N; ✗ N = stopped after N programs (why); "
          "R/G = the correction turns' strategies (repair/regenerate); then the run's tokens"
          + ("; one entry per run, separated by /." if len(outs) > 1 else "."))
    print()
    print("| task | " + " | ".join(LABEL[p] for p in present) + " |")
    print("|---|" + "---|" * len(present))
    for tid, solvable in tasks:
        name = tid + ("" if solvable else " (unsolvable)")
        print(f"| {name} | " + " | ".join(" / ".join(cells.get((tid, p), ["–"])) for p in present) + " |")
    print()

    a = dict(rows)
    fixed_best = [p for p in ("repair", "regenerate") if p in a]
    for ad in ("adaptive-1", "adaptive-2"):
        if ad not in a or not fixed_best:
            continue
        best = max(fixed_best, key=lambda p: a[p]["per_k"])
        ok = a[ad]["per_k"] >= a[best]["per_k"]
        print(f"- {LABEL[ad]}: {a[ad]['per_k']:.2f} fixed / 1k tokens vs best fixed strategy ({best}) "
              f"{a[best]['per_k']:.2f}: {'held' if ok else 'NOT held'}")
        if "blind" in a and a["blind"]["unsolv_tokens"]:
            for key, what in (("unsolv_tokens", "all turns"), ("unsolv_corr_tokens", "correction turns")):
                less = 1 - a[ad][key] / a["blind"][key] if a["blind"][key] else 0.0
                print(f"  - tokens on unsolvable tasks ({what}): {a[ad][key]} vs blind {a['blind'][key]}: "
                      f"{less * 100:.0f}% less (target ≥ 60%): {'held' if less >= 0.6 else 'NOT held'}")
    print()
    print("What-if (not measured, computed from the same journals): tokens on the unsolvable tasks had a "
          "chain stopped at its first identical resubmission (the turn that wrote it counted, nothing after):")
    for p, ag in rows:
        print(f"- {LABEL[p]}: {ag['unsolv_if']} (measured {ag['unsolv_tokens']})")
    for p, ag in rows:
        if ag["unsolvable_fixed"]:
            print(f"- WARNING: {LABEL[p]} passed {ag['unsolvable_fixed']} 'unsolvable' task(s): a check is wrong")


if __name__ == "__main__":
    main()
