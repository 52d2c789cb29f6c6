"""DeepSeekMoE feed-forward (spec section 4): the router (`TopkRouter`), the routed experts and shared
experts (`DeepSeekMoE`), the dense SwiGLU FFN (`MLP`), and aux-loss-free bias balancing.

The routed-expert arithmetic sits behind `moe_forward`, which dispatches to the fused kernel in
`r1pipe.kernels` (Triton on CUDA, its pure-torch twin elsewhere). Expert weights are kept fused in memory
as transformers 5 does (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); checkpoint.py
converts them to the published per-expert keys.
"""
from __future__ import annotations

import torch
from torch import nn

from r1pipe.model.config import DeepSeekConfig
from r1pipe.model.lean_autograd import float32_linear, silu_mul


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). Used for dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def route_tokens(
    router_logits: torch.Tensor, config: DeepSeekConfig, e_score_correction_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick top-K experts per token. Returns (topk_ids [T,K], topk_weights [T,K] fp32, scores [T,E] fp32).

    V3 (`noaux_tc`, sigmoid): the bias only *chooses* experts; weights come from the unbiased scores.
    Groups are ranked by the sum of their top-2 biased scores; experts outside the kept groups get -inf.
    V2 (softmax, `greedy` / `group_limited_greedy` with the group max; masked experts get 0.0).
    Every step mirrors transformers' routers so the chosen experts agree bit for bit.
    """
    c = config
    n_tokens, n_experts = router_logits.shape
    scores = router_logits.sigmoid() if c.scoring_func == "sigmoid" else router_logits.softmax(dim=-1)
    if c.topk_method == "noaux_tc":
        choice = scores + e_score_correction_bias if e_score_correction_bias is not None else scores
        grouped = choice.view(n_tokens, c.n_group, n_experts // c.n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        fill = float("-inf")
    elif c.topk_method == "group_limited_greedy":
        choice = scores
        group_scores = scores.view(n_tokens, c.n_group, n_experts // c.n_group).max(dim=-1).values
        fill = 0.0
    else:  # greedy
        choice, group_scores, fill = scores, None, None
    if group_scores is not None and c.topk_group < c.n_group:
        group_idx = torch.topk(group_scores, k=c.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, c.n_group, n_experts // c.n_group).reshape(n_tokens, -1)
        choice = choice.masked_fill(~expert_mask.bool(), fill)
    topk_ids = torch.topk(choice, k=c.num_experts_per_tok, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_ids)
    if c.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, topk_weights * c.routed_scaling_factor, scores


class TopkRouter(nn.Module):
    """The gate: `weight` [E, H] (affinity centroids e_i) and, for `noaux_tc`, the selection-only
    `e_score_correction_bias` [E] (a float32 buffer: it gets no gradient, only ±γ balancing updates)."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        # float32 router GEMM: bf16 logits flip near-tied expert choices (transformers does the same).
        logits = float32_linear(x, self.weight)
        return route_tokens(logits, self.config, self.e_score_correction_bias)


class RoutedExperts(nn.Module):
    """The Nr fine-grained experts, fused: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I]."""

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        e, i, h = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x, topk_ids, topk_weights):
        return moe_forward(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights)


def moe_forward(x, gate_up_proj, down_proj, topk_ids, topk_weights) -> torch.Tensor:
    """Σ_k w_k · down_e(silu(gate_e(x)) * up_e(x)) over each token's chosen experts; x [T, H] -> [T, H]."""
    from r1pipe.kernels import fused_moe  # picks Triton on CUDA, the pure-torch twin elsewhere

    return fused_moe(x, gate_up_proj, down_proj, topk_ids, topk_weights.to(x.dtype))


class DeepSeekMoE(nn.Module):
    """h' = Σ shared FFN(u) + Σ g_i · FFN_i(u) (the residual is added by the block).

    Records the per-expert token count of the last forward (`last_expert_load`) for bias balancing and,
    when `seq_aux_loss_alpha` > 0 in training, the sequence-wise balance loss in `aux_loss`.
    """

    def __init__(self, config: DeepSeekConfig):
        super().__init__()
        self.config = config
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(config)
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        else:
            self.shared_experts = None
        self.register_buffer("last_expert_load", torch.zeros(config.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_ids, topk_weights, scores = self.gate(flat)
        with torch.no_grad():
            # a histogram over [-0.5, E - 0.5), masked tokens moved out of range: bincount and boolean indexing
            # both wait for the GPU (their output size depends on the data), which a CUDA graph cannot capture
            # and a step pays per layer; scatter_add into E counters serialises on atomics
            ids = topk_ids if token_mask is None else topk_ids.masked_fill(~token_mask.reshape(-1, 1).bool(), -1)
            experts = self.config.n_routed_experts
            self.last_expert_load = torch.histc(ids.reshape(-1).float(), bins=experts, min=-0.5, max=experts - 0.5)
        out = self.experts(flat, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.aux_loss = None
        if self.training and self.config.seq_aux_loss_alpha > 0:
            self.aux_loss = sequence_balance_loss(scores.view(*shape[:-1], -1), topk_ids.view(*shape[:-1], -1), self.config)
        return out.view(shape)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None, gamma: float | None = None) -> None:
        """Aux-loss-free balancing: b_i -= γ if expert i was overloaded, += γ if underloaded (sign rule)."""
        if self.gate.e_score_correction_bias is None:
            return
        load = self.last_expert_load if load is None else load
        gamma = self.config.bias_update_speed if gamma is None else gamma
        bias = self.gate.e_score_correction_bias
        bias += gamma * torch.sign(load.mean() - load).to(bias)


def sequence_balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor, config: DeepSeekConfig) -> torch.Tensor:
    """α Σ_i f_i P_i per sequence, averaged over sequences (V3's complementary sequence-wise loss).

    scores [B, T, E] (affinities), topk_ids [B, T, K]. f_i = Nr/(Kr·T) Σ_t 1[i chosen], P_i = mean_t s_i/Σ_j s_j.
    """
    n_experts, k = config.n_routed_experts, config.num_experts_per_tok
    if scores.dim() == 2:
        scores, topk_ids = scores[None], topk_ids[None]
    t = scores.shape[1]
    counts = torch.zeros(scores.shape[0], n_experts, device=scores.device).scatter_add_(
        1, topk_ids.reshape(scores.shape[0], -1), torch.ones(topk_ids.shape[0], t * k, device=scores.device)
    )
    f = counts * n_experts / (k * t)
    p = (scores / scores.sum(-1, keepdim=True)).mean(dim=1)
    return config.seq_aux_loss_alpha * (f * p).sum(-1).mean()
