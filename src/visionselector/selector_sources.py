"""Where a trained VisionSelector scorer comes from, and converting it to our own format.

``load_selector(source)`` reads any of these and returns ``(config, state_dict)`` in the
shape :func:`visionselector.checkpoint.read_selector` returns for our own format:

- a folder written by :func:`visionselector.save_selector` (``selector_config.json`` and
  ``selector.safetensors``), or the hub id of one;
- a VisionSelector release: a whole Qwen2.5-VL checkpoint with the scorer stored next to
  the vision tower as ``visual.importance_scorer.{q_proj,k_proj}.{weight,bias}`` (sharded
  with ``model.safetensors.index.json``, or one ``model.safetensors``), or its hub id.
  Only the index and the shard that holds the scorer are opened (for a hub id, only
  those two files are downloaded), and only the four scorer tensors are read;
- a standalone scorer folder as AngelSlim's token compressor loads it (``config.json``
  with ``architecture: TransformerScorer`` and the constructor's ``in_features`` /
  ``hidden_dim``, one ``.safetensors`` file with the scorer's ``q_proj`` / ``k_proj``), or
  its hub id. Its Python file is never run.

The released scorer (``TransformerScorer``) projects each visual token ``x_i`` to
``q_i = Wq x_i + bq`` and ``k_i = Wk x_i + bk`` and scores it by
``s_i = mean_j <q_i, k_j> / sqrt(h)``, which is exactly what
:class:`~visionselector.methods.visionselector.ImportanceScorer` computes (in linear
time), with ``q_proj`` as ``query`` and ``k_proj`` as ``key``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from .checkpoint import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_selector, write_selector
from .hub import is_hub_id, resolve_file, resolve_folder

__all__ = ["SELECTOR_SOURCES", "load_selector", "check_selector_config", "scorer_from_release_tensors",
           "ConvertConfig", "run_convert"]

RELEASE_INDEX = "model.safetensors.index.json"
RELEASE_SINGLE_FILE = "model.safetensors"
RELEASE_CONFIG = "config.json"
# The scorer's attribute in VisionSelector's vision tower; releases saved with
# transformers 4.50 put it at ``visual.importance_scorer.``, later layouts nest it deeper.
SCORER_ATTRIBUTE = "importance_scorer."
# The released scorer's tensor names (after the prefix) -> ours.
RELEASE_TO_OURS = {
    "q_proj.weight": "scorer.query.weight",
    "q_proj.bias": "scorer.query.bias",
    "k_proj.weight": "scorer.key.weight",
    "k_proj.bias": "scorer.key.bias",
}
# Wrapper prefixes that AngelSlim's loader strips from every tensor name.
ANGELSLIM_STRIPPED = ("module.", "visual.importance_scorer.", "_orig_mod.")
ANGELSLIM_ARCHITECTURE = "TransformerScorer"

SELECTOR_SOURCES = (
    f"a folder written by visionselector.save_selector ({CONFIG_NAME} + {WEIGHTS_NAME})",
    f"a VisionSelector release: a Qwen2.5-VL checkpoint folder holding visual.importance_scorer.* "
    f"({RELEASE_INDEX} + shards, or {RELEASE_SINGLE_FILE})",
    f"an AngelSlim scorer folder ({RELEASE_CONFIG} with architecture {ANGELSLIM_ARCHITECTURE} + one .safetensors file)",
    "the hub id (owner/name) of any of these",
)


def _sources_text() -> str:
    return "a selector source is " + "; or ".join(SELECTOR_SOURCES)


def load_selector(source: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of the scorer at ``source`` (see the module docstring for the kinds).

    ``config`` holds ``method``, ``method_config`` (``{"hidden_dim": h}``), ``hidden_size``
    (``D``), ``model_family``, ``model_class``, ``training_retention`` (``None`` where the source does not
    record it) and, for converted sources, a ``source`` note, checked by
    :func:`check_selector_config`. ``state_dict`` holds ``scorer.{query,key}.weight``
    ``[h, D]`` and ``scorer.{query,key}.bias`` ``[h]`` in the dtype they were stored in.
    """
    config, state_dict = _load_any(source)
    return check_selector_config(config, source), state_dict


def check_selector_config(config: dict, source) -> dict:
    """``config`` if its fields have the types a selector config needs; ``ValueError`` naming the
    field and what is valid otherwise.

    ``method``: a method name; ``hidden_size``: an integer >= 1; ``method_config``: an object
    of the method's options (may be absent); ``model_family`` and ``model_class``: a string or
    null; ``training_retention``: a number in (0, 1] or null. The options inside
    ``method_config`` are checked against the method when it is built.
    """
    from .methods.base import check_value
    from .ops.topk import validate_retention

    where = f"selector config of {str(source)!r}"
    if not isinstance(config, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(config).__name__}")
    for name in ("method", "hidden_size"):
        if name not in config:
            raise ValueError(f"{where} has no {name!r} field (a selector config holds method, method_config, "
                             "hidden_size, model_family, model_class and training_retention)")
    method = check_value(f"{where}: field 'method'", config["method"], str)
    if not method:
        raise ValueError(f"{where}: field 'method' must be a method name, got ''")
    check_value(f"{where}: field 'hidden_size'", config["hidden_size"], int, at_least=1)
    for name in ("model_family", "model_class"):
        check_value(f"{where}: field {name!r}", config.get(name), str, optional=True)
    options = config.get("method_config", {})
    if not isinstance(options, dict):
        raise ValueError(f"{where}: field 'method_config' must be an object of the method's options "
                         f"(e.g. {{\"hidden_dim\": 64}}), got {options!r} ({type(options).__name__})")
    retention = config.get("training_retention")
    if retention is not None:
        try:
            validate_retention(retention)
        except ValueError:
            raise ValueError(f"{where}: field 'training_retention' must be a number in (0, 1] or null, "
                             f"got {retention!r} ({type(retention).__name__})") from None
    return config


def _load_any(source) -> tuple[dict, dict[str, torch.Tensor]]:
    """What :func:`load_selector` returns, before its config is checked."""
    path = Path(source)
    if path.is_file():
        raise ValueError(f"selector {str(source)!r} is a file; give the folder that holds it ({_sources_text()})")
    if not path.is_dir() and not is_hub_id(source):
        raise FileNotFoundError(f"selector not found: {str(source)!r} is neither a local folder nor a hub id "
                                f"(owner/name); {_sources_text()}")
    if path.is_dir() and ((path / CONFIG_NAME).exists() or (path / WEIGHTS_NAME).exists()):
        return read_selector(path)  # our format; read_selector names a missing or damaged file
    ours = None if path.is_dir() else resolve_file(source, CONFIG_NAME, what="selector")
    if ours is not None:
        weights = resolve_file(source, WEIGHTS_NAME, what="selector")
        if weights is None:
            raise FileNotFoundError(f"selector {str(source)!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        return read_selector(ours.parent)
    index = resolve_file(source, RELEASE_INDEX, what="selector")
    if index is not None:
        return _read_sharded_release(source, index)
    model_config_path = resolve_file(source, RELEASE_CONFIG, what="selector")
    model_config = _read_json(model_config_path) if model_config_path is not None else {}
    if is_angelslim_config(model_config):
        return _read_angelslim(source, model_config)
    single = resolve_file(source, RELEASE_SINGLE_FILE, what="selector")
    if single is not None:
        return _read_release_files(source, {name: single for name in _safetensors_names(single)}, model_config)
    raise FileNotFoundError(f"selector {str(source)!r} holds none of the files of a selector: {_sources_text()}")


# ---------------------------------------------------------------- VisionSelector releases


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"corrupt JSON file {path}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"corrupt JSON file {path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_sharded_release(source, index_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Open only the shard(s) that the index assigns the scorer tensors to."""
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"corrupt checkpoint index {index_path}: expected a 'weight_map' object "
                         "(tensor name -> shard file)")
    names = scorer_tensor_names(weight_map, where=str(index_path))
    shard_paths = {}
    for shard in sorted({weight_map[name] for name in names.values()}):
        shard_paths[shard] = _resolve_shard(source, shard, index_path)
    located = {name: shard_paths[weight_map[name]] for name in names.values()}
    config_path = resolve_file(source, RELEASE_CONFIG, what="selector")
    model_config = _read_json(config_path) if config_path is not None else {}
    return _read_release_files(source, located, model_config)


def _resolve_shard(source, shard: str, index_path: Path) -> Path:
    if not isinstance(shard, str) or PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts:
        raise ValueError(f"checkpoint index {index_path} names shard {shard!r}; expected a file name inside "
                         "the checkpoint folder")
    path = resolve_file(source, shard, what="selector")
    if path is None:
        raise FileNotFoundError(f"checkpoint index {index_path} puts the selector's tensors in shard {shard!r}, "
                                f"but {str(source)!r} does not hold that file")
    return path


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors raises several error types for damaged files
        raise ValueError(f"corrupt safetensors file {path}: {error}") from None


def scorer_tensor_names(available, *, where: str) -> dict[str, str]:
    """The source's names of the four scorer tensors, keyed by role (``q_proj.weight`` ...).

    Finds the one prefix ``P`` (``visual.importance_scorer.`` in the releases) under which
    ``P + q_proj.weight`` etc. all exist among ``available`` tensor names."""
    anchor = SCORER_ATTRIBUTE + "q_proj.weight"
    prefixes = sorted({name[: -len("q_proj.weight")] for name in available if name.endswith(anchor)})
    if not prefixes:
        raise ValueError(f"{where} holds no VisionSelector scorer: no tensor named *{anchor} (VisionSelector "
                         f"releases store it as visual.{SCORER_ATTRIBUTE}{{q_proj,k_proj}}.{{weight,bias}})")
    if len(prefixes) > 1:
        raise ValueError(f"{where} holds several scorers ({', '.join(p + 'q_proj.weight' for p in prefixes)}); "
                         "expected exactly one")
    names = {role: prefixes[0] + role for role in RELEASE_TO_OURS}
    missing = [name for name in names.values() if name not in available]
    if missing:
        raise ValueError(f"{where} holds {prefixes[0]}q_proj.weight but not {', '.join(missing)}; a scorer has "
                         f"{', '.join(names.values())}")
    return names


def _read_release_files(source, located: dict[str, Path], model_config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the scorer out of safetensors files; ``located`` maps candidate tensor names to files."""
    names = scorer_tensor_names(located, where=f"checkpoint {str(source)!r}")
    tensors = {role: _read_tensor(located[name], name) for role, name in names.items()}
    prefix = names["q_proj.weight"][: -len("q_proj.weight")]
    state_dict, hidden_dim, hidden_size = scorer_from_release_tensors(tensors, prefix=prefix, where=str(source))
    shards = ", ".join(sorted({located[name].name for name in names.values()}))
    config = {
        "format_version": FORMAT_VERSION,
        "method": "visionselector",
        "method_config": {"hidden_dim": hidden_dim},
        "hidden_size": hidden_size,
        "model_family": model_config.get("model_type"),
        "model_class": (model_config.get("architectures") or [None])[0],
        "training_retention": None,  # a release does not record the retention it was trained at
        "source": f"VisionSelector release {source}: {prefix}{{q_proj,k_proj}}.{{weight,bias}} from {shards}",
    }
    return config, state_dict


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, without loading the rest of the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensor = handle.get_tensor(name) if name in handle.keys() else None
    except Exception as error:  # safetensors raises several error types for damaged files
        raise ValueError(f"corrupt safetensors file {path}: {error}") from None
    if tensor is None:
        raise ValueError(f"tensor {name!r} is not in {path}")
    return tensor


def scorer_from_release_tensors(tensors: dict[str, torch.Tensor], *, prefix: str = "",
                                where: str = "selector") -> tuple[dict[str, torch.Tensor], int, int]:
    """Check and rename a released scorer.

    Args:
        tensors: ``q_proj.weight`` / ``k_proj.weight`` ``[h, D]`` and ``q_proj.bias`` /
            ``k_proj.bias`` ``[h]``.
        prefix: the tensors' prefix in the source, so that errors give their full names.
        where: the source, for errors.

    Returns:
        ``(state_dict, h, D)`` with our names (``scorer.query.weight`` ...).
    """
    def described(role: str) -> str:
        return f"{prefix}{role} {list(tensors[role].shape)}"

    for role in RELEASE_TO_OURS:
        if not tensors[role].is_floating_point():
            raise ValueError(f"{where}: {prefix}{role} has dtype {tensors[role].dtype}; expected floating point")
    query = tensors["q_proj.weight"]
    if query.ndim != 2 or 0 in query.shape:
        raise ValueError(f"{where}: {described('q_proj.weight')} is not a linear layer's weight; expected [h, D]")
    if tensors["k_proj.weight"].shape != query.shape:
        raise ValueError(f"{where}: query and key disagree: {described('q_proj.weight')} but "
                         f"{described('k_proj.weight')}; both must be [h, D]")
    hidden_dim, hidden_size = query.shape
    for role in ("q_proj.bias", "k_proj.bias"):
        if tuple(tensors[role].shape) != (hidden_dim,):
            raise ValueError(f"{where}: {described(role)} does not fit {described(role.replace('bias', 'weight'))}; "
                             f"expected [h] = [{hidden_dim}]")
    state_dict = {ours: tensors[role] for role, ours in RELEASE_TO_OURS.items()}
    return state_dict, int(hidden_dim), int(hidden_size)


# ---------------------------------------------------------------- AngelSlim scorer folders


def is_angelslim_config(config: dict) -> bool:
    """A standalone scorer's ``config.json``: the class name and its constructor arguments,
    not a ``transformers`` model config (which has ``model_type``)."""
    return "model_type" not in config and ("architecture" in config or "in_features" in config)


def _read_angelslim(source, config: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A scorer folder as AngelSlim's token compressor loads it: only the vision-only
    ``TransformerScorer`` (VisionSelector's scorer) is accepted, and its file must hold
    exactly the four scorer tensors, so that no other scorer is ever misread as it."""
    architecture = config.get("architecture", ANGELSLIM_ARCHITECTURE)  # AngelSlim's own default
    if architecture != ANGELSLIM_ARCHITECTURE:
        raise ValueError(f"selector {str(source)!r} is a {architecture!r} scorer; only {ANGELSLIM_ARCHITECTURE} "
                         "(VisionSelector's q_proj/k_proj scorer over visual tokens alone) can be read")
    folder = resolve_folder(source, what="selector", allow_patterns=[RELEASE_CONFIG, "*.safetensors"])
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise FileNotFoundError(f"selector {str(source)!r}: expected exactly one .safetensors file next to "
                                f"{RELEASE_CONFIG}, found {found} (pickled .bin weights are not read)")
    tensors = {}
    for name in _safetensors_names(files[0]):
        role = name
        for wrapper in ANGELSLIM_STRIPPED:
            role = role.replace(wrapper, "")
        if role in tensors:
            raise ValueError(f"selector {str(source)!r}: {files[0].name} holds {role} twice (under several wrapper "
                             f"prefixes among {', '.join(ANGELSLIM_STRIPPED)})")
        tensors[role] = _read_tensor(files[0], name)
    if set(tensors) != set(RELEASE_TO_OURS):
        raise ValueError(f"selector {str(source)!r}: {files[0].name} holds {sorted(tensors)}; a {architecture} "
                         f"holds exactly {sorted(RELEASE_TO_OURS)}")
    state_dict, hidden_dim, hidden_size = scorer_from_release_tensors(tensors, where=str(files[0]))
    for key, value in (("in_features", hidden_size), ("hidden_dim", hidden_dim)):
        if key in config and config[key] != value:
            raise ValueError(f"selector {str(source)!r}: {RELEASE_CONFIG} says {key}={config[key]}, but the weights "
                             f"in {files[0].name} have {key}={value}")
    config = {
        "format_version": FORMAT_VERSION,
        "method": "visionselector",
        "method_config": {"hidden_dim": hidden_dim},
        "hidden_size": hidden_size,
        "model_family": None,  # the folder does not say which model it was trained on
        "model_class": None,
        "training_retention": None,
        "source": f"AngelSlim {architecture} {source}: {files[0].name}",
    }
    return config, state_dict


# ---------------------------------------------------------------- visionselector convert


@dataclass
class ConvertConfig:
    """Settings of ``visionselector convert SOURCE OUT``."""

    source: str = field(metadata={"positional": True, "help": "selector to read: " + "; or ".join(SELECTOR_SOURCES)})
    out: str = field(metadata={"positional": True,
                               "help": f"folder to write the selector to ({CONFIG_NAME} + {WEIGHTS_NAME})"})


def run_convert(config: ConvertConfig, print_fn=print) -> Path:
    """Read ``config.source`` with :func:`load_selector` and write it in our format to ``config.out``."""
    from .commands.common import check_output_folder

    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} is a file; give a folder to write {CONFIG_NAME} and {WEIGHTS_NAME} into")
    check_output_folder(out)  # nor may any folder above it be a file
    selector_config, state_dict = load_selector(config.source)
    written = write_selector(out, selector_config, state_dict)
    parameters = sum(tensor.numel() for tensor in state_dict.values())
    print_fn(f"wrote {written}: {selector_config['method']} scorer, hidden size {selector_config['hidden_size']}, "
             f"hidden_dim {selector_config['method_config'].get('hidden_dim')}, {parameters:,} parameters, "
             f"model family {selector_config.get('model_family')} (from {config.source})")
    return written
