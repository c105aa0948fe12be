"""Surgery speed and memory: elo-ray's streaming detach / merge / chat vector next to the plain
way (load whole models with from_pretrained, change tensors in memory, save_pretrained).

    .venv/bin/python benchmarks/surgery.py                 # ~0.5 GB fp32 llama, 6 shards
    .venv/bin/python benchmarks/surgery.py --layers 16     # bigger

Every measurement runs in a fresh Python process (so that nothing is cached in the allocator
from an earlier one) with the checkpoint files already in the page cache and no dirty pages
left to write back; the table shows the best time and the largest peak of `--repeats` runs. Peak memory is the
growth of the process's resident set (VmHWM after the call minus VmRSS before it, with the
high-water mark reset through /proc/self/clear_refs), so it counts tensors, mmapped pages
that were touched and allocator overhead alike. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

LAYERS = (0, -1)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


# ---- the operations, each run in a child process --------------------------------------------


def touch(model) -> None:
    """Read every parameter once, as the first training step would: from_pretrained maps the
    files lazily, so without this the plain detach would be measured before reading weights."""
    for p in model.parameters():
        p.detach().sum()


def elo_detach(base, elo, target, instruct, out):
    from elo_ray import surgery

    touch(surgery.detach(base, LAYERS))


def plain_detach(base, elo, target, instruct, out):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    n = model.config.num_hidden_layers
    keep = [i % n for i in LAYERS]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    model.config.num_hidden_layers = len(keep)
    touch(model)


def elo_merge(base, elo, target, instruct, out):
    from elo_ray import surgery

    surgery.merge(base, elo, out)


def plain_merge(base, elo, target, instruct, out):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    small = transformers.AutoModelForCausalLM.from_pretrained(elo, dtype=torch.float32)
    for i, layer in enumerate(small.config.elo_layers):
        model.model.layers[layer].load_state_dict(small.model.layers[i].state_dict())
    model.save_pretrained(out, max_shard_size=_shard_size(base))


def elo_chat_vector(base, elo, target, instruct, out):
    from elo_ray import surgery

    surgery.chat_vector(target, base, instruct, out)


def plain_chat_vector(base, elo, target, instruct, out):
    import torch
    import transformers

    load = lambda p: transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    t, b, i = load(target), load(base), load(instruct)
    bs, is_ = b.state_dict(), i.state_dict()
    with torch.no_grad():
        for name, p in t.state_dict().items():
            p.add_(is_[name] - bs[name])
    t.save_pretrained(out, max_shard_size=_shard_size(target))


OPS = {f.__name__: f for f in (elo_detach, plain_detach, elo_merge, plain_merge, elo_chat_vector, plain_chat_vector)}


def _shard_size(path: str) -> int:
    return max(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def child(op: str, paths: list[str]) -> None:
    import transformers

    from elo_ray import surgery

    # Imports are not what is measured: load the model class and safetensors before the clock.
    config = surgery.checkpoint_config(paths[0])
    transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    import safetensors.torch  # noqa: F401
    transformers.utils.logging.disable_progress_bar()

    open("/proc/self/clear_refs", "w").write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    OPS[op](*paths)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak": _status("VmHWM") - before}))


# ---- the parent: build checkpoints, run every op in its own process, print the table ----------


def build(root: str, args) -> dict[str, str]:
    import transformers

    from elo_ray import surgery
    from elo_ray.tiny import tiny_config, tiny_model

    transformers.utils.logging.disable_progress_bar()
    config = tiny_config(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    paths = {}
    for seed, name in enumerate(("base", "target", "instruct")):
        paths[name] = os.path.join(root, name)
        tiny_model(config, seed=seed).save_pretrained(paths[name], max_shard_size=args.shard_size)
    paths["elo"] = surgery.save_detached(paths["base"], LAYERS, os.path.join(root, "elo"))
    return paths


def warm_page_cache(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(64 << 20):
                    pass


def run(op: str, paths: dict[str, str], out: str, repeats: int) -> dict:
    """Best time and largest peak of `repeats` runs, each in a fresh process after a sync, so
    that write-back of an earlier run's output does not slow this one down."""
    runs = []
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        argv = [paths["base"], paths["elo"], paths["target"], paths["instruct"], out]
        proc = subprocess.run([sys.executable, __file__, "--child", op, *argv], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{op} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seconds": min(r["seconds"] for r in runs), "peak": max(r["peak"] for r in runs)}


def same_tensors(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    def load(p):
        out = {}
        for n in sorted(os.listdir(p)):
            if n.endswith(".safetensors"):
                out.update(load_file(os.path.join(p, n)))
        return out

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--repeats", type=int, default=3, help="runs per operation (best time, largest peak)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])

    with tempfile.TemporaryDirectory(prefix="elo-bench-") as root:
        paths = build(root, args)
        shards = [os.path.getsize(os.path.join(paths["base"], n)) for n in os.listdir(paths["base"]) if n.endswith(".safetensors")]
        warm_page_cache(root)
        results = {}
        for op in OPS:
            results[op] = run(op, paths, os.path.join(root, op), args.repeats)
        agree = {
            "merge": same_tensors(os.path.join(root, "elo_merge"), os.path.join(root, "plain_merge")),
            "chat_vector": same_tensors(os.path.join(root, "elo_chat_vector"), os.path.join(root, "plain_chat_vector")),
        }

    mb = lambda n: n / 2**20  # noqa: E731
    print(
        f"llama fp32, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
        f"{mb(sum(shards)):.0f} MiB in {len(shards)} shards (largest {mb(max(shards)):.0f} MiB); "
        f"detach layers {LAYERS}; {os.cpu_count()} CPUs\n"
    )
    head = f"{'operation':<12} {'elo-ray s':>10} {'plain s':>9} {'speedup':>8} {'elo-ray MiB':>12} {'plain MiB':>10} {'memory':>8}  outputs"
    print(head)
    print("-" * len(head))
    for name in ("detach", "merge", "chat_vector"):
        ours, plain = results[f"elo_{name}"], results[f"plain_{name}"]
        same = {True: "identical", False: "DIFFER"}.get(agree.get(name), "-")
        print(
            f"{name:<12} {ours['seconds']:>10.2f} {plain['seconds']:>9.2f} "
            f"{plain['seconds'] / ours['seconds']:>7.1f}x {mb(ours['peak']):>12.0f} {mb(plain['peak']):>10.0f} "
            f"{plain['peak'] / max(ours['peak'], 1):>7.1f}x  {same}"
        )
    print(
        "\npeak = growth of resident memory during the call; speedup and memory = plain / elo-ray;\n"
        "detach includes reading each parameter of the result once (from_pretrained maps lazily)"
    )


if __name__ == "__main__":
    main()
