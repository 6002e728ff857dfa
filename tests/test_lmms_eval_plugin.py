"""The lmms-eval plugin: lmms-eval's own evaluator, a local task written here, and a checkpoint laid out
like a hub download (offline: the data set is a JSONL file with PNG images made here)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval", reason="the lmms-eval extra is not installed (see docs/lmms-eval.md)")
pytest.importorskip("PIL")

from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

import visionselector as vs  # noqa: E402
from visionselector.integrations.lmms_eval import VisionSelectorLMM  # noqa: E402

from real_checkpoint import build_qwen2_5_vl_checkpoint  # noqa: E402

ANSWER_TASK, CHOICE_TASK, SPLIT = "vs_tiny_answers", "vs_tiny_choices", "test"
MAX_NEW_TOKENS = 4
CHOICES = ["yes", "no"]
# A long answer: a prompt that showed it to the method would change what the method keeps.
CONTINUATION = " The picture shows two cats sleeping on a blue sofa while the dog watches the street."
SIZES = [(84, 84), (56, 112), (112, 84), (84, 56)]
QUESTIONS = ["What is in the picture?", "How many cats are there?", "Which colour is the car?",
             "Is the light on or off?"]
# Each sample's visual tokens (the processor's 2x2 merge of 14-pixel patches).
VISUAL_TOKENS = [9, 8, 12, 6]


def _sharpen(folder):
    """Redraw the checkpoint's weights with a larger spread, so that its answers depend on each image
    (a freshly initialised model answers the same to every input); saved back in place."""
    model, _ = vs.load_model(folder, processor=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _sharpen(build_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("qwen") / "ckpt"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    paths = []
    for index, (height, width) in enumerate(SIZES):
        paths.append(folder / f"{index}.png")
        Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _plain_prompt(processor, image_path, question, continuation=""):
    """The unpatched model's input built by hand: the chat template with the image first."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.open(image_path).convert("RGB")
    return text, processor(text=[text + continuation], images=[image], return_tensors="pt")


def _count(processor, prompt, continuation):
    """Tokens the continuation adds to the prompt's."""
    return (len(processor.tokenizer(prompt + continuation)["input_ids"])
            - len(processor.tokenizer(prompt)["input_ids"]))


@pytest.fixture(scope="module")
def plain(checkpoint, images):
    """The unpatched model's greedy answers and, per (sample, choice), the mean negative log-likelihood
    of `` choice`` after the prompt, computed by hand one sample at a time."""
    model, processor = vs.load_model(checkpoint)
    answers, losses = [], {}
    with torch.no_grad():
        for index, (path, question) in enumerate(zip(images, QUESTIONS)):
            _, inputs = _plain_prompt(processor, path, question)
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            answers.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True).strip())
            for choice in CHOICES:
                text, inputs = _plain_prompt(processor, path, question, " " + choice)
                count = _count(processor, text, " " + choice)
                log_probs = model(**inputs).logits[0].double().log_softmax(-1)
                ids = inputs["input_ids"][0]
                positions = range(len(ids) - count, len(ids))
                losses[index, choice] = -sum(float(log_probs[p - 1, ids[p]]) for p in positions) / count
    assert len(set(answers)) > 1, "the checkpoint answers alike to every image: the test would prove little"
    return {"answers": answers, "losses": losses}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, images, plain):
    """Two tasks on four samples: short answers scored by exact match (samples 0 and 2 hold the
    unpatched model's own answer, so its score is 0.5), and a yes/no choice by log-likelihood."""
    folder = tmp_path_factory.mktemp("tasks")
    answers = [plain["answers"][i] if i % 2 == 0 else "not the answer" for i in range(len(images))]
    rows = [{"index": i, "image": str(path), "question": question, "answer": answer, "label": i % 2}
            for i, (path, question, answer) in enumerate(zip(images, QUESTIONS, answers))]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "tiny_utils.py").write_text(
        "from PIL import Image\n\n\n"
        "def doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n\n\n"
        "def doc_to_text(doc):\n    return doc['question']\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    {SPLIT}: {folder / 'data.jsonl'}\n"
              f"test_split: {SPLIT}\ndoc_to_visual: !function tiny_utils.doc_to_visual\n"
              "doc_to_text: !function tiny_utils.doc_to_text\n")
    (folder / f"{ANSWER_TASK}.yaml").write_text(
        f"task: {ANSWER_TASK}\n{common}output_type: generate_until\ndoc_to_target: answer\n"
        f"generation_kwargs:\n  max_new_tokens: {MAX_NEW_TOKENS}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / f"{CHOICE_TASK}.yaml").write_text(
        f"task: {CHOICE_TASK}\n{common}output_type: multiple_choice\ndoc_to_target: label\n"
        f"doc_to_choice: {json.dumps(CHOICES)}\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.fixture
def log_lines():
    """What the run logs through lmms-eval's logger (loguru), INFO and above."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


def _evaluate(tasks, task, model_args, batch_size=1):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    # Only the tasks written here: indexing lmms-eval's hundreds of own tasks would take seconds.
    manager = TaskManager(include_path=str(tasks), include_defaults=False, model_name="visionselector")
    return simple_evaluate(model="visionselector", model_args=model_args, tasks=[task], batch_size=batch_size,
                           device="cpu", task_manager=manager, log_samples=True, bootstrap_iters=0)


def _answers(results) -> dict[int, str]:
    return {sample["doc_id"]: sample["filtered_resps"][0] for sample in results["samples"][ANSWER_TASK]}


def _choice_losses(results) -> dict[tuple[int, str], float]:
    """(document, choice) -> the model's value for that continuation, as lmms-eval logged it."""
    values = {}
    for sample in results["samples"][CHOICE_TASK]:
        for choice, response in zip(CHOICES, sample["resps"]):
            values[sample["doc_id"], choice] = response[0][0]
    return values


def test_importing_visionselector_and_its_integrations_leaves_lmms_eval_unloaded():
    code = ("import sys, visionselector, visionselector.integrations; "
            "print(sorted(m for m in ('lmms_eval', 'loguru') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_lmms_eval_finds_the_model_through_its_entry_point():
    from lmms_eval.models import get_model

    assert get_model("visionselector") is VisionSelectorLMM and VisionSelectorLMM.is_simple


def test_unpruned_and_retention_one_give_the_plain_models_answers_and_score(checkpoint, tasks, plain, offline):
    baseline = _evaluate(tasks, ANSWER_TASK, f"pretrained={checkpoint},method=none")
    assert _answers(baseline) == dict(enumerate(plain["answers"]))
    assert baseline["results"][ANSWER_TASK]["exact_match,none"] == pytest.approx(0.5)
    # Retention 1 is an exact no-op, here in batches of two.
    full = _evaluate(tasks, ANSWER_TASK, f"pretrained={checkpoint},method=divprune,retention=1.0", batch_size=2)
    assert _answers(full) == _answers(baseline)
    assert full["results"][ANSWER_TASK]["exact_match,none"] == pytest.approx(0.5)
    assert full["throughput"]["avg_visual_tokens_kept_fraction"] == 1.0


def test_a_pruned_run_keeps_fewer_tokens_logs_them_and_batches_exactly(checkpoint, tasks, plain, offline, log_lines):
    args = f"pretrained={checkpoint},method=divprune,retention=0.25"
    alone = _evaluate(tasks, ANSWER_TASK, args, batch_size=1)
    kept = sum(max(1, int(0.25 * n)) for n in VISUAL_TOKENS)
    expected = f"tokens kept: {100 * kept / sum(VISUAL_TOKENS):.2f}% of visual tokens"
    assert any(f"method=divprune, retention=0.25 [generate_until] {expected}" in line for line in log_lines), log_lines
    assert alone["throughput"]["avg_visual_tokens_kept_fraction"] == pytest.approx(kept / sum(VISUAL_TOKENS))
    assert alone["throughput"]["avg_visual_tokens_kept_per_sample"] == pytest.approx(kept / len(VISUAL_TOKENS))
    assert _answers(alone) != dict(enumerate(plain["answers"]))  # dropping 3 tokens in 4 changes answers
    # A padded batch gives each sample what it gets alone.
    assert _answers(_evaluate(tasks, ANSWER_TASK, args, batch_size=2)) == _answers(alone)


def test_loglikelihood_equals_the_hand_computation_and_lmms_eval_picks_the_likelier_choice(
        checkpoint, tasks, plain, offline):
    for model_args, batch_size in (("method=none", 1), ("method=cdpruner,retention=1.0", 2)):
        results = _evaluate(tasks, CHOICE_TASK, f"pretrained={checkpoint},{model_args}", batch_size)
        values = _choice_losses(results)
        assert values == pytest.approx(plain["losses"], rel=1e-4, abs=1e-5), model_args
        # lmms-eval takes the smallest value as the model's choice; acc counts it against the label.
        picks = [min(CHOICES, key=lambda choice: plain["losses"][index, choice]) for index in range(len(SIZES))]
        accuracy = sum(pick == CHOICES[index % 2] for index, pick in enumerate(picks)) / len(SIZES)
        assert results["results"][CHOICE_TASK]["acc,none"] == pytest.approx(accuracy)


def _requests(request_type, task, documents, second):
    """Requests as lmms-eval builds them for a simple model (``second``: generation_kwargs or the continuation)."""
    def doc_to_visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    return [Instance(request_type=request_type, arguments=(doc["question"], second, doc_to_visual, index, task, SPLIT),
                     idx=0, metadata={"task": task, "doc_id": index, "repeats": 1})
            for index, doc in enumerate(documents)]


def _pairs(outputs) -> list[tuple[float, bool]]:
    """Loglikelihood results as lmms-eval's evaluator reads them."""
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # lmms-eval 0.6 reads them as returned
        return list(outputs)
    return [unwrap_generation_output(output)[0] for output in outputs]


def _documents(images):
    return [{"image": str(path), "question": question} for path, question in zip(images, QUESTIONS)]


def test_question_aware_pruning_selects_alike_for_loglikelihood_and_generation_in_any_batch(checkpoint, images):
    documents = _documents(images)
    results, selections = {}, {}
    for batch_size in (1, 3):
        lm = VisionSelectorLMM(pretrained=str(checkpoint), method="cdpruner", retention=0.25, batch_size=batch_size,
                               device="cpu")
        lm.task_dict = {"tiny": {SPLIT: documents}}
        generation, scoring = [], []
        for request in _requests("generate_until", "tiny", documents, {"max_new_tokens": 2}):
            lm.generate_until([request])
            generation.append(vs.last_selection(lm.model)[0].tolist())
        for request in _requests("loglikelihood", "tiny", documents, CONTINUATION):
            lm.loglikelihood([request])
            scoring.append(vs.last_selection(lm.model)[0].tolist())
        # The continuation is labelled, so the method reads the same prompt as when generating.
        assert scoring == generation
        assert [len(kept) for kept in generation] == [max(1, int(0.25 * n)) for n in VISUAL_TOKENS]
        assert lm.tokens_kept.kept_tokens == 2 * sum(len(kept) for kept in generation)
        selections[batch_size] = generation
        results[batch_size] = _pairs(lm.loglikelihood(_requests("loglikelihood", "tiny", documents, CONTINUATION)))
    assert selections[1] == selections[3]
    assert [value for value, _ in results[3]] == pytest.approx([value for value, _ in results[1]], rel=1e-5)
    assert [greedy for _, greedy in results[3]] == [greedy for _, greedy in results[1]]
    # By hand: one sample alone, its continuation labelled; the last logits but one predict it.
    model, processor = vs.load_model(checkpoint)
    by_hand = []
    with vs.attached(model, method="cdpruner", retention=0.25), torch.no_grad():
        for path, question in zip(images, QUESTIONS):
            text, inputs = _plain_prompt(processor, path, question, CONTINUATION)
            count = _count(processor, text, CONTINUATION)
            labels = torch.full_like(inputs["input_ids"], -100)
            labels[0, -count:] = inputs["input_ids"][0, -count:]
            logits = model(**inputs, labels=labels).logits[0]
            assert logits.shape[0] < inputs["input_ids"].shape[1]  # the logits cover the kept tokens only
            log_probs = logits[-count - 1:-1].double().log_softmax(-1)
            by_hand.append(-float(log_probs.gather(1, labels[0, -count:, None]).mean()))
    assert [value for value, _ in results[1]] == pytest.approx(by_hand, rel=1e-4, abs=1e-5)


def test_until_cuts_the_answer_and_sampling_follows_do_sample(checkpoint, images, plain):
    documents = _documents(images)
    lm = VisionSelectorLMM(pretrained=str(checkpoint), method="none", batch_size=2, device="cpu")
    lm.task_dict = {"tiny": {SPLIT: documents}}
    greedy = lm.generate_until(_requests("generate_until", "tiny", documents, {"max_new_tokens": MAX_NEW_TOKENS}))
    assert [text.strip() for text in greedy] == plain["answers"]
    answer = greedy[0]
    stop = answer[len(answer) // 2:]  # the second half of the answer, as a stop string
    settings = {"max_new_tokens": MAX_NEW_TOKENS, "until": [stop], "temperature": 0.7}  # no do_sample: greedy
    cut = lm.generate_until(_requests("generate_until", "tiny", documents[:1], settings))
    assert cut == [answer[:answer.find(stop)]] and len(cut[0]) < len(answer)
    assert lm.tokens_kept.samples == 5 and lm.tokens_kept.fraction == 1.0
    torch.manual_seed(0)
    sampled = [lm.generate_until(_requests("generate_until", "tiny", documents,
                                           {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": True, "temperature": 5.0}))
               for _ in range(2)]
    assert sampled[0] != sampled[1]


@pytest.mark.parametrize("model_args, message", [
    ({"method": "divprune", "retention": 0.2}, "pretrained=PATH_OR_HUB_ID"),
    ({"pretrained": "x", "retention": 0.2}, "method=NAME, one of none, cdpruner"),
    ({"pretrained": "x", "method": "divprun", "retention": 0.2}, "unknown method 'divprun'.*methods: none, cdpruner"),
    ({"pretrained": "x", "method": "divprune"}, "retention=R"),
    ({"pretrained": "x", "method": "divprune", "retention": 1.5}, r"retention must be in \(0, 1\]"),
    ({"pretrained": "x", "method": "fastv", "retention": 0.2, "layr": 1},
     "unknown model_args 'layr' for method 'fastv'; valid model_args: pretrained, method, .*options: layer"),
    ({"pretrained": "x", "method": "fastv", "retention": 0.2, "layer": -1}, "option 'layer' of method 'fastv'"),
    ({"pretrained": "x", "method": "none", "retention": 0.2}, "method=none .* retention do not apply"),
    ({"pretrained": "x", "method": "visionselector", "retention": 0.2}, "needs a trained selector: selector="),
    ({"pretrained": "x", "method": "divprune", "retention": 0.2, "batch_size": "auto"}, "batch_size must be a whole"),
    ({"pretrained": "x", "method": "divprune", "retention": 0.2, "dtype": "fp8"}, "dtype must be one of auto"),
    ({"pretrained": "x", "method": "divprune", "retention": 0.2, "device": "gpu"}, "device must be a torch device"),
])
def test_bad_model_args_are_refused_by_name_before_anything_loads(model_args, message):
    with pytest.raises(ValueError, match=message):
        VisionSelectorLMM(**model_args)


def test_bad_model_args_reach_the_lmms_eval_user_by_name(checkpoint, tasks, offline):
    from visionselector.reference import shipped_selector

    with pytest.raises(ValueError, match="unknown model_args 'layr' for method 'dart'.*options: layer, num_pivots"):
        _evaluate(tasks, ANSWER_TASK, f"pretrained={checkpoint},method=dart,retention=0.5,layr=0")
    with pytest.raises(ValueError, match="saved for method 'visionselector_q', not 'visionselector'"):
        _evaluate(tasks, ANSWER_TASK, f"pretrained={checkpoint},method=visionselector,retention=0.5,"
                                      f"selector={shipped_selector('visionselector_q')}")
