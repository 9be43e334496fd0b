"""The closing table of bench/gpu_session.sh: every stage's numbers next to the issues' targets.

    python bench/session_table.py OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys

# (target, anchor measured on an H100 80GB, 2026-11-26)
DALI_BYOL2_MIX_TARGET = 20_000      # issue 3: 1.25x the solo-learn-style DALI anchor (16,103 img/s, no mixing)
E2E_VIT_S_TARGET = 3_400            # issue 6: ViT-S/16 SDMP-MoCo from JPEG, batch 256
E2E_RATIO_TARGET = 0.95             # issue 6: end to end / same trainer on synthetic device data


def load(out: str, name: str):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def dali_rows(doc) -> None:
    print("DALI loaders (img/s, samples with all their views; x = ratio to the solo-learn-style baseline of the "
          "same recipe and crop filter, same run):")
    # keyed by (recipe, interpolation): a -bilinear row set against the bicubic baseline mixed two filters
    base = {(r["config"].partition("-")[0], r.get("interpolation")): r["img_per_s"] for r in doc["records"]
            if r.get("baseline") and r.get("recipe") and r.get("img_per_s")}
    for r in doc["records"]:
        if "error" in r:
            print(f"  {r['config']:<24} FAILED {r['error']}")
            continue
        line = f"  {r['config']:<24} B={r['batch_size']:<4} {r['img_per_s']:>10,.0f}"
        if r.get("gpu_used_mb") is not None:
            line += f"  ({r['gpu_used_mb'] / 1024:.1f} GiB on the device)"
        key = (r["config"].partition("-")[0], r.get("interpolation"))
        if key in base and not r.get("baseline"):
            line += f"  {r['img_per_s'] / base[key]:5.2f}x"
        if r["config"].startswith("byol2-") and r.get("mixing"):
            line += f"   >= {DALI_BYOL2_MIX_TARGET:,}: {verdict(r['img_per_s'] >= DALI_BYOL2_MIX_TARGET)}"
        print(line)


def e2e_rows(name: str, doc, targets: bool) -> None:
    print(f"{name} (img/s; ratio = end to end / synthetic device data, same step mode):")
    for r in doc["records"]:
        ratio = r.get("ratio_to_synthetic_same_mode")
        # the loader column fits every backend's name ("torchvision" ran into "B=" at 10)
        line = (f"  {r['run']:<10}{r['mode']:<8}{r.get('loader', ''):<12}B={r['batch_size']:<4}"
                f"{r['img_per_s']:>9,.0f}" + (f"   ratio {ratio:.2f}" if ratio is not None else ""))
        if targets and r["run"] == "e2e":
            line += (f"   >= {E2E_VIT_S_TARGET:,}: {verdict(r['img_per_s'] >= E2E_VIT_S_TARGET)}; "
                     f">= {E2E_RATIO_TARGET}x: {verdict((ratio or 0) >= E2E_RATIO_TARGET)}")
        print(line)


def kernel_lines(out: str) -> None:
    for sub in ("kernels", "kernels_bench"):
        path = os.path.join(out, sub, "summary.txt")
        if not os.path.exists(path):
            continue
        keep = [ln.rstrip() for ln in open(path)
                if any(k in ln for k in ("passed", "failed", "FAILED", "ERROR SUMMARY", "PASS", "MISS", "BUILD"))]
        print(f"kernels ({sub}):")
        for ln in keep[-14:]:
            print("  " + ln.strip())


def main(out: str) -> int:
    env = os.path.join(out, "env.txt")
    if os.path.exists(env):
        print("device: " + open(env).readline().strip())
    kernel_lines(out)
    doc = load(out, "gpu_dali.json")
    if doc:
        dali_rows(doc)
    for name, targets in (("e2e_vit_s", True), ("e2e_vit_s_compile", True), ("e2e_vit_b", False),
                          ("e2e_dino_s", False)):
        doc = load(out, f"{name}.json")
        if doc:
            e2e_rows(name, doc, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")))
