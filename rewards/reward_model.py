"""Model-based reward of R1's stage 4 (spec section 1): a local `AutoModelForSequenceClassification`
with one output scores prompt + response, in batches. scope="summary" scores only the final
summary after `</think>` (R1's helpfulness), scope="response" the whole response (harmlessness).

Loaded models are cached per (path, device). torch/transformers are imported on first use only, so
importing r1pipe.rewards stays light. Text helpers: rewards/text.py.
"""

from __future__ import annotations

from pathlib import Path

from .registry import register
from .text import completion_text, prompt_text, split_reasoning

SCOPES = ("summary", "response")
_MODELS: dict = {}


def load_reward_model(model_path: str, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer), loaded once per (path, device, dtype) and put in eval mode."""
    key = (str(model_path), device, dtype)
    if key not in _MODELS:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not (Path(model_path) / "config.json").is_file():
            # never a hub id: r1pipe downloads nothing at run time, and a hub lookup would hang offline
            raise FileNotFoundError(f"reward model {model_path}: no config.json there; expected a local folder with a "
                                    "sequence-classification model (kwargs.model_path)")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=getattr(torch, dtype))
        if model.config.num_labels != 1:
            raise ValueError(
                f"reward model {model_path}: config num_labels={model.config.num_labels}; expected 1 (one scalar score)"
            )
        tokenizer.truncation_side = "left"  # an over-long input loses the prompt's start, never the scored response
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            # The classifier reads the last non-pad token, so it must know which id is padding.
            model.config.pad_token_id = tokenizer.pad_token_id
        _MODELS[key] = (model.to(device).eval(), tokenizer)
    return _MODELS[key]


def scored_text(prompt, completion, scope: str, tokenizer) -> str:
    """What the reward model reads: the prompt and the scored part of the response, through the
    tokenizer's chat template when it has one and the prompt is a chat."""
    if scope not in SCOPES:
        raise ValueError(f"reward_model: scope={scope!r}; expected one of {SCOPES}")
    response = completion_text(completion)
    if scope == "summary":
        _cot, summary = split_reasoning(response)
        response = summary.strip() if summary.strip() else response
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        messages = list(prompt) + [{"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt_text(prompt) + response


@register("reward_model")
def reward_model_reward(
    prompts=None,
    completions=(),
    model_path: str | None = None,
    scope: str = "summary",
    batch_size: int = 8,
    max_length: int = 2048,
    device: str = "cpu",
    dtype: str = "float32",
    **_,
) -> list[float]:
    """The reward model's scalar output for each (prompt, response)."""
    if not model_path:
        raise ValueError("reward_model needs kwargs.model_path: a local folder with a sequence-classification model")
    import torch

    model, tokenizer = load_reward_model(model_path, device, dtype)
    prompts = prompts if prompts is not None else [None] * len(completions)
    texts = [scored_text(p, c, scope, tokenizer) for p, c in zip(prompts, completions)]
    # A chat template writes its own BOS; plain text gets the tokenizer's special tokens.
    templated = any(isinstance(p, list) for p in prompts) and bool(getattr(tokenizer, "chat_template", None))
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                max_length=max_length, add_special_tokens=not templated,
            ).to(device)
            logits = model(**batch).logits
            scores.extend(logits[:, 0].float().tolist())
    return scores
