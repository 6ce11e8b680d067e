"""Print one Markdown table from pytest-benchmark JSON files (used by bench/gpu_check.sh)."""
import json
import sys

KEYS = ("gbps", "GBps", "gb_per_s", "pct_of_copy", "kernel_pct_of_copy", "speedup", "ratio",
        "reference_s", "fused_s", "copy_gbps")


def main(paths):
    print("| benchmark | median | extra |")
    print("|---|---|---|")
    for p in paths:
        try:
            data = json.load(open(p))
        except (OSError, ValueError) as e:
            print(f"| {p} | (unreadable: {e}) | |")
            continue
        for b in data.get("benchmarks", []):
            med = b["stats"]["median"]
            unit = f"{med * 1e6:.1f} us" if med < 1e-3 else f"{med * 1e3:.3f} ms"
            extra = {k: v for k, v in b.get("extra_info", {}).items()
                     if any(s in k for s in KEYS) and isinstance(v, (int, float))}
            ex = ", ".join(f"{k}={v:.3g}" for k, v in extra.items())
            print(f"| {b['fullname'].split('::')[-1]} | {unit} | {ex} |")


if __name__ == "__main__":
    main(sys.argv[1:])
