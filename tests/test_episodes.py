"""Robot episodes: the native layout, per-step windows, action text format and metrics, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nvila_ft.data.kit import DataError
from nvila_ft.data.media import MediaError, VideoClip, load_video, write_video
from nvila_ft.domains.robotics.actions import ActionFormat, parse_action_text
from nvila_ft.domains.robotics.episodes import RobotEpisodes, window
from nvila_ft.domains.robotics.generators import make_robot_episodes_dataset
from nvila_ft.domains.scoring import compute_metrics
from nvila_ft.domains.task import validation_source
from tests.tolerances import METRIC  # float64 metrics: 64 roundings of values <= 1

FIELDS = {"x": {"low": -1, "high": 1, "bins": 3}, "y": {"low": -1, "high": 1, "bins": 3}, "grip": {"values": ["open", "close"]}}


def _frames(count: int) -> list[Image.Image]:
    """Frame k is a flat grey of value 10 * k + 5, so a decoded frame tells which frame it was."""
    return [Image.new("RGB", (16, 16), (10 * k + 5,) * 3) for k in range(count)]


def _level(image: Image.Image) -> int:
    return int(round((float(np.asarray(image).mean()) - 5) / 10))


# ----------------------------------------------------------------------------------------------- windows / clips
def test_window_is_strided_and_clamped_at_the_episode_start():
    assert window(9, 4, 2) == (3, 5, 7, 9)
    assert window(1, 4, 1) == (0, 0, 0, 1)
    assert window(0, 1, 3) == (0,)


def test_clip_of_a_frame_folder_picks_its_frames_in_order(tmp_path):
    folder = tmp_path / "ep"
    folder.mkdir()
    for k, frame in enumerate(_frames(12)):
        frame.save(folder / f"f_{k:03d}.png")
    frames = load_video(VideoClip("ep", (3, 7, 11)), 6, media_root=tmp_path)
    # 3 chosen frames brought to 6 by the uniform sampling: round(linspace(0, 2, 6)) = 0 0 1 1 2 2
    assert [_level(f) for f in frames] == [3, 3, 7, 7, 11, 11]


def test_clip_of_a_video_file_decodes_the_chosen_frames(tmp_path):
    write_video(_frames(10), tmp_path / "ep.mp4")
    frames = load_video(VideoClip("ep.mp4", (2, 2, 6)), 3, media_root=tmp_path)
    assert [_level(f) for f in frames] == [2, 2, 6]


def test_clip_beyond_the_video_names_the_frame_and_the_length(tmp_path):
    write_video(_frames(5), tmp_path / "ep.mp4")
    with pytest.raises(MediaError, match=r"frame 9 asked for, the video has 5 decodable frames") as err:
        load_video(VideoClip("ep.mp4", (8, 9)), 2, media_root=tmp_path)
    assert err.value.kind == "video_frames"
    with pytest.raises(MediaError, match="escapes the media root"):
        load_video(VideoClip("../ep.mp4", (0,)), 1, media_root=tmp_path / "inner")


# ----------------------------------------------------------------------------------------------- action format
def test_action_format_bins_and_writes_signed_tokens():
    fmt = ActionFormat({"x": {"low": -1, "high": 1, "bins": 5}, "grip": {"values": ["open", "close"]}})
    # bins of width 0.4 over [-1, 1]: -1..-0.6 -> -2, ..., -0.2..0.2 -> 0, 0.6..1 -> +2; outside is clipped
    assert [fmt.encode_value("x", v) for v in (-3.0, -0.7, -0.3, 0.1, 0.5, 1.0)] == ["-2", "-2", "-1", "0", "+1", "+2"]
    assert fmt.format({"x": 0.45, "grip": "Close"}) == "x=+1 grip=close"
    with pytest.raises(ValueError, match="missing field.*grip"):
        fmt.format({"x": 0})
    with pytest.raises(ValueError, match="grip: 'half' is not one of"):
        fmt.format({"x": 0, "grip": "half"})
    with pytest.raises(ValueError, match="odd number of bins"):
        ActionFormat({"x": {"low": -1, "high": 1, "bins": 4}})


def test_action_parser_reports_what_is_wrong_instead_of_raising():
    fmt = ActionFormat(FIELDS)
    good = fmt.parse("x=1 y=-1 grip=open")
    assert good.ok and good.values == {"x": "+1", "y": "-1", "grip": "open"}
    bad = fmt.parse("x=+3 grip=open z=1 banana")
    assert not bad.ok and bad.values == {"grip": "open"}
    assert sorted(bad.problems) == sorted([
        "'banana' is not field=value", "field 'x': '+3' is not one of ['-1', '0', '+1']",
        "unknown field 'z' (fields: ['x', 'y', 'grip'])", "missing field 'y'"])
    assert fmt.parse("").problems == ["empty output (no field=value tokens)", "missing field 'x'",
                                      "missing field 'y'", "missing field 'grip'"]
    assert parse_action_text("x=1 x=0").problems == ["field 'x' given twice"]


# ----------------------------------------------------------------------------------------------- metrics
def test_action_metrics_against_a_hand_count():
    references = ["x=+1 y=0 grip=open", "x=+1 y=0 grip=close", "x=0 y=0 grip=open", "x=0 y=-1 grip=open"]
    predictions = ["x=1 y=0 grip=open",   # all right ("1" is "+1")
                   "x=+1 y=-1 grip=close",  # x, grip right
                   "x=0 grip=open",         # malformed (no y): wrong on every field
                   "the robot moves"]       # malformed
    scores = compute_metrics(["action_exact_match", "action_field_accuracy", "action_malformed_rate"],
                             predictions, references)
    assert scores["action_exact_match"] == pytest.approx(1 / 4, abs=METRIC, rel=0)
    assert scores["action_field_accuracy/x"] == pytest.approx(2 / 4, abs=METRIC, rel=0)
    assert scores["action_field_accuracy/y"] == pytest.approx(1 / 4, abs=METRIC, rel=0)
    assert scores["action_field_accuracy/grip"] == pytest.approx(2 / 4, abs=METRIC, rel=0)
    assert scores["action_field_accuracy"] == pytest.approx((2 / 4 + 1 / 4 + 2 / 4) / 3, abs=METRIC, rel=0)
    assert scores["action_malformed_rate"] == pytest.approx(2 / 4, abs=METRIC, rel=0)


def test_action_metrics_never_crash_on_odd_outputs():
    scores = compute_metrics(["action_exact_match", "action_field_accuracy", "action_malformed_rate"],
                             ["", "=", "x=", "x=1 x=1", "grip=open"], ["x=1"] * 4 + ["move left"])
    assert scores["action_exact_match"] == 0 and scores["action_malformed_rate"] == 1
    assert scores["action_field_accuracy/x"] == 0


# ----------------------------------------------------------------------------------------------- the source
def _write_episodes(tmp_path, episodes, name="episodes.json"):
    folder = tmp_path / "frames"
    folder.mkdir(exist_ok=True)
    for k, frame in enumerate(_frames(6)):
        frame.save(folder / f"{k:02d}.png")
    path = tmp_path / name
    path.write_text(json.dumps(episodes))
    return path


GOOD = {"episode_id": "e1", "video": "frames", "instruction": "pick it",
        "steps": [{"frame": 0, "subgoal": "go", "action": {"x": 1.0, "y": 0, "grip": "open"}, "action_text": "move right"},
                  {"frame_index": 4, "subgoal": "grab", "action": {"x": 0, "y": 0, "grip": "close"}}]}


def test_one_record_per_step_with_its_window_instruction_and_target(tmp_path):
    path = _write_episodes(tmp_path, [GOOD])
    records = RobotEpisodes(str(path), context_frames=3, frame_stride=2, action_fields=FIELDS).records()
    assert [r.answer for r in records] == ["x=+1 y=0 grip=open", "x=0 y=0 grip=close"]
    assert [r.id for r in records] == ["e1#0", "e1#1"]
    assert records[1].origin == f"{path}[0].steps[1]"
    video, text = records[1].messages[0]["content"]
    assert video["video"] == VideoClip("frames", (0, 2, 4)) and text["text"] == "pick it"
    assert records[0].media_root == str(tmp_path.resolve())
    subgoals = RobotEpisodes(str(path), target="subgoal").records()
    assert [r.answer for r in subgoals] == ["go", "grab"]
    # an episode's steps are one group: a held-out share takes whole episodes, never neighbouring steps
    assert records[0].meta["group"] == records[1].meta["group"] == f"{path}[0]"


def test_bad_episodes_and_steps_name_file_episode_step_and_field(tmp_path):
    episodes = [GOOD, {"video": "frames", "steps": []},
                {**GOOD, "steps": [{"frame": -1, "action": {}}, {"frame": 1, "action": {"x": 0, "grip": "open"}},
                                   {"frame": 2, "action": {"x": 0, "y": 0, "grip": "open"}}]}]
    path = _write_episodes(tmp_path, episodes)
    source = RobotEpisodes(str(path), action_fields=FIELDS, on_error="collect")
    records = source.records()
    assert [r.origin for r in records] == [f"{path}[0].steps[0]", f"{path}[0].steps[1]", f"{path}[2].steps[2]"]
    lines = [e.line() for e in source.errors]
    assert lines == [
        f"{path}[1]: structure: field 'instruction': missing",
        f"{path}[2].steps[0]: structure: field 'frame': expected a frame index (a whole number >= 0), got int -1",
        f"{path}[2].steps[1]: structure: field 'action': missing field(s) ['y'] (the action format has ['x', 'y', 'grip'])",
    ]
    with pytest.raises(DataError, match=r"episodes.json\[1\]: field 'instruction': missing"):
        RobotEpisodes(str(path), action_fields=FIELDS).records()
    text_source = RobotEpisodes(str(_write_episodes(tmp_path, [GOOD], "one.json")), target="action_text", on_error="collect")
    assert [r.answer for r in text_source.records()] == ["move right"]
    assert "steps[1]: no_answer: field 'action_text': missing" in text_source.errors[0].line()


def test_validation_file_is_read_like_train(tmp_path):
    train = RobotEpisodes(str(_write_episodes(tmp_path, [GOOD])), target="action_tokens", context_frames=4, action_fields=FIELDS)
    validation = validation_source(str(_write_episodes(tmp_path, [GOOD, GOOD], "val.json")), train)
    assert isinstance(validation, RobotEpisodes) and validation.context_frames == 4 and validation.on_error == "collect"
    assert len(validation.records()) == 4


def test_json_lines_episodes_and_a_broken_line(tmp_path):
    _write_episodes(tmp_path, [])
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n" + json.dumps({**GOOD, "episode_id": "e2"}) + "\n")
    source = RobotEpisodes(str(path), target="subgoal", on_error="collect", limit=2)
    assert [r.id for r in source.records()] == ["e1#0", "e1#1"]
    assert [e.origin for e in source.errors] == [f"{path}[1]"] and "not valid JSON" in source.errors[0].reason


def test_processor_measures_and_validation_checks_episode_steps(tmp_path):
    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.data.validation import validate_records
    from nvila_ft.model.pretrained import pretrained_checkpoint

    processor = NVILAProcessor.from_pretrained(pretrained_checkpoint("nvila-video-tiny"))
    late = {**GOOD, "steps": [{"frame": 9, "subgoal": "go"}]}  # the folder has 6 frames
    records = RobotEpisodes(str(_write_episodes(tmp_path, [GOOD, late])), target="subgoal", context_frames=3).records()
    sample = processor.process(records[1].messages, sample_id=records[1].name, media_root=records[1].media_root)
    size = processor.measure(records[1].messages, records[1].name, records[1].media_root)
    assert size.positions == sample.length and size.tiles == processor.num_video_frames == sample.videos[0].shape[0]
    report = validate_records(records, processor)
    assert [(b.origin, b.kind) for b in report.bad] == [(records[2].origin, "video_frames")]
    assert "frame 9 asked for, the folder has 6 frames" in report.bad[0].reason


def test_builtin_episodes_actions_follow_the_scene(tmp_path):
    path = make_robot_episodes_dataset(tmp_path / "eps", num_episodes=20, seed=3, media="mp4")
    episodes = json.loads(path.read_text())
    assert make_robot_episodes_dataset(tmp_path / "again", num_episodes=20, seed=3, media="mp4").read_bytes() == path.read_bytes()
    for episode in episodes:
        steps = episode["steps"]
        assert steps[-1]["action"] == {"x": 0, "y": 0, "grip": "close"} and steps[-1]["action_text"] == "grasp"
        assert all(s["action"]["grip"] == "open" and (s["action"]["x"] == 0) != (s["action"]["y"] == 0) for s in steps[:-1])
        assert [s["frame"] for s in steps] == list(range(len(steps)))
    # the gripper (white outline) moves one cell per step the way the action says
    episode = episodes[0]
    frames = load_video(VideoClip(episode["video"], tuple(range(len(episode["steps"])))), len(episode["steps"]), tmp_path / "eps")

    def gripper_cell(image):
        white = np.asarray(image).min(axis=2) > 200
        rows, cols = np.nonzero(white)
        return int(rows.mean()) // 8, int(cols.mean()) // 8

    for step, before, after in zip(episode["steps"], frames, frames[1:]):
        (r0, c0), (r1, c1) = gripper_cell(before), gripper_cell(after)
        assert (c1 - c0, r0 - r1) == (step["action"]["x"], step["action"]["y"])


def test_without_a_path_the_source_reads_the_builtin_episodes(tmp_path):
    source = RobotEpisodes(None, target="action_text", builtin={"num_episodes": 3, "seed": 5}, cache_dir=str(tmp_path))
    records = source.records()
    episodes = json.loads(source.file().read_text())
    assert source.file().parent.parent == tmp_path
    assert [r.answer for r in records] == [s["action_text"] for e in episodes for s in e["steps"]]
    assert records[-1].answer == "grasp"
