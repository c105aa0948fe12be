"""What a local Ray costs to start with and without its dashboard (which serves the State API).

    python benchmarks/ray_start.py --repeat 3

Each start runs in a fresh Python process, alternating the two ways, and starts Ray as
`elo-ray run` does without a cluster (`local_ray.start`, called by `stages.ensure_ray`) with
`num_cpus=2, log_to_driver=False` and the dashboard off or on. Measured per start: the seconds
`ray.init` took, whether the State API answers (Ray Train's placement-group cleaner polls it
once a second; without it the cleaner logs a warning each time and cannot clean up after a dead
controller), the CPU seconds the driver and every Ray process used while Ray sat idle for a few
seconds after that (what Ray costs a shared machine while nothing runs), then the memory of them
all: resident set (RSS) and unique set (USS, memory no other process shares), and how long
`ray.shutdown` took. The table shows medians of the starts
that came up, and how many did not (Ray gives its raylet 30 s to register and its dashboard
RAY_DASHBOARD_STARTUP_TIMEOUT_S, 60 s by default, which a loaded machine can miss).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import psutil, ray
sys.path.insert(0, sys.argv[3])
from elo_ray import local_ray
dashboard = sys.argv[1] == "1"
began = time.perf_counter()
local_ray.start(dashboard=dashboard, num_cpus=2, log_to_driver=False)
init_s = time.perf_counter() - began
try:
    from ray.util.state import list_nodes
    list_nodes(timeout=10)
    state_api = True
except Exception:
    state_api = False
me = psutil.Process()

def cpu_s(procs):
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total

procs = [me, *me.children(recursive=True)]
before = cpu_s(procs)
time.sleep(float(sys.argv[2]))
idle_cpu_s = cpu_s(procs) - before
procs = [me, *me.children(recursive=True)]
rss = uss = 0
for p in procs:
    try:
        info = p.memory_full_info()
        rss, uss = rss + info.rss, uss + info.uss
    except psutil.Error:
        pass
began = time.perf_counter()
ray.shutdown()
print(json.dumps({"init_s": init_s, "state_api": state_api, "processes": len(procs), "idle_cpu_s": idle_cpu_s,
                  "rss_mib": rss / 2**20, "uss_mib": uss / 2**20,
                  "shutdown_s": time.perf_counter() - began}))
"""


def start(dashboard: bool, settle_s: float) -> dict | None:
    """One start's figures, or None when Ray did not come up (on a loaded machine its raylet or
    dashboard can miss Ray's start-up deadlines)."""
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if dashboard else "0", str(settle_s), str(ROOT)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(f"  dashboard={dashboard}: start failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="starts per way, alternating")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds Ray sits idle after ray.init (its CPU use measured) before measuring memory")
    args = parser.parse_args()
    runs: dict[bool, list[dict]] = {False: [], True: []}
    failed = {False: 0, True: 0}
    while any(len(r) < args.repeat for r in runs.values()) and sum(failed.values()) < 4 * args.repeat:
        for dashboard in (False, True):
            if len(runs[dashboard]) < args.repeat:
                figures = start(dashboard, args.settle)
                if figures is None:
                    failed[dashboard] += 1
                else:
                    runs[dashboard].append(figures)
                    print(f"  dashboard={dashboard}: {figures}", file=sys.stderr)

    def med(dashboard: bool, key: str) -> float:
        values = [r[key] for r in runs[dashboard]]
        return statistics.median(values) if values else float("nan")

    print(f"| local Ray | starts (failed) | ray.init s | State API | processes | idle CPU s / {args.settle:g} s "
          "| RSS MiB | USS MiB | shutdown s |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for dashboard, name in ((False, "include_dashboard=False"), (True, "include_dashboard=True")):
        api = "/".join(sorted({"yes" if r["state_api"] else "no" for r in runs[dashboard]}))
        print(f"| {name} | {len(runs[dashboard])} ({failed[dashboard]}) | {med(dashboard, 'init_s'):.1f} | {api} | "
              f"{med(dashboard, 'processes'):.0f} | {med(dashboard, 'idle_cpu_s'):.2f} | {med(dashboard, 'rss_mib'):.0f} | {med(dashboard, 'uss_mib'):.0f} | "
              f"{med(dashboard, 'shutdown_s'):.1f} |")
    print(f"| dashboard / none | | {med(True, 'init_s') / med(False, 'init_s'):.2f}x | | | "
          f"{med(True, 'idle_cpu_s') / med(False, 'idle_cpu_s'):.2f}x | "
          f"{med(True, 'rss_mib') / med(False, 'rss_mib'):.2f}x | {med(True, 'uss_mib') / med(False, 'uss_mib'):.2f}x | |")


if __name__ == "__main__":
    main()
