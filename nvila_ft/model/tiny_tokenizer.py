"""The tokenizer of the tiny NVILA presets: files committed in `assets/tiny_tokenizer/`.

Tiny presets need a vocabulary small enough to keep the embedding tables toy-sized, but the same layout as
NVILA's Qwen2 tokenizer so that every code path (chat template, media tokens, label masking, padding) runs
unchanged: byte-level BPE with Qwen2's pre-tokenizer, then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
`[BOS]`, `[PAD]` as the last five ids (151643..151647 in the real one, vocab_size-5..vocab_size-1 here). They are
in the transformers-4.x layout of NVILA's released `llm/` folder, so the official NVILA code can load a tiny
checkpoint too. `tests/tokenizer_files.py` regenerates them byte for byte (and builds the real Qwen2 one).
"""

from __future__ import annotations

from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
