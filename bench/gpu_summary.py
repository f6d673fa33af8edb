"""One table from a gpu_check.sh run: model-only vs embed_shard end to end per model, against issue 14's goals,
the feeder alone, and the fallback check. Reads the JSON the benches wrote into a folder; prints; not a test.

    python3 bench/gpu_summary.py "$OUT" [fallback_rc [nvimgcodec_fallback_rc]]
"""

from __future__ import annotations

import glob
import json
import os
import sys

# issue 14: end to end >= 0.8x model-only (ResNet-50 >= 11k img/s on an H100/H200), ResNet-18 >= 20k img/s
GOALS = {"resnet50": (0.8, 11_000.0), "resnet18": (0.0, 20_000.0)}
MODEL_ONLY = "a model-only (preloaded pixels)"
END_TO_END = "d embed_shard end to end"
VERDICTS = {"0": "passed", "skipped": "SKIPPED"}  # a fallback check's exit code, or gpu_check.sh's "skipped"
SWEEP = "d sweep "  # embed_bench --sweep rows


def rows(folder: str) -> list[tuple[str, str, str, str, str]]:
    """(what, img/s, x model-only, goal, verdict) rows from the JSON files in `folder`."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "embed_bench_*.json"))):
        with open(path) as f:
            report = json.load(f)
        env, got = report["env"], report["rows"]
        model = env["model"]
        m = got.get(MODEL_ONLY, {}).get("img_s", float("nan"))
        d = got.get(END_TO_END, {}).get("img_s", float("nan"))
        ratio, floor = GOALS.get(model, (0.0, 0.0))
        # partial: the bench was stopped (a step's timeout) after these rows; the rest were never measured
        marks = [("_pil" in os.path.basename(path), " PIL decode"), (env.get("mixed"), " mixed sizes"),
                 (env.get("partial"), " (partial)")]  # fmt: skip
        label = f"{model} {env['precision']}" + "".join(mark for on, mark in marks if on)
        goal = f">= {ratio:.1f}x and >= {floor:,.0f}" if ratio else f">= {floor:,.0f}" if floor else "(no goal)"
        out.append((f"{label}: model-only", f"{m:,.0f}", "1.00", "", ""))
        # end to end at the defaults, then the sweep's other settings (assembly workers, nvImageCodec), judged alike
        runs = [("embed_shard", d)] + [(name[len(SWEEP) :], row.get("img_s", float("nan")))
                                       for name, row in got.items() if name.startswith(SWEEP)]  # fmt: skip
        for what, s in runs:
            if not floor:
                verdict = ""
            elif s != s:  # NaN: the row never ran
                verdict = "not measured"
            else:
                verdict = "met" if s >= floor and s >= ratio * m else "MISSED"
            out.append((f"{label}: {what}"[:64], f"{s:,.0f}", f"{s / m:.2f}" if m else "-", goal, verdict))
    for path in sorted(glob.glob(os.path.join(folder, "feeder_bench_*.json"))):
        with open(path) as f:
            for setting, row in json.load(f).items():
                cpu = f"{1000 * row['cpu_per_img']:.3f} ms CPU/img"
                out.append((f"feeder only (no model) {setting}", f"{row['img_s']:,.0f}", "", cpu, ""))
    return out


def main(argv: list[str]) -> int:
    folder = argv[0]
    table = rows(folder)
    for name, rc in zip(("nvjpeg fallback check", "nvimgcodec fallback check"), argv[1:]):
        if rc != "":  # "": that check was not run (nvImageCodec not installed)
            table.append((name, "", "", "same outcome as PIL", VERDICTS.get(rc, "FAILED")))
    print(f"{'':64} {'img/s':>9} {'x model':>8}  {'goal':28} verdict")
    for what, rate, ratio, goal, verdict in table:
        print(f"{what:64} {rate:>9} {ratio:>8}  {goal:28} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
