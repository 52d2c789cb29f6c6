"""The embedded demo: build the tiny DeepSeekMoE/MLA policy, save it in the published layout, load it in
vLLM and sample from it. (The full tiny R1 pipeline grows from here.)"""
from __future__ import annotations

import os
import time
from pathlib import Path


def run_demo(out: str) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from r1pipe.data.tokenizer import load_tiny_tokenizer
    from r1pipe.model import DeepSeekPolicy
    from r1pipe.model.tiny import tiny_config

    out_dir = Path(out)
    tok = load_tiny_tokenizer()
    policy = DeepSeekPolicy.from_config(tiny_config(vocab_size=len(tok)), seed=0)
    n_params = sum(p.numel() for p in policy.parameters())
    ckpt = policy.save_pretrained(out_dir / "base", tokenizer=tok)
    print(f"tiny policy: {n_params / 1e6:.2f}M parameters, saved to {ckpt}")

    from vllm import LLM, SamplingParams

    start = time.time()
    llm = LLM(str(ckpt), dtype="float32", enforce_eager=True, max_model_len=128, seed=0, block_size=16)
    print(f"vLLM engine up in {time.time() - start:.1f}s")
    prompt = tok("12+7=")["input_ids"]
    result = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=16, temperature=1.0, seed=0))
    print("sample:", repr(tok.decode(list(result[0].outputs[0].token_ids))))
    return 0
