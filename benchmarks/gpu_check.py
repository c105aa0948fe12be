"""One command that proves elo-ray's GPU path: the whole pipeline through Ray, then throughput.

    python benchmarks/gpu_check.py                  # one GPU: the 1B pipeline and the 1b/8b throughput
    python benchmarks/gpu_check.py --device cpu     # the CPU-sized variant, a couple of minutes

On a GPU host without Ray, unpack the offline archive (scripts/offline_archive.py) first:

    tar -xJf .offline/elo-ray-offline-cp312.tar.xz -C /tmp
    export PYTHONPATH=/tmp/elo-ray-offline/site:$PWD PATH=/tmp/elo-ray-offline/bin:$PATH

What it does, in one run on one device:
0. On a GPU, liger-kernel's fused linear cross-entropy against elo-ray's chunked one (loss and
   gradients); where it fails or differs, every part below uses the chunked loss instead.
1. Pipeline. A byte-level BPE tokenizer trained on the bundled corpus and a Llama-shaped model
   built from a config with random weights (on cuda: 16 layers, hidden 2048, ffn 8192, GQA 32/8,
   about 1B parameters, stored in bf16), then `elo-ray run` of pretrain (layers 0 and 15),
   merge, align, instruct and eval on the bundled English/Korean corpus, one Ray Train worker
   (`use_gpu: true`, bf16 on cuda). Each stage's manifest is read back and checked: committed,
   its outputs listed with sizes, its model a HF checkpoint, its training metrics finite.
2. Throughput (benchmarks/throughput.py): bare PyTorch vs the engine's step without Ray (core)
   vs run_training with one Ray Train worker fed by Ray Data (engine), at the 1b shape for
   ELO, full and LoRA, and at the 8b shape for ELO with the step's options side by side
   (the plain loss with FSDP-sharded frozen parameters, as before the faster step; the chunked
   loss; compiled layers): tokens/s, MFU (bf16 dense peak) and peak memory.
3. A results table, printed and written as results.md and results.json with the device, driver,
   torch and Ray versions, and the issue's three goals checked.

Every part is reported, not fatal: a pipeline that fails or runs past --pipeline-timeout is
stopped with its Ray and the throughput part still runs; the throughput rows run in the order of
the preset (the goals' rows first) and none begins after --deadline; results.json and results.md
are rewritten after each part and row, so a run stopped from outside keeps what it measured.
The exit status is 1 when the pipeline failed.

Outputs go to $OUT when set (the device tool brings them back), else results/gpu_check/; work
files (models, runs) to a temporary directory, or --workdir. The CPU variant runs the same code
on tiny shapes in a couple of minutes, so that this script cannot rot unnoticed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import throughput  # noqa: E402

STAGES = ("pretrain", "merge", "align", "instruct", "eval")
# What each device runs. model: the pipeline's base model; runs: (shape, methods, implementations),
# in the order they run: what the goals need first, so that a run cut short by --deadline
# still has them.
PRESETS = {
    "cuda": {
        "model": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=2048, vocab=8192),
        "seq_len": 512, "micro_batch": 4, "align_tokens": 200_000, "steps": 14, "warmup": 2, "threads": 8,
        "pipeline_timeout": 330,
        "runs": [
            ("8b", ["elo"], ["bare", "core", "engine"]),
            ("1b", ["elo", "full"], ["bare", "core", "engine"]),
            ("8b", ["elo"], ["core+loss=plain+frozen_params=shard", "core+loss=chunked", "core+compile_layers=true"]),
            ("1b", ["lora"], ["bare", "core", "engine"]),
        ],
    },
    "cpu": {
        "model": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, vocab=1024),
        "seq_len": 64, "micro_batch": 4, "align_tokens": 4_000, "steps": 4, "warmup": 2, "threads": 1,
        "pipeline_timeout": 1500,
        "runs": [
            ("tiny", ["elo", "full"], ["bare", "core"]),
            ("tiny", ["elo"], ["engine", "core+loss=plain+frozen_params=shard"]),
        ],
    },
}
# The goals for the GPU (benchmarks/README.md).
GOALS = {"engine_vs_bare_8b_elo": 0.95, "mfu_8b_elo": 0.45, "speedup_vs_analytic_1b": 0.95}


# --------------------------------------------------------------------------- 1. the pipeline


def build_base(path: Path, preset: dict, device: torch.device) -> dict:
    """Tokenizer trained on the bundled corpus and a random-init Llama of the preset's shape; one
    built earlier in the same --workdir for the same preset is reused (written last: complete)."""
    import transformers

    marker = path / "gpu-check-base.json"
    if marker.is_file() and json.loads(marker.read_text())["model"] == preset["model"]:
        return json.loads(marker.read_text())["base"]

    from elo_ray.builtin import corpus_texts
    from elo_ray.tiny import train_tokenizer

    dims = dict(preset["model"])
    tokenizer = train_tokenizer(corpus_texts(), vocab_size=dims.pop("vocab"))
    config = transformers.LlamaConfig(
        **dims, vocab_size=len(tokenizer), head_dim=dims["hidden_size"] // dims["num_attention_heads"],
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    base = {"params": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "dtype": str(dtype).removeprefix("torch.")}
    del model
    marker.write_text(json.dumps({"model": preset["model"], "base": base}))
    return base


def job_spec(base: Path, storage_root: Path, preset: dict, device: torch.device, loss: str = "auto") -> dict:
    """The pipeline's spec: every stage, one worker, the bundled corpus."""
    seq, micro = preset["seq_len"], preset["micro_batch"]
    train = {"micro_batch_size": micro, "log_every": 2, "checkpoint_every": 1000, "loss": loss, "precision":
             "bf16" if device.type == "cuda" else "fp32"}
    resources = {"num_workers": 1, "use_gpu": device.type == "cuda",
                 "cpus_per_worker": 2 if device.type == "cuda" else 0.5}
    if device.type == "cuda":
        resources["gpu_type"] = gpu_type()
    corpus = [{"uri": "builtin:corpus/en.jsonl", "language": "en"}, {"uri": "builtin:corpus/ko.jsonl", "language": "ko"}]
    chats = [{"uri": "builtin:corpus/chat_en.jsonl", "language": "en", "text_field": "messages"},
             {"uri": "builtin:corpus/chat_ko.jsonl", "language": "ko", "text_field": "messages"}]
    return {
        "run_id": "gpu-check",
        "storage": {"root": str(storage_root)},
        "model": {"base": str(base)},
        "resources": resources,
        "pretrain": {"layers": [0, -1], "data": {"sources": corpus, "weights": {"en": 1, "ko": 9}, "seq_len": seq,
                                                  "epochs": 1, "heldout_docs": 8},
                     "train": {**train, "lr": 1e-4, "warmup_steps": 2}},
        "merge": {},
        "align": {"max_tokens": preset["align_tokens"], "train": {**train, "lr": 1e-5}},
        "instruct": {"data": {"sources": chats, "seq_len": seq, "heldout_docs": 2}, "train": {**train, "lr": 1e-5}},
        "eval": {"max_docs": 4},
    }


def gpu_type() -> str:
    """The spec's gpu_type for this GPU (validate checks memory against it)."""
    name = torch.cuda.get_device_name()
    for fragment, spec_name in (("H200", "H200-141GB"), ("H100", "H100-80GB"), ("A100", "A100-80GB"), ("L4", "L4-24GB")):
        if fragment in name:
            return spec_name
    return "A100-80GB"


def check_manifests(run_uri: str) -> list[dict]:
    """Each stage's manifest, read back and checked; raises naming the first stage that fails."""
    from elo_ray import manifest, storage

    rows = []
    for stage in STAGES:
        m = manifest.read(storage.join(run_uri, stage))
        if m is None:
            raise RuntimeError(f"stage {stage}: no manifest under {run_uri}/{stage}: it did not commit")
        problems = []
        if m.status != "complete" or m.stage != stage:
            problems.append(f"status {m.status!r}, stage {m.stage!r}")
        if not m.outputs or any(o.get("size", 1) <= 0 for o in m.outputs if "size" in o):
            problems.append(f"outputs {m.outputs[:3]}")
        model = m.uris.get("model")
        if stage != "eval" and (model is None or not storage.exists(storage.join(model, "config.json"))):
            problems.append(f"model {model!r} is not a HF checkpoint")
        row = {"stage": stage, "seconds": m.metrics.get("seconds"), "outputs": len(m.outputs)}
        if stage in ("pretrain", "align", "instruct"):
            row.update({k: m.metrics.get(k) for k in ("loss", "tokens_total", "tokens_per_s", "mfu", "peak_memory_gb")})
            if not (isinstance(row["loss"], float) and math.isfinite(row["loss"]) and row["tokens_total"]):
                problems.append(f"loss {row['loss']}, tokens {row['tokens_total']}")
        if stage == "eval":
            row["perplexity"] = m.metrics.get("perplexity")
            if not row["perplexity"] or not all(math.isfinite(v) for r in row["perplexity"].values() for v in r.values()):
                problems.append(f"perplexity {row['perplexity']}")
        if problems:
            raise RuntimeError(f"stage {stage}: manifest check failed: " + "; ".join(problems))
        rows.append(row)
    return rows


def run_pipeline(work: Path, out: Path, preset: dict, device: torch.device, timeout: float, loss: str) -> dict:
    """Build the base model, run `elo-ray run` on it (stopped with its local Ray after `timeout`
    seconds), check every manifest."""
    import signal

    import yaml

    began = time.perf_counter()
    base = build_base(work / "base", preset, device)
    built = time.perf_counter() - began
    spec_path = work / "gpu-check.yaml"
    spec_path.write_text(yaml.safe_dump(job_spec(work / "base", work / "runs", preset, device, loss), sort_keys=False))
    log_path = out / "pipeline.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    began_run = time.perf_counter()
    with open(log_path, "w") as log:
        # Its own process group, so that a run past its time is stopped with the Ray it started.
        # --verbose --debug: Ray's own lines and the traceback, should a stage fail where nobody watches.
        proc = subprocess.Popen([sys.executable, "-m", "elo_ray.cli", "run", str(spec_path), "--verbose", "--debug"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout - built, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    seconds = time.perf_counter() - began_run
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        what = f"stopped after {seconds:.0f} s (--pipeline-timeout)" if code is None else f"exited {code}"
        raise RuntimeError(f"elo-ray run {what}; the end of {log_path.name}:\n" + "\n".join(tail))
    return {"base_model": base, "build_seconds": built, "run_seconds": seconds, "loss": loss,
            "stages": check_manifests(str(work / "runs" / "gpu-check"))}


def disk_free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 2**30


def check_liger(device: torch.device) -> dict:
    """liger-kernel's fused linear cross-entropy against elo-ray's chunked one on random bf16
    data of the 8b head's width: loss and gradients, and whether liger may serve `loss: auto`."""
    from elo_ray.train import loss as loss_lib

    if not loss_lib.liger_available():
        return {"ok": False, "why": "liger-kernel is not installed"}
    torch.manual_seed(0)
    hidden = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(128256, 4096, device=device) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, 128256, (4096,), device=device)
    targets[::7] = loss_lib.IGNORE_INDEX
    found = {}
    try:
        for impl in ("chunked", "liger"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            torch.cuda.synchronize()
            began = time.perf_counter()
            loss = (loss_lib._liger(h, w, targets, None) if impl == "liger"
                    else loss_lib.linear_cross_entropy(h, w, targets, 1024, None))
            loss.backward()
            torch.cuda.synchronize()
            found[impl] = (loss.detach().float(), h.grad.float(), w.grad.float(), time.perf_counter() - began)
    except Exception as e:  # a kernel that does not build or run here: the chunked loss serves instead
        return {"ok": False, "why": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    (l0, h0, w0, t0), (l1, h1, w1, t1) = found["chunked"], found["liger"]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    out = {"loss_rel": abs(float(l1 - l0)) / abs(float(l0)), "grad_hidden_rel": rel(h1, h0),
           "grad_weight_rel": rel(w1, w0), "chunked_s": t0, "liger_s": t1}
    out["ok"] = out["loss_rel"] < 1e-3 and out["grad_hidden_rel"] < 2e-2 and out["grad_weight_rel"] < 2e-2
    if not out["ok"]:
        out["why"] = "liger's loss or gradients differ from the chunked loss's beyond bf16 rounding"
    return out


# --------------------------------------------------------------------------- 2. throughput


def without_liger(runs: list) -> list:
    """The preset's runs with the chunked loss where `loss: auto` would take liger."""
    pin = lambda i: i if i == "bare" or "loss=" in i else f"{i}+loss=chunked"  # noqa: E731
    return [(shape, methods, [pin(i) for i in impls]) for shape, methods, impls in runs]


def run_throughput(work: Path, preset: dict, device: torch.device, runs: list, deadline: float | None,
                   on_row) -> list[dict]:
    """Every (shape, methods, implementations) of `runs`, one row at a time, through
    benchmarks/throughput.py; rows not begun by `deadline` (a perf_counter time) are skipped.
    `on_row(results)` after each row. Ray starts before the first engine row."""
    args = argparse.Namespace(device=device.type, steps=preset["steps"], warmup=preset["warmup"],
                              threads=preset["threads"], repeat=1)
    shapes: dict[str, dict] = {}
    ray_started = False

    def results() -> list[dict]:
        out = []
        for shape, e in shapes.items():
            out.append({"shape": shape, "impls": e["impls"], "seconds": e["seconds"], "skipped": e["skipped"],
                        "table": throughput.table(shape, throughput.SHAPES[shape], e["rows"], e["impls"], device.type,
                                                  preset["threads"]) if e["rows"] else "",
                        **throughput.to_json(shape, device.type, e["rows"])})
        return out

    try:
        for shape, methods, impls in runs:
            entry = shapes.setdefault(shape, {"rows": {}, "impls": [], "seconds": 0.0, "skipped": []})
            (work / shape).mkdir(parents=True, exist_ok=True)  # each shape its own saved models
            for method in methods:
                for impl in impls:
                    if deadline is not None and time.perf_counter() > deadline:
                        entry["skipped"].append(f"{impl} {method}")
                        continue
                    if impl.startswith("engine") and not ray_started:
                        throughput.start_ray(preset["threads"])
                        ray_started = True
                    began = time.perf_counter()
                    result = throughput.measure(impl, throughput.SHAPES[shape], method, args, str(work / shape), 0)
                    throughput.merge(entry["rows"], (impl, method), result)
                    if impl.startswith("engine"):  # its final checkpoint and export (1b full: ~17 GB)
                        for done in ("runs", f"out-{method}"):
                            shutil.rmtree(work / shape / done, ignore_errors=True)
                    entry["seconds"] += time.perf_counter() - began
                    if impl not in entry["impls"]:
                        entry["impls"].append(impl)
                    on_row(results())
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    return results()


# --------------------------------------------------------------------------- 3. the report


def versions(device: torch.device) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("ray", "transformers", "peft", "liger_kernel"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    if device.type == "cuda":
        out["device"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            out["driver"] = None
    else:
        out["device"] = f"cpu ({os.cpu_count()} cores)"
    return out


def row(results: list[dict], shape: str, impl: str, method: str) -> dict | None:
    for r in results:
        if r["shape"] == shape:
            for x in r["rows"]:
                if x["impl"] == impl and x["method"] == method and "error" not in x:
                    return x
    return None


def goals(results: list[dict]) -> list[dict]:
    """The issue's three goals, from the 8b and 1b rows (GPU presets only)."""
    out = []
    bare8, engine8, core8 = (row(results, "8b", i, "elo") for i in ("bare", "engine", "core"))
    if bare8 and engine8:
        ratio = engine8["tokens_per_s"] / bare8["tokens_per_s"]
        out.append({"goal": "engine ELO tok/s / bare's at 8b", "value": ratio, "target": GOALS["engine_vs_bare_8b_elo"]})
    best = max((x for x in (core8, engine8) if x and x.get("mfu") is not None), key=lambda x: x["mfu"], default=None)
    if best:
        out.append({"goal": f"ELO step MFU at 8b ({best['impl']})", "value": best["mfu"], "target": GOALS["mfu_8b_elo"]})
    for impl in ("bare", "core", "engine"):
        elo, full = row(results, "1b", impl, "elo"), row(results, "1b", impl, "full")
        if elo and full:
            analytic = full["flops_per_token"] / elo["flops_per_token"]
            out.append({"goal": f"ELO/full speed-up / analytic at 1b ({impl})",
                        "value": elo["tokens_per_s"] / full["tokens_per_s"] / analytic,
                        "target": GOALS["speedup_vs_analytic_1b"]})
    for g in out:
        g["met"] = g["value"] >= g["target"]
    return out


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [f"# gpu_check on {v['device']}", "",
             "versions: " + ", ".join(f"{k} {v[k]}" for k in v if k != "device" and v[k]), ""]
    liger = report.get("liger")
    if liger:
        lines += ["liger-kernel's fused linear cross-entropy vs the chunked loss (4096 tokens, hidden 4096, vocab "
                  "128256, bf16): " + (f"loss {liger['loss_rel']:.1e}, grad hidden {liger['grad_hidden_rel']:.1e}, "
                                       f"grad head {liger['grad_weight_rel']:.1e} relative; forward+backward "
                                       f"{1e3 * liger['liger_s']:.0f} ms vs {1e3 * liger['chunked_s']:.0f} ms "
                                       "(first call, compile included); " if "loss_rel" in liger else "")
                  + ("used by loss: auto" if liger["ok"] else f"NOT used, the chunked loss serves: {liger['why']}"), ""]
    if report.get("pipeline_error"):
        lines += ["## Pipeline: FAILED", "", "```", report["pipeline_error"], "```", ""]
    p = report.get("pipeline")
    if p:
        b = p["base_model"]
        lines += [f"## Pipeline: `elo-ray run`, one worker, {b['params'] / 1e9:.2f}B-parameter Llama "
                  f"(vocab {b['vocab_size']}, {b['dtype']}), built in {p['build_seconds']:.0f} s, run in "
                  f"{p['run_seconds']:.0f} s (loss: {p['loss']}); every manifest checked", "",
                  "| stage | s | loss | tokens | tok/s | MFU | peak GiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for s in p["stages"]:
            fmt = lambda k, f: (f.format(s[k]) if s.get(k) is not None else "")  # noqa: E731
            mfu = f"{100 * s['mfu']:.1f}%" if s.get("mfu") is not None else ""
            lines.append(f"| {s['stage']} | {fmt('seconds', '{:.0f}')} | {fmt('loss', '{:.3f}')} | "
                         f"{fmt('tokens_total', '{:,}')} | {fmt('tokens_per_s', '{:,.0f}')} | {mfu} | "
                         f"{fmt('peak_memory_gb', '{:.1f}')} |")
        ev = next(s for s in p["stages"] if s["stage"] == "eval")
        lines += ["", "held-out perplexity: " + "; ".join(
            f"{model} " + ", ".join(f"{lang} {ppl:,.0f}" for lang, ppl in langs.items())
            for model, langs in ev["perplexity"].items()), ""]
    for r in report.get("throughput", []):
        lines += [f"## Throughput, shape {r['shape']} ({r['seconds']:.0f} s)", "", r["table"], ""]
        if r["skipped"]:
            lines += ["not run (past --deadline): " + ", ".join(r["skipped"]), ""]
    if report.get("goals"):
        lines += ["## Goals", ""] + [f"- {g['goal']}: {g['value']:.3f} (goal >= {g['target']}): "
                                     f"{'met' if g['met'] else 'MISSED'}" for g in report["goals"]]
    lines += ["", f"total {report['seconds']:.0f} s", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results" / "gpu_check"),
                        help="where results.md, results.json and pipeline.log go (default $OUT, else results/gpu_check)")
    parser.add_argument("--workdir", help="models and runs (default: a temporary directory, removed after); "
                                             "a rerun with the same one reuses the base model and committed stages")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: liger, pipeline, throughput")
    parser.add_argument("--deadline", type=float, help="seconds after the start past which no throughput row "
                        "begins (the rest are listed as not run); the pipeline gets at most this long too")
    parser.add_argument("--pipeline-timeout", type=float, help="seconds before `elo-ray run` is stopped "
                        "(default: the preset's, 330 on cuda)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU here: use --device cpu for the CPU-sized variant")
    preset = PRESETS[device.type]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = {s for s in args.skip.split(",") if s}
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    report = {"versions": versions(device), "preset": device.type}
    began = time.perf_counter()
    deadline = began + args.deadline if args.deadline else None

    def save() -> None:  # after every part and row: a run stopped from outside keeps what it measured
        report["seconds"] = time.perf_counter() - began
        (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "results.md").write_text(markdown(report))

    runs, loss = preset["runs"], "auto"
    if device.type == "cuda" and "liger" not in skip:
        report["liger"] = check_liger(device)
        print(f"liger: {report['liger']}", flush=True)
        if not report["liger"]["ok"]:
            runs, loss = without_liger(runs), "chunked"
        save()
    with tempfile.TemporaryDirectory(prefix="elo-ray-gpu-check-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "pipeline" not in skip:
            timeout = args.pipeline_timeout or preset["pipeline_timeout"]
            if deadline is not None:
                timeout = min(timeout, deadline - time.perf_counter())
            try:
                report["pipeline"] = run_pipeline(work, out, preset, device, timeout, loss)
                print(f"pipeline: every stage committed and checked in {report['pipeline']['run_seconds']:.0f} s",
                      flush=True)
            except Exception as e:  # reported; the throughput part still runs
                report["pipeline_error"] = f"{type(e).__name__}: {e}"
                print(f"pipeline FAILED: {report['pipeline_error']}", flush=True)
            if not args.workdir:  # its checkpoints (1B with optimizer state: ~13 GB a training stage) go
                shutil.rmtree(work / "runs", ignore_errors=True)
            report["disk_free_gb_after_pipeline"] = disk_free_gb(work)
            save()
        if "throughput" not in skip:
            (work / "throughput").mkdir(exist_ok=True)

            def on_row(results):
                report["throughput"] = results
                report["goals"] = goals(results)
                save()

            report["throughput"] = run_throughput(work / "throughput", preset, device, runs, deadline, on_row)
            report["goals"] = goals(report["throughput"])
        save()
    print(markdown(report))
    return 1 if report.get("pipeline_error") else 0


if __name__ == "__main__":
    sys.exit(main())
