"""The compared methods: each turns the base model into a model of the target language on the same
token budget, `Size.cp_tokens`, as the paper compares them (DESIGN.md).

- full:        full fine-tuning of the base on the mixed stream, all the tokens.
- lora:        LoRA adapters on every linear layer, the same tokens, merged into the weights after.
- elo:         detach the first and last layers, train them on `(1 - align_share)` of the tokens,
               merge them back ("no align"), then full fine-tuning of the merged model on the rest,
               from separate alignment text ("+ align"): the paper's 9 GB of ELO and 1 GB of alignment.
- elo-middle:  the same with the two middle layers (the paper's (16, 17) of 32).
- elo-align:   ELO on the first and last layers once, then each alignment method of
               `ALIGN_VARIANTS` from the same merged model: what each costs (time, peak memory)
               and how much of full alignment's perplexity recovery it keeps.

A new method is one function `(Experiment, MethodOptions) -> MethodResult` added to `METHODS`;
its rows then run with `replicate.py --methods NAME` and appear in every table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from replicate.corpus import log
from replicate.experiment import ALIGN_VARIANTS, Experiment, MethodResult, align_settings


@dataclass(frozen=True)
class MethodOptions:
    """Choices of a run that are not fields of the size preset."""

    middle_layers: tuple[int, int] | None = None  # elo-middle's pair (default: Size.middle_pair)


def full_or_lora(exp: Experiment, kind: str) -> MethodResult:
    """`kind` (full or lora) on all of cp_tokens, English share en_share."""
    s = exp.size
    res = MethodResult(name=kind, kind=kind, layers=None)
    run_dir = exp.runs / kind
    out = run_dir / "model"
    lr = s.cp_lr if kind == "full" else s.lora_lr
    res.stages.append(exp.train("cp", run_dir, exp.base_dir, out, method=kind, lr=lr,
                                data_cfg=exp.data_config("train", s.cp_tokens, s.en_share)))
    res.perplexity[kind] = exp.perplexity(out)
    res.trainable_params = exp.trainable_params(exp.base_dir, kind)
    return res


def elo(exp: Experiment, layers: tuple[int, ...]) -> MethodResult:
    """ELO on `layers`: detach, train, merge ("no align"), then align ("+ align")."""
    name = f"elo {tuple(layers)}"
    res = MethodResult(name=name, kind="elo", layers=list(layers))
    run_dir = exp.runs / ("elo-" + "-".join(map(str, layers)))
    merged = _merged(exp, layers, run_dir, res)
    align, aligned = exp.align(merged, run_dir)
    res.stages.append(align)
    res.perplexity[f"{name} + align"] = exp.perplexity(aligned)
    return res


def _merged(exp: Experiment, layers: tuple[int, ...], run_dir, res: MethodResult):
    """ELO's first half into `res`: detach, train and merge `layers`, the merged model's
    perplexity ("no align") and the parameters ELO trains; returns the merged model's folder."""
    stages, merged = exp.detach_merge(layers, run_dir)
    res.stages.extend(stages)
    res.perplexity[f"elo {tuple(layers)} no align"] = exp.perplexity(merged)
    res.trainable_params = exp.trainable_params(run_dir / "elo-init", "elo")
    return merged


def elo_align(exp: Experiment, layers: tuple[int, ...]) -> MethodResult:
    """ELO on `layers` (detach, train, merge), then every alignment method from the merged model;
    the model of each is labelled `elo (...) + align` (full) or `elo (...) + align VARIANT`."""
    name = f"elo {tuple(layers)}"
    res = MethodResult(name=f"{name}, alignment methods", kind="elo", layers=list(layers))
    run_dir = exp.runs / ("elo-align-" + "-".join(map(str, layers)))
    merged = _merged(exp, layers, run_dir, res)
    for variant in ALIGN_VARIANTS:
        try:
            align, aligned = exp.align(merged, run_dir, variant, layers)
        except Exception as e:  # a method that cannot run here (lora_layers with every layer whole): its row says so
            res.align_failed[variant] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log(f"{run_dir.name}: alignment {variant} failed: {res.align_failed[variant]}")
            continue
        res.stages.append(align)
        label = f"{name} + align" + ("" if variant == "full" else f" {variant}")
        res.perplexity[label] = exp.perplexity(aligned)
        res.align_stage[label] = align.stage
        settings = align_settings(variant, layers)
        res.align_trainable[label] = exp.trainable_params(merged, settings["method"], layers=settings.get("layers"))
    return res


METHODS: dict[str, Callable[[Experiment, MethodOptions], MethodResult]] = {
    "full": lambda exp, opt: full_or_lora(exp, "full"),
    "lora": lambda exp, opt: full_or_lora(exp, "lora"),
    "elo": lambda exp, opt: elo(exp, (0, exp.size.num_layers - 1)),
    "elo-middle": lambda exp, opt: elo(exp, opt.middle_layers or exp.size.middle_pair),
    "elo-align": lambda exp, opt: elo_align(exp, (0, exp.size.num_layers - 1)),
}
