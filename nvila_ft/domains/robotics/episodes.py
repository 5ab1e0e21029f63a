"""Robot episodes -> one training record per step: the frames up to that step, the instruction, the target.

The native layout, a JSON list (`.json`) or JSON Lines (`.jsonl`, one episode a line) of episodes, as
LeRobot / RLDS exports flatten to (one episode, its language instruction, its per-step records):

    {"episode_id": "pick-0007",                    # optional; records are named <episode_id>#<step>
     "video": "episodes/pick-0007.mp4",            # an mp4 (any FFmpeg video) or a folder of frames,
                                                   # relative to media_root (default: the file's folder)
     "instruction": "pick up the red block",       # also read from "language_instruction" or "task"
     "steps": [{"frame": 0,                        # 0-based frame index of the step's observation
                                                   # (also "frame_index"); a folder's frames in sorted name order
                "subgoal": "move above the block",
                "action": {"x": 0.8, "y": 0.0, "grip": "open"},   # or a string
                "action_text": "move right"}, ...]}

One record per step. Its video is the window of `context_frames` frames ending at the step's frame, `frame_stride`
apart and clamped at the episode's start (frame 9, 4 frames, stride 2 -> 3, 5, 7, 9; frame 1 -> 0, 0, 0, 1); only
those frames are decoded. The processor brings the window to the model's `num_video_frames` and the model pools
it in time as its config says. The prompt is the instruction, the answer the step's target:

- `subgoal`: the step's "subgoal" text;
- `action_text`: the step's "action_text", else its "action" when that is a string;
- `action_tokens`: the step's "action" dict discretised by `action_fields` (`nvila_ft.domains.robotics.actions`), e.g.
  "x=+1 y=0 grip=open"; the action metrics (`action_exact_match`, ...) parse the model's answer back.

A malformed episode or step raises DataError naming the file, the episode index, the step and the field, or with
`on_error="collect"` lands in `errors` and the rest is kept. `limit` counts episodes. With `path=None` the
built-in synthetic episodes (`nvila_ft.domains.robotics.generators.make_robot_episodes_dataset`, options in `builtin`) are
generated into the cache and read like user data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nvila_ft.data.kit import (
    RecordProblem,
    SubsetFile,
    WrittenSubset,
    check_on_error,
    describe_value,
    json_file_records,
    optional_id,
    report,
    resolve_media_root,
)
from nvila_ft.data.media import VideoClip
from nvila_ft.data.records import Record
from nvila_ft.data.subset import cannot_write
from nvila_ft.data.validation import BadRecord
from nvila_ft.domains.robotics.actions import ActionFormat
from nvila_ft.domains.robotics.generators import make_robot_episodes_dataset
from nvila_ft.domains.synthetic import cache_folder, options_name

TARGETS = ("subgoal", "action_text", "action_tokens")
INSTRUCTION_FIELDS = ("instruction", "language_instruction", "task")
FRAME_FIELDS = ("frame", "frame_index")


def window(frame: int, context_frames: int, frame_stride: int) -> tuple[int, ...]:
    """The `context_frames` frame indices ending at `frame`, `frame_stride` apart, clamped at 0."""
    return tuple(max(0, frame - k * frame_stride) for k in reversed(range(context_frames)))


class RobotEpisodes:
    """Episodes in the native layout (module docstring) as per-step records."""

    def __init__(
        self,
        path: str | None = None,
        media_root: str | None = None,
        target: str = "action_tokens",
        context_frames: int = 2,
        frame_stride: int = 1,
        action_fields: Mapping[str, Mapping[str, Any]] | None = None,
        limit: int | None = None,
        on_error: str = "raise",
        builtin: Mapping[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"target = {target!r}: choose one of {list(TARGETS)}")
        for name, value in (("context_frames", context_frames), ("frame_stride", frame_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r}: a whole number >= 1")
        if target == "action_tokens" and not action_fields:
            raise ValueError("target = action_tokens needs action_fields, e.g. {x: {low: -1, high: 1, bins: 3}, "
                             "grip: {values: [open, close]}}")
        self.path, self.media_root, self.target = path, media_root, target
        self.context_frames, self.frame_stride, self.limit = context_frames, frame_stride, limit
        self.action_fields = action_fields
        self.format = ActionFormat(action_fields) if action_fields else None
        self.on_error = check_on_error(on_error)
        self.builtin, self.cache_dir = dict(builtin or {}), cache_dir
        self.errors: list[BadRecord] = []

    def file(self) -> Path:
        """The episodes file: `path`, or the built-in episodes (generated on first use)."""
        if self.path is not None:
            return Path(self.path)
        options = dict(self.builtin)
        return make_robot_episodes_dataset(cache_folder("robot_episodes-" + options_name(options), self.cache_dir), **options)

    def records(self) -> list[Record]:
        self.errors = []
        file = self.file()
        name = str(self.path) if self.path is not None else str(file)
        root = resolve_media_root(self.media_root, file.parent)
        return json_file_records(self, file, name, lambda entry, origin, index: self._step_records(entry, origin, index, root))

    def subset_files(self) -> list[SubsetFile]:
        """None: a subset of per-step records is not a subset of the episodes file."""
        raise cannot_write(self)

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        raise cannot_write(self)

    def _step_records(self, entry: Any, origin: str, index: int, root: str) -> list[Record]:
        """One record per usable step of an episode; a bad step is reported and skipped, a bad episode raises."""
        episode_id, video, instruction, steps = _episode(entry)
        out: list[Record] = []
        for step_index, step in enumerate(steps):
            where = f"{origin}.steps[{step_index}]"
            try:
                frame, answer = _frame(step), self._target(step)
            except RecordProblem as problem:
                report(self, where, problem)
                continue
            clip = VideoClip(video, window(frame, self.context_frames, self.frame_stride))
            messages = [
                {"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": instruction}]},
                {"role": "assistant", "content": answer},
            ]
            record_id = f"{episode_id if episode_id is not None else index}#{step_index}"
            out.append(Record(messages, where, record_id, root,
                              {"episode_id": episode_id, "step": step_index, "frame": frame,
                               "group": origin}))  # an episode's steps are held out together
        return out

    def _target(self, step: dict[str, Any]) -> str:
        if self.target == "subgoal":
            return _text(step.get("subgoal"), "subgoal")
        action = step.get("action")
        if self.target == "action_text":
            if step.get("action_text") is not None:
                return _text(step["action_text"], "action_text")
            if isinstance(action, str):
                return _text(action, "action")
            raise RecordProblem("field 'action_text': missing (target action_text takes it, or a string 'action')",
                                 kind="no_answer")
        if not isinstance(action, Mapping):
            raise RecordProblem(f"field 'action': expected a dict of {list(self.format.fields)}, got "
                                 f"{describe_value(action)}", kind="no_answer" if action is None else "structure")
        try:
            return self.format.format(action)
        except ValueError as err:
            raise RecordProblem(f"field 'action': {err}") from err


def _episode(entry: Any) -> tuple[str | None, str, str, list[Any]]:
    if not isinstance(entry, dict):
        raise RecordProblem(f"expected a dict (an episode), got {type(entry).__name__}")
    video = entry.get("video")
    if not isinstance(video, str) or not video.strip():
        raise RecordProblem(f"field 'video': expected the path of a video file or frame folder, got {describe_value(video)}")
    key = next((k for k in INSTRUCTION_FIELDS if k in entry), "instruction")
    instruction = _text(entry.get(key), key)
    steps = entry.get("steps")
    if not isinstance(steps, list) or not steps:
        raise RecordProblem(f"field 'steps': expected a non-empty list of steps, got {describe_value(steps)}")
    return optional_id(entry.get("episode_id")), video, instruction, steps


def _frame(step: Any) -> int:
    if not isinstance(step, dict):
        raise RecordProblem(f"expected a dict (a step), got {type(step).__name__}")
    key = next((k for k in FRAME_FIELDS if k in step), "frame")
    value = step.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecordProblem(f"field {key!r}: expected a frame index (a whole number >= 0), got {describe_value(value)}")
    return value


def _text(value: Any, field: str) -> str:
    if value is None:
        raise RecordProblem(f"field {field!r}: missing", kind="no_answer" if field != "instruction" else "structure")
    if not isinstance(value, str) or not value.strip():
        raise RecordProblem(f"field {field!r}: expected non-empty text, got {describe_value(value)}")
    return value.strip()
