"""The experiment's results as markdown tables and PNG plots.

Everything here reads the plain `results.json` that `replicate.py` writes, so tables and plots
can be redrawn from a finished run (`replicate.py --report-only`).
"""

from __future__ import annotations

import math
from pathlib import Path

STAGE_ORDER = ("detach", "cp", "pretrain", "merge", "align")
STAGE_COLOURS = {"detach": "#bbbbbb", "cp": "#4c72b0", "pretrain": "#55a868", "merge": "#8c8c8c", "align": "#dd8452"}
LANG_NAMES = {"en": "English", "ja": "Japanese"}


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _fmt_tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e4 else f"{n:,}"


def _ppl(before: float, after: float) -> str:
    if not math.isfinite(after):
        return "inf"
    return f"{after:.1f} ({100 * (after / before - 1):+.0f}%)"


def model_rows(results: dict) -> list[dict]:
    """One row per evaluated model: the base and every model a method produced, in order."""
    base = results["base"]
    rows = [{"model": "base (English only, from scratch)", "method": "base", "trained": f"all ({base['params'] / 1e6:.1f}M)",
             "tokens": base["run"]["tokens"], "stages": [base["run"]], "perplexity": base["perplexity"]}]
    for m in results["methods"]:
        stages = m["stages"]
        for label, ppl in m["perplexity"].items():
            upto = "merge" if label.endswith("no align") else None
            used = []
            for s in stages:
                used.append(s)
                if s["stage"] == upto:
                    break
            if m["kind"] == "elo":
                trained = f"layers {', '.join(map(str, m['layers']))} ({m['trainable_params'] / 1e6:.2f}M)"
                trained += " + all (align)" if upto is None else ""
            elif m["kind"] == "lora":
                trained = f"LoRA r={results['size']['lora_rank']} ({m['trainable_params'] / 1e6:.2f}M)"
            else:
                trained = f"all ({m['trainable_params'] / 1e6:.1f}M)"
            rows.append({"model": label, "method": m["name"], "trained": trained,
                         "tokens": sum(s["tokens"] for s in used), "stages": used, "perplexity": ppl})
    return rows


def perplexity_table(results: dict) -> str:
    """Per model: trained parameters, tokens, wall time, throughput, memory, held-out perplexity."""
    langs = sorted(results["base"]["perplexity"])
    base_ppl = results["base"]["perplexity"]
    head = ["model", "trains", "tokens", "wall s", "train tok/s", "peak GiB"] + [f"ppl {lang} (vs base)" for lang in langs]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|" + "---:|" * len(langs)]
    for r in model_rows(results):
        trained_stages = [s for s in r["stages"] if s.get("loop_s")]
        rates = " / ".join(f"{s['tokens_per_s']:,.0f}" for s in trained_stages if s.get("tokens_per_s"))
        mem = max((s["peak_memory_gb"] for s in trained_stages if s.get("peak_memory_gb")), default=None)
        ppl = [f"{r['perplexity'][lang]:.1f}" if r["method"] == "base" else _ppl(base_ppl[lang], r["perplexity"][lang])
               for lang in langs]
        lines.append("| " + " | ".join([
            r["model"], r["trained"], _fmt_tokens(r["tokens"]), _fmt_s(sum(s["wall_s"] for s in r["stages"])),
            rates or "-", f"{mem:.2f}" if mem else "-", *ppl]) + " |")
    return "\n".join(lines)


def _totals(m: dict) -> dict[str, float | None]:
    """A method's wall, loop and worker-CPU seconds over all its stages (CPU: None if unrecorded)."""
    trained = [s for s in m["stages"] if s.get("loop_s") is not None]
    cpu = [s.get("cpu_s") for s in trained]
    return {"wall": sum(s["wall_s"] for s in m["stages"]), "loop": sum(s["loop_s"] for s in trained),
            "cpu": sum(cpu) if cpu and None not in cpu else None}


def time_table(results: dict) -> str:
    """Per method: wall seconds of each stage, the training loops alone, the workers' CPU
    seconds in them, and the speed-up over full fine-tuning by each of the three."""
    methods = results["methods"]
    full = next((_totals(m) for m in methods if m["kind"] == "full"), None)
    head = ["method", *STAGE_ORDER, "total wall s", "loop s", "worker CPU s", "speed-up vs full (wall / loop / CPU)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m in methods:
        by = {s["stage"]: s for s in m["stages"]}
        t = _totals(m)
        speed = "-"
        if full:
            ratios = [full[k] / t[k] if full[k] and t[k] else None for k in ("wall", "loop", "cpu")]
            speed = " / ".join("-" if r is None else f"{r:.2f}x" for r in ratios)
        cells = [_fmt_s(by[st]["wall_s"]) if st in by else "" for st in STAGE_ORDER]
        lines.append("| " + " | ".join([m["name"], *cells, _fmt_s(t["wall"]), _fmt_s(t["loop"]), _fmt_s(t["cpu"]),
                                         speed]) + " |")
    return "\n".join(lines)


def corpus_table(results: dict) -> str:
    """Corpus sizes per language: documents and tokens of each part."""
    info = results["info"]
    tokens = info.get("corpus_tokens", {})
    lines = ["| language | packages | pages | documents (train / held-out) | tokens: continual pretraining | alignment | held-out (scored) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for lang, c in results["corpus"].items():
        t = tokens.get(lang, {})
        pkgs = ", ".join(f"{p} {v}" for p, v in c["packages"].items())
        scored = info.get("eval_tokens", {}).get(lang)
        lines.append(
            f"| {LANG_NAMES.get(lang, lang)} | {pkgs} | {c['pages']:,} | {c['train_docs']:,} / {c['heldout_docs']:,} | "
            f"{t.get('cp', 0):,} | {t.get('align', 0):,} | {t.get('heldout', 0):,} ({scored:,}) |"
        )
    return "\n".join(lines)


def reproduce(results: dict) -> str:
    """The command that reproduces these results (where they are written aside)."""
    sets = "".join(f" --set {o}" for o in results.get("overrides", []))
    device = " --device cuda" if results.get("device") == "cuda" else ""
    return f"benchmarks/replicate.py --size {results['size_name']}{device}{sets}"


def markdown(results: dict) -> str:
    """The whole report: settings, corpus, perplexity table, time table."""
    s, info = results["size"], results["info"]
    base = results["base"]
    lines = [
        f"# Replication in miniature: `{reproduce(results)}` on {results['device_name']}",
        "",
        f"Base model: Llama-shaped, {s['num_layers']} layers, hidden {s['hidden_size']}, "
        f"{base['params'] / 1e6:.1f}M parameters, vocabulary {info.get('vocab_size', s['vocab_size'])}, "
        f"pretrained from scratch on {_fmt_tokens(base['run']['tokens'])} English tokens "
        f"({_fmt_s(base['run']['wall_s'])} s{', by an earlier invocation, reused' if info.get('base_reused_from') else ''}). "
        f"Continual pretraining: {_fmt_tokens(s['cp_tokens'])} tokens per method, "
        f"English:Japanese 1:9, sequences of {s['seq_len']}; ELO spends {100 * (1 - s['align_share']):.0f}% of them "
        f"on its layers and {100 * s['align_share']:.0f}% on alignment. Learning rates: full {s['cp_lr']:g}, "
        f"ELO {s['cp_lr']:g}, LoRA {s['lora_lr']:g}, alignment {s['align_lr']:g} (warm-up, cosine to 10%).",
        "",
        "## Corpus (Debian manual pages)",
        "",
        corpus_table(results),
        "",
        "## Held-out perplexity (lower is better)",
        "",
        perplexity_table(results),
        "",
        "## Time per stage (seconds, wall clock, one run on the same machine)",
        "",
        time_table(results),
        "",
        f"Machine: {info.get('cpus')} CPUs, torch {info.get('torch')}, {info.get('gpu', 'no GPU')}; load average "
        f"{'/'.join(f'{x:.1f}' for x in info.get('load_average_at_start', []))} at the start and "
        f"{'/'.join(f'{x:.1f}' for x in info.get('load_average_at_end', []))} at the end; this invocation "
        f"{_fmt_s(info.get('total_s'))} s; elo-ray {info.get('elo_ray_commit', '?')}.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def plot_perplexity(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = model_rows(results)
    langs = sorted(results["base"]["perplexity"])
    fig, axes = plt.subplots(1, len(langs), figsize=(6 * len(langs), 0.5 * len(rows) + 1.5), squeeze=False)
    labels = [r["model"] for r in rows]
    colours = ["#999999"] + [
        "#4c72b0" if r["method"] == "full" else "#c44e52" if r["method"] == "lora"
        else ("#8fd19e" if r["model"].endswith("no align") else "#2e8540") for r in rows[1:]]
    for ax, lang in zip(axes[0], langs):
        values = [r["perplexity"][lang] for r in rows]
        ax.barh(range(len(rows)), values, color=colours)
        ax.axvline(values[0], color="#555555", linestyle="--", linewidth=1)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows))
        ax.invert_yaxis()
        if max(values) / min(values) > 5:  # a new language can start orders of magnitude higher
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xlim(0.9 * min(values), 1.05 * max(values))
        ax.set_title(f"held-out perplexity, {LANG_NAMES.get(lang, lang)} (lower is better)")
        ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time(results: dict, path: Path) -> None:
    """Wall seconds by stage (the training loop hatched inside), and beside them the workers' CPU
    seconds in the training loops, which a shared machine's other load disturbs far less."""
    import matplotlib.pyplot as plt

    methods = results["methods"]
    has_cpu = all(s.get("cpu_s") is not None for m in methods for s in m["stages"] if s.get("loop_s") is not None)
    fig, axes = plt.subplots(1, 2 if has_cpu else 1, figsize=(13 if has_cpu else 9, 0.6 * len(methods) + 1.8),
                             squeeze=False)
    ax = axes[0][0]
    seen = set()
    for i, m in enumerate(methods):
        left = 0.0
        for s in sorted(m["stages"], key=lambda s: STAGE_ORDER.index(s["stage"])):
            label = s["stage"] if s["stage"] not in seen else None
            seen.add(s["stage"])
            ax.barh(i, s["wall_s"], left=left, color=STAGE_COLOURS[s["stage"]], label=label)
            if s.get("loop_s"):  # the training loop inside the stage; the rest is start-up and export
                ax.barh(i, s["loop_s"], left=left, height=0.25, color="none", edgecolor="black", hatch="///",
                        label=None if "loop" in seen else "training loop")
                seen.add("loop")
            left += s["wall_s"]
        ax.text(left, i, f" {left:,.0f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(methods)), [m["name"] for m in methods])
    ax.invert_yaxis()
    ax.set_xlabel(f"wall seconds, {_fmt_tokens(results['size']['cp_tokens'])} tokens per method")
    ax.set_title("wall time by method and stage")
    ax.margins(x=0.15)
    if has_cpu:
        ax = axes[0][1]
        for i, m in enumerate(methods):
            left = 0.0
            for s in sorted(m["stages"], key=lambda s: STAGE_ORDER.index(s["stage"])):
                if s.get("cpu_s") is None:
                    continue
                ax.barh(i, s["cpu_s"], left=left, color=STAGE_COLOURS[s["stage"]])
                left += s["cpu_s"]
            ax.text(left, i, f" {left:,.0f} CPU-s", va="center", fontsize=9)
        ax.set_yticks(range(len(methods)), [""] * len(methods))
        ax.invert_yaxis()
        ax.set_xlabel("CPU seconds of the training worker in its training loops")
        ax.set_title("work by method (CPU seconds)")
        ax.margins(x=0.2)
    axes[0][-1].legend(handles=axes[0][0].get_legend_handles_labels()[0],
                       labels=axes[0][0].get_legend_handles_labels()[1],
                       loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
    curve = results["base"]["run"]["curve"]
    if curve:
        ax0.plot([t for t, _ in curve], [v for _, v in curve], color="#555555")
    ax0.set_title("base model: pretraining from scratch on English")
    ax0.set_xlabel("tokens")
    ax0.set_ylabel("training loss")
    for i, m in enumerate(results["methods"]):
        offset = 0
        for s in m["stages"]:
            if not s.get("curve"):
                continue
            xs = [offset + t for t, _ in s["curve"]]
            style = "--" if s["stage"] == "align" else "-"
            ax1.plot(xs, [v for _, v in s["curve"]], style, color=f"C{i}", label=f"{m['name']}: {s['stage']}")
            offset += s["tokens"]
    ax1.set_title("continual pretraining (English:Japanese 1:9)")
    ax1.set_xlabel("tokens")
    ax1.set_ylabel("training loss")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> list[Path]:
    """results.md, perplexity.png, time.png and loss.png in `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.md", out_dir / "perplexity.png", out_dir / "time.png", out_dir / "loss.png"]
    paths[0].write_text(markdown(results), encoding="utf-8")
    plot_perplexity(results, paths[1])
    plot_time(results, paths[2])
    plot_loss(results, paths[3])
    return paths
