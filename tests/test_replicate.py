"""benchmarks/replicate.py: the corpus rules, the report, and its smallest setting end to end.

The end-to-end test runs `replicate.py --smoke` in a subprocess (its own local Ray), on a few
real manual pages, so the benchmark cannot silently rot; the numbers it produces are not
checked for quality, only for being what the stages say they are.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from replicate import corpus, report  # noqa: E402
from replicate.experiment import SIZES  # noqa: E402

# What `man --nh --nj -l ... | col -bx` prints for a page: header, sections at column 0, footer.
RENDERED = """\
OPEN(2)                    System Calls Manual                    OPEN(2)

NAME
       open - open a file

SYNOPSIS
       #include <fcntl.h>

DESCRIPTION
       The open() system call opens the file specified by pathname.  If the
       specified file does not exist, it may optionally be created by open().

   Flags
       O_RDONLY  read only.

SEE ALSO
       close(2)

Linux man-pages 6.03              2023-02-05                      OPEN(2)
"""


def test_sections_drop_header_and_footer_and_dedent_bodies():
    secs = corpus.sections(RENDERED)
    assert [s.splitlines()[0] for s in secs] == ["NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"]
    assert secs[0] == "NAME\nopen - open a file"
    assert secs[2] == (  # dedented by the least indent in the section: the subsection heading's
        "DESCRIPTION\n"
        "    The open() system call opens the file specified by pathname.  If the\n"
        "    specified file does not exist, it may optionally be created by open().\n"
        "\n"
        "Flags\n"
        "    O_RDONLY  read only."
    )
    assert not any("man-pages 6.03" in s or "OPEN(2)" in s for s in secs)


def test_short_sections_join_the_next_and_a_short_tail_joins_the_last():
    docs = corpus.documents(RENDERED, min_chars=40)
    assert len(docs) == 2
    assert docs[0].startswith("NAME\nopen - open a file\n\nSYNOPSIS")  # NAME alone is under 40 chars
    assert docs[1].startswith("DESCRIPTION") and docs[1].endswith("SEE ALSO\nclose(2)")
    assert "".join(corpus.documents(RENDERED, min_chars=10**6)).count("NAME") == 1


def test_japanese_share_counts_kana_and_kanji_among_letters():
    assert corpus.ja_share("ファイルを開く") == 1.0
    assert corpus.ja_share("open a file") == 0.0
    assert corpus.ja_share("open() はファイルを開く") == pytest.approx(8 / 12)  # 8 kana/kanji of 12 letters
    assert corpus.ja_share("1234 ...") == 0.0


def test_heldout_pages_are_a_stable_hash_of_the_name():
    names = [f"man{i % 8}/page{i}.{i % 8}" for i in range(4000)]
    held = [n for n in names if corpus.is_heldout(n, 5.0)]
    assert 0.04 < len(held) / len(names) < 0.06
    assert held == [n for n in names if corpus.is_heldout(n, 5.0)]
    assert not any(corpus.is_heldout(n, 0.0) for n in names)
    assert all(corpus.is_heldout(n, 100.0) for n in names)


def _stage(stage, wall, loop=None, tokens=0):
    return {"stage": stage, "wall_s": wall, "loop_s": loop, "cpu_s": 2 * loop if loop else None, "tokens": tokens, "steps": 1,
            "tokens_per_s": tokens / loop if loop else None, "peak_memory_gb": 1.5 if loop else None,
            "final_loss": 3.0, "plan_s": 1.0, "curve": [[tokens // 2, 4.0], [tokens, 3.0]] if loop else [],
            "tokens_by_language": {}}


def _results():
    ppl = lambda en, ja: {"en": en, "ja": ja}  # noqa: E731
    return {
        "size_name": "small", "size": {**SIZES["small"].__dict__}, "device": "cpu", "device_name": "2 CPU cores",
        "corpus": {lang: {"pages": 10, "train_docs": 9, "heldout_docs": 1, "packages": {"p": "1"}} for lang in ("en", "ja")},
        "info": {"cpus": 2, "torch": "x", "corpus_tokens": {"en": {"cp": 100, "align": 10, "heldout": 5}},
                 "eval_tokens": {"en": 5, "ja": 5}, "load_average_at_start": [1, 1, 1], "total_s": 1000},
        "base": {"params": 12_900_000, "run": _stage("base", 500, 450, 900_000), "perplexity": ppl(30.0, 3000.0)},
        "methods": [
            {"name": "full", "kind": "full", "layers": None, "trainable_params": 12_900_000,
             "stages": [_stage("cp", 400, 300, 300_000)], "perplexity": {"full": ppl(33.0, 60.0)}},
            {"name": "lora", "kind": "lora", "layers": None, "trainable_params": 500_000,
             "stages": [_stage("cp", 300, 250, 300_000)], "perplexity": {"lora": ppl(31.0, 200.0)}},
            {"name": "elo (0, 11)", "kind": "elo", "layers": [0, 11], "trainable_params": 1_500_000,
             "stages": [_stage("detach", 1), _stage("pretrain", 70, 50, 270_000), _stage("merge", 1),
                        _stage("align", 29, 25, 30_000)],
             "perplexity": {"elo (0, 11) no align": ppl(40.0, 150.0), "elo (0, 11) + align": ppl(32.0, 90.0)}},
        ],
    }


def test_report_rows_speed_ups_and_plots(tmp_path):
    results = _results()
    md = report.markdown(results)
    assert "| elo (0, 11) no align | layers 0, 11 (1.50M) | 270K | 72 |" in md  # detach + pretrain + merge
    assert "| elo (0, 11) + align | layers 0, 11 (1.50M) + all (align) | 300K | 101 |" in md
    assert "| full | all (12.9M) | 300K | 400 | 1,000 |" in md
    assert "33.0 (+10%)" in md and "60.0 (-98%)" in md
    assert "| elo (0, 11) | 1.0 |  | 70 | 1.0 | 29 | 101 | 75 | 150 | 3.96x / 4.00x / 4.00x |" in md  # 400/101, 300/75
    paths = report.write(results, tmp_path)
    for p in paths[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- end to end


def _smoke_prerequisites() -> str | None:
    if shutil.which("man") is None or shutil.which("col") is None or shutil.which("dpkg-query") is None:
        return "needs man-db, col and dpkg (a Debian system with manual pages)"
    missing = [p for pkgs in corpus.PACKAGES.values() for p in pkgs if not corpus.installed(p)]
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return f"needs the packages {missing} (apt-get install -y {' '.join(missing)})"
    return None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`replicate.py --smoke` once for the module (full fine-tuning and ELO; LoRA and the middle
    pair run the same code with another method name and other layers)."""
    reason = _smoke_prerequisites()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("replicate")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "replicate.py"), "--smoke", "--methods", "full,elo",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_smoke_corpus_is_deduplicated_and_heldout_pages_are_never_trained(smoke):
    out, results, _ = smoke
    for lang in ("en", "ja"):
        train = corpus.read_texts(out / "corpus" / f"{lang}.train.jsonl")
        held = corpus.read_texts(out / "corpus" / f"{lang}.heldout.jsonl")
        assert train and held
        assert len(set(train)) == len(train) and not set(train) & set(held)
        cp, align = (corpus.read_texts(out / "corpus" / f"{lang}.{p}.jsonl") for p in ("cp", "align"))
        assert sorted(cp + align) == sorted(train) and not set(cp) & set(align)
    ja = corpus.read_texts(out / "corpus" / "ja.train.jsonl")
    assert all(corpus.ja_share(t) >= corpus.MIN_JA_SHARE for t in ja)
    assert results["corpus"]["en"]["pages"] == SIZES["smoke"].max_pages


def test_smoke_trains_each_method_on_its_token_budget(smoke):
    _, results, _ = smoke
    size = SIZES["smoke"]
    base = results["base"]["run"]
    assert base["tokens"] == size.base_tokens and base["tokens_by_language"] == {"en": size.base_tokens}
    full, elo = results["methods"]
    assert [s["stage"] for s in full["stages"]] == ["cp"]
    assert full["stages"][0]["tokens"] == size.cp_tokens
    assert [s["stage"] for s in elo["stages"]] == ["detach", "pretrain", "merge", "align"]
    by = {s["stage"]: s for s in elo["stages"]}
    assert by["pretrain"]["tokens"] + by["align"]["tokens"] == size.cp_tokens
    langs = full["stages"][0]["tokens_by_language"]
    assert langs["en"] / size.cp_tokens == pytest.approx(0.1, abs=1 / 40)  # one sequence of 40
    for s in (full["stages"][0], by["pretrain"], by["align"]):
        assert s["loop_s"] > 0 and s["tokens_per_s"] > 0 and s["peak_memory_gb"] > 0 and s["curve"]
        assert 0 < s["cpu_s"] and 0 <= s["data_wait_s"] <= s["loop_s"]


def test_smoke_elo_merge_changes_only_the_detached_layers_and_alignment_changes_all(smoke):
    out, results, _ = smoke
    last = SIZES["smoke"].num_layers - 1
    base = _tensors(out / "base")
    merged = _tensors(out / "runs" / f"elo-0-{last}" / "merged")
    aligned = _tensors(out / "runs" / f"elo-0-{last}" / "aligned")
    assert merged.keys() == base.keys()
    for name, t in base.items():
        detached = name.startswith(("model.layers.0.", f"model.layers.{last}."))
        if name.endswith("proj.weight"):
            assert torch.equal(merged[name], t) != detached, name
        if not detached:
            assert torch.equal(merged[name], t), name
        if name.endswith("proj.weight"):
            assert not torch.equal(aligned[name], merged[name]), name


def test_smoke_reports_finite_perplexities_table_and_plots(smoke):
    out, results, stdout = smoke
    models = ["base"] + [label for m in results["methods"] for label in m["perplexity"]]
    assert models == ["base", "full", f"elo (0, {SIZES['smoke'].num_layers - 1}) no align",
                      f"elo (0, {SIZES['smoke'].num_layers - 1}) + align"]
    every = [results["base"]["perplexity"]] + [p for m in results["methods"] for p in m["perplexity"].values()]
    for ppl in every:
        assert set(ppl) == {"en", "ja"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
    md = (out / "results.md").read_text()
    for label in models[1:]:
        assert f"| {label} |" in md
    for name in ("perplexity.png", "time.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Held-out perplexity" in stdout
