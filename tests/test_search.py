"""`elo-ray search`: candidate parsing, the ranking on given perplexities, and one search of the
demo spec through Ray Tune (trials' results, ranking order, a rerun that reuses every trial)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from elo_ray import manifest, storage
from elo_ray.config import ResourcesConfig, load_spec
from elo_ray import layer_sets as candidates
from elo_ray.search import ranking, run_search
from elo_ray.search.trials import TrialOutcome, concurrent_trials, trial_spec

DEMO = str(resources.files("elo_ray") / "demo.yaml")


# --- candidates ----------------------------------------------------------------------------

def test_parse_candidates():
    assert candidates.parse("0,-1; 0,1; -2,-1") == [[0, -1], [0, 1], [-2, -1]]
    assert candidates.parse(" 0 , 15 ,-1 ;;") == [[0, 15, -1]]


@pytest.mark.parametrize("text, said", [
    ("0,-1; a,b", "'a,b' is not a list of layer indices"),
    (" ; ", "names no layer set"),
])
def test_parse_candidates_errors(text, said):
    with pytest.raises(candidates.CandidateError, match=said):
        candidates.parse(text)


def test_resolve_candidates_against_the_depth():
    found = candidates.resolve([[0, -1], [-2, -1], [0, 5], [-1, 0]], num_layers=6)
    # 0,5 and -1,0 are 0,-1 in a 6-layer model: searched once, as first written
    assert [(c.given, c.layers, c.name) for c in found] == [
        ((0, -1), (0, 5), "layers-0-5"), ((-2, -1), (4, 5), "layers-4-5")]
    assert found[0].set_line == "--set pretrain.layers=[0,-1]"
    with pytest.raises(candidates.CandidateError, match="candidate 0,6: "):
        candidates.resolve([[0, 6]], num_layers=6)
    assert candidates.default(32) == [[0, -1], [0, 1], [-2, -1], [15, 16], [0, 16, -1]]


def test_a_trial_is_a_short_elo_run_of_its_candidate_scored_by_perplexity_only(demo_base, tmp_path):
    spec = load_spec(DEMO, [f"storage.root={tmp_path}", f"model.base={demo_base}"])
    assert spec.eval.tasks == ["elo_mc_en", "elo_mc_ko"] and spec.align.enabled and spec.instruct.enabled
    trial = trial_spec(spec, candidates.resolve([[0, 1]], 6)[0], "s")
    assert trial.storage.root == f"{tmp_path}/s/search" and trial.run_id is None
    assert trial.pretrain.layers == [0, 1] and trial.pretrain.data.max_tokens == spec.search.max_tokens == 12000
    assert trial.merge.enabled and trial.eval.enabled and not trial.align.enabled and not trial.instruct.enabled
    assert trial.eval.tasks == [] and trial.eval.max_docs == spec.eval.max_docs  # ranked by held-out perplexity
    assert trial.model.base == demo_base
    corpus = resources.files("elo_ray") / "corpus"  # builtin: names resolved once, for every trial
    assert [s.uri for s in trial.pretrain.data.sources] == [str(corpus / "en.jsonl"), str(corpus / "ko.jsonl")]


def test_concurrent_trials_from_the_resources():
    cpu = ResourcesConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.5)
    assert concurrent_trials(cpu, {"CPU": 2}) == 1  # 2 workers x 0.5 + 1 for the data
    assert concurrent_trials(cpu, {"CPU": 8}) == 4
    gpu = ResourcesConfig(num_workers=8, use_gpu=True)
    assert concurrent_trials(gpu, {"CPU": 96, "GPU": 16}) == 2
    assert concurrent_trials(gpu, {"CPU": 96, "GPU": 4}) == 1  # the smallest cluster still runs one


# --- ranking on given numbers ----------------------------------------------------------------

def outcome(layers, ppl_ko, ppl_en, seconds=10.0, error=None) -> TrialOutcome:
    c = candidates.Candidate(tuple(layers), tuple(i % 6 for i in layers))
    base = {"en": 20.0, "ko": 40.0}

    def m(stage, metrics):
        return manifest.Manifest(stage, "h", {}, [], metrics, "t0", "t1")

    found = {} if error else {
        "pretrain": m("pretrain", {"seconds": seconds}), "merge": m("merge", {"seconds": 1.0}),
        "eval": m("eval", {"perplexity": {"base": base, "merge": {"en": ppl_en, "ko": ppl_ko}}}),
    }
    return TrialOutcome(c, found, error)


def test_ranking_orders_by_target_change_and_keeps_failures(tmp_path):
    outcomes = [outcome([0, -1], 30.0, 21.0), outcome([0, 1], 36.0, 20.0),
                outcome([-2, -1], 0, 0, error="pretrain: DivergedError: loss nan at step 3"),
                outcome([2, 3], 28.0, 25.0)]
    norms = {"en": [1.0, 0.0, 0.0, 0.0, 0.0, 2.0], "ko": [4.0, 1.0, 0.5, 0.2, 0.1, 3.0]}
    rows = ranking.build(outcomes, ["ko"], layer_params=1000, norms=norms)
    assert [(r.name, r.rank) for r in rows] == [
        ("layers-2-3", 1), ("layers-0-5", 2), ("layers-0-1", 3), ("layers-4-5", None)]
    assert rows[0].target_change == pytest.approx(28 / 40 - 1)
    assert rows[0].english_change == pytest.approx(25 / 20 - 1)
    assert rows[1].seconds == pytest.approx(11.0) and rows[1].trained_params == 2000
    assert rows[3].error.startswith("pretrain: DivergedError")
    # probe: ko scores 0,5 -> 7.0, 0,1 -> 5.0, 2,3 -> 0.7 (the failed one is not ranked)
    assert [(r.name, r.probe_score, r.probe_rank) for r in rows[:3]] == [
        ("layers-2-3", pytest.approx(0.7), 3), ("layers-0-5", pytest.approx(7.0), 1), ("layers-0-1", pytest.approx(5.0), 2)]
    agree = ranking.agreement(rows)
    assert agree["candidates"] == 3 and agree["spearman"] == pytest.approx(-0.5)

    info = {"run_id": "r", "num_layers": 6, "max_tokens": 1000, "languages": ["en", "ko"], "targets": ["ko"],
            "agreement": agree}
    uris = ranking.write(str(tmp_path), rows, info)
    assert sorted(uris) == ["ranking.json", "ranking.md", "ranking.png"]
    assert storage.read_bytes(uris["ranking.png"])[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(storage.read_text(uris["ranking.json"]))
    assert record["best"] == {"layers": [2, 3], "set": "--set pretrain.layers=[2,3]"}
    assert [c["rank"] for c in record["candidates"]] == [1, 2, 3, None]
    md = storage.read_text(uris["ranking.md"])
    assert "| 1 | 2, 3 | ko 40.0 → 28.0 | -30.0% | +25.0% | 11 | 0.00M | 3 |" in md
    assert "failed: pretrain: DivergedError: loss nan at step 3" in md
    assert "Use: `--set pretrain.layers=[2,3]`" in md
    assert "Spearman's rho -0.50" in md


def test_ranking_with_no_finished_candidate(tmp_path):
    rows = ranking.build([outcome([0, 1], 0, 0, error="merge: SurgeryError: boom")], ["ko"], layer_params=10)
    assert rows[0].rank is None and ranking.agreement(rows) is None
    uris = ranking.write(str(tmp_path), rows, {"run_id": "r", "num_layers": 6, "max_tokens": 1,
                                               "languages": ["en", "ko"], "targets": ["ko"]})
    assert "ranking.png" not in uris
    assert "No candidate finished." in storage.read_text(uris["ranking.md"])
    assert json.loads(storage.read_text(uris["ranking.json"]))["best"] is None


# --- the demo spec through Ray Tune ----------------------------------------------------------

@pytest.mark.slow  # two trials of three stages each and a rerun (about 4 minutes on 2 cores)
def test_search_on_the_demo_spec_ranks_and_rerun_reuses(ray_local, demo_base, tmp_path):
    spec = load_spec(DEMO, [f"storage.root={tmp_path}", f"model.base={demo_base}",
                            "search.max_tokens=2048", "search.probe_docs=2",
                            "pretrain.train.log_every=1", "eval.max_docs=4"])
    given = candidates.parse("0,-1; -2,-1")
    first = run_search(spec, "s", given)
    assert [r.error for r in first.rows] == [None, None]
    assert sorted(r.name for r in first.rows) == ["layers-0-5", "layers-4-5"]
    assert not any(r.reused for r in first.rows)

    record = json.loads(storage.read_text(f"{tmp_path}/s/search/ranking.json"))
    found = record["candidates"]
    for c in found:  # every trial's results, from its own eval manifest
        ev = manifest.read(f"{tmp_path}/s/search/{c['name']}/eval")
        assert ev.metrics["perplexity"]["merge"] == c["merged"] and set(c["merged"]) == {"en", "ko"}
        assert c["base"] == ev.metrics["perplexity"]["base"]  # the same base for every candidate
        pre = manifest.read(f"{tmp_path}/s/search/{c['name']}/pretrain").metrics
        # search.max_tokens caps the data: 2048 tokens = 2 workers x 2 steps x 4 sequences x 128
        assert pre["step"] == 2 and sum(pre["data"]["trained_tokens"].values()) == 2048
    changes = [c["merged"]["ko"] / c["base"]["ko"] - 1 for c in found]
    assert changes == sorted(changes) and [c["rank"] for c in found] == [1, 2]
    assert [c["target_change"] for c in found] == pytest.approx(changes)
    assert record["best"]["set"] == f"--set pretrain.layers=[{','.join(map(str, found[0]['given']))}]"
    assert len(record["probe"]["ko"]) == 6 and all(g > 0 for g in record["probe"]["ko"])
    assert {c["probe_rank"] for c in found} == {1, 2}
    assert storage.read_bytes(f"{tmp_path}/s/search/ranking.png")[:4] == b"\x89PNG"

    finished = {c["name"]: manifest.read(f"{tmp_path}/s/search/{c['name']}/pretrain").finished_at for c in found}
    again = run_search(spec, "s", given)
    assert all(r.reused for r in again.rows)
    assert [(r.name, r.merged) for r in again.rows] == [(c["name"], c["merged"]) for c in found]
    assert {n: manifest.read(f"{tmp_path}/s/search/{n}/pretrain").finished_at for n in finished} == finished
