"""Training stages on Ray Train: one FSDP2 worker loop for ELO pretraining, alignment and SFT.

- `trainer.run_training`  the driver: checks, TorchTrainer, resume, result
- `loop`                  the worker loop (one per rank)
- `model`                 build on meta, choose trainable parameters, FSDP2, load tensor by tensor
- `optim`                 AdamW and the warm-up + cosine schedule
- `state`                 the train state (step, schedule, data position, tokens per language)
- `checkpoint`            sharded DCP checkpoints of model, optimizer and train state through Ray Train
- `export`                the trained model as a HF safetensors checkpoint, tensor by tensor
- `metrics`               FLOPs per token, MFU, peak memory, the JSON-lines log
- `reader`                the `BatchReader` protocol the data plane implements
- `synthetic`             a fixed-rows reader for tests and benchmarks

Names are imported on first use, so that `elo_ray.train.metrics` (used by the bare-PyTorch
benchmark on GPU machines without Ray) does not pull in Ray.
"""

import importlib

_EXPORTS = {
    "Batch": "elo_ray.train.reader",
    "BatchReader": "elo_ray.train.reader",
    "CheckpointMismatchError": "elo_ray.train.errors",
    "DivergedError": "elo_ray.train.errors",
    "TrainingError": "elo_ray.train.errors",
    "TrainResult": "elo_ray.train.trainer",
    "run_training": "elo_ray.train.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'elo_ray.train' has no attribute {name!r}")
