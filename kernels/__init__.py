"""Fused kernels on the two hot paths (token log-probs, routed experts), each with its pure-torch twin."""
from r1pipe.kernels.dispatch import kernel_backend  # noqa: F401
from r1pipe.kernels.moe import fused_moe, moe_reference  # noqa: F401
from r1pipe.kernels.logprob import fused_linear_logprobs  # noqa: F401
