"""reward_model: a tiny randomly-initialised sequence classifier saved to disk scores batches exactly
as one-at-a-time transformers forwards do, on the summary or the whole response."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from r1pipe.data.tokenizer import TINY_TOKENIZER_DIR  # noqa: E402
from r1pipe.rewards import RewardRunner, RewardSpec, load_reward  # noqa: E402

PROMPTS = ["What is 2+3? ", "Say hi. ", "Add 10 and 5. ", "?", "Name a prime. "]
COMPLETIONS = [
    "<think>2 plus 3 is 5</think>It is 5.",
    "<think>a greeting</think>Hi!",
    "<think>ten and five make fifteen, let me double check: 10 + 5 = 15</think>15",
    "no think tags here at all",
    [{"role": "assistant", "content": "<think>2 is prime</think>2"}],
]
SUMMARIES = ["It is 5.", "Hi!", "15", "no think tags here at all", "2"]
RESPONSES = [c if isinstance(c, str) else c[0]["content"] for c in COMPLETIONS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        num_labels=1, pad_token_id=tok.pad_token_id,
    )
    model = transformers.LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def one_at_a_time(path, texts):
    """Independent reference: unpadded single-sequence forwards."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]


def test_batched_scores_match_single_forwards(model_dir):
    reward = load_reward("reward_model")
    for scope, parts in (("summary", SUMMARIES), ("response", RESPONSES)):
        got = reward(prompts=PROMPTS, completions=COMPLETIONS, model_path=str(model_dir), scope=scope, batch_size=3)
        want = one_at_a_time(model_dir, [p + s for p, s in zip(PROMPTS, parts)])
        assert got == pytest.approx(want, abs=1e-5)
    summary = reward(prompts=PROMPTS, completions=COMPLETIONS, model_path=str(model_dir), scope="summary")
    response = reward(prompts=PROMPTS, completions=COMPLETIONS, model_path=str(model_dir), scope="response")
    assert summary[0] != pytest.approx(response[0], abs=1e-6)  # the CoT changes what is scored
    assert summary[3] == pytest.approx(response[3], abs=1e-6)  # no CoT: the summary is everything


def test_chat_prompts_go_through_the_chat_template(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "It is 5."}], tokenize=False)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        want = model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    got = load_reward("reward_model")(prompts=[prompt], completions=[COMPLETIONS[0]], model_path=str(model_dir))
    assert got == [pytest.approx(want, abs=1e-5)]


def test_reward_model_in_a_recipe_and_bad_path(model_dir, tmp_path):
    specs = [RewardSpec("reward_model", kwargs={"model_path": str(model_dir), "scope": "response"})]
    out = RewardRunner(specs)(PROMPTS[:2], COMPLETIONS[:2])
    assert out.per_function["reward_model"] == pytest.approx(one_at_a_time(model_dir, [p + r for p, r in zip(PROMPTS, RESPONSES[:2])]), abs=1e-5)
    with pytest.raises(ValueError, match="model_path"):
        load_reward("reward_model")(prompts=["p"], completions=["c"])
    # a missing model is a failed reward for those samples, not a crashed run
    bad = RewardRunner([RewardSpec("reward_model", kwargs={"model_path": str(tmp_path / "none")})])(["p"], ["c"])
    assert bad.per_function["reward_model"] == [None] and bad.metrics["rewards/reward_model/error_count"] == 1
