"""``visionselector speed``: attach a method to a randomly initialised Qwen2.5-VL, generate, and time prefill.

The weights are random (nothing is downloaded), so the generated tokens mean nothing;
what it shows is the mechanics (tokens kept per sample, the same ``generate``
call, an exact no-op at retention 1) and the prefill time with and without compression.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

__all__ = ["SpeedConfig", "run_speed"]


@dataclass
class SpeedConfig:
    """Settings of :func:`run_speed`."""

    method: str = field(default="visionselector", metadata={"help": "selection method (see 'visionselector methods')"})
    retentions: tuple[float, ...] = field(default=(1.0, 0.5, 0.2, 0.1), metadata={"help": "retentions to time"})
    image_size: int = field(default=672, metadata={"help": "image side in pixels (patches of 14, merged 2x2)"})
    batch_size: int = field(default=2, metadata={"help": "samples per batch (images of two sizes)"})
    text_layers: int = field(default=8, metadata={"help": "decoder layers of the language model"})
    hidden_size: int = field(default=512, metadata={"help": "language model width"})
    repeats: int = field(default=5, metadata={"help": "timed prefills per retention (after one warm-up)"})
    new_tokens: int = field(default=8, metadata={"help": "tokens generated per sample"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    seed: int = field(default=0, metadata={"help": "seed of weights and inputs"})


def _demo_model(config: SpeedConfig):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..presets import qwen2_5_vl_config

    heads = max(1, config.hidden_size // 64)
    model_config = qwen2_5_vl_config(
        hidden_size=config.hidden_size, text_layers=config.text_layers, heads=heads, kv_heads=max(1, heads // 4),
        intermediate_size=3 * config.hidden_size, vocab_size=4096, vision_depth=4, vision_hidden=256,
        vision_heads=4, patch_size=14, window_size=112,
    )
    torch.manual_seed(config.seed)
    return Qwen2_5_VLForConditionalGeneration(model_config).eval()


def _timed_prefill(model, batch) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**batch, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def run_speed(config: SpeedConfig | None = None, *, print_fn=print) -> dict:
    """Run it and return its measurements (also printed)."""
    import visionselector as vs

    from ..presets import SampleSpec, synthetic_batch

    config = config or SpeedConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    model = _demo_model(config)
    grid = config.image_size // 14
    grid -= grid % 2
    sizes = [(grid, grid), (grid // 4 * 2, grid)]  # a square image and one of half its height
    samples = [SampleSpec(images=[sizes[i % 2]], prefix=12, suffix=20) for i in range(config.batch_size)]
    batch = synthetic_batch(model.config, samples, seed=config.seed)
    visual = [int((row == model.config.image_token_id).sum()) for row in batch["input_ids"]]
    parameters = sum(p.numel() for p in model.parameters())
    print_fn(f"method {config.method}; Qwen2.5-VL (random weights, {parameters / 1e6:.1f}M parameters, {config.text_layers} decoder layers "
             f"of width {config.hidden_size}, SDPA, {torch.get_num_threads()} CPU threads)")
    print_fn(f"batch of {len(samples)}: visual tokens per sample {visual}, "
             f"sequence length {batch['input_ids'].shape[1]} (left padding)")

    with torch.no_grad():
        reference_ids = model.generate(**batch, max_new_tokens=config.new_tokens, do_sample=False)
    vs.attach(model, method=config.method, retention=1.0)
    with torch.no_grad():
        same_ids = model.generate(**batch, max_new_tokens=config.new_tokens, do_sample=False)
    no_op = bool(torch.equal(reference_ids, same_ids))
    print_fn(f"retention 1.0 is an exact no-op: generated ids identical to the unpatched model: {no_op}")

    timings: dict[float, list[float]] = {r: [] for r in config.retentions}
    kept: dict[float, list[int]] = {}
    for retention in config.retentions:  # warm-up, and the number of tokens each retention keeps
        vs.set_retention(model, retention)
        _timed_prefill(model, batch)
        kept[retention] = [len(s) for s in vs.last_selection(model)]
    for _ in range(config.repeats):  # interleaved, so drift of the machine affects every variant alike
        for retention in config.retentions:
            vs.set_retention(model, retention)
            timings[retention].append(_timed_prefill(model, batch))

    full = statistics.median(timings[1.0]) if 1.0 in timings else None
    print_fn("")
    print_fn(f"{'retention':>9}  {'kept per sample':>16}  {'prefill ms (median)':>20}  {'spread ms':>10}  {'speed-up':>8}")
    rows = []
    for retention in config.retentions:
        median = statistics.median(timings[retention])
        spread = max(timings[retention]) - min(timings[retention])
        speedup = full / median if full else float("nan")
        rows.append({"retention": retention, "kept": kept[retention], "prefill_ms": median * 1e3,
                     "spread_ms": spread * 1e3, "speedup": speedup})
        print_fn(f"{retention:>9.2f}  {str(kept[retention]):>16}  {median * 1e3:>20.1f}  {spread * 1e3:>10.1f}  "
                 f"{speedup:>7.2f}x")

    vs.set_retention(model, 0.2)
    with torch.no_grad():
        pruned_ids = model.generate(**batch, max_new_tokens=config.new_tokens, do_sample=False)
    length = batch["input_ids"].shape[1]
    selection = vs.last_selection(model)
    print_fn("")
    print_fn(f"generate at retention 0.2 (same call as before): new token ids {pruned_ids[:, length:].tolist()}")
    print_fn(f"visual tokens kept by sample 0 (first 12 of {len(selection[0])}): {selection[0][:12].tolist()}")
    if config.method == "visionselector":
        print_fn("(an untrained scorer; train one with visionselector.train_selector)")
    vs.detach(model)
    return {"no_op": no_op, "rows": rows, "visual_tokens": visual}
