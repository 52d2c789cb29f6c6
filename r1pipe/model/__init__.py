"""The DeepSeekMoE/MLA policy: config, modules, checkpoint IO, tiny configs for tests and the demo."""
from r1pipe.model.config import ConfigError, DeepSeekConfig
from r1pipe.model.checkpoint import CheckpointError
from r1pipe.model.transformer import CausalLMOutput, DeepSeekPolicy
from r1pipe.model.mla import LatentCache

__all__ = ["CausalLMOutput", "CheckpointError", "ConfigError", "DeepSeekConfig", "DeepSeekPolicy", "LatentCache"]
