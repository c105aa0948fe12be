"""Training throughput and peak memory: ELO pretraining vs full fine-tuning vs LoRA, each two ways.

    python benchmarks/throughput.py --repeat 2             # CPU: bare loop and engine, one table
    python benchmarks/throughput.py --bare-only --device cuda --shape 8b   # a lent GPU, no Ray
    python benchmarks/throughput.py --impl bare,core --device cuda --shape 1b
    python benchmarks/throughput.py --impl bare,core,core+loss=plain+frozen_params=shard --methods elo
    python benchmarks/gpu_check.py           # on a GPU: this at 1b and 8b, engine included, and the pipeline

Three implementations of the same training step on the same shapes, trainable parameters,
AdamW, loss (summed CE / label tokens), clipping and per-step loss sync:
- bare:   a single-process PyTorch loop: the reference for what the hardware gives (bf16
          autocast with fp32 master weights on GPU, fp32 on CPU);
- core:   the engine's step without Ray: `elo_ray.train.model.build` (FSDP2 on a one-rank process
          group, bf16 MixedPrecisionPolicy on GPU), `optim.build_optimizer`, `step.train_step` and
          `step.check_batches`, weights loaded from a saved checkpoint (needs pydantic);
- engine: `run_training` with ONE Ray Train worker: the core plus Ray Train, Ray Data rows through
          the `BatchReader` path and metric reports (checkpoint and export at the end not timed).
`core` separates what FSDP2 costs from what Ray and the data path cost. Token rows are random:
tokenizing is the data plane's cost (its own benchmark). core and engine take TrainConfig settings
after a `+` (`core+loss=plain+frozen_params=shard`: the step as it was before the chunked loss and
the frozen parameters outside FSDP), so that variants of the step run side by side in one table.
On a GPU the table has MFU (bf16 dense peak, `elo_ray.train.metrics.PEAK_TFLOPS`).

Throughput: tokens/s of the best interval of `--warmup` steps after the first (the engine's
metric intervals; the others time the same intervals): the best interval is what the code does
when nothing else runs. On CPU also tokens per CPU-second of the training process (median
interval; the engine's from its `worker_cpu_s` metric, so Ray's threads in the worker count):
on a machine shared with other work wall time swings by 2x while CPU time barely moves. Peak memory:
on GPU the allocator's peak; on CPU the process's peak resident set (the engine's worker process
also holds Ray). The analytic FLOP ratio comes from `elo_ray.train.metrics.train_flops_per_token`.

Goals (issue 15, on an H100/H200, in one run of benchmarks/gpu_check.py): the engine's ELO tokens/s
at the 8b shape >= 0.95 of bare's; ELO step MFU >= 45% at 8b; ELO/full speed-up at 1b >= 0.95 of
the analytic FLOP ratio. On CPU: the engine's ELO/full speed-up >= 0.9 of the bare loop's.

Measured (2026-11-27):
- one H100 80GB, torch 2.11, `--impl bare,core --device cuda` (tokens/s, peak GiB):
      1b  elo  bare 158,760 (18.8)  core 153,710 (18.2)   full  bare 38,347 (47.2)  core 38,773 (42.9)
          lora bare  37,098 (35.1)  core  38,103 (31.3)   ELO/full: bare 4.14x, core 3.96x (0.96)
      8b  elo  bare  74,412 (24.9)  core  68,645 (24.7)   full and LoRA: out of memory on one GPU
                                                          (fp32 master weights; they need FSDP over 8)
      (core at 8b was 67,413 with 7 host syncs per step, 68,645 with 2; the rest of the gap is
      probably FSDP2 casting and gathering the frozen embedding and head, 1.05B parameters, every
      step; not profiled on the GPU)
- this 2-core CPU machine, shared with other sessions (load average 20-30), default flags, two
  runs; tokens per CPU-second (the engine's counts every thread of its worker process, Ray's too):
      elo   bare 1,359 / 1,442   core 1,312 / 1,424   engine 1,361 / 1,187
      full  bare   409 /   403   core   388 /   395   engine   392 /   390
      lora  bare   495 /   498   core   494 /   471   engine   465 /   447
      ELO/full: bare 3.32x / 3.58x, engine 3.48x / 3.05x (1.05 / 0.85 of bare's)
  Wall-clock tokens/s swung up to 2x between runs under that load (the worker got 20-90% of a
  core); the table prints both. Reading the rows eagerly instead of streaming them changed
  nothing: the engine's worker loses time to the machine's load, not to the data path.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from elo_ray.train.metrics import train_flops_per_token  # noqa: E402  (no Ray, no pydantic)

# Llama-like shapes; "tiny" is for the test of benchmarks/gpu_check.py; "cpu" keeps a realistic vocabulary and depth at a width a CPU can train.
SHAPES = {
    "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=176, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, seq_len=64, micro_batch=2),
    "cpu": dict(num_hidden_layers=24, hidden_size=256, intermediate_size=688, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=32000, seq_len=256, micro_batch=4),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, seq_len=2048, micro_batch=4, tie_word_embeddings=True),
    "8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, seq_len=2048, micro_batch=2),
}
METHODS = ("elo", "full", "lora")
IMPLS = ("bare", "core", "engine")
ELO_LAYERS = 2
LORA_RANK, LORA_ALPHA, LR = 16, 32.0, 1e-5


def parse_impl(spec: str) -> tuple[str, dict]:
    """`core+loss=plain+frozen_params=shard` -> ("core", {"loss": "plain", "frozen_params": "shard"}):
    an implementation and TrainConfig settings of the engine's step (core and engine only)."""
    impl, *settings = spec.split("+")
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r} in {spec!r}; choose from {IMPLS}")
    out = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or impl == "bare":
            raise ValueError(f"{spec!r}: settings are KEY=VALUE of TrainConfig, for core and engine only")
        out[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return impl, out


def train_config(method: str, settings: dict, **kw):
    from elo_ray.config import TrainConfig

    return TrainConfig(method=method, lr=LR, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, **kw, **settings)


def llama_config(shape: dict, method: str):
    import transformers

    kw = {k: v for k, v in shape.items() if k not in ("seq_len", "micro_batch")}
    kw["max_position_embeddings"] = max(shape["seq_len"], 2048)
    kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    if method == "elo":  # the detached model: first and last layer only
        kw["num_hidden_layers"] = ELO_LAYERS
        kw["elo_layers"] = [0, shape["num_hidden_layers"] - 1]
    return transformers.LlamaConfig(**kw)


def flops_per_token(shape: dict, method: str) -> int:
    return train_flops_per_token(llama_config(shape, method), method, shape["seq_len"], LORA_RANK)


def token_batches(shape: dict, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape["vocab_size"], (shape["micro_batch"], shape["seq_len"]), generator=gen)
            for _ in range(n)]


def summary(rates: list[float], cpu_rates: list[float], peak_gb: float) -> dict:
    """Per timed interval: tokens per wall second and per CPU second of the training process.
    tokens_per_s is the best interval, what the code does when nothing else runs; the CPU-time
    rate (median) barely moves when other work shares the machine, which wall time does."""
    return {"tokens_per_s": max(rates), "mean_tokens_per_s": len(rates) / sum(1 / r for r in rates),
            "tokens_per_cpu_s": sorted(cpu_rates)[len(cpu_rates) // 2], "rates": rates, "cpu_rates": cpu_rates,
            "peak_memory_gb": peak_gb}


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(shape: dict, steps: int, warmup: int, device: torch.device, one_step) -> dict:
    """Run `one_step(batch)` `steps` times; tokens/s per interval of `warmup` steps, the first dropped."""
    batches = token_batches(shape)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = warmup * shape["micro_batch"] * shape["seq_len"]
    rates, cpu_rates, start, start_cpu = [], [], time.perf_counter(), time.process_time()
    for step in range(steps):
        one_step(batches[step % len(batches)])
        if (step + 1) % warmup == 0:
            now, now_cpu = time.perf_counter(), time.process_time()
            rates.append(tokens / (now - start))
            cpu_rates.append(tokens / (now_cpu - start_cpu))
            start, start_cpu = now, now_cpu
    return summary(rates[1:], cpu_rates[1:], peak_gb(device))


# --------------------------------------------------------------------------- bare PyTorch


def bare_run(shape: dict, method: str, device: torch.device, steps: int, warmup: int, workdir: str) -> dict:
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(llama_config(shape, method), dtype=torch.float32)
    if method == "elo":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.layers."))
    elif method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), fused=device.type == "cuda")
    cuda = device.type == "cuda"

    def one_step(ids):
        ids = ids.to(device, non_blocking=True)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        (loss / (ids.shape[0] * (ids.shape[1] - 1))).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return timed(shape, steps, warmup, device, one_step)


# --------------------------------------------------------------------------- the engine's step, no Ray


def saved_model(shape: dict, method: str, device: torch.device, workdir: str) -> str:
    """A random-init checkpoint of the method's model (the ELO model for elo), saved once."""
    import transformers

    kind = "elo" if method == "elo" else "full"
    path = os.path.join(workdir, f"model-{kind}")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        with device:
            model = transformers.AutoModelForCausalLM.from_config(llama_config(shape, kind))
        if device.type == "cuda":
            model = model.to(torch.bfloat16)  # as real checkpoints are stored; half the bytes to write
        model.save_pretrained(path)
        del model
    return path


def core_run(shape: dict, method: str, device: torch.device, steps: int, warmup: int, workdir: str,
             settings: dict | None = None) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from elo_ray.train import model as model_lib
    from elo_ray.train.optim import build_optimizer
    from elo_ray.train.step import check_batches, train_step

    if not dist.is_initialized():
        store = os.path.join(workdir, f"pg-{os.getpid()}")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                                rank=0, world_size=1)
    train = train_config(method, settings or {})
    stage = model_lib.build(saved_model(shape, method, device, workdir), train, device, init_device_mesh(device.type, (1,)))
    optimizer = build_optimizer(stage.module, train, device)

    def one_step(ids):
        micro = [{"input_ids": ids, "labels": ids, "tokens": {"en": ids.numel()}}]
        stats = check_batches(micro, stage.config, 1, device)
        train_step(stage.module, optimizer, micro, stats, train.grad_clip, device, 1, stage.loss)

    return timed(shape, steps, warmup, device, one_step)


# --------------------------------------------------------------------------- the engine


def engine_run(shape: dict, method: str, device: torch.device, steps: int, warmup: int, workdir: str, cpus: float,
               repeat: int, settings: dict | None = None) -> dict:
    """elo-ray's run_training with one worker; tokens/s from its metric intervals after warm-up."""
    from elo_ray.config import ResourcesConfig
    from elo_ray.train import run_training
    from elo_ray.train.synthetic import random_rows, rows_plan

    b, s = shape["micro_batch"], shape["seq_len"]
    plan = rows_plan(random_rows(steps * b, s, shape["vocab_size"]))
    train = train_config(method, settings or {}, max_steps=steps, micro_batch_size=b, log_every=warmup,
                         checkpoint_every=10**6)
    tag = "-".join(f"{k}-{v}" for k, v in sorted((settings or {}).items()))
    result = run_training(
        name=f"bench-{method}-{repeat}-{tag}", model_uri=saved_model(shape, method, device, workdir),
        output_uri=os.path.join(workdir, f"out-{method}"), storage_uri=os.path.join(workdir, "runs"), train=train,
        resources=ResourcesConfig(num_workers=1, cpus_per_worker=cpus, max_failures=0, use_gpu=device.type == "cuda"),
        plan=plan, seq_len=s,
    )
    with open(result.metrics_uri) as f:
        records = [json.loads(line) for line in f][1:]  # the first interval is the warm-up
    return summary([r["tokens_per_s"] for r in records],
                   [r["tokens_per_s"] * r["interval_s"] / r["worker_cpu_s"] for r in records],
                   max(r["peak_memory_gb"] for r in records))


# --------------------------------------------------------------------------- running them


def _child(queue, fn, args, threads):
    torch.set_num_threads(threads)
    try:
        queue.put(fn(*args))
    except Exception as e:  # reported as a row
        queue.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})


def measure(impl_spec: str, shape: dict, method: str, args, workdir: str, repeat: int) -> dict:
    """One run. On CPU bare and core run in a fresh process each, so that the peak resident set
    is their own; the engine's worker is a fresh process anyway."""
    impl, settings = parse_impl(impl_spec)
    device = torch.device(args.device)
    if impl == "engine":
        try:
            return engine_run(shape, method, device, args.steps, args.warmup, workdir, float(args.threads), repeat,
                              settings)
        except Exception as e:  # reported as a row (an out-of-memory worker, say)
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    fn, fn_args = (bare_run, ()) if impl == "bare" else (core_run, (settings,))
    if device.type == "cuda":
        try:
            return fn(shape, method, device, args.steps, args.warmup, workdir, *fn_args)
        except torch.cuda.OutOfMemoryError as e:
            return {"error": f"out of memory ({str(e).splitlines()[0][:60]})"}
        finally:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, (shape, method, device, args.steps, args.warmup, workdir, *fn_args),
                                            args.threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def merge(rows: dict, key: tuple, result: dict) -> None:
    """Pool the timed intervals of repeated runs; keep the highest peak memory."""
    print(f"{key[0]:6s} {key[1]}: " + json.dumps({k: v for k, v in result.items() if "rates" not in k}), flush=True)
    old = rows.get(key)
    if old is None or "error" in old or "error" in result:
        rows[key] = old if old is not None and "error" not in old else result
        return
    rows[key] = summary(old["rates"] + result["rates"], old["cpu_rates"] + result["cpu_rates"],
                        max(old["peak_memory_gb"], result["peak_memory_gb"]))


def mfu(row: dict, flops: float, device: str) -> float | None:
    """Model FLOPs utilisation of a row: achieved FLOP/s over the GPU's bf16 dense peak."""
    from elo_ray.train.metrics import peak_tflops

    peak = peak_tflops(torch.device(device), torch.bfloat16) if device == "cuda" else None
    return row["tokens_per_s"] * flops / (peak * 1e12) if peak else None


def table(shape_name: str, shape: dict, rows: dict, impls: list[str], device: str, threads: int) -> str:
    def ok(*rs):
        return all(r is not None and "error" not in r for r in rs)

    flops = {m: flops_per_token(shape, m) for m in METHODS}
    cpu = device == "cpu"
    lines = [
        f"shape {shape_name}: {shape['num_hidden_layers']} layers (ELO model: {ELO_LAYERS}), hidden {shape['hidden_size']}, "
        f"ffn {shape['intermediate_size']}, vocab {shape['vocab_size']}, {shape['micro_batch']} x {shape['seq_len']} "
        f"tokens/step, " + (f"cpu, {threads} thread(s), fp32" if cpu else "cuda, bf16 compute, fp32 master"),
        "",
        "| method | GFLOP/token | impl | tok/s (best) | vs bare |" + (" tok/CPU-s (median) | vs bare |" if cpu else " MFU |")
        + " peak GiB |",
        "| --- | ---: | --- | ---: | ---: |" + (" ---: | ---: |" if cpu else " ---: |") + " ---: |",
    ]
    for m in METHODS:
        for i in impls:
            r, bare = rows.get((i, m)), rows.get(("bare", m))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {m} | {flops[m] / 1e9:.3f} | {i} | {r['error'][:60]} | |" + " |" * (2 if cpu else 1) + " |")
                continue
            vs = lambda key: f"{r[key] / bare[key]:.2f}" if ok(bare) else "-"  # noqa: E731
            line = f"| {m} | {flops[m] / 1e9:.3f} | {i} | {r['tokens_per_s']:,.0f} | {vs('tokens_per_s')} |"
            if cpu:
                line += f" {r['tokens_per_cpu_s']:,.0f} | {vs('tokens_per_cpu_s')} |"
            else:
                u = mfu(r, flops[m], device)
                line += f" {100 * u:.1f}% |" if u is not None else " - |"
            lines.append(line + f" {r['peak_memory_gb']:.2f} |")
    analytic = flops["full"] / flops["elo"]
    lines += ["", f"analytic FLOP ratio full/ELO: {analytic:.2f}x (full/LoRA {flops['full'] / flops['lora']:.2f}x)"]
    for key, what in [("tokens_per_s", "wall"), ("tokens_per_cpu_s", "CPU time")][: 2 if cpu else 1]:
        speedup = {}
        for i in impls:
            elo, full = rows.get((i, "elo")), rows.get((i, "full"))
            if ok(elo, full):
                speedup[i] = elo[key] / full[key]
        if speedup:
            lines.append(f"ELO/full speed-up ({what}): " + ", ".join(
                f"{i} {x:.2f}x ({x / analytic:.2f} of analytic)" for i, x in speedup.items()))
    return "\n".join(lines)


def run(shape_name: str, methods: list[str], impls: list[str], args, workdir: str) -> dict:
    """Every (impl, method) row of one shape; implementations alternate within each repeat, so
    that load from elsewhere hits all alike. The engine needs a running Ray."""
    rows: dict = {}
    for r in range(args.repeat):
        for m in methods:
            for impl in impls:
                merge(rows, (impl, m), measure(impl, SHAPES[shape_name], m, args, workdir, r))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: cpu on CPU, 1b on cuda")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--impl", default=None,
                        help="comma list of bare, core, engine (default: bare,engine on CPU); core and engine take "
                             "TrainConfig settings: core+loss=plain+frozen_params=shard")
    parser.add_argument("--bare-only", action="store_true", help="same as --impl bare (no Ray, no pydantic)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed (also the engine's log interval)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of bare and core; the engine's one worker gets as many CPUs")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating; intervals are pooled")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args(argv)
    shape_name = args.shape or ("1b" if args.device == "cuda" else "cpu")
    shape = SHAPES[shape_name]
    methods = [m for m in args.methods.split(",") if m]
    impls = ["bare"] if args.bare_only else (args.impl or "bare,engine").split(",")
    try:
        kinds = {parse_impl(i)[0] for i in impls}
    except ValueError as e:
        parser.error(str(e))
    if set(methods) - set(METHODS):
        parser.error(f"--methods takes {METHODS}")
    if args.steps <= args.warmup or (args.steps - args.warmup) % args.warmup:
        parser.error("--steps must be --warmup plus a multiple of --warmup (the engine's log intervals)")

    with tempfile.TemporaryDirectory(prefix="elo-ray-bench-") as workdir:
        if "engine" in kinds:
            start_ray(args.threads)
        rows = run(shape_name, methods, impls, args, workdir)
        if "engine" in kinds:
            import ray

            ray.shutdown()
    print()
    print(table(shape_name, shape, rows, impls, args.device, args.threads))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(shape_name, args.device, rows), f, indent=1)
    return 0


def start_ray(threads: int) -> None:
    """A local Ray for the engine rows, or the running one that RAY_ADDRESS names."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)
    else:
        ray.init(num_cpus=max(2, threads + 1), include_dashboard=False, log_to_driver=False)


def to_json(shape_name: str, device: str, rows: dict) -> dict:
    shape = SHAPES[shape_name]
    out = []
    for (i, m), r in rows.items():
        extra = {"flops_per_token": flops_per_token(shape, m)}
        if "error" not in r:
            extra["mfu"] = mfu(r, extra["flops_per_token"], device)
        out.append({"impl": i, "method": m, **r, **extra})
    return {"shape": shape_name, "device": device, "shape_config": shape, "rows": out}


if __name__ == "__main__":
    sys.exit(main())
