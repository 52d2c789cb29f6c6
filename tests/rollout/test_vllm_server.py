"""The server engine (`vllm serve` subprocess, weights pushed over its dev-mode API) samples from the
trainer's weights, proven as tests/rollout/test_vllm_engine.py proves the colocated engine: after a real
update its sampled-token logprobs agree with transformers' within 2x the disagreement of a fresh load.

One server per module (~30 s to start on the 2-core CPU box), started on checkpoint A: its first samples
are the fresh-load baseline of A. The real updates are A -> B (a perturbed copy) and back B -> A, where the
baseline applies and the samples must equal the fresh load's.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from r1pipe.rollout.vllm_server import VLLMServerEngine  # noqa: E402
from tests.rollout.test_vllm_engine import (  # noqa: E402
    MAX_TOKENS,
    N_SAMPLES,
    _checkpoint_items,
    _hf,
    _max_logprob_diff,
    _perturbed_copy,
    _sample,
)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    engine = VLLMServerEngine(tiny_checkpoint, max_model_len=128, seed=0, max_num_seqs=64,
                              cpu_kv_cache_bytes=64 << 20, log_file=tmp_path_factory.mktemp("serve") / "vllm.log")
    yield engine
    engine.close()


def test_server_samples_and_syncs_real_update(server, tiny_checkpoint, tmp_path):
    hf_a = _hf(tiny_checkpoint)
    fresh = _sample(server)
    assert fresh.num_samples == 8 * N_SAMPLES
    assert fresh.prompt_index == [i for i in range(8) for _ in range(N_SAMPLES)]
    for ids, reason in zip(fresh.completion_ids, fresh.finish_reason):
        assert (reason == "length") == (len(ids) == MAX_TOKENS)
    d0 = _max_logprob_diff(hf_a, fresh)  # the server's fresh load of A vs transformers
    assert d0 < 1e-3

    # A -> B: a real update, sent as the trainer sends it (transformers state dict, experts packed).
    ckpt_b = _perturbed_copy(tiny_checkpoint, tmp_path / "ckpt_b")
    hf_b = _hf(ckpt_b)
    stats = server.sync_weights(hf_b.state_dict().items())
    on_b = _sample(server)
    delta_b, b_vs_a = _max_logprob_diff(hf_b, on_b), _max_logprob_diff(hf_a, on_b)
    assert b_vs_a > 1.0  # the update is real: the old weights are far off
    assert delta_b < 1e-3
    assert stats.tensors > 0 and stats.buckets >= 1

    # B -> A (published per-expert keys): A's fresh-load baseline applies, and so do its exact samples.
    back = server.sync_weights(_checkpoint_items(tiny_checkpoint))
    on_a = _sample(server)
    delta, a_vs_b = _max_logprob_diff(hf_a, on_a), _max_logprob_diff(hf_b, on_a)
    print(f"\nd0(A) {d0:.3g}  synced A->B vs B {delta_b:.3g} (vs A {b_vs_a:.3g})  B->A vs A {delta:.3g} "
          f"(vs B {a_vs_b:.3g})  sync {stats}  back {back}")
    assert delta <= 2 * d0
    assert a_vs_b > 1.0
    assert on_a.completion_ids == fresh.completion_ids  # same seeds, same weights, same samples


def test_connect_to_running_server(server, tiny_checkpoint):
    client = VLLMServerEngine(tiny_checkpoint, server_url=server.url + "/")
    assert client.process is None  # connected, not started
    mine, theirs = _sample(client, seed=5), _sample(server, seed=5)
    assert mine.completion_ids == theirs.completion_ids
    # concurrent requests batch differently each time: float32 sums move by ~1e-6, once seen at 1.05e-5
    # (wrong or stale weights move them by nats)
    for a, b in zip(mine.logprobs, theirs.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=5e-5)
    client.close()  # leaves a server it did not start running
    assert server.process.poll() is None


def test_bad_server_url_fails_clearly(tiny_checkpoint):
    with pytest.raises(ValueError, match="server_url"):
        VLLMServerEngine(tiny_checkpoint, server_url="localhost:8000", max_model_len=128)
    with pytest.raises(ConnectionError, match="no healthy vLLM server"):
        VLLMServerEngine(tiny_checkpoint, server_url="http://127.0.0.1:9", max_model_len=128)


def test_server_that_dies_names_its_log(tiny_checkpoint, tmp_path, monkeypatch):
    # A stand-in for `vllm serve` that fails at once (a real failing start costs ~15 s of imports here).
    import sys

    from r1pipe.rollout import vllm_server

    monkeypatch.setattr(vllm_server, "serve_command",
                        lambda settings, port: [sys.executable, "-c", "raise SystemExit('no GPU here')"])
    with pytest.raises(RuntimeError, match="vllm serve exited during start; log .*vllm.log(.|\n)*no GPU here"):
        VLLMServerEngine(tiny_checkpoint, max_model_len=128, log_file=tmp_path / "vllm.log", start_timeout_s=60)
