"""Fixtures for model tests: transformers' own DeepSeek models as the numerical oracle."""
import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from r1pipe.model.tiny import tiny_config

HF_CLASSES = {
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A transformers DeepSeek model of the tiny shape with random weights big enough that routing is far
    from uniform, and a non-zero balancing bias (V3)."""
    cfg = tiny_config(family, **overrides).to_dict()
    config_cls, model_cls = HF_CLASSES[family]
    hf_config = config_cls(**{k: v for k, v in cfg.items() if k != "architectures"})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    return model


@pytest.fixture(params=["deepseek_v3", "deepseek_v2"])
def family(request):
    return request.param
