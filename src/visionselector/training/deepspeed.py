"""A DeepSpeed config file for selector training: ZeRO-3 partitions the frozen model.

The scorer is small (12.85M weights for Qwen2.5-VL-7B; 150 MB with its Adam state), so what
ZeRO stages 1 and 2 shard (optimizer state, gradients) is not worth sharding: the scorer stays
whole on every process, with this library's optimizer, gradient sum and checkpoints (which is
also what lets a run resume on another number of processes). What does not fit is the frozen
model: ZeRO-3 partitions its weights over the processes from the moment they load (and can
offload them to CPU memory or NVMe), gathering each module's weights while it runs, forward and
backward. A config file's other settings are read where they have a meaning here (bf16/fp16,
the micro-batch size, the batch size, gradient clipping) and must agree with the command's.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DeepSpeedPlan", "full_parameters"]

# Entries that transformers' Trainer fills from the model's hidden size when they say "auto"; left
# out here, DeepSpeed uses its own defaults for them.
_HIDDEN_SIZE_ENTRIES = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


@dataclass
class DeepSpeedPlan:
    """What a DeepSpeed config file asks of a selector training run."""

    path: Path
    config: dict
    stage: int
    dtype: str | None = None  # "bfloat16" / "float16" when the file enables them
    micro_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path, *, batch_size: int, micro_batch_size: int | None, dtype: str,
             max_grad_norm: float) -> "DeepSpeedPlan":
        """Read and check ``path`` against the command's settings; ``ValueError`` naming any conflict."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"DeepSpeed config not found: {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"DeepSpeed config {path} is not valid JSON: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"DeepSpeed config {path} must hold a JSON object")
        zero = config.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError(f"DeepSpeed config {path}: zero_optimization must be an object")
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        plan = cls(path, config, stage)
        plan._read_precision(dtype)
        plan._read_batch(batch_size, micro_batch_size)
        clipping = config.get("gradient_clipping", "auto")
        if clipping != "auto" and clipping != max_grad_norm:
            raise ValueError(f"DeepSpeed config {path} has gradient_clipping {clipping!r} but --max-grad-norm is "
                             f"{max_grad_norm:g}; make them agree (or write \"auto\" in the file)")
        for section in ("optimizer", "scheduler"):
            if section in config:
                plan.notes.append(f"its {section} section is not used: the scorer trains with AdamW and a cosine "
                                  "schedule with warm-up, set by --learning-rate, --weight-decay and --warmup-ratio")
        if stage in (1, 2):
            plan.notes.append(f"ZeRO stage {stage} shards optimizer state and gradients, which for the scorer "
                              "are too small to shard; the run is plain data parallel (stage 3 partitions the model)")
        return plan

    def _read_precision(self, dtype: str) -> None:
        enabled = [name for name, key in (("bfloat16", "bf16"), ("float16", "fp16"))
                   if _is_enabled(self.config.get(key), self.path, key, auto=dtype == name)]
        if len(enabled) > 1:
            raise ValueError(f"DeepSpeed config {self.path} enables both bf16 and fp16; enable at most one")
        if enabled:
            if dtype not in ("auto", enabled[0]):
                raise ValueError(f"DeepSpeed config {self.path} enables {enabled[0]} but --dtype is {dtype}; make "
                                 "them agree")
            self.dtype = enabled[0]

    def _read_batch(self, batch_size: int, micro_batch_size: int | None) -> None:
        micro = self.config.get("train_micro_batch_size_per_gpu", "auto")
        if micro != "auto":
            if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
                raise ValueError(f"DeepSpeed config {self.path}: train_micro_batch_size_per_gpu must be a positive "
                                 f"integer or \"auto\", got {micro!r}")
            if micro_batch_size is not None and micro != micro_batch_size:
                raise ValueError(f"DeepSpeed config {self.path} has train_micro_batch_size_per_gpu {micro} but "
                                 f"--micro-batch-size is {micro_batch_size}; make them agree")
            self.micro_batch_size = micro
        total = self.config.get("train_batch_size", "auto")
        if total != "auto" and total != batch_size:
            raise ValueError(f"DeepSpeed config {self.path} has train_batch_size {total!r} but --batch-size (the "
                             f"examples of a step over all processes) is {batch_size}; make them agree")

    @property
    def partitions_model(self) -> bool:
        return self.stage == 3

    def engine_config(self) -> dict:
        """The config ZeRO-3 gets: the file's ZeRO and precision settings, without what this run does itself."""
        zero = {key: value for key, value in self.config.get("zero_optimization", {}).items()
                if not (key in _HIDDEN_SIZE_ENTRIES and value == "auto")}
        leftover = sorted(key for key, value in zero.items() if value == "auto")
        if leftover:
            raise ValueError(f"DeepSpeed config {self.path}: cannot resolve \"auto\" for zero_optimization."
                             f"{', zero_optimization.'.join(leftover)}; give values")
        config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": self.micro_batch_size or 1,
                  "gradient_accumulation_steps": 1}
        if self.dtype is not None:
            config["bf16" if self.dtype == "bfloat16" else "fp16"] = {"enabled": True}
        return config

    def loading(self):
        """A context to load the model in: under ZeRO-3, each weight is partitioned as it loads,
        so that no process ever holds the whole model."""
        if not self.partitions_model:
            return nullcontext()
        return _partitioned_loading(self.engine_config())

    def partition(self, model):
        """Install ZeRO-3 on the loaded model; returns the engine (keep it while the model is used)."""
        if not self.partitions_model:
            return None
        deepspeed = _import_deepspeed()
        engine, *_ = deepspeed.initialize(model=model, config=self.engine_config())
        return engine


def _is_enabled(section, path, key: str, auto: bool) -> bool:
    if section is None:
        return False
    if not isinstance(section, dict) or "enabled" not in section:
        raise ValueError(f"DeepSpeed config {path}: {key} must be an object with an \"enabled\" entry")
    value = section["enabled"]
    if value == "auto":
        return auto
    if not isinstance(value, bool):
        raise ValueError(f"DeepSpeed config {path}: {key}.enabled must be true, false or \"auto\", got {value!r}")
    return value


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ValueError("--deepspeed needs the deepspeed package: pip install --no-build-isolation "
                         "'visionselector[deepspeed]' (after PyTorch)") from None
    return deepspeed


@contextmanager
def _partitioned_loading(config: dict):
    _import_deepspeed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    # transformers loads weights partitioned (deepspeed.zero.Init) while this object is alive.
    keeper = HfDeepSpeedConfig(config)
    try:
        yield keeper
    finally:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def full_parameters(module):
    """A context in which ``module``'s weights are whole, also where ZeRO-3 partitioned them
    (reading them then gathers them from every process, so every process must enter it)."""
    parameters = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not parameters:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters)
