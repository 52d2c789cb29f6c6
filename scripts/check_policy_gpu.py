"""Whole-model check on a GPU: the policy with its fused kernels (Triton MoE, fused log-probs) against the same
policy on the pure-torch twins, on a DeepSeek-V2-Lite-shaped model cut to 2 layers (1 dense + 1 MoE), bf16:
logits, token log-probs and every parameter gradient agree within bf16 tolerance; prints times too.

    python scripts/check_policy_gpu.py [--layers 2] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import time

import torch

from r1pipe.kernels import kernel_backend
from r1pipe.model import DeepSeekConfig, DeepSeekPolicy

V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
               moe_intermediate_size=1408, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
               num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
               norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1, max_position_embeddings=4096)


def run(policy, ids, pos, targets):
    policy.zero_grad(set_to_none=True)
    logits = policy(ids, position_ids=pos).logits.float()
    logp = policy(ids, position_ids=pos, targets=targets)
    (-(logp.float().sum()) / targets.numel()).backward()
    return logits.detach(), logp.detach().float(), {n: p.grad.float().clone() for n, p in policy.named_parameters()}


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = DeepSeekConfig.from_dict({**V2_LITE, "num_hidden_layers": args.layers})
    policy = DeepSeekPolicy(config).init_weights(seed=0, std=0.02).to("cuda", torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device="cuda")
    pos = (torch.arange(args.tokens, device="cuda") % args.seq)[None]  # packed sequences of args.seq tokens
    targets = torch.roll(ids, -1, 1)
    fused = run(policy, ids, pos, targets)
    with kernel_backend("torch"):
        twin = run(policy, ids, pos, targets)
    rows = []
    for name, a, b in (("logits", fused[0], twin[0]), ("logprobs", fused[1], twin[1])):
        rows.append((name, ((a - b).norm() / b.norm()).item()))
    worst = max(fused[2], key=lambda n: ((fused[2][n] - twin[2][n]).norm() / twin[2][n].norm().clamp_min(1e-12)).item())
    for n in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
              "model.layers.1.mlp.gate.weight", "lm_head.weight", worst):
        rows.append((f"grad {n}", ((fused[2][n] - twin[2][n]).norm() / twin[2][n].norm().clamp_min(1e-12)).item()))
    t_fused = timed(lambda: run(policy, ids, pos, targets))
    with kernel_backend("torch"):
        t_twin = timed(lambda: run(policy, ids, pos, targets))
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.layers} layers, {args.tokens} tokens")
    print("| quantity | rel. error fused vs twin |\n|---|---|")
    for name, err in rows:
        print(f"| {name} | {err:.2e} |")
    ok = all(err < 2e-2 for _, err in rows)
    print(f"\nfwd (logits) + fwd/bwd (logprobs): fused {t_fused:.1f} ms, torch twins {t_twin:.1f} ms")
    print("PASS" if ok else "FAIL: above bf16 tolerance (2e-2)")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
