"""Prefill speed, generate latency, memory and FLOPs of each method at each retention.

All variants are timed in one run, interleaved round by round (so drift of a noisy
machine hits every variant alike), after warm-up, and reported as medians with their
spread. Speed-ups are against the unpatched model in the same run. Next to each
measured speed-up stand two limits:

* the *measured limit*: the same model run on the already-shortened sequence (the
  vision encoder still sees the whole image; the language model sees only the kept
  tokens, with no selection work), timed in the same rounds;
* the *FLOP limit*: prefill FLOPs of the unpatched model over those of the limit run.

FLOPs are counted by ``torch.utils.flop_counter`` on one real prefill per variant, split
into vision encoder (with its patch merger, the projector), scorer and language model.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapters.base import output_cache

__all__ = ["BenchConfig", "run_bench", "format_table"]

BASELINE = "none"


@dataclass
class BenchConfig:
    """Settings of ``visionselector bench``."""

    model: str = field(default="qwen2.5-vl-7b", metadata={
        "help": "architecture preset (qwen2.5-vl-3b, qwen2.5-vl-7b, qwen3-vl-8b, qwen3.5-27b: published widths, random "
                "weights), 'reference', a Qwen-family checkpoint folder or a hub id"})
    text_layers: int | None = field(default=None, metadata={"help": "keep only the first N decoder layers (presets)"})
    vision_layers: int | None = field(default=None, metadata={"help": "keep only the first N vision blocks (presets)"})
    methods: tuple[str, ...] = field(default=("visionselector",), metadata={
        "help": "methods to time: names, or variants NAME@OPTION=VALUE,... (divprune@merge=true)"})
    retentions: tuple[float, ...] = field(default=(1.0, 0.5, 0.3, 0.2, 0.1, 0.05), metadata={"help": "retentions"})
    image_size: int = field(default=448, metadata={"help": "image side in pixels (patches merged 2x2 into tokens)"})
    frames: int = field(default=0, metadata={"help": "video frames instead of an image (0: an image)"})
    batch_size: int = field(default=1, metadata={"help": "samples per batch"})
    prompt_tokens: int = field(default=48, metadata={"help": "text tokens around the image"})
    new_tokens: int = field(default=16, metadata={"help": "tokens generated for the generate latency (0: skip)"})
    dtype: str = field(default="auto", metadata={"help": "float32, bfloat16 or auto (bfloat16 on CUDA)"})
    attn: str = field(default="sdpa", metadata={"help": "attention implementation: sdpa, eager, flash_attention_2"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (cuda when available)"})
    repeats: int = field(default=5, metadata={"help": "timed rounds over all variants"})
    warmup: int = field(default=1, metadata={"help": "untimed rounds first"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})
    out: str | None = field(default=None, metadata={"help": "folder for bench.json and bench.png"})
    seed: int = field(default=0, metadata={"help": "seed of weights and inputs"})
    progress: bool = field(default=True, metadata={
        "help": "show a progress bar of rounds and variants on stderr (only when stderr is a terminal)"})


@dataclass
class Variant:
    method: str
    retention: float
    prefill_ms: list = field(default_factory=list)
    generate_ms: list = field(default_factory=list)
    tokens_kept: float | None = None
    kv_cache_mib: float | None = None
    peak_mib: float | None = None
    flops: dict | None = None
    attn_while_attached: str | None = None


def _resolve(config: BenchConfig):
    from ..commands.common import parse_device, parse_dtype

    device = parse_device(config.device)
    dtype = parse_dtype(config.dtype)
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def _check_config(config: BenchConfig) -> list[float]:
    """Every setting, before anything is built or timed; returns the retentions, largest first."""
    from ..commands.common import check_count, check_output_folder
    from ..ops.topk import validate_retention
    from .quality import parse_method_specs

    parse_method_specs(config.methods)
    if not config.methods:
        raise ValueError("give at least one method to time")
    retentions = sorted({validate_retention(r) for r in config.retentions}, reverse=True)
    if not retentions:
        raise ValueError("give at least one retention")
    for name, minimum in (("batch_size", 1), ("repeats", 1), ("warmup", 0), ("image_size", 1), ("frames", 0),
                          ("prompt_tokens", 0), ("new_tokens", 0), ("text_layers", 1), ("vision_layers", 1)):
        if getattr(config, name) is not None or name not in ("text_layers", "vision_layers"):
            check_count(name, getattr(config, name), minimum)
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {config.seed!r}")
    if config.out is not None:
        check_output_folder(config.out)
    return retentions


def _progress_bar(total: int, enabled: bool):
    """A bar on stderr; with ``enabled`` it still shows only when stderr is a terminal (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="benchmark", unit="run", disable=None if enabled else True)


def build_model(config: BenchConfig, device, dtype):
    """The model to time and a sentence saying what it is."""
    from ..adapters import ADAPTERS
    from ..adapters.positions import MRoPEPositions
    from ..presets import ARCHITECTURES, architecture_config

    if config.model in ARCHITECTURES:
        spec = ARCHITECTURES[config.model]
        model_config = architecture_config(config.model, text_layers=config.text_layers,
                                           vision_layers=config.vision_layers, attn_implementation=config.attn)
        from transformers.initialization import no_init_weights

        generation_class = ADAPTERS[spec["family"]].classes()[0]
        with torch.device(device), no_init_weights():
            model = generation_class._from_config(model_config, dtype=dtype)
        _fill_weights(model, config.seed)
        description = (f"{config.model} widths with random weights, {model_config.text_config.num_hidden_layers} of "
                       f"{spec['text_layers']} decoder layers and {model_config.vision_config.depth} of "
                       f"{spec['vision_depth']} vision blocks")
    else:
        from ..models import load_model

        try:
            model, _ = load_model(config.model, dtype=dtype, device=device, attn_implementation=config.attn,
                                  processor=False)
        except FileNotFoundError as error:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ValueError(f"model must be an architecture preset ({known}), 'reference', a checkpoint folder or "
                             f"a hub id: {error}") from None
        description = f"checkpoint {config.model}"
    if not isinstance(ADAPTERS[model.config.model_type].positions, MRoPEPositions):
        raise ValueError(f"bench builds Qwen-style synthetic inputs (M-RoPE families: "
                         f"{', '.join(n for n, a in ADAPTERS.items() if isinstance(a.positions, MRoPEPositions))}); "
                         f"{config.model} is a {model.config.model_type} model")
    return model.eval(), description


def _fill_weights(model, seed: int, tile_size: int = 1 << 20) -> None:
    """Give every weight small random values fast: speed does not depend on the values (as
    long as they are ordinary numbers), so a random tile is repeated through each tensor
    instead of drawing billions of numbers."""
    generator = torch.Generator().manual_seed(seed)
    tile = (torch.rand(tile_size, generator=generator) * 0.04 - 0.02)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.view(-1)
            if name.endswith("bias"):
                flat.zero_()
            elif "norm" in name:
                flat.fill_(1.0)
            else:
                source = tile.to(device=flat.device, dtype=flat.dtype)
                whole = flat.numel() // tile_size * tile_size
                flat[:whole].view(-1, tile_size).copy_(source.expand(whole // tile_size, tile_size))
                flat[whole:].copy_(source[:flat.numel() - whole])


def build_inputs(model, config: BenchConfig, device):
    from ..presets import SampleSpec, synthetic_batch

    patch = model.config.vision_config.patch_size
    grid = max(2, round(config.image_size / patch / 2) * 2)
    prefix = config.prompt_tokens // 3
    if config.frames:
        spec = SampleSpec(videos=[(max(1, config.frames // 2), grid, grid)], prefix=prefix,
                          suffix=config.prompt_tokens - prefix)
    else:
        spec = SampleSpec(images=[(grid, grid)], prefix=prefix, suffix=config.prompt_tokens - prefix)
    batch = synthetic_batch(model.config, [spec] * config.batch_size, seed=config.seed, device=device)
    from ..adapters import find_adapter

    adapter = find_adapter(model)
    dtype = adapter.vision_tower(adapter.core(model)).dtype
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch:
            batch[key] = batch[key].to(dtype)
    return batch


class _Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, function) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        function()
        return (time.perf_counter() - begin) * 1e3


def _cache_mib(cache) -> float | None:
    """Memory of a cache's tensors, in MiB."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if torch.is_tensor(tensor):
                total += tensor.numel() * tensor.element_size()
    return total / 2**20


def _flops_by_part(model, run) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, depth=None) as counter:
        run()
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    root = type(model).__name__
    from ..adapters import find_adapter

    adapter = find_adapter(model)
    core = adapter.core(model)
    names = {id(module): name for name, module in model.named_modules()}
    vision, text = names[id(adapter.vision_tower(core))], names[id(adapter.text_model(core))]

    def part(*suffixes):
        # Sum the outermost modules recorded under each prefix: a module called directly
        # (not through its parent's forward) is recorded without its parent.
        total = 0
        for suffix in suffixes:
            prefix = f"{root}.{suffix}"
            under = {name for name in counts if name == prefix or name.startswith(prefix + ".")}
            total += sum(counts[name] for name in under if not any(
                name.startswith(other + ".") for other in under))
        return total

    scorer = part("visual_token_selector")
    return {
        "total": counts.get("Global", 0),
        "vision_encoder": part(vision),
        "scorer": scorer,
        # The scorer runs inside the language model's (wrapped) forward; count it once.
        "language_model": part(text, "lm_head") - scorer,
    }


def _limit_runner(model, batch, kept_per_sample: int, text_tokens: int, device, dtype):
    """Encoder on the whole image, then the language model on ``text + kept`` random embeddings."""
    from ..adapters import find_adapter

    adapter = find_adapter(model)
    text_model = adapter.text_model(adapter.core(model))
    length = text_tokens + kept_per_sample
    generator = torch.Generator(device="cpu").manual_seed(1)
    embeds = torch.randn(batch["input_ids"].shape[0], length, model.config.text_config.hidden_size,
                         generator=generator).to(device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            adapter.run_vision(model, batch)
            hidden = text_model(inputs_embeds=embeds, use_cache=True).last_hidden_state
            model.lm_head(hidden[:, -1:])

    return run


def run_bench(config: BenchConfig, *, print_fn=print) -> dict:
    """Time every (method, retention), the unpatched model and the limits; return the report."""
    import visionselector as vs

    from ..commands.common import set_threads
    from ..ops.topk import token_budget

    from .quality import parse_method_specs

    retentions = _check_config(config)
    rows = {row.label: row for row in parse_method_specs(config.methods)}
    set_threads(config.threads)
    device, dtype = _resolve(config)
    model, description = build_model(config, device, dtype)
    batch = build_inputs(model, config, device)
    from ..adapters import find_adapter

    visual_per_sample = int(find_adapter(model).visual_mask(model, batch["input_ids"][:1]).sum())
    text_tokens = batch["input_ids"].shape[1] - visual_per_sample
    def attached(label: str):
        return vs.attached(model, method=rows[label].method, retention=retentions[0], **rows[label].options)

    for method in config.methods:  # fail now, not after minutes of timing, if a method cannot attach
        with attached(method):
            pass
    timer = _Timer(device)
    print_fn(f"{description}; {str(dtype).replace('torch.', '')}, {config.attn}, {device.type}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                f" ({torch.get_num_threads()} threads)"))
    print_fn(f"batch of {config.batch_size}: {visual_per_sample} visual and {text_tokens} text tokens per sample")

    def prefill():
        with torch.no_grad():
            return model(**batch, use_cache=True, logits_to_keep=1)

    def generate():
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens,
                           do_sample=False)

    baseline = Variant(BASELINE, 1.0, tokens_kept=visual_per_sample)
    variants = {(method, r): Variant(method, r) for method in config.methods for r in retentions}
    limits = {}
    for r in retentions:
        kept = int(token_budget(r, torch.tensor([visual_per_sample]))[0])
        limits.setdefault(kept, Variant("limit", r, tokens_kept=kept))

    def measure_once(variant: Variant, timed: bool, run_prefill, with_generate: bool):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        elapsed = timer(run_prefill)
        if timed:
            variant.prefill_ms.append(elapsed)
            if device.type == "cuda":
                variant.peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        if with_generate and config.new_tokens > 0:
            elapsed = timer(generate)
            if timed:
                variant.generate_ms.append(elapsed)

    limit_runs = {kept: _limit_runner(model, batch, kept, text_tokens, device, dtype) for kept in limits}
    rounds = config.warmup + config.repeats
    per_round = 1 + len(limits) + len(variants)
    # Every run of every round, then the FLOP-counting pass: on a large model each is seconds.
    progress = _progress_bar((rounds + 1) * per_round, config.progress)

    def step(stage: str, label: str) -> None:
        progress.set_postfix_str(f"{stage}: {label}", refresh=False)

    try:
        for round_index in range(rounds):
            timed = round_index >= config.warmup
            stage = f"round {round_index + 1}/{rounds}" + ("" if timed else " (warm-up)")
            step(stage, BASELINE)
            measure_once(baseline, timed, prefill, True)
            progress.update(1)
            for kept, variant in limits.items():
                step(stage, f"limit {kept} tokens")
                measure_once(variant, timed, limit_runs[kept], False)
                progress.update(1)
            for method in config.methods:
                with attached(method):
                    for r in retentions:
                        step(stage, f"{method} r={r:g}")
                        vs.set_retention(model, r)
                        measure_once(variants[(method, r)], timed, prefill, True)
                        progress.update(1)

        # One more prefill per variant, outside the timed rounds, for FLOPs, tokens and cache size.
        step("FLOPs", BASELINE)
        baseline.flops = _flops_by_part(model, prefill)
        baseline.kv_cache_mib = _cache_mib(output_cache(prefill()))
        progress.update(1)
        for kept, variant in limits.items():
            step("FLOPs", f"limit {kept} tokens")
            variant.flops = _flops_by_part(model, limit_runs[kept])
            progress.update(1)
        for method in config.methods:
            with attached(method):
                for r in retentions:
                    step("FLOPs", f"{method} r={r:g}")
                    vs.set_retention(model, r)
                    variant = variants[(method, r)]
                    variant.flops = _flops_by_part(model, prefill)
                    variant.kv_cache_mib = _cache_mib(output_cache(prefill()))
                    variant.tokens_kept = statistics.mean(len(s) for s in vs.last_selection(model))
                    variant.attn_while_attached = model.config.text_config._attn_implementation
                    progress.update(1)
    finally:
        progress.close()

    records = _records(baseline, variants, limits, visual_per_sample)
    report = {
        "description": description,
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "attn": config.attn,
        "visual_tokens_per_sample": visual_per_sample,
        "text_tokens_per_sample": text_tokens,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "baseline": _summary(baseline),
        "records": records,
    }
    print_fn(format_table(report))
    if config.out:
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(report, out / "bench.png")
        print_fn(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report


def _median(values):
    return statistics.median(values) if values else None


def _summary(variant: Variant) -> dict:
    return {
        "prefill_ms": _median(variant.prefill_ms),
        "prefill_ms_min": min(variant.prefill_ms) if variant.prefill_ms else None,
        "prefill_ms_max": max(variant.prefill_ms) if variant.prefill_ms else None,
        "generate_ms": _median(variant.generate_ms),
        "tokens_kept": variant.tokens_kept,
        "kv_cache_mib": variant.kv_cache_mib,
        "peak_mib": variant.peak_mib,
        "flops": variant.flops,
        "attn_while_attached": variant.attn_while_attached,
    }


def _records(baseline: Variant, variants: dict, limits: dict, visual_per_sample: int) -> list[dict]:
    from ..methods import get_method_class
    from .quality import VARIANT_SEPARATOR
    from ..ops.topk import token_budget

    base = _summary(baseline)
    records = []
    for (method, retention), variant in variants.items():
        summary = _summary(variant)
        kept = int(token_budget(retention, torch.tensor([visual_per_sample]))[0])
        limit = _summary(limits[kept])
        flops = summary["flops"]
        record = {"method": method, "retention": retention, **summary,
                  "speedup": base["prefill_ms"] / summary["prefill_ms"],
                  "limit_prefill_ms": limit["prefill_ms"],
                  "limit_speedup": base["prefill_ms"] / limit["prefill_ms"],
                  "flop_limit_speedup": base["flops"]["total"] / limit["flops"]["total"],
                  "flop_speedup": base["flops"]["total"] / flops["total"],
                  "scorer_share": flops["scorer"] / flops["total"] if flops["total"] else 0.0,
                  "generate_speedup": (base["generate_ms"] / summary["generate_ms"]
                                       if base["generate_ms"] and summary["generate_ms"] else None)}
        record["of_limit"] = record["speedup"] / record["limit_speedup"]
        if get_method_class(method.partition(VARIANT_SEPARATOR)[0]).inside_llm:
            # The limit shortens the sequence before the LLM; a method pruning inside it cannot reach that.
            record["of_limit"] = None
        records.append(record)
    return records


def format_table(report: dict) -> str:
    base = report["baseline"]
    lines = [
        f"unpatched prefill {base['prefill_ms']:.1f} ms (range {base['prefill_ms_min']:.1f}..{base['prefill_ms_max']:.1f}),"
        f" {base['flops']['total'] / 1e9:.1f} GFLOP (vision encoder {base['flops']['vision_encoder'] / 1e9:.1f},"
        f" language model {base['flops']['language_model'] / 1e9:.1f})"
        + (f", generate {base['generate_ms']:.0f} ms" if base["generate_ms"] else ""),
        "",
        f"{'method':>14} {'ret':>5} {'kept':>6} {'prefill ms':>11} {'range':>15} {'speed-up':>8} {'limit':>7}"
        f" {'of limit':>8} {'FLOP x':>7} {'FLOP lim':>8} {'scorer':>8} {'gen ms':>8} {'KV MiB':>7} {'peak MiB':>8}",
    ]
    for r in report["records"]:
        lines.append(
            f"{r['method']:>14} {r['retention']:>5.2f} {r['tokens_kept']:>6.0f} {r['prefill_ms']:>11.1f}"
            f" {r['prefill_ms_min']:>7.1f}..{r['prefill_ms_max']:<7.1f}{r['speedup']:>7.2f}x {r['limit_speedup']:>6.2f}x"
            + (f" {r['of_limit'] * 100:>7.0f}%" if r["of_limit"] is not None else f" {'n/a':>8}")
            + f" {r['flop_speedup']:>6.2f}x {r['flop_limit_speedup']:>7.2f}x {r['scorer_share'] * 100:>7.3f}%"
            f" {(r['generate_ms'] or math.nan):>8.0f} {(r['kv_cache_mib'] or math.nan):>7.1f}"
            f" {(r['peak_mib'] if r['peak_mib'] is not None else math.nan):>8.0f}"
        )
    lines.append("speed-up: unpatched / method prefill; limit: unpatched / (same model on the already-shortened "
                 "sequence); of limit: speed-up / limit (n/a for methods that prune inside the LLM); FLOP x: FLOP "
                 "ratio unpatched / method; FLOP lim: FLOP ratio of the limit; scorer: share of prefill FLOPs")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in report["records"]})
    for method in methods:
        rows = sorted((r for r in report["records"] if r["method"] == method), key=lambda r: r["retention"])
        axis.plot([r["retention"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"{method} (measured)")
    rows = sorted({r["retention"]: r for r in report["records"]}.values(), key=lambda r: r["retention"])
    axis.plot([r["retention"] for r in rows], [r["limit_speedup"] for r in rows], "k--", label="limit (measured)")
    axis.plot([r["retention"] for r in rows], [r["flop_limit_speedup"] for r in rows], "k:", label="limit (FLOPs)")
    axis.set_xlabel("retention (fraction of visual tokens kept)")
    axis.set_ylabel("prefill speed-up vs unpatched")
    axis.set_title(f"{report['description']}\n{report['dtype']}, {report['attn']}, {report['device']}", fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
