"""Write the tiny random-weight GGUF the test suite runs on.

Architecture ``llama``, 64 wide, 2 layers, a byte-level SentencePiece vocabulary (``<unk>``,
``<s>``, ``</s>``, the 256 byte tokens, ChatML control tokens, and some whole words), and a
ChatML ``tokenizer.chat_template``. The weights are random but seeded, so the file is the same
on every run. The output layer favours the whole-word tokens (Japanese among them), so replies
are mostly valid multibyte text, while prompts still tokenize through the byte tokens.

    python scripts/make_tiny_gguf.py models/tiny.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, PoolingType, TokenType

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORDS = [
    "▁the",
    "▁a",
    "▁chat",
    "▁stream",
    "▁model",
    "ing",
    "ed",
    "▁llama",
    "日本",
    "日本語",
    "こんにちは",
    "東京",
    "ありがとう",
    "です",
    "ます",
    "。",
    "、",
    "テスト",
    "世界",
    "▁😀",
    "é",
    "Ωμέγα",
]


def write_tiny_gguf(
    path: str | Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    seed: int = 0,
    chat_template: str = CHATML_TEMPLATE,
    pooling: int | None = None,
) -> Path:
    """Write the tiny model to ``path`` (with ``chat_template``) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>".encode())
        types.append(TokenType.BYTE)
    tokens += [b"<|im_start|>", b"<|im_end|>"]
    types += [TokenType.CONTROL, TokenType.CONTROL]
    first_word = len(tokens)
    for word in WORDS:
        tokens.append(word.encode())
        types.append(TokenType.NORMAL)
    n_vocab = len(tokens)
    scores = [0.0] * first_word + [-float(i) for i in range(len(WORDS))]

    n_head = 4
    n_ff = 2 * n_embd
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("llamastream-tiny")
    writer.add_context_length(4096)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokens.index(b"<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)
    if pooling is not None:  # an embedding model: llama.cpp pools its states this way
        writer.add_pooling_type(PoolingType(pooling))

    def randn(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    output = np.zeros((n_vocab, n_embd), dtype=np.float32)
    output[first_word:] = randn(len(WORDS), n_embd, scale=2.0)
    writer.add_tensor("token_embd.weight", randn(n_vocab, n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", randn(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", randn(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", randn(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", randn(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", randn(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", randn(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", randn(n_embd, n_ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="models/tiny.gguf")
    args = parser.parse_args()
    out = write_tiny_gguf(args.path)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
