"""The experiment's results as markdown tables and PNG plots.

Everything here reads the plain `results.json` that `replicate.py` writes (the bases and the
rows, `rows.py`), so tables and plots can be redrawn from a finished run
(`replicate.py --report-only`).
"""

from __future__ import annotations

import math
from pathlib import Path

from replicate import languages
from replicate.corpus import log
from replicate.rows import full_reference_changes, setting_label

STAGE_ORDER = ("detach", "cp", "pretrain", "merge", "align")
STAGE_COLOURS = {"detach": "#bbbbbb", "cp": "#4c72b0", "pretrain": "#55a868", "merge": "#8c8c8c", "align": "#dd8452"}


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _fmt_tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e4 else f"{n:,}"


def _ppl(before: float, after: float) -> str:
    if not math.isfinite(after):
        return "inf"
    return f"{after:.1f} ({100 * (after / before - 1):+.0f}%)"


def _langs(results: dict) -> list[str]:
    return ["en", results["target"]]


def _name(code: str) -> str:
    return languages.name(code)


def preset_rows(results: dict) -> list[dict]:
    """The rows run on the preset itself (no --set): the paper's comparison (the alignment
    methods have their own table)."""
    return [r for r in results["rows"] if not r["changes"] and r["method"] != "elo-align"]


def _base_label(results: dict, base: dict) -> str:
    share = base["settings"]["size"].get("base_target_share", 0.0)
    layers = base["settings"]["size"]["num_layers"]
    what = "English only" if not share else f"{100 * (1 - share):.0f}% English, {100 * share:.0f}% {_name(results['target'])}"
    rebuilt = f"; built again, as {base['rebuild_of']} was gone" if base.get("rebuild_of") else ""
    return f"base ({layers} layers, {what}, from scratch{rebuilt})"


def model_rows(results: dict, rows: list[dict]) -> list[dict]:
    """One row per evaluated model: each base the rows ran on (one, or a base and its rebuilds), and
    every model the rows produced."""
    out = []
    for key in dict.fromkeys(row["base"] for row in rows):
        base = results["bases"][key]
        out.append({"model": _base_label(results, base), "method": "base", "trained": f"all ({base['params'] / 1e6:.1f}M)",
                    "tokens": base["run"]["tokens"], "stages": [base["run"]], "perplexity": base["perplexity"],
                    "base": base})
    for row in rows:
        m = row["result"]
        base = results["bases"][row["base"]]
        for label, ppl in m["perplexity"].items():
            upto = "merge" if label.endswith("no align") else None
            own_align = m.get("align_stage", {}).get(label)  # elo-align: one alignment of several
            used = []
            for s in m["stages"]:
                if own_align and s["stage"].startswith("align") and s["stage"] != own_align:
                    continue
                used.append(s)
                if s["stage"] == upto:
                    break
            if m["kind"] == "elo":
                trained = f"layers {', '.join(map(str, m['layers']))} ({m['trainable_params'] / 1e6:.2f}M)"
                aligned = m.get("align_trainable", {}).get(label)
                trained += "" if upto is not None else f" + {aligned / 1e6:.2f}M (align)" if aligned else " + all (align)"
            elif m["kind"] == "lora":
                trained = f"LoRA r={row['size']['lora_rank']} ({m['trainable_params'] / 1e6:.2f}M)"
            else:
                trained = f"all ({m['trainable_params'] / 1e6:.1f}M)"
            out.append({"model": label, "method": m["name"], "trained": trained, "row": row,
                        "tokens": sum(s["tokens"] for s in used), "stages": used, "perplexity": ppl, "base": base})
    return out


def perplexity_table(results: dict, rows: list[dict]) -> str:
    """Per model: trained parameters, tokens, wall time, throughput, memory, held-out perplexity."""
    langs = _langs(results)
    head = ["model", "trains", "tokens", "wall s", "train tok/s", "peak GiB"] + [f"ppl {lang} (vs base)" for lang in langs]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|" + "---:|" * len(langs)]
    for r in model_rows(results, rows):
        trained_stages = [s for s in r["stages"] if s.get("loop_s")]
        rates = " / ".join(f"{s['tokens_per_s']:,.0f}" for s in trained_stages if s.get("tokens_per_s"))
        mem = max((s["peak_memory_gb"] for s in trained_stages if s.get("peak_memory_gb")), default=None)
        base_ppl = r["base"]["perplexity"]
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


def time_table(results: dict, rows: list[dict]) -> str:
    """Per method: wall seconds of each stage, the training loops alone, the workers' CPU
    seconds in them, and the speed-up over full fine-tuning by each of the three."""
    methods = [r["result"] for r in rows]
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
    lines = ["| language | packages | pages | documents (train / held-out) | dropped untranslated | tokens: ELO layer training "
             "| alignment | held-out (scored) |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for lang, c in results.get("corpus", {}).items():
        t = tokens.get(lang, {})
        pkgs = ", ".join(f"{p} {v}" for p, v in c["packages"].items())
        scored = info.get("eval_tokens", {}).get(lang, 0)
        dropped = f"{c.get('untranslated', 0):,} ({c['filter']})" if c.get("filter") else "-"
        lines.append(
            f"| {_name(lang)} | {pkgs} | {c['pages']:,} | {c['train_docs']:,} / {c['heldout_docs']:,} | {dropped} | "
            f"{t.get('cp', 0):,} | {t.get('align', 0):,} | {t.get('heldout', 0):,} ({scored:,}) |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the English question


def _delta(base: float, after: float) -> float:
    """Relative perplexity change, in percent."""
    return 100 * (after / base - 1)


def target_gain_kept(base: float, ref: float, after: float) -> float | None:
    """Of the reference's drop in target loss (log perplexity) from the base, the share `after`
    achieves (1.0: as much as the reference)."""
    gain = math.log(base) - math.log(ref)
    return (math.log(base) - math.log(after)) / gain if gain > 0 else None


def full_reference(results: dict, row: dict) -> dict | None:
    """The full fine-tuning row with the same base settings, tokens and mix as ELO row `row` (on
    a base built again with the same settings, `rebuild_of`, too: the rows share one key)."""
    want = full_reference_changes(row["changes"])
    return next((r for r in results["rows"] if r["method"] == "full" and r["changes"] == want), None)


def comparisons(results: dict) -> list[dict]:
    """Per ELO (first + last) row: its setting, its base, its full fine-tuning reference and the
    perplexities of both, in the order the rows ran."""
    target = results["target"]
    out = []
    for row in results["rows"]:
        if row["method"] != "elo":
            continue
        base = results["bases"][row["base"]]["perplexity"]
        ppl = row["result"]["perplexity"]
        after = next(v for k, v in ppl.items() if k.endswith("+ align"))
        no_align = next(v for k, v in ppl.items() if k.endswith("no align"))
        ref = full_reference(results, row)
        full = ref["result"]["perplexity"]["full"] if ref else None
        c = {"row": row, "setting": setting_label(row["changes"]), "base": base, "elo": after, "no_align": no_align,
             "full": full, "full_row": ref, "en_share": row["size"]["en_share"]}
        if full:
            c["english_as_well"] = after["en"] <= full["en"]
            c["target_kept"] = target_gain_kept(base[target], full[target], after[target])
        out.append(c)
    return out


def english_table(results: dict) -> str:
    """The English question: ELO + alignment against full fine-tuning at equal tokens, per setting."""
    t = results["target"]
    lines = [f"| setting | base ppl en / {t} | full: en | full: {t} | ELO + align: en | ELO + align: {t} "
             f"| ELO keeps English as well as full? | target gain kept (of full's) |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for c in comparisons(results):
        b, e, f = c["base"], c["elo"], c["full"]
        full_cells = [_ppl(b["en"], f["en"]), _ppl(b[t], f[t])] if f else ["(no full row)", ""]
        verdict = ("yes" if c["english_as_well"] else "no") if f else "-"
        kept = f"{100 * c['target_kept']:.0f}%" if f and c.get("target_kept") is not None else "-"
        lines.append(f"| {c['setting']} | {b['en']:.1f} / {b[t]:,.0f} | {full_cells[0]} | {full_cells[1]} | "
                     f"{_ppl(b['en'], e['en'])} | {_ppl(b[t], e[t])} | {verdict} | {kept} |")
    return "\n".join(lines)


def share_of_change(before: float, ref: float, after: float) -> float | None:
    """Of the reference's change in log perplexity from `before`, the share `after` makes
    (1.0: the same change; None when the reference changed nothing)."""
    change = math.log(ref) - math.log(before)
    return (math.log(after) - math.log(before)) / change if abs(change) > 1e-9 else None


def align_methods_table(results: dict) -> str:
    """Per elo-align row and alignment method: what the alignment trains, its time and peak
    memory, the aligned model's perplexity, and the share of full alignment's change it makes."""
    t = results["target"]
    lines = [f"| setting | alignment | trains | align wall s | align loop s | peak GiB | ppl en | ppl {t} "
             f"| of full alignment's change: en | {t} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        if row["method"] != "elo-align":
            continue
        m = row["result"]
        ppl = m["perplexity"]
        no_align = next(v for k, v in ppl.items() if k.endswith("no align"))
        full = next(ppl[k] for k, st in m["align_stage"].items() if st == "align")
        by_stage = {s["stage"]: s for s in m["stages"]}
        lines.append(f"| {setting_label(row['changes'])} | none (ELO merged) | | | | | {no_align['en']:.1f} | "
                     f"{no_align[t]:,.1f} | 0% | 0% |")
        for label, stage in m["align_stage"].items():
            s, p = by_stage[stage], ppl[label]
            kept = [share_of_change(no_align[lang], full[lang], p[lang]) for lang in ("en", t)]
            lines.append(f"| {setting_label(row['changes'])} | {stage.removeprefix('align-') if stage != 'align' else 'full'} "
                         f"| {m['align_trainable'][label] / 1e6:.2f}M | {_fmt_s(s['wall_s'])} | {_fmt_s(s.get('loop_s'))} "
                         f"| {s['peak_memory_gb']:.2f} | {p['en']:.1f} | {p[t]:,.1f} | "
                         + " | ".join("-" if k is None else f"{100 * k:.0f}%" for k in kept) + " |")
        for variant, why in m.get("align_failed", {}).items():
            lines.append(f"| {setting_label(row['changes'])} | {variant} | failed: {why} | | | | | | | |")
    return "\n".join(lines)


def ratio_rows(results: dict) -> list[dict]:
    """The English:target sweep of ELO: comparisons whose only change is en_share, by share."""
    sweep = [c for c in comparisons(results) if set(c["row"]["changes"]) <= {"en_share"}]
    return sorted(sweep, key=lambda c: c["en_share"])


def ratio_table(results: dict) -> str:
    t = results["target"]
    lines = [f"| English:{t} | ELO no align: en | ELO no align: {t} | ELO + align: en | ELO + align: {t} |",
             "|---|---:|---:|---:|---:|"]
    for c in ratio_rows(results):
        b, s = c["base"], c["en_share"]
        ratio = f"{s * 10:g}:{(1 - s) * 10:g}"
        lines.append(f"| {ratio} | {_ppl(b['en'], c['no_align']['en'])} | {_ppl(b[t], c['no_align'][t])} | "
                     f"{_ppl(b['en'], c['elo']['en'])} | {_ppl(b[t], c['elo'][t])} |")
    full = next((r for r in results["rows"] if r["method"] == "full" and not r["changes"]), None)
    if full:
        b, f = results["bases"][full["base"]]["perplexity"], full["result"]["perplexity"]["full"]
        s = full["size"]["en_share"]
        lines.append(f"| full fine-tuning, {s * 10:g}:{(1 - s) * 10:g} | | | {_ppl(b['en'], f['en'])} | {_ppl(b[t], f[t])} |")
    return "\n".join(lines)


def all_rows_table(results: dict) -> str:
    """Every row run, every model it produced, with the command that runs it."""
    t = results["target"]
    lines = [f"| setting | model | tokens | wall s | worker CPU s | ppl en (vs its base) | ppl {t} (vs its base) | command |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in model_rows(results, results["rows"]) if r["method"] != "base"):
        trained = [s for s in r["stages"] if s.get("loop_s") is not None]
        cpu = [s.get("cpu_s") for s in trained]
        b = r["base"]["perplexity"]
        lines.append(f"| {setting_label(r['row']['changes'])} | {r['model']} | {_fmt_tokens(r['tokens'])} | "
                     f"{_fmt_s(sum(s['wall_s'] for s in r['stages']))} | "
                     f"{_fmt_s(sum(cpu)) if cpu and None not in cpu else '-'} | {_ppl(b['en'], r['perplexity']['en'])} | "
                     f"{_ppl(b[t], r['perplexity'][t])} | `{r['row']['command']}` |")
    for key, base in results["bases"].items():
        lines.append(f"| base {key} | {_base_label(results, base)} | {_fmt_tokens(base['run']['tokens'])} | "
                     f"{_fmt_s(base['run']['wall_s'])} | {_fmt_s(base['run'].get('cpu_s'))} | {base['perplexity']['en']:.1f} | "
                     f"{base['perplexity'][t]:,.1f} | (built by the first row that needs it) |")
    return "\n".join(lines)


def reproduce(results: dict) -> str:
    """The command that runs the preset's comparison into these results."""
    device = " --device cuda" if results.get("device") == "cuda" else ""
    return f"benchmarks/replicate.py --size {results['size_name']} --target {results['target']}{device}"


def markdown(results: dict) -> str:
    """The whole report: settings, corpus, the paper's comparison, the sweep, the English question, every row."""
    rows = preset_rows(results)
    info = results["info"]
    t = results["target"]
    lines = [f"# Replication in miniature: `{reproduce(results)}` on {results.get('device_name', '?')}", ""]
    if rows:
        s = rows[0]["size"]
        base = results["bases"][rows[0]["base"]]
        lines += [
            f"Base model: Llama-shaped, {s['num_layers']} layers, hidden {s['hidden_size']}, "
            f"{base['params'] / 1e6:.1f}M parameters, vocabulary {info.get('vocab_size', s['vocab_size'])}, "
            f"pretrained from scratch on {_fmt_tokens(base['run']['tokens'])} tokens ({_fmt_s(base['run']['wall_s'])} s). "
            f"Continual pretraining: {_fmt_tokens(s['cp_tokens'])} tokens per method, "
            f"English:{_name(t)} {10 * s['en_share']:g}:{10 * (1 - s['en_share']):g}, sequences of {s['seq_len']}; "
            f"ELO spends {100 * (1 - s['align_share']):.0f}% of them on its layers and {100 * s['align_share']:.0f}% "
            f"on alignment. Learning rates: full {s['cp_lr']:g}, ELO {s['elo_lr'] or s['cp_lr']:g}, LoRA {s['lora_lr']:g}, "
            f"alignment {s['align_lr']:g} (warm-up, cosine to 10%).", ""]
    lines += ["## Corpus (Debian manual pages)", "", corpus_table(results), ""]
    if rows:
        lines += ["## Held-out perplexity: the paper's comparison (lower is better)", "", perplexity_table(results, rows), "",
                  "## Time per stage (seconds, wall clock)", "", time_table(results, rows), ""]
    if len(ratio_rows(results)) > 1:
        lines += [f"## English:{_name(t)} ratio of ELO's tokens (ELO + align, first + last layers)", "",
                  ratio_table(results), ""]
    if any(c["full"] for c in comparisons(results)):
        lines += ["## The English question: ELO + alignment against full fine-tuning at equal tokens", "",
                  english_table(results), ""]
    if any(r["method"] == "elo-align" for r in results["rows"]):
        lines += ["## Alignment methods after ELO (first + last layers), from the same merged model", "",
                  align_methods_table(results), ""]
    lines += ["## Every row", "", all_rows_table(results), "",
              f"Machine: {info.get('cpus')} CPUs, torch {info.get('torch')}; each row's load average and commit are "
              "in results.json.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def plot_perplexity(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = model_rows(results, preset_rows(results))
    langs = _langs(results)
    fig, axes = plt.subplots(1, len(langs), figsize=(6 * len(langs), 0.5 * len(rows) + 1.5), squeeze=False)
    labels = [r["model"] for r in rows]
    colours = ["#999999" if r["method"] == "base" else "#4c72b0" if r["method"] == "full" else "#c44e52"
               if r["method"] == "lora" else ("#8fd19e" if r["model"].endswith("no align") else "#2e8540") for r in rows]
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
        ax.set_title(f"held-out perplexity, {_name(lang)} (lower is better)")
        ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time(results: dict, path: Path) -> None:
    """Wall seconds by stage (the training loop hatched inside), and beside them the workers' CPU
    seconds in the training loops, which a shared machine's other load disturbs far less."""
    import matplotlib.pyplot as plt

    methods = [r["result"] for r in preset_rows(results)]
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
    ax.set_xlabel(f"wall seconds, {_fmt_tokens(preset_rows(results)[0]['size']['cp_tokens'])} tokens per method")
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
    rows = preset_rows(results)
    curve = results["bases"][rows[0]["base"]]["run"]["curve"] if rows else []
    if curve:
        ax0.plot([t for t, _ in curve], [v for _, v in curve], color="#555555")
    ax0.set_title("base model: pretraining from scratch on English")
    ax0.set_xlabel("tokens")
    ax0.set_ylabel("training loss")
    for i, m in enumerate(r["result"] for r in rows):
        offset = 0
        for s in m["stages"]:
            if not s.get("curve"):
                continue
            xs = [offset + t for t, _ in s["curve"]]
            style = "--" if s["stage"] == "align" else "-"
            ax1.plot(xs, [v for _, v in s["curve"]], style, color=f"C{i}", label=f"{m['name']}: {s['stage']}")
            offset += s["tokens"]
    ax1.set_title(f"continual pretraining (English:{_name(results['target'])})")
    ax1.set_xlabel("tokens")
    ax1.set_ylabel("training loss")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratio(results: dict, path: Path) -> None:
    """English and target perplexity change against the English share of ELO's tokens, full
    fine-tuning at its share as a reference point."""
    import matplotlib.pyplot as plt

    t = results["target"]
    sweep = ratio_rows(results)
    full = next((r for r in results["rows"] if r["method"] == "full" and not r["changes"]), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, lang in zip(axes, ("en", t)):
        xs = [100 * c["en_share"] for c in sweep]
        for key, label, style in (("elo", "ELO + align", "o-"), ("no_align", "ELO, no align", "s--")):
            ys = [_delta(c["base"][lang], c[key][lang]) for c in sweep]
            ax.plot(xs, ys, style, label=label, color="#2e8540" if key == "elo" else "#8fd19e")
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:+.0f}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if full:
            b, f = results["bases"][full["base"]]["perplexity"], full["result"]["perplexity"]["full"]
            y = _delta(b[lang], f[lang])
            ax.plot([100 * full["size"]["en_share"]], [y], "D", color="#4c72b0", label="full fine-tuning")
            ax.annotate(f"{y:+.0f}%", (100 * full["size"]["en_share"], y), textcoords="offset points",
                        xytext=(4, -12), fontsize=8, color="#4c72b0")
        ax.axhline(0, color="#555555", linewidth=0.8)
        ax.set_xlabel(f"English share of the continual-pretraining tokens (%; the rest {_name(t)})")
        ax.set_ylabel("held-out perplexity change vs the base (%)")
        ax.set_title(f"{_name(lang)} perplexity change (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_english(results: dict, path: Path) -> None:
    """Per setting: English perplexity change and target perplexity of ELO + align beside its
    full fine-tuning reference."""
    import matplotlib.pyplot as plt

    t = results["target"]
    comps = [c for c in comparisons(results) if c["full"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.55 * len(comps) + 1.8), squeeze=False)
    ys = range(len(comps))
    for ax, lang in zip(axes[0], ("en", t)):
        h = 0.38
        elo = [c["elo"][lang] for c in comps]
        full = [c["full"][lang] for c in comps]
        if lang == "en":
            elo = [_delta(c["base"]["en"], v) for c, v in zip(comps, elo)]
            full = [_delta(c["base"]["en"], v) for c, v in zip(comps, full)]
        ax.barh([y - h / 2 for y in ys], elo, height=h, color="#2e8540", label="ELO + align")
        ax.barh([y + h / 2 for y in ys], full, height=h, color="#4c72b0", label="full fine-tuning (same base, tokens)")
        for y, a, b in zip(ys, elo, full):
            fmt = (lambda v: f" {v:+.0f}%") if lang == "en" else (lambda v: f" {v:,.0f}")
            ax.text(a, y - h / 2, fmt(a), va="center", fontsize=7)
            ax.text(b, y + h / 2, fmt(b), va="center", fontsize=7)
        ax.set_yticks(list(ys), [c["setting"] for c in comps] if lang == "en" else [""] * len(comps))
        ax.invert_yaxis()
        if lang == "en":
            ax.set_title("English perplexity change vs its base (%, lower is better)")
        else:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{_name(t)} held-out perplexity (log, lower is better)")
        ax.margins(x=0.2)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> list[Path]:
    """results.md and the plots there are rows for, in `out_dir`; returns their paths. Without
    matplotlib (a GPU image may lack it) only results.md: `--report-only` draws the plots where it is."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.md"]
    paths[0].write_text(markdown(results), encoding="utf-8")
    try:
        import matplotlib
    except ImportError:
        log("plots left out: matplotlib is not installed here; `replicate.py --report-only --out DIR` draws them "
            "where it is")
        return paths
    matplotlib.use("Agg")
    plots = []
    if preset_rows(results):
        plots += [("perplexity.png", plot_perplexity), ("time.png", plot_time), ("loss.png", plot_loss)]
    if len(ratio_rows(results)) > 1:
        plots.append(("ratio.png", plot_ratio))
    if any(c["full"] for c in comparisons(results)):
        plots.append(("english.png", plot_english))
    for name, plot in plots:
        paths.append(out_dir / name)
        plot(results, paths[-1])
    return paths
