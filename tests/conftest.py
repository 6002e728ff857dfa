import pytest
import torch

from visionselector.presets import build_qwen2_5_vl, tiny_qwen2_5_vl_config


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def make_model(attn_implementation="sdpa", seed=0, **overrides):
    return build_qwen2_5_vl(tiny_qwen2_5_vl_config(attn_implementation=attn_implementation, **overrides), seed=seed)


def randomise_scorer(model, seed=1, std=0.5):
    """A scorer whose ranking is far from flat, so selections are meaningful."""
    import visionselector as vs

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in vs.get_scorer(model).parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_qwen2_5_vl_config()
