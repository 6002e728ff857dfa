"""The ``visionselector`` model of lmms-eval: any supported checkpoint, with any selection method.

.. code-block:: bash

    lmms-eval --model visionselector --tasks mme --batch_size 8 \\
        --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=divprune,retention=0.2

lmms-eval (0.6 and later) finds plugin models in the ``lmms_eval.models`` entry-point group:
each entry point gives a ``ModelManifest`` (a model name and the import path of its class) or a
callable that returns one. This package declares :func:`model_manifest` there. ``import
visionselector`` never imports lmms-eval; this module does, and only lmms-eval (or a user of
the plugin) imports this module.

``model_args`` (``KEY=VALUE`` separated by commas):

* ``pretrained``: a checkpoint folder, a hub id or ``reference`` (required).
* ``method``: a registered method (``visionselector methods`` lists them), or ``none`` for the
  unpruned model, the baseline (required).
* ``retention``: fraction of each sample's visual tokens kept, in (0, 1] (required with a method).
* ``selector``: a trained selector (folder or hub id) for the trainable methods.
* ``dtype``: ``auto`` (default: the checkpoint's on GPUs, float32 on CPUs), ``float32``,
  ``bfloat16`` or ``float16``; ``attn_implementation``: ``sdpa``, ``eager``, ...
* ``max_new_tokens``: answer length when the task's ``generation_kwargs`` do not set it (256).
* any option of the method (``layer=2`` for ``fastv``), passed to :func:`visionselector.attach`.

``--batch_size`` and ``--device`` come from lmms-eval's own options.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    from lmms_eval.api.model import lmms
    from loguru import logger
except ImportError as error:  # pragma: no cover - the module is only imported with lmms-eval installed
    raise ImportError("visionselector.integrations.lmms_eval needs lmms-eval: pip install "
                      "\"visionselector[lmms-eval]\"") from error

import visionselector as vs
from visionselector.commands.common import parse_dtype

__all__ = ["MODEL_NAME", "NO_PRUNING", "PLUGIN_ARGUMENTS", "TokensKept", "VisionSelectorLMM", "model_manifest"]

# The name lmms-eval's --model takes.
MODEL_NAME = "visionselector"
# method=none: the model without a selection method, the baseline every table needs.
NO_PRUNING = "none"
# The plugin's own model_args; every other key must be an option of the method.
PLUGIN_ARGUMENTS = ("pretrained", "method", "retention", "selector", "batch_size", "device", "dtype",
                    "max_new_tokens", "attn_implementation")
DEFAULT_MAX_NEW_TOKENS = 256
# generation_kwargs keys that reach generate; tasks also carry keys meant for other models
# (image_aspect_ratio, ...), which are left out.
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IGNORE_INDEX = -100


def model_manifest():
    """The entry point's payload: model ``visionselector`` is :class:`VisionSelectorLMM`, a simple model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{VisionSelectorLMM.__name__}")


@dataclass
class TokensKept:
    """Visual tokens of the samples seen, before selection and kept, summed."""

    samples: int = 0
    visual_tokens: int = 0
    kept_tokens: int = 0

    def add(self, visual: list[int], kept: list[int]) -> None:
        self.samples += len(visual)
        self.visual_tokens += sum(visual)
        self.kept_tokens += sum(kept)

    def merge(self, other: "TokensKept") -> None:
        self.samples += other.samples
        self.visual_tokens += other.visual_tokens
        self.kept_tokens += other.kept_tokens

    @property
    def fraction(self) -> float:
        """Visual tokens kept over visual tokens (NaN before any sample with one)."""
        return self.kept_tokens / self.visual_tokens if self.visual_tokens else math.nan

    def as_dict(self) -> dict:
        samples = max(self.samples, 1)
        return {"samples": self.samples, "visual_tokens": self.visual_tokens, "kept_tokens": self.kept_tokens,
                "fraction_kept": self.fraction, "visual_tokens_per_sample": self.visual_tokens / samples,
                "kept_tokens_per_sample": self.kept_tokens / samples}

    def describe(self) -> str:
        if not self.visual_tokens:
            return f"tokens kept: no visual tokens in {self.samples} samples"
        numbers = self.as_dict()
        return (f"tokens kept: {100 * self.fraction:.2f}% of visual tokens ({numbers['kept_tokens_per_sample']:.1f} of "
                f"{numbers['visual_tokens_per_sample']:.1f} per sample; {self.kept_tokens} of {self.visual_tokens} "
                f"over {self.samples} samples)")


@dataclass
class _Prompt:
    """One request made ready for the processor: its chat-formatted text and its images."""

    text: str
    images: list


class VisionSelectorLMM(lmms):
    """A supported checkpoint with a selection method attached, as an lmms-eval model.

    It is a *simple* model (``is_simple = True``): lmms-eval hands each request over as the
    task's prompt text plus a function that gives the document's images, both for
    ``generate_until`` and for ``loglikelihood``. The *chat* style hands over structured
    messages instead, but lmms-eval builds chat requests for generation only (its message
    tasks refuse ``loglikelihood``), so the simple style is the one that serves every request
    type. The checkpoint's own chat template writes the prompt either way: one user turn
    holding the images, then the prompt text (``<image>`` tags removed: the template places
    the images), which is the layout lmms-eval's chat requests use for tasks that do not write
    their own messages, followed by the template's generation prompt.

    Requests are batched for real: up to ``batch_size`` prompts (sharing generation settings)
    go through the processor together, left-padded, into one ``generate`` or one forward. A
    padded batch gives each sample what it gets alone, so results do not depend on the batch
    size. Decoding is greedy unless the task sets ``do_sample: true``.

    ``tokens_kept`` (:class:`TokensKept`) sums the visual tokens before and after selection
    over every request so far; each call also logs a ``tokens kept: ...`` line through
    lmms-eval's logger and adds ``visual_tokens_kept_fraction`` (with per-sample counts) to
    the run's ``throughput`` results.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, method: str | None = None, retention: float | None = None,
                 selector: str | None = None, batch_size: int | str = 1, device: str | None = None,
                 dtype: str = "auto", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 attn_implementation: str | None = None, max_batch_size: int | None = None, **method_options) -> None:
        # max_batch_size: lmms-eval passes its --max_batch_size, which only serves batch_size=auto (refused here).
        super().__init__()
        # Every argument is checked before the model loads, so that a typo costs no loading time.
        if pretrained is None:
            raise ValueError("model_args must name the checkpoint: pretrained=PATH_OR_HUB_ID (a checkpoint folder, "
                             "a hub id or 'reference')")
        self.method, self.retention, self.method_options = _checked_method(method, retention, selector,
                                                                           method_options)
        self.selector = selector
        self._batch_size = _whole_number("batch_size", batch_size)
        self.default_max_new_tokens = _whole_number("max_new_tokens", max_new_tokens)
        self._device = _checked_device(device)
        dtype = parse_dtype(dtype)
        _refuse_data_parallel()
        model, processor = vs.load_model(str(pretrained), dtype=dtype, device=self._device,
                                         attn_implementation=attn_implementation)
        if self.method != NO_PRUNING:
            vs.attach(model, method=self.method, retention=self.retention, selector=selector, **self.method_options)
        self._model, self._processor = model, processor
        from ..data.encoding import placeholder_ids

        self._placeholders = torch.tensor(placeholder_ids(processor))
        self._reads_prompt = self.method != NO_PRUNING and "prompt" in vs.get_method(model).needs
        self.tokens_kept = TokensKept()
        logger.info(f"visionselector: {pretrained} with {self.label}"
                    + (f", selector {selector}" if selector is not None else ""))

    # -- what lmms-eval reads ---------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def tokenizer(self):
        return self._processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def label(self) -> str:
        """The method, its retention and options, as the logs name the run."""
        if self.method == NO_PRUNING:
            return "method=none (all visual tokens)"
        options = "".join(f", {key}={value}" for key, value in self.method_options.items())
        return f"method={self.method}, retention={self.retention:g}{options}"

    # -- requests ---------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Answers of ``generate_until`` requests: ``(context, generation_kwargs, doc_to_visual,
        doc_id, task, split)``. ``max_new_tokens`` comes from the task's generation_kwargs (or
        the model_arg), greedy unless ``do_sample`` is true; each answer is cut before the first
        of the task's ``until`` strings, at which generation also stops."""
        answers: list[str | None] = [None] * len(requests)
        tally, generated, started = TokensKept(), 0, time.perf_counter()
        with _progress(len(requests), "generate_until") as bar:
            for batch in self._batches(requests, _generation_key):
                generation_kwargs = batch[0][1][1]
                settings, stops = self._generation_settings(generation_kwargs)
                inputs = self._encode([self._prompt(args) for _, args in batch])
                with torch.no_grad():
                    output = self._model.generate(**inputs, **settings)
                tally.add(*self._token_counts(inputs))
                new_tokens = output[:, inputs["input_ids"].shape[1]:]
                generated += int((new_tokens != settings["pad_token_id"]).sum())
                texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for (position, args), text in zip(batch, texts):
                    answers[position] = _cut_at_stops(text, stops)
                    self.cache_hook.add_partial("generate_until", (args[0], generation_kwargs), answers[position])
                bar.update(len(batch))
        self._report("generate_until", tally, time.perf_counter() - started, generated)
        return answers

    def loglikelihood(self, requests) -> list:
        """``(value, is_greedy)`` of each ``loglikelihood`` request: ``(context, continuation or
        doc_to_target, doc_to_visual, doc_id, task, split)``, or ``(context, continuation)``.
        With lmms-eval 0.7 each pair comes wrapped so that its evaluator keeps it whole
        (:func:`_for_the_evaluator`); ``lmms_eval.api.instance.unwrap_generation_output`` gives
        it back.

        ``value`` follows lmms-eval's convention rather than the sign its base class describes:
        its ``multiple_choice`` tasks pick the choice with the *smallest* value, and its own
        Hugging Face models return the language-model loss. So ``value`` is the mean negative
        log-likelihood per continuation token, ``-sum(log p(token)) / n`` (``-value * n`` is the
        continuation's log-probability), and ``is_greedy`` says whether greedy decoding would
        produce every continuation token. The continuation follows the chat template's
        generation prompt, tokenized with it (its ``n`` tokens are those the whole text has
        beyond the prompt's).

        With a method that reads the prompt (``visionselector_q``, ``cdpruner``) the forward is
        given labels on the continuation, so that the method leaves the answer out of what it
        reads and selects exactly what it selects for generation. (FastV and DART select by the
        attention of the last token, which is here the continuation's last.) The logits cover
        the kept tokens only; the labels are compacted the same way to find each continuation
        token's logits.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        tally, started = TokensKept(), time.perf_counter()
        with _progress(len(requests), "loglikelihood") as bar:
            for batch in self._batches(requests, lambda args: None):
                continuations = [self._continuation(args) for _, args in batch]
                prompts = [self._prompt(args) for _, args in batch]
                lengths = [self._continuation_length(prompt.text, continuation)
                           for prompt, continuation in zip(prompts, continuations)]
                inputs = self._encode([_Prompt(prompt.text + continuation, prompt.images)
                                       for prompt, continuation in zip(prompts, continuations)])
                labels = _continuation_labels(inputs["input_ids"], lengths)
                # Only a method that reads the prompt needs the labels, to leave the continuation out of
                # it; the others are spared the loss over the whole batch's logits that labels bring.
                given = {"labels": labels} if self._reads_prompt else {}
                with torch.no_grad():
                    logits = self._model(**inputs, **given).logits
                tally.add(*self._token_counts(inputs))
                scored = self._labels_of_kept_tokens(labels)
                for row, ((position, args), continuation) in enumerate(zip(batch, continuations)):
                    results[position] = _continuation_score(logits[row], scored[row], lengths[row])
                    self.cache_hook.add_partial("loglikelihood", (args[0], continuation), results[position])
                bar.update(len(batch))
        self._report("loglikelihood", tally, time.perf_counter() - started, 0)
        return [_for_the_evaluator(pair) for pair in results]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the visionselector model answers single-turn requests (generate_until and "
                                  "loglikelihood); multi-round tasks are not supported")

    # -- prompts and batches ----------------------------------------------------------------

    def _batches(self, requests, key):
        """``[(position, args), ...]`` batches of at most ``batch_size`` requests with the same
        ``key(args)``, longest prompts first so that each batch pads little."""
        groups: dict = {}
        for position, request in enumerate(requests):
            groups.setdefault(key(request.args), []).append((position, request.args))
        for members in groups.values():
            members.sort(key=lambda member: -len(member[1][0]))
            for start in range(0, len(members), self._batch_size):
                yield members[start:start + self._batch_size]

    def _prompt(self, args: tuple) -> _Prompt:
        """The chat-formatted prompt of a request and its images. Both request types start
        ``(context, _, doc_to_visual, doc_id, task, split)``; ``(context, continuation)`` has no images."""
        context = args[0]
        images = self._images(*args[2:6]) if len(args) >= 6 else []
        if not isinstance(context, str):
            raise TypeError(f"a request's context must be text, got {type(context).__name__}")
        # Tags written for models that place images by tag; the chat template places them here.
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context.replace("<image>", "")}]
        text = self._processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True)
        return _Prompt(text, images)

    def _images(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        document = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(document) or []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        return [_as_image(visual, f"task {task!r}, document {doc_id}") for visual in visuals]

    def _continuation(self, args: tuple) -> str:
        target = args[1]
        if callable(target):
            target = target(self.task_dict[args[4]][args[5]][args[3]])
        if not isinstance(target, str) or not target:
            raise ValueError(f"a loglikelihood continuation must be non-empty text, got {target!r} (check the task's "
                             "doc_to_target)")
        return target

    def _continuation_length(self, prompt: str, continuation: str) -> int:
        """Tokens the continuation adds to the prompt, as the processor tokenizes the whole text."""
        whole = len(self.tokenizer(prompt + continuation)["input_ids"])
        alone = len(self.tokenizer(prompt)["input_ids"])
        if whole <= alone:
            raise ValueError(f"the continuation {continuation!r} adds no token to the prompt")
        return whole - alone

    def _encode(self, prompts: list[_Prompt]) -> dict:
        """One left-padded batch through the processor, on the model's device."""
        images = [image for prompt in prompts for image in prompt.images]
        batch = self._processor(text=[prompt.text for prompt in prompts], images=images or None, padding=True,
                                padding_side="left", return_tensors="pt")
        return {name: value.to(self._device) if torch.is_tensor(value) else value for name, value in batch.items()}

    def _generation_settings(self, generation_kwargs: dict) -> tuple[dict, list[str]]:
        """``generate`` keyword arguments for a task's generation_kwargs, and its stop strings."""
        from ..models import greedy_settings

        generation_kwargs = dict(generation_kwargs or {})
        max_new_tokens = _whole_number("max_new_tokens (in generation_kwargs)",
                                       generation_kwargs.get("max_new_tokens", self.default_max_new_tokens))
        settings = greedy_settings(self._model, self._processor, max_new_tokens)
        if "num_beams" in generation_kwargs:
            settings["num_beams"] = _whole_number("num_beams (in generation_kwargs)", generation_kwargs["num_beams"])
        if generation_kwargs.get("do_sample") is True:
            settings["do_sample"] = True
            settings.update({key: generation_kwargs[key] for key in SAMPLING_KEYS if key in generation_kwargs})
        stops = _stop_strings(generation_kwargs.get("until"))
        if stops:
            # Stops generation as soon as a stop string is written; the answer is cut there as well.
            settings.update(stop_strings=stops, tokenizer=self.tokenizer)
        return settings, stops

    # -- tokens kept and log-likelihoods ----------------------------------------------------------

    def _token_counts(self, inputs: dict) -> tuple[list[int], list[int]]:
        """Per sample of the last call: visual tokens in its prompt, and those the language model kept."""
        ids = inputs["input_ids"]
        visual = torch.isin(ids, self._placeholders.to(ids.device))
        if inputs.get("attention_mask") is not None:
            visual &= inputs["attention_mask"].bool()
        counts = visual.sum(1).tolist()
        if self.method == NO_PRUNING:
            return counts, counts
        return counts, [len(indices) for indices in vs.last_selection(self._model)]

    def _labels_of_kept_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` laid out like the logits of the last forward: compacted to the kept tokens when
        the method dropped some (the record of that forward says which)."""
        if self.method == NO_PRUNING:
            return labels
        from ..api import get_state

        record = get_state(self._model).last
        compaction = None if record is None else record.compaction
        if compaction is None:  # nothing dropped (retention 1, or no visual token)
            return labels
        return compaction.apply_labels(labels.to(compaction.index.device), IGNORE_INDEX)

    def _report(self, request_type: str, tally: TokensKept, seconds: float, generated: int) -> None:
        """Log one call's tokens kept, add them to the run's throughput results and to the model's total."""
        self.tokens_kept.merge(tally)
        if not tally.samples:
            return
        logger.info(f"visionselector {self.label} [{request_type}] {tally.describe()}")
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        numbers = tally.as_dict()
        # lmms-eval averages each of these over the calls of the run into results["throughput"]["avg_..."].
        kept = {} if not tally.visual_tokens else {
            "visual_tokens_kept_fraction": numbers["fraction_kept"],
            "visual_tokens_per_sample": numbers["visual_tokens_per_sample"],
            "visual_tokens_kept_per_sample": numbers["kept_tokens_per_sample"]}
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=generated,
                    avg_speed=generated / seconds if seconds > 0 else 0.0, additional_metrics=kept)


# -- model_args -------------------------------------------------------------------------------


def _checked_method(method, retention, selector, options: dict) -> tuple[str, float | None, dict]:
    """``(method, retention, options)`` checked: a known method (or ``none``), a retention in (0, 1],
    a selector for a trainable method, and options the method has."""
    from ..methods.base import check_options, get_method_class, list_methods, method_options
    from ..ops.topk import validate_retention

    known = ", ".join([NO_PRUNING, *list_methods()])
    if method is None:
        raise ValueError(f"model_args must name the method: method=NAME, one of {known} ('none' evaluates the "
                         "model with every visual token)")
    if method == NO_PRUNING:
        given = {"retention": retention, "selector": selector, **options}
        stray = [key for key, value in given.items() if value is not None]
        if stray:
            raise ValueError(f"method=none evaluates the model with every visual token, so model_args "
                             f"{', '.join(stray)} do not apply; valid model_args: {', '.join(PLUGIN_ARGUMENTS)}")
        return method, None, {}
    if method not in list_methods():
        raise ValueError(f"unknown method {method!r} in model_args; methods: {known}")
    method_class = get_method_class(method)
    accepted = list(method_options(method_class))
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise ValueError(f"unknown model_args {', '.join(map(repr, unknown))} for method {method!r}; valid model_args: "
                         f"{', '.join(PLUGIN_ARGUMENTS)}, and the method's options: {', '.join(accepted) or 'none'}")
    if retention is None:
        raise ValueError(f"model_args must give retention=R, the fraction of visual tokens {method!r} keeps, in (0, 1]")
    retention = validate_retention(retention)
    if method_class.trainable and selector is None:
        raise ValueError(f"method {method!r} needs a trained selector: selector=FOLDER_OR_HUB_ID (for the paper's "
                         "scorer, JulietChoo/VisionSelector-Qwen2.5-VL-7B or -3B)")
    # lmms-eval reads values as numbers or booleans where it can; 'none' stays text.
    options = {key: None if isinstance(value, str) and value.lower() == "none" else value
               for key, value in options.items()}
    return method, retention, check_options(method_class, options)


def _whole_number(name: str, value) -> int:
    """A whole number of at least 1 from a model_arg or generation setting (lmms-eval passes text or numbers)."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return number


def _checked_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(str(device))
    except RuntimeError:
        raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:1; got {device!r}") from None


def _refuse_data_parallel() -> None:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("the visionselector model runs in one process on one device; launch lmms-eval without "
                           "accelerate/torchrun data parallelism (one process per device, with --limit/--offset)")


# -- requests -----------------------------------------------------------------------------------


def _generation_key(args: tuple) -> str:
    """Requests with equal generation settings share batches."""
    return json.dumps(args[1], sort_keys=True, default=str)


def _stop_strings(until) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(stop, str) for stop in until):
        raise ValueError(f"generation_kwargs 'until' must be a string or a list of strings, got {until!r}")
    return [stop for stop in until if stop]


def _cut_at_stops(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    end = min([text.find(stop) for stop in stops if stop in text], default=len(text))
    return text[:end]


def _as_image(visual, where: str):
    """An RGB ``PIL.Image`` from a visual lmms-eval's ``doc_to_visual`` gave."""
    from PIL import Image

    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    if isinstance(visual, (str, Path)) and str(visual).lower().endswith(IMAGE_SUFFIXES):
        with Image.open(visual) as image:
            return image.convert("RGB")
    raise TypeError(f"{where}: the visionselector model evaluates image tasks; doc_to_visual gave "
                    f"{type(visual).__name__} {str(visual)[:80]!r} (videos and audio are not supported)")


def _progress(total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"visionselector {description}", unit="request")


def _continuation_labels(input_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``-100`` except on each row's last ``lengths[row]`` tokens (its continuation; rows are left-padded)."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, length in enumerate(lengths):
        labels[row, -length:] = input_ids[row, -length:]
    return labels


def _for_the_evaluator(pair: tuple[float, bool]):
    """``pair`` as this lmms-eval's evaluator reads a loglikelihood result.

    lmms-eval 0.7 passes every model output through ``unwrap_generation_output``, which keeps
    the text of a ``GenerationResult`` as it is but turns a ``(float, bool)`` pair into its
    string, so that its loglikelihood and multiple_choice tasks could not read it back. The
    pair travels inside a ``GenerationResult`` there; lmms-eval 0.6 stores outputs as returned.
    """
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:
        return pair
    if unwrap_generation_output(pair)[0] == pair:  # a version that keeps pairs whole
        return pair
    return GenerationResult(text=pair)


def _continuation_score(logits: torch.Tensor, labels: torch.Tensor, length: int) -> tuple[float, bool]:
    """Mean negative log-likelihood of one row's labelled tokens, and whether each is the argmax;
    ``logits`` ``[L, V]`` and ``labels`` ``[L]`` of the same (possibly compacted) sequence."""
    positions = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if len(positions) != length:  # every text token is kept, so this would be a bug
        raise RuntimeError(f"{len(positions)} continuation tokens reached the language model, expected {length}")
    # The token at position p is predicted by the logits at position p - 1.
    log_probs = logits[positions - 1].float().log_softmax(-1)
    targets = labels[positions].to(log_probs.device)
    token_log_probs = log_probs.gather(1, targets[:, None]).squeeze(1)
    return float(-token_log_probs.mean()), bool((log_probs.argmax(-1) == targets).all())
