"""Training stages on Ray Train: one FSDP2 worker loop for ELO pretraining, alignment and SFT.

- `trainer.run_training`  the driver: checks, TorchTrainer, resume, result
- `loop`                  the worker loop (one per rank)
- `model`                 build on meta, choose trainable parameters, FSDP2, load tensor by tensor
- `optim`                 AdamW and the warm-up + cosine schedule
- `checkpoint`            sharded DCP checkpoints through Ray Train, resume checks
- `export`                the trained model as a HF safetensors checkpoint, tensor by tensor
- `metrics`               FLOPs per token, MFU, peak memory, the JSON-lines log
- `reader`                the `BatchReader` protocol the data plane implements
- `synthetic`             a fixed-rows reader for tests and benchmarks
"""

from elo_ray.train.errors import CheckpointMismatchError, DivergedError, TrainingError
from elo_ray.train.reader import Batch, BatchReader
from elo_ray.train.trainer import TrainResult, run_training

__all__ = [
    "Batch",
    "BatchReader",
    "CheckpointMismatchError",
    "DivergedError",
    "TrainResult",
    "TrainingError",
    "run_training",
]
