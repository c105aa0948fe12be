"""What keeping idle Ray workers for reuse saves: `elo-ray search` (or `run`) on the demo spec
with the local Ray's idle workers kept (elo-ray's IDLE_WORKERS) against Ray's default (as many
as the machine has CPUs; the others end a second after their task).

    python benchmarks/worker_reuse.py --repeat 2                # the demo search, 3 candidates
    python benchmarks/worker_reuse.py --what run --repeat 2     # the demo's five stages

Each run is a fresh `elo-ray` process with a storage root, run id and Ray temp dir of its own,
alternating the two ways (so a shared machine's load falls on both alike); Ray's default is
asked for with RAY_num_workers_soft_limit=-1, which `local_ray.start` leaves as it finds it.
Measured per run: wall seconds of the command, the CPU seconds of its process tree (driver,
Ray and its workers; each process's last sample, so a process's last second is missed), Python
worker processes Ray started (its `worker-*.out` logs), the most idle workers seen at once and
the most memory (PSS) all its Ray worker processes held at once (sampled once a second), and
the held-out perplexities the run wrote, which must be the same both ways.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = "0,-1; 0,1; -2,-1"
WAYS = {"kept": None, "ray default": "-1"}  # RAY_num_workers_soft_limit


def _sample(driver: psutil.Process, stop: threading.Event, peaks: dict) -> None:
    """The most idle Ray workers, and the most memory (PSS: shared pages split between the
    processes that share them) of all Ray worker processes, seen at once; only the command's
    own Ray (the driver's descendants), not another Ray on the machine."""
    cpu = peaks.setdefault("cpu", {})  # (pid, start) -> the last CPU seconds seen
    while not stop.wait(1.0):
        idle = pss = 0
        try:
            procs = [driver, *driver.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                times = p.cpu_times()
                cpu[(p.pid, p.create_time())] = times.user + times.system
                cmd = p.cmdline()
                if cmd and cmd[0].startswith("ray::"):
                    pss += p.memory_full_info().pss
                    idle += cmd[0].startswith("ray::IDLE")
            except psutil.Error:
                pass
        peaks["idle"] = max(peaks.get("idle", 0), idle)
        peaks["pss"] = max(peaks.get("pss", 0), pss)


def _perplexities(root: str, run_id: str, what: str) -> dict:
    """The held-out perplexities the run wrote: per candidate (search) or per model (run)."""
    if what == "search":
        ranking = json.loads(Path(root, run_id, "search", "ranking.json").read_text())
        return {r["name"]: r["merged"] for r in ranking["candidates"]}
    return json.loads(Path(root, run_id, "eval", "perplexity.json").read_text())


def one_run(way: str, what: str, n: int, work: str, log_dir: str | None = None) -> dict:
    root, run_id = f"{work}/runs", f"{what}-{way.replace(' ', '-')}-{n}"
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="r", dir=work), PYTHONPATH=str(ROOT))
    env.pop("RAY_num_workers_soft_limit", None)
    if WAYS[way] is not None:
        env["RAY_num_workers_soft_limit"] = WAYS[way]
    cmd = [sys.executable, "-m", "elo_ray.cli", what, str(ROOT / "jobs/demo.yaml"), "--run-id", run_id,
           "--set", f"storage.root={root}"]
    if what == "search":
        cmd += ["--candidates", CANDIDATES]
    peaks: dict = {}
    stop = threading.Event()
    began = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc:
        sampler = threading.Thread(target=_sample, args=(psutil.Process(proc.pid), stop, peaks), daemon=True)
        sampler.start()
        output = proc.stdout.read()
    wall = time.perf_counter() - began
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{way} run {n} failed ({proc.returncode}):\n{output[-3000:]}")
    # Ray's logs: one worker-*.out per Python worker process it started (session_latest is a link)
    workers = len(glob.glob(f"{env['RAY_TMPDIR']}/ray/session_2*/logs/worker-*.out"))
    if log_dir:
        Path(log_dir, f"{run_id}.log").write_text(output)
    return {"wall_s": wall, "cpu_s": sum(peaks.get("cpu", {}).values()), "workers": workers, "idle": peaks.get("idle", 0), "pss_gib": peaks.get("pss", 0) / 2**30,
            "ppl": _perplexities(root, run_id, what)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("search", "run"), default="search",
                        help="elo-ray search with 3 candidates, or elo-ray run (the demo's five stages)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per way, alternating")
    parser.add_argument("--logs", help="a folder to keep each run's output in")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="wr", dir="/tmp") as work:  # short: Ray's socket paths
        for n in range(args.repeat):
            for way in WAYS:
                runs[way].append(r := one_run(way, args.what, n, work, args.logs))
                print(f"  {way} #{n}: {r['wall_s']:.0f} s, {r['cpu_s']:.0f} CPU-s, {r['workers']} worker processes, "
                      f"{r['idle']} idle at most, {r['pss_gib']:.2f} GiB at most", file=sys.stderr)
    same = all(r["ppl"] == runs["kept"][0]["ppl"] for rs in runs.values() for r in rs)

    def med(way: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[way])

    print(f"elo-ray {args.what} jobs/demo.yaml" + (f' --candidates "{CANDIDATES}"' if args.what == "search" else "")
          + f"; {args.repeat} run(s) per way, medians; same perplexities both ways: {'yes' if same else 'NO'}")
    print("| idle Ray workers | wall s | CPU s | worker processes started | idle workers at most | Ray workers' memory (PSS) at most, GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for way in WAYS:
        name = "kept (elo-ray's local Ray)" if way == "kept" else "Ray's default (one per CPU)"
        print(f"| {name} | {med(way, 'wall_s'):.0f} | {med(way, 'cpu_s'):.0f} | {med(way, 'workers'):.0f} | {med(way, 'idle'):.0f} | "
              f"{med(way, 'pss_gib'):.2f} |")
    print(f"| kept / default | {med('kept', 'wall_s') / med('ray default', 'wall_s'):.2f}x | "
          f"{med('kept', 'cpu_s') / med('ray default', 'cpu_s'):.2f}x | "
          f"{med('kept', 'workers') / med('ray default', 'workers'):.2f}x | | "
          f"{med('kept', 'pss_gib') / med('ray default', 'pss_gib'):.2f}x |")
    if not same:
        raise SystemExit("the two ways wrote different perplexities")


if __name__ == "__main__":
    main()
