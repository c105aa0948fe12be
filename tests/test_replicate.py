"""benchmarks/replicate.py: the corpus and language rules, rows and their results file, the
report, and its smallest setting end to end for two target languages.

The end-to-end tests run `replicate.py --smoke` in a subprocess (its own local Ray), on a few
real manual pages, so the benchmark cannot silently rot; the numbers it produces are not
checked for quality, only for being what the stages say they are. They are marked slow (a few
minutes each with the manual pages' installation): `make test-all` runs them, `make test` not.
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

from replicate import corpus, languages, report, rows  # noqa: E402
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


def test_script_share_counts_the_target_script_among_letters():
    ja = "kana and kanji"
    assert languages.script_share("ファイルを開く", ja) == 1.0
    assert languages.script_share("open a file", ja) == 0.0
    assert languages.script_share("open() はファイルを開く", ja) == pytest.approx(8 / 12)  # 8 kana/kanji of 12 letters
    assert languages.script_share("1234 ...", ja) == 0.0
    assert languages.script_share("open() открывает файл", "Cyrillic") == pytest.approx(13 / 17)
    assert languages.script_share("open() 打开文件", "Han") == pytest.approx(4 / 8)


def test_target_documents_pass_by_script_share_or_language_identification():
    ja, ru, de, fr = (languages.target(c) for c in ("ja", "ru", "de", "fr"))
    assert languages.is_target_text("open() はパス名で指定されたファイルを開く。", ja)
    assert not languages.is_target_text("The open() system call opens the file specified by pathname.", ja)
    assert languages.is_target_text("Системный вызов open() открывает файл, указанный в pathname.", ru)
    # Latin letters cannot tell German from English; the identifier can.
    assert languages.is_target_text("Der Systemaufruf open() öffnet die durch pathname angegebene Datei.", de)
    assert not languages.is_target_text("The open() system call opens the file specified by pathname.", de)
    assert languages.is_target_text("L'appel système open() ouvre le fichier indiqué par pathname.", fr)
    assert languages.rule(ja) == "20% of letters in kana and kanji"
    assert languages.rule(de) == "py3langid: de rather than en"


def test_targets_are_debian_packages_and_unknown_codes_say_which_exist():
    assert languages.target("zh_CN").package == "manpages-zh" and languages.target("zh_CN").man_dir == "zh_CN"
    assert languages.target("pt_BR").package == "manpages-pt-br" and languages.target("pt_BR").langid_code == "pt"
    assert languages.target("de").package == "manpages-de" and languages.target("de").script is None
    with pytest.raises(ValueError, match=r"--target 'zh': not a target language; did you mean zh_CN\?.*: cs, da, de"):
        languages.target("zh")
    with pytest.raises(ValueError, match=r"--target 'xx': not a target language \(targets"):
        languages.target("xx")


def test_heldout_pages_are_a_stable_hash_of_the_name():
    names = [f"man{i % 8}/page{i}.{i % 8}" for i in range(4000)]
    held = [n for n in names if corpus.is_heldout(n, 5.0)]
    assert 0.04 < len(held) / len(names) < 0.06
    assert held == [n for n in names if corpus.is_heldout(n, 5.0)]
    assert not any(corpus.is_heldout(n, 0.0) for n in names)
    assert all(corpus.is_heldout(n, 100.0) for n in names)


def test_a_page_sample_keeps_the_held_out_share_by_the_same_hash():
    pages = [Path(f"/usr/share/man/man{i % 8}/page{i}.{i % 8}.gz") for i in range(2000)]
    sample = corpus.sample_pages(pages, 12, 25.0)
    held = [p for p in sample if corpus.is_heldout(corpus.page_name(p), 25.0)]
    assert len(sample) == 12 and len(held) == 3 and len({p.parent.name for p in sample}) > 4
    assert sample == sorted(sample, key=corpus.page_name)
    assert len([p for p in corpus.sample_pages(pages, 12, 0.1) if corpus.is_heldout(corpus.page_name(p), 0.1)]) == 1


def _stage(stage, wall, loop=None, tokens=0):
    return {"stage": stage, "wall_s": wall, "loop_s": loop, "cpu_s": 2 * loop if loop else None, "tokens": tokens, "steps": 1,
            "tokens_per_s": tokens / loop if loop else None, "peak_memory_gb": 1.5 if loop else None,
            "final_loss": 3.0, "plan_s": 1.0, "curve": [[tokens // 2, 4.0], [tokens, 3.0]] if loop else [],
            "tokens_by_language": {}}


def _row(method, changes, result, base="b1"):
    size = {**SIZES["small"].__dict__, **changes}
    return {"key": rows.row_key(method, changes), "method": method, "changes": changes, "base": base, "size": size,
            "command": rows.command({"size_name": "small", "target": "ja", "device": "cpu", "seed": 0}, method, changes),
            "result": result}


def _full(en, ja):
    return {"name": "full", "kind": "full", "layers": None, "trainable_params": 12_900_000,
            "stages": [_stage("cp", 400, 300, 300_000)], "perplexity": {"full": {"en": en, "ja": ja}}}


def _elo(en, ja, no_align=(40.0, 150.0)):
    return {"name": "elo (0, 11)", "kind": "elo", "layers": [0, 11], "trainable_params": 1_500_000,
            "stages": [_stage("detach", 1), _stage("pretrain", 70, 50, 270_000), _stage("merge", 1),
                       _stage("align", 29, 25, 30_000)],
            "perplexity": {"elo (0, 11) no align": dict(zip(("en", "ja"), no_align)),
                           "elo (0, 11) + align": {"en": en, "ja": ja}}}


def _results():
    base = lambda key, en, ja, **size: {"key": key, "params": 12_900_000, "run": _stage("base", 500, 450, 900_000),  # noqa: E731
                                        "perplexity": {"en": en, "ja": ja},
                                        "settings": {"size": {"num_layers": 12, "base_target_share": 0.0, **size}}}
    return {
        "size_name": "small", "target": "ja", "device": "cpu", "seed": 0, "device_name": "2 CPU cores",
        "corpus": {lang: {"pages": 10, "train_docs": 9, "heldout_docs": 1, "packages": {"p": "1"}, "untranslated": 3,
                          "filter": None if lang == "en" else "20% of letters in kana and kanji"} for lang in ("en", "ja")},
        "info": {"cpus": 2, "torch": "x", "corpus_tokens": {"en": {"cp": 100, "align": 10, "heldout": 5}},
                 "eval_tokens": {"en": 5, "ja": 5}},
        "bases": {"b1": base("b1", 30.0, 3000.0), "b2": base("b2", 28.0, 900.0, base_target_share=0.05)},
        "rows": [
            _row("full", {}, _full(33.0, 60.0)),
            _row("lora", {}, {"name": "lora", "kind": "lora", "layers": None, "trainable_params": 500_000,
                              "stages": [_stage("cp", 300, 250, 300_000)], "perplexity": {"lora": {"en": 31.0, "ja": 200.0}}}),
            _row("elo", {}, _elo(36.0, 90.0)),
            _row("elo", {"elo_lr": 1e-4}, _elo(33.0, 150.0)),
            _row("elo", {"en_share": 0.5}, _elo(31.5, 300.0, no_align=(35.0, 900.0))),
            _row("full", {"base_target_share": 0.05}, _full(30.8, 50.0), base="b2"),
            _row("elo", {"base_target_share": 0.05}, _elo(30.8, 100.0), base="b2"),
            _row("elo", {"num_layers": 24}, _elo(30.0, 100.0)),  # no full row of its own yet
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
    assert [p.name for p in paths] == ["results.md", "perplexity.png", "time.png", "loss.png", "ratio.png", "english.png"]
    for p in paths[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_report_is_the_tables_alone_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    results = _results()
    assert report.write(results, tmp_path) == [tmp_path / "results.md"]
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == report.markdown(results)
    assert not list(tmp_path.glob("*.png"))
    assert "plots left out: matplotlib is not installed here" in capsys.readouterr().out


def test_report_only_without_results_says_which_file_is_missing(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("replicate_script", ROOT / "benchmarks" / "replicate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--report-only", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().out == (f"[replicate] error: no {tmp_path / 'results.json'} to draw from; run rows into "
                                       "that --out first (or pass the --out they used)\n")


def test_english_question_compares_each_elo_row_with_full_on_its_own_base():
    md = report.markdown(_results())
    # preset: ELO +20% English vs full +10%; the target gain kept is ln(3000/90) / ln(3000/60) = 90%.
    assert "| preset | 30.0 / 3,000 | 33.0 (+10%) | 60.0 (-98%) | 36.0 (+20%) | 90.0 (-97%) | no | 90% |" in md
    # an ELO-only field keeps the preset's full row as the reference
    assert "| elo_lr=0.0001 | 30.0 / 3,000 | 33.0 (+10%) | 60.0 (-98%) | 33.0 (+10%) | 150.0 (-95%) | yes | 77% |" in md
    # a changed base compares with the full row on that base
    assert "| base_target_share=0.05 | 28.0 / 900 | 30.8 (+10%) | 50.0 (-94%) | 30.8 (+10%) | 100.0 (-89%) | yes | 76% |" in md
    assert "| num_layers=24 | 30.0 / 3,000 | (no full row) |  | 30.0 (+0%) | 100.0 (-97%) | - | - |" in md
    # the ratio sweep: the preset's 1:9 and en_share=0.5, full at 1:9 for reference
    assert "| 1:9 | 40.0 (+33%) | 150.0 (-95%) | 36.0 (+20%) | 90.0 (-97%) |" in md
    assert "| 5:5 | 35.0 (+17%) | 900.0 (-70%) | 31.5 (+5%) | 300.0 (-90%) |" in md
    assert "| full fine-tuning, 1:9 | | | 33.0 (+10%) | 60.0 (-98%) |" in md
    assert "`benchmarks/replicate.py --size small --target ja --methods elo --set base_target_share=0.05` |" in md


def test_overrides_parse_by_field_type_and_name_renamed_or_unknown_fields():
    small = SIZES["small"]
    assert rows.parse_overrides(small, ["elo_lr=1e-4", "num_layers=24", "align_en_share=None", "cp_tokens=1e5"]) == {
        "elo_lr": 1e-4, "num_layers": 24, "align_en_share": None, "cp_tokens": 100_000}
    with pytest.raises(ValueError, match="base_ja_share was renamed base_target_share"):
        rows.parse_overrides(small, ["base_ja_share=0.05"])
    with pytest.raises(ValueError, match="did you mean elo_lr"):
        rows.parse_overrides(small, ["elo_rl=1e-4"])
    with pytest.raises(ValueError, match="cannot be None"):
        rows.parse_overrides(small, ["cp_lr=none"])


def test_a_row_is_keyed_by_what_it_changes_and_the_store_skips_finished_rows(tmp_path):
    small = SIZES["small"]
    same = rows.Row("elo", ("cp_lr=3e-4",))  # the preset's own value: the preset's row
    assert same.changes(small) == {} and rows.Row("elo", ("elo_lr=1e-4",)).changes(small) == {"elo_lr": 1e-4}
    assert rows.full_reference_changes({"elo_lr": 1e-4, "num_layers": 24}) == {"num_layers": 24}
    header = {"size_name": "small", "target": "ja", "device": "cpu", "seed": 0}
    store = rows.ResultsStore(tmp_path / "results.json", header)
    store.add_row({"key": rows.row_key("elo", {}), "x": 1})
    store.add_row({"key": rows.row_key("elo", {}), "x": 2})  # a rerun replaces it
    again = rows.ResultsStore(tmp_path / "results.json", header)
    assert again.has(rows.row_key("elo", {})) and not again.has(rows.row_key("full", {}))
    assert [r["x"] for r in again.data["rows"]] == [2]
    with pytest.raises(ValueError, match="another setting.*target.*'ja', 'de'"):
        rows.ResultsStore(tmp_path / "results.json", {**header, "target": "de"})
    all_rows = rows.MATRICES["all"]
    assert len(set(all_rows)) == len(all_rows) and set(all_rows) >= {r for m in rows.MATRICES.values() for r in m}


def test_a_base_built_again_otherwise_is_kept_beside_the_first_and_cited_by_its_rows(tmp_path):
    header = {"size_name": "small", "target": "ja", "device": "cpu", "seed": 0}
    store = rows.ResultsStore(tmp_path / "results.json", header)
    first = {"key": "b1", "settings": {"size": {"num_layers": 12}}, "perplexity": {"en": 216.07, "ja": 67358.0}}
    again = {**first, "perplexity": {"en": 215.98, "ja": 67597.4}}
    assert store.add_base(first) == "b1" and store.add_base(dict(first)) == "b1"  # the same build: reused
    assert store.add_base(again) == "b1.2" and store.add_base(dict(again)) == "b1.2"
    assert store.add_base({**first, "perplexity": {"en": 1.0, "ja": 2.0}}) == "b1.3"
    saved = rows.ResultsStore(tmp_path / "results.json", header).data["bases"]
    assert saved["b1"] == first and saved["b1.2"] == {**again, "rebuild_of": "b1"} and len(saved) == 3
    label = report._base_label({"target": "ja"}, {**saved["b1.2"], "settings": {"size": {"num_layers": 12}}})
    assert label == "base (12 layers, English only, from scratch; built again, as b1 was gone)"


def test_rows_on_a_rebuilt_base_show_it_beside_the_first_and_are_measured_against_it(tmp_path):
    results = _results()
    results["bases"]["b1.2"] = {**results["bases"]["b1"], "perplexity": {"en": 31.0, "ja": 2900.0}, "rebuild_of": "b1"}
    lora = next(r for r in results["rows"] if r["method"] == "lora")
    lora["base"] = "b1.2"
    table = report.perplexity_table(results, report.preset_rows(results))
    assert "| base (12 layers, English only, from scratch) | all (12.9M) |" in table
    assert "| base (12 layers, English only, from scratch; built again, as b1 was gone) | all (12.9M) |" in table
    assert "| lora | LoRA r=16 (0.50M) | 300K | 300 | 1,200 | 1.50 | 31.0 (+0%) | 200.0 (-93%) |" in table
    every = report.all_rows_table(results)
    assert every.count("| base b1") == 2 and "| preset | lora |" in every
    assert report.write(results, tmp_path)[1].name == "perplexity.png"


# --------------------------------------------------------------------------- end to end


def _smoke_prerequisites(target: str) -> str | None:
    if shutil.which("man") is None or shutil.which("col") is None or shutil.which("dpkg-query") is None:
        return "needs man-db, col and dpkg (a Debian system with manual pages)"
    packages = [*corpus.ENGLISH_PACKAGES, languages.target(target).package]
    missing = [p for p in packages if not corpus.installed(p)]
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        return f"needs the packages {missing} (apt-get install -y {' '.join(missing)})"
    return None


def _run_smoke(tmp_path_factory, target: str, methods: str):
    reason = _smoke_prerequisites(target)
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp(f"replicate-{target}")
    # The limit catches a hang, not a loaded machine: ~70 s when quiet, 18 minutes seen at load 25.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "replicate.py"), "--smoke", "--target", target, "--methods", methods,
         "--out", str(out)],
        capture_output=True, text=True, timeout=1800, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`replicate.py --smoke` (Japanese) once for the module: full fine-tuning and ELO; LoRA and
    the middle pair run the same code with another method name and other layers."""
    return _run_smoke(tmp_path_factory, "ja", "full,elo")


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_smoke_corpus_is_deduplicated_and_heldout_pages_are_never_trained(smoke):
    out, results, _ = smoke
    folder = out / "corpus" / "ja"
    for lang in ("en", "ja"):
        train = corpus.read_texts(folder / f"{lang}.train.jsonl")
        held = corpus.read_texts(folder / f"{lang}.heldout.jsonl")
        assert train and held
        assert len(set(train)) == len(train) and not set(train) & set(held)
        cp, align = (corpus.read_texts(folder / f"align-{SIZES['smoke'].align_share:g}" / f"{lang}.{p}.jsonl")
                     for p in ("cp", "align"))
        assert sorted(cp + align) == sorted(train) and not set(cp) & set(align)
    ja = corpus.read_texts(folder / "ja.train.jsonl")
    assert all(languages.script_share(t, "kana and kanji") >= languages.MIN_SCRIPT_SHARE for t in ja)
    assert results["corpus"]["en"]["pages"] == SIZES["smoke"].max_pages
    assert results["corpus"]["ja"]["filter"] == "20% of letters in kana and kanji"


@pytest.mark.slow
def test_smoke_trains_each_method_on_its_token_budget(smoke):
    _, results, _ = smoke
    size = SIZES["smoke"]
    full, elo = (r["result"] for r in results["rows"])
    base = results["bases"][results["rows"][0]["base"]]["run"]
    assert base["tokens"] == size.base_tokens and base["tokens_by_language"] == {"en": size.base_tokens}
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


@pytest.mark.slow
def test_smoke_elo_merge_changes_only_the_detached_layers_and_alignment_changes_all(smoke):
    out, results, _ = smoke
    last = SIZES["smoke"].num_layers - 1
    base = _tensors(out / "bases" / results["rows"][0]["base"])
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


@pytest.mark.slow
def test_smoke_reports_finite_perplexities_table_and_plots(smoke):
    out, results, stdout = smoke
    models = ["base"] + [label for r in results["rows"] for label in r["result"]["perplexity"]]
    assert models == ["base", "full", f"elo (0, {SIZES['smoke'].num_layers - 1}) no align",
                      f"elo (0, {SIZES['smoke'].num_layers - 1}) + align"]
    every = [b["perplexity"] for b in results["bases"].values()] + [
        p for r in results["rows"] for p in r["result"]["perplexity"].values()]
    for ppl in every:
        assert set(ppl) == {"en", "ja"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
    md = (out / "results.md").read_text()
    for label in models[1:]:
        assert f"| {label} |" in md
    for name in ("perplexity.png", "time.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Held-out perplexity" in stdout


@pytest.mark.slow
def test_smoke_rerun_skips_finished_rows(smoke):
    out, results, _ = smoke
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "replicate.py"), "--smoke", "--methods", "full,elo", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("row done already, skipped") == 2 and "[replicate] row: " not in proc.stdout
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


@pytest.mark.slow
def test_a_bundle_runs_where_manual_pages_apt_get_and_matplotlib_are_missing(tmp_path):
    """The GPU host of issue 16 has no package index: --bundle's corpus and tokenizer let the
    harness run there without man-db or apt-get, and without matplotlib it writes the tables."""
    reason = _smoke_prerequisites("ja")
    if reason:
        pytest.skip(reason)
    script = [sys.executable, str(ROOT / "benchmarks" / "replicate.py"), "--smoke"]
    here, there = tmp_path / "here", tmp_path / "there"
    made = subprocess.run([*script, "--bundle", "--out", str(here)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    assert not (here / "results.json").exists() and not (here / "bases").exists()
    import tarfile

    with tarfile.open(here / "bundle.tar.xz") as tar:
        names = sorted(tar.getnames())
        tar.extractall(there, filter="data")
    assert names == sorted([*(f"corpus/ja/{lang}.{part}.jsonl" for lang in ("en", "ja") for part in ("train", "heldout")),
                            "corpus/ja/corpus.json", *(f"tokenizer/ja-512/{f}" for f in (
                                "chat_template.jinja", "settings.json", "tokenizer.json", "tokenizer_config.json"))])
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('no matplotlib on this host')\n")
    tools = tmp_path / "tools"  # this machine's commands but the ones the corpus' build runs (Ray's workers need bash)
    tools.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for name in (os.listdir(folder) if os.path.isdir(folder) else ()):
            if name not in ("man", "col", "apt-get", "apt", "dpkg-query", "dpkg") and not (tools / name).exists():
                (tools / name).symlink_to(Path(folder) / name)
    env = {**os.environ, "PATH": str(tools), "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"}
    proc = subprocess.run([*script, "--methods", "elo", "--out", str(there)], capture_output=True, text=True,
                          timeout=1800, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "corpus: reusing" in proc.stdout and "tokenizer: reusing" in proc.stdout
    assert "plots left out: matplotlib is not installed here" in proc.stdout
    results = json.loads((there / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["elo"]
    assert (there / "results.md").is_file() and not list(there.glob("*.png"))


@pytest.fixture(scope="module")
def smoke_german(tmp_path_factory):
    """A Latin-script target: German pages filtered by language identification, end to end
    (full fine-tuning alone: the training code is the same for every target)."""
    return _run_smoke(tmp_path_factory, "de", "full")


@pytest.mark.slow
def test_smoke_german_filters_by_language_and_trains_and_scores_both_languages(smoke_german):
    out, results, _ = smoke_german
    de = corpus.read_texts(out / "corpus" / "de" / "de.train.jsonl")
    assert de and all(languages.is_target_text(t, languages.target("de")) for t in de)
    assert results["corpus"]["de"]["filter"] == "py3langid: de rather than en"
    (row,) = results["rows"]
    cp = row["result"]["stages"][0]
    assert set(cp["tokens_by_language"]) == {"en", "de"} and cp["tokens"] == SIZES["smoke"].cp_tokens
    ppl = row["result"]["perplexity"]["full"]
    assert set(ppl) == {"en", "de"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert "| German | manpages-de" in (out / "results.md").read_text()


def _elo_align():
    stages = [_stage("detach", 1), _stage("pretrain", 70, 50, 270_000), _stage("merge", 1)]
    result = {"name": "elo (0, 11), alignment methods", "kind": "elo", "layers": [0, 11], "trainable_params": 1_500_000,
              "stages": stages, "perplexity": {"elo (0, 11) no align": {"en": 40.0, "ja": 150.0}},
              "align_stage": {}, "align_trainable": {}}
    for variant, wall, ppl, trains in [("full", 29, (36.0, 90.0), 12_900_000), ("layers", 12, (38.0, 120.0), 3_000_000),
                                       ("lora_layers", 15, (37.0, 100.0), 3_400_000), ("offload", 60, (36.0, 90.0), 12_900_000)]:
        stage, label = ("align", "elo (0, 11) + align") if variant == "full" else \
            (f"align-{variant}", f"elo (0, 11) + align {variant}")
        stages.append(_stage(stage, wall, wall - 4, 30_000))
        result["perplexity"][label] = dict(zip(("en", "ja"), ppl))
        result["align_stage"][label] = stage
        result["align_trainable"][label] = trains
    return result


def test_alignment_methods_are_compared_with_full_alignment_from_the_same_merged_model():
    results = _results()
    results["rows"].append(_row("elo-align", {}, _elo_align()))
    md = report.markdown(results)
    # en: ln(38/40) / ln(36/40) = 49%; ja: ln(120/150) / ln(90/150) = 44%
    assert "| preset | none (ELO merged) | | | | | 40.0 | 150.0 | 0% | 0% |" in md
    assert "| preset | full | 12.90M | 29 | 25 | 1.50 | 36.0 | 90.0 | 100% | 100% |" in md
    assert "| preset | layers | 3.00M | 12 | 8.0 | 1.50 | 38.0 | 120.0 | 49% | 44% |" in md
    assert "| preset | offload | 12.90M | 60 | 56 | 1.50 | 36.0 | 90.0 | 100% | 100% |" in md
    # each aligned model counts its own alignment only, not the other three
    assert "| elo (0, 11) + align layers | 270K + 30K |" not in md
    assert "| preset | elo (0, 11) + align layers | 300K | 84 |" in md
    # the paper's comparison keeps its own rows
    assert md.count("| elo (0, 11) + align | layers 0, 11 (1.50M) + all (align) |") == 1
    # a method that could not run says why in its row
    results["rows"][-1]["result"]["align_failed"] = {"lora_layers": "TrainingError: nothing is left for LoRA"}
    assert "| preset | lora_layers | failed: TrainingError: nothing is left for LoRA | | | | | | | |" in report.markdown(results)


def test_search_spec_trains_each_candidate_as_the_elo_rows_train_first_and_last(tmp_path):
    from elo_ray.config import spec_from_dict
    from elo_ray.layer_sets import Candidate
    from elo_ray.search.trials import trial_spec
    from replicate.experiment import Experiment

    exp = Experiment(tmp_path, SIZES["small"], target="ja", size_name="small")
    spec = spec_from_dict(exp.search_spec(tmp_path / "runs"))
    trial = trial_spec(spec, Candidate(given=(0, 1), layers=(0, 1)), "layers-small-ja")
    # the ELO rows' stream and schedule: 90% of cp_tokens from the cp part at 1:9, lr 3e-4, 105 steps
    data = exp.elo_data_config()
    assert trial.pretrain.data.max_tokens == spec.search.max_tokens == round(240_000 * 0.9) == data.max_tokens
    assert [s.uri for s in trial.pretrain.data.sources] == [s.uri for s in data.sources]
    assert trial.pretrain.data.sources[1].uri.endswith("corpus/ja/align-0.1/ja.cp.jsonl")
    assert trial.pretrain.data.weights == {"en": 0.1, "ja": 0.9} and trial.pretrain.data.seq_len == 256
    assert trial.pretrain.train == exp.train_config("elo", 3e-4, data.max_tokens)
    assert (trial.pretrain.train.lr, trial.pretrain.train.warmup_steps, trial.pretrain.train.micro_batch_size) == (3e-4, 5, 8)
    assert trial.pretrain.layers == [0, 1]
    # scored on 32 held-out documents per language that training skips; no tasks, no alignment
    assert trial.pretrain.data.heldout_docs == trial.eval.max_docs == 32
    assert trial.eval.tasks == [] and not trial.align.enabled
    assert trial.model.base == str(tmp_path / "bases" / exp.base_key)
    assert trial.model.tokenizer == str(tmp_path / "tokenizer" / "ja-8192")
    assert (trial.resources.num_workers, trial.resources.cpus_per_worker) == (1, 1.0)
