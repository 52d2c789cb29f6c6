"""The tiny character-level tokenizer shipped in the repo (no downloads), used by the embedded task.

Built with `tokenizers` (WordLevel over printable ASCII, one token per character) plus whole-token
markers of the R1 output format; saved as a transformers tokenizer so `AutoTokenizer` and vLLM load it.
`python -m r1pipe.data.tokenizer --rebuild` rewrites the committed asset; tests/data checks it is unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import tempfile
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
# Role and control tokens: dropped by decode(skip_special_tokens=True).
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT)
# Output-format markers: whole tokens (so the format is one decision for the policy), but not
# "special", so skip_special_tokens=True keeps them in the text the reward functions read.
FORMAT_TOKENS = ("<think>", "</think>", "<answer>", "</answer>", "\\boxed{")
# Printable ASCII (space .. ~) and newline, in code-point order so ids never depend on set ordering.
ALPHABET = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))

# Roles are single tokens; an assistant turn ends with <|eos|> so sampling stops there. The
# {% generation %} markers let transformers return the assistant-token mask (loss on responses only).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; expected system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def tiny_vocab() -> dict[str, int]:
    """Token -> id: control tokens first (pad is 0), then format markers, then the characters."""
    tokens = list(SPECIAL_TOKENS) + list(FORMAT_TOKENS) + list(ALPHABET)
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_tokenizer():
    """Construct the tokenizer in memory (deterministic: same inputs, same files)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=tiny_vocab(), unk_token=UNK))
    # Every character is its own piece; the added tokens are matched before this split runs.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins pieces with no separator, which is what makes decode(encode(x)) == x.
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=2048,
        padding_side="left",  # generation batches are left-padded
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Write the tokenizer files to out_dir (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save_pretrained(str(out))
    return out


def rebuild_asset(target: str | Path = TINY_TOKENIZER_DIR) -> Path:
    """Replace the committed asset with a fresh build (files removed first so no stale file stays)."""
    target = Path(target)
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_tokenizer(tmp)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(tmp, target)
    target.chmod(0o755)  # TemporaryDirectory is 0700; the committed folder must be readable by all
    return target


def load_tiny_tokenizer(path: str | Path = TINY_TOKENIZER_DIR):
    """Load the shipped tokenizer from the package directory (never the network)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"tiny tokenizer asset missing: {path / 'tokenizer.json'}; "
            "rebuild it with `python -m r1pipe.data.tokenizer --rebuild`"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rebuild", action="store_true", help=f"rewrite {TINY_TOKENIZER_DIR}")
    parser.add_argument("--out", default=None, help="write to this directory instead of the asset")
    args = parser.parse_args()
    if args.rebuild or args.out:
        out = rebuild_asset(args.out or TINY_TOKENIZER_DIR)
        print(f"wrote {out}: vocab size {len(load_tiny_tokenizer(out))}")
    else:
        tok = load_tiny_tokenizer()
        print(json.dumps({"dir": str(TINY_TOKENIZER_DIR), "vocab_size": len(tok)}))


if __name__ == "__main__":
    _main()
