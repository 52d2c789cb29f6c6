from r1pipe.kernels.moe import fused_moe, moe_reference  # noqa: F401
from r1pipe.kernels.logprob import fused_linear_logprobs  # noqa: F401
