"""`elo-ray search`: which layers to detach, for a model and language nobody has ablated yet.

    elo-ray search jobs/demo.yaml --candidates "0,-1; 0,1; -2,-1" --run-id demo

For each candidate layer set, a short ELO pretraining on the same token budget
(`search.max_tokens`), the merge, and held-out perplexity per language; the candidates run as
parallel Ray Tune trials, each a small pipeline run of its own (trials.py), so a rerun reuses
every finished one. The ranking (ranking.py) goes to `{root}/{run_id}/search/ranking.{md,json,png}`
with the `--set pretrain.layers=[...]` line of the best. Beside it, a probe that trains nothing
(probe.py): its ranking and how well it agrees with the trained one.

    elo_ray/layer_sets.py (beside surgery, so validate checks search.candidates with it): the
                   layer sets: --candidates, search.candidates, or derived from the depth
    probe.py       per-layer gradient norms of the base on a sample of each language
    trials.py      one pipeline run per candidate, as Ray Tune trials
    ranking.py     the ranked table, JSON and plot
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from elo_ray import builtin, lease, stage_table, storage
from elo_ray.config import JobSpec
from elo_ray import layer_sets as candidates_lib
from elo_ray.search import probe, ranking, trials

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    rows: list[ranking.Row]
    uris: dict[str, str]  # ranking.md, ranking.json, ranking.png
    markdown: str

    @property
    def best(self) -> ranking.Row | None:
        return next((r for r in self.rows if r.rank == 1), None)


def choose(spec: JobSpec, given: list[list[int]] | None, num_layers: int) -> list[candidates_lib.Candidate]:
    """The candidates: `given` (--candidates), else search.candidates, else derived from the depth."""
    return candidates_lib.resolve(given or spec.search.candidates or candidates_lib.default(num_layers), num_layers)


def run_probe(spec: JobSpec) -> dict[str, list[float]]:
    """The probe's per-layer gradient norms of the base, as one Ray task (on a GPU when the spec's
    workers have one)."""
    import ray

    from elo_ray import logs

    root = spec.storage.root
    cfg = builtin.resolve_sources(spec.pretrain.data, root)
    tokenizer = builtin.resolve(stage_table.value_at(spec, stage_table.tokenizer_key(spec)), root)
    docs = probe.sample(cfg, tokenizer, spec.search.probe_docs)
    use_gpu = spec.resources.use_gpu
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(
        logs.in_workers(probe.layer_gradient_norms))
    return ray.get(task.remote(builtin.resolve(spec.model.base, root), docs, cfg.seq_len, use_gpu))


def run_search(spec: JobSpec, run_id: str, given: list[list[int]] | None = None, force_unlock: bool = False,
               max_concurrent: int | None = None) -> SearchResult:
    """Probe, trials and ranking of the search of `run_id` (module docstring); the search's
    lease (`{run}/search`) is held throughout."""
    from elo_ray import surgery
    from elo_ray.model_size import param_counts
    from elo_ray.stages import ensure_ray

    config = surgery.checkpoint_config(builtin.resolve(spec.model.base, spec.storage.root))
    chosen = choose(spec, given, config.num_hidden_layers)
    languages = sorted({s.language for s in spec.pretrain.data.sources})
    targets = [lang for lang in languages if lang != "en"] or languages
    uri = trials.search_uri(spec, run_id)
    info = {"run_id": run_id, "num_layers": config.num_hidden_layers, "max_tokens": spec.search.max_tokens,
            "languages": languages, "targets": targets, "probe_docs": spec.search.probe_docs}
    ensure_ray()
    with lease.hold(uri, force=force_unlock):
        norms = None
        if spec.search.probe_docs:
            try:
                norms = run_probe(spec)
            except Exception as e:  # the probe is advice: the trained ranking is the answer
                log.warning(f"search: the probe failed ({type(e).__name__}: {e}); ranking without it")
                info["probe_error"] = f"{type(e).__name__}: {e}"
        outcomes = trials.run_trials(spec, run_id, chosen, max_concurrent)
        rows = ranking.build(outcomes, targets, param_counts(config).layer, norms)
        info["agreement"] = ranking.agreement(rows)
        info["probe"] = norms
        uris = ranking.write(uri, rows, info)
    return SearchResult(rows, uris, storage.read_text(uris["ranking.md"]))
