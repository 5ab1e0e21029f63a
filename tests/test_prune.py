"""DeltaLoss pruning: per-token scores against a hand computation, the selection rule, subsets written in the input's
own layout, and `nvila-ft prune` end to end."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from nvila_ft.data.llava import LlavaJson
from nvila_ft.data.mixture import Mixture
from nvila_ft.data.records import Record
from nvila_ft.data.subset import origin_parts, write_subset
from nvila_ft.data.tables import TableSource
from nvila_ft.training.config import ConfigError
from nvila_ft.training.pruning import PruneRule, RecordScore, TokenLoss, answer_losses, record_source, record_sources
from tests.test_cli import run_cli
from tests.tolerances import TINY_FORWARD, cross_entropy, reordered, scale_of


# ----------------------------------------------------------------------------------------------- scores
def test_answer_losses_match_a_plain_loop(tmp_path):
    """Batched (padded) scores equal one forward per record with log-softmax taken by hand at each label position."""
    from nvila_ft.domains.general.generators import make_shapes_dataset
    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
    from nvila_ft.model.presets import save_preset_checkpoint

    checkpoint = save_preset_checkpoint(tmp_path / "ckpt", "nvila-8b-tiny")
    model = NVILAForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32, device=torch.device("cpu"))
    processor = NVILAProcessor.from_pretrained(checkpoint)
    records = LlavaJson(str(make_shapes_dataset(tmp_path / "data", 5, seed=3))).records()
    # answers of different lengths, so the batch is padded
    records[1].messages[-1]["content"] = "a red circle in the top left corner"
    records.append(Record([{"role": "user", "content": "no such image"}, {"role": "assistant", "content": "x"}],
                          "mem[5]", media_root=str(tmp_path)))
    records[-1].messages[0]["content"] = [{"type": "image", "image": "missing.png"}, {"type": "text", "text": "?"}]
    batched = answer_losses(model, processor, records, batch_size=4)

    model.eval()
    for record, got in zip(records[:-1], batched[:-1]):
        sample = processor.process(record.messages, media_root=record.media_root)
        batch = processor.collate([sample])
        labels = batch.pop("labels")[0]
        with torch.no_grad():
            logits = model(**batch).logits[0].double()
        total, count = 0.0, 0
        for t in range(1, len(labels)):
            if labels[t] != -100:
                row = logits[t - 1]
                total += float(row[labels[t]] - torch.logsumexp(row, 0))
                count += 1
        assert got.tokens == count
        # batch of 4 (padded) against one sample: |d loss| <= 2 max|d logit| + the cross-entropy's own reordering
        atol = 2 * reordered(TINY_FORWARD, scale_of(logits))["atol"] + cross_entropy(logits.shape[-1], count, total / count)["atol"]
        assert got.loss == pytest.approx(-total / count, abs=atol)
    assert batched[1].tokens > batched[0].tokens
    assert isinstance(batched[-1], str) and "missing.png" in batched[-1]


def test_token_loss_by_hand_and_without_supervised_tokens():
    from nvila_ft.training.pruning import _token_loss

    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    # position 0 predicts token 1 (label 0: p = 1/2), position 1 predicts token 2 (label 0: p = 3/4)
    got = _token_loss(logits, torch.tensor([-100, 0, 0]))
    # float32 (log 3 rounded, a 2-term logsumexp, a mean of 2) against float64: 5 roundings at |log 3|
    assert got.tokens == 2 and got.loss == pytest.approx(-(math.log(0.5) + math.log(0.75)) / 2, abs=reordered(5, math.log(3))["atol"])
    empty = _token_loss(logits, torch.tensor([0, -100, -100]))  # only position 0 supervised: nothing predicts it
    assert empty.tokens == 0 and math.isnan(empty.loss)


# ----------------------------------------------------------------------------------------------- selection
def score(index: int, strong: float | None, weak: float | None, source: str = "a.json") -> RecordScore:
    loss = lambda v: None if v is None else TokenLoss(3, v)  # noqa: E731
    return RecordScore(f"{source}[{index}]", None, source, loss(strong), loss(weak))


def test_selection_drops_trivial_harmful_and_unusable_then_keeps_top_delta():
    scores = [
        score(0, 0.01, 0.02),  # both right: trivial
        score(1, 1.5, 0.2),    # strong 1.3 nats worse: harmful
        score(2, 0.2, 1.2),    # delta +1.0
        score(3, 0.4, 0.5),    # +0.1
        score(4, 0.6, 0.9),    # +0.3
        score(5, None, 0.3),   # unusable
        score(6, 0.5, 0.2),    # -0.3: within the margin, a candidate
        score(7, 0.01, 0.9),   # strong right only: +0.89, not trivial
    ]
    PruneRule(keep_fraction=0.5, trivial_loss=0.05, harmful_margin=0.5).select(scores)
    # budget round(0.5 * 8) = 4 from the candidates 2 (+1.0), 7 (+0.89), 4 (+0.3), 3 (+0.1), 6 (-0.3)
    assert [s.reason for s in scores] == ["trivial", "harmful", "top_delta", "top_delta", "top_delta", "unusable",
                                          "below_cut", "top_delta"]


def test_selection_budget_is_four_of_eight():
    scores = [score(i, 0.5, 0.5 + d) for i, d in enumerate([0.3, -0.1, 0.2, 0.0, 0.5, 0.1, -0.2, 0.4])]
    PruneRule(keep_fraction=0.5).select(scores)
    assert [s.origin for s in scores if s.kept] == ["a.json[0]", "a.json[2]", "a.json[4]", "a.json[7]"]


def test_keep_fraction_is_per_source_with_half_up_rounding_and_at_least_one():
    scores = [score(i, 0.5, 0.5 + 0.01 * i, "a.json") for i in range(5)] + [score(i, 0.5, 0.6, "b.json") for i in range(1)]
    PruneRule(keep_fraction=0.5).select(scores)
    kept_a = [s.origin for s in scores if s.kept and s.source == "a.json"]
    assert kept_a == ["a.json[2]", "a.json[3]", "a.json[4]"]  # round(2.5) = 3 (half up), highest delta
    assert [s.kept for s in scores if s.source == "b.json"] == [True]  # round(0.5) = 1 and at least 1
    assert PruneRule(keep_fraction=0.1).budget(4) == 1
    assert PruneRule(keep_fraction=1.0).budget(7) == 7
    assert PruneRule(keep_fraction=0.25).budget(10) == 3  # 2.5 -> 3


def test_ties_keep_the_earlier_record_and_trivial_records_never_fill_the_budget():
    scores = [score(i, 0.4, 0.6) for i in range(4)]
    PruneRule(keep_fraction=0.5).select(scores)
    assert [s.kept for s in scores] == [True, True, False, False]
    trivial = [score(i, 0.01, 0.01) for i in range(3)] + [score(3, 0.3, 0.4)]
    PruneRule(keep_fraction=0.75).select(trivial)
    assert [s.reason for s in trivial] == ["trivial", "trivial", "trivial", "top_delta"]


def test_delta_is_the_mean_log_probability_gain():
    s = score(0, 0.25, 1.0)
    assert s.delta == 0.75  # mean(log p_strong - log p_weak) = loss_weak - loss_strong; 1.0 - 0.25 is exact in binary
    assert s.row()["decision"] == "dropped" and s.row()["tokens"] == 3


def test_record_source():
    record = Record([], "/d/x.json[3]", meta={"question_type": "color"})
    assert record_source(record, "file") == "/d/x.json"
    assert record_source(record, "question_type") == "color"
    assert record_source(Record([], "/d/x.json[3]"), "question_type") == "/d/x.json"
    assert record_source(record, "none") == "all"
    assert record_source(record, "file_and_type") == "/d/x.json / color"
    assert record_source(Record([], "/d/x.json[3]"), "file_and_type") == "/d/x.json"
    answered = Record([{"role": "user", "content": "q"}, {"role": "assistant", "content": "yes"}], "/d/x.json[3]",
                      meta={"question_type": "lesion"})
    assert record_source(answered, "file_type_answer") == "/d/x.json / lesion / answer 'yes'"


def test_auto_sources_split_closed_answer_sets_by_answer_only():
    def record(index: int, kind: str, answer: str) -> Record:
        return Record([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}], f"/d/x.json[{index}]",
                      meta={"question_type": kind})

    closed = [record(i, "lesion", "yes" if i % 2 else "no") for i in range(20)]  # 2 answers, 10 records each
    free = [record(20 + i, "report", f"finding number {i}") for i in range(20)]  # every answer different
    sources = record_sources(closed + free, "auto")
    assert set(sources[:20]) == {"/d/x.json / lesion / answer 'yes'", "/d/x.json / lesion / answer 'no'"}
    assert set(sources[20:]) == {"/d/x.json / report"}
    few = [record(i, "lesion", "yes" if i % 2 else "no") for i in range(6)]  # 3 records an answer: not enough to split
    assert set(record_sources(few, "auto")) == {"/d/x.json / lesion"}
    assert PruneRule().by == "auto"


@pytest.mark.parametrize("kwargs, field", [
    ({"keep_fraction": 0}, "keep_fraction"), ({"keep_fraction": 1.5}, "keep_fraction"),
    ({"keep_fraction": True}, "keep_fraction"), ({"trivial_loss": -1}, "trivial_loss"),
    ({"harmful_margin": -0.1}, "harmful_margin"), ({"by": "folder"}, "by"),
])
def test_rule_rejects_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=f"prune.{field}"):
        PruneRule(**kwargs)


# ----------------------------------------------------------------------------------------------- subsets
def _llava(i: int) -> dict:
    return {"id": f"r{i}", "image": f"img/{i}.png", "extra": [i, {"k": "é"}],
            "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": f"a{i}"}]}


def test_subset_of_llava_json_is_the_same_entries_in_order(tmp_path):
    (tmp_path / "in").mkdir()
    entries = [_llava(i) for i in range(6)]
    path = tmp_path / "in" / "train.json"
    path.write_text(json.dumps(entries))
    source = LlavaJson(str(path))
    records = source.records()
    written = write_subset(source, [records[4].origin, records[1].origin, records[2].origin], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "train.json").read_text()) == [entries[1], entries[2], entries[4]]
    assert written[0].layout == "llava_json" and written[0].records == 3
    assert written[0].media_root == str((tmp_path / "in").resolve())
    reread = LlavaJson(str(tmp_path / "out" / "train.json"), media_root=written[0].media_root).records()
    assert [r.id for r in reread] == ["r1", "r2", "r4"]


def test_subset_of_json_lines_copies_the_original_lines(tmp_path):
    lines = [json.dumps(_llava(i), separators=(",", ":")) for i in range(4)]
    path = tmp_path / "train.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line is not a record
    source = LlavaJson(str(path))
    origins = [r.origin for r in source.records()]
    write_subset(source, [origins[0], origins[3]], tmp_path / "out")
    assert (tmp_path / "out" / "train.jsonl").read_text() == lines[0] + "\n" + lines[3] + "\n"


@pytest.mark.parametrize("name, delimiter", [("qa.csv", ","), ("qa.tsv", "\t")])
def test_subset_of_a_table_keeps_columns_and_rows(tmp_path, name, delimiter):
    rows = [["id", "image", "question", "answer", "note"]] + [[f"{i}", f"{i}.png", f"q {i}, \"quoted\"", f"a{i}", "x\ny"]
                                                              for i in range(5)]
    path = tmp_path / name
    with path.open("w", newline="") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    source = TableSource(str(path))
    records = source.records()
    write_subset(source, [records[0].origin, records[3].origin], tmp_path / "out")
    with (tmp_path / "out" / name).open(newline="") as handle:
        assert list(csv.reader(handle, delimiter=delimiter)) == [rows[0], rows[1], rows[4]]
    assert [r.answer for r in TableSource(str(tmp_path / "out" / name)).records()] == ["a0", "a3"]


def test_subset_of_a_mixture_writes_one_file_per_input(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.json").write_text(json.dumps([_llava(i) for i in range(3)]))
    mixture = Mixture([LlavaJson(str(tmp_path / "a" / "train.json")), LlavaJson(str(tmp_path / "b" / "train.json"))])
    records = mixture.records()
    written = write_subset(mixture, [records[0].origin, records[5].origin], tmp_path / "out")
    assert [w.path.name for w in written] == ["train.json", "1-train.json"]
    assert [json.loads(w.path.read_text())[0]["id"] for w in written] == ["r0", "r2"]
    assert origin_parts("x/data.json[12]") == ("x/data.json", 12)


def test_subset_of_a_parquet_dataset(tmp_path):
    import datasets

    from nvila_ft.data.hf_dataset import HFDataset

    datasets.Dataset.from_dict({"question": [f"q{i}" for i in range(4)], "answer": [f"a{i}" for i in range(4)]}).to_parquet(
        str(tmp_path / "qa.parquet"))
    source = HFDataset(str(tmp_path / "qa.parquet"), question_column="question", answer_column="answer", image_column=None)
    records = source.records()
    written = write_subset(source, [records[1].origin, records[3].origin], tmp_path / "out")
    again = HFDataset(str(written[0].path), question_column="question", answer_column="answer", image_column=None).records()
    assert [r.answer for r in again] == ["a1", "a3"]


def test_subset_of_a_saved_dataset_dict(tmp_path):
    import datasets

    from nvila_ft.data.hf_dataset import HFDataset

    rows = {"question": [f"q{i}" for i in range(5)], "answer": [f"a{i}" for i in range(5)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    source = HFDataset(str(tmp_path / "saved"), question_column="question", answer_column="answer", image_column=None)
    records = source.records()
    written = write_subset(source, [records[0].origin, records[4].origin], tmp_path / "out")
    assert written[0].layout == "hf_saved" and written[0].path.name == "saved-subset"
    assert datasets.load_from_disk(str(written[0].path))["answer"] == ["a0", "a4"]


# ----------------------------------------------------------------------------------------------- command
@pytest.mark.slow
def test_prune_command_end_to_end_and_bad_config(tmp_path):
    cache = tmp_path / "cache"
    small = ["task.train.num_records=40", "trainer.per_device_train_batch_size=4"]
    strong = tmp_path / "strong"
    run_cli(["finetune", f"hydra.run.dir={strong}", "trainer.max_steps=6", "eval.before_training=false",
             "trainer.save_steps=100", *small], tmp_path, cache)
    out = tmp_path / "prune"
    result = run_cli(["prune", f"hydra.run.dir={out}", f"prune.strong={strong}", "prune.weak=base",
                      "prune.keep_fraction=0.25", "prune.by=file", "task.train.num_records=40"], tmp_path, cache)
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"origin", "id", "strong_loss", "weak_loss", "delta", "decision", "reason"} <= set(rows[0])
    kept = [r for r in rows if r["decision"] == "kept"]
    assert len(kept) == 10
    assert min(r["delta"] for r in kept) >= max(r["delta"] for r in rows if r["reason"] == "below_cut")
    data_file, _ = origin_parts(rows[0]["origin"])
    original = json.loads(open(data_file).read())
    pruned = json.loads((out / "pruned" / "data.json").read_text())
    assert pruned == [original[origin_parts(r["origin"])[1]] for r in kept]
    report = json.loads((out / "prune_report.json").read_text())
    assert report["kept"] == 10 and report["written"][0]["media_root"] == str(cache.resolve() / "builtin" / "scan-n40-seed0")
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG" and "top_delta" in (out / "prune_report.md").read_text()
    assert "kept 10 of 40 records" in result.stderr + result.stdout
    # the pruned file is a task input as it is
    reread = LlavaJson(str(out / "pruned" / "data.json"), media_root=report["written"][0]["media_root"]).records()
    assert len(reread) == 10 and math.isfinite(kept[0]["delta"])

    bad = run_cli(["prune", f"hydra.run.dir={tmp_path / 'bad'}", "prune.weak=base"], tmp_path, cache, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "nvila-ft prune: error: prune.strong is not set: give `base` (the model option), a checkpoint directory or "
        "a run directory of nvila-ft finetune, e.g. prune.strong=outputs/<run>"]


def test_model_choices_and_their_errors(tmp_path):
    from nvila_ft.commands.prune import PruneOptions, choose_model

    with pytest.raises(ConfigError, match=r"^prune.weak is not set"):
        PruneOptions(strong="base")
    with pytest.raises(ConfigError, match=r"^prune.keep_fraction = 1.5: the share of each source kept, in \(0, 1\]$"):
        PruneOptions(strong="base", weak="base", keep_fraction=1.5)
    with pytest.raises(ConfigError, match=r"^prune.batch_size = 0"):
        PruneOptions(strong="base", weak="base", batch_size=0)
    with pytest.raises(ConfigError, match=r"^prune.strong = .*nowhere: does not exist"):
        choose_model("strong", str(tmp_path / "nowhere"), None, tmp_path)
    with pytest.raises(ConfigError, match=r"neither a run directory .* nor a checkpoint"):
        choose_model("weak", str(tmp_path), None, tmp_path)
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model:\n  _target_: nvila_ft.model.source.ModelSource\n  preset: nvila-8b-tiny\n")
    with pytest.raises(ConfigError, match=r"^prune.strong: .*run: no trained adapters"):
        choose_model("strong", str(run), None, tmp_path)
    (run / "config.json").write_text("{}")  # a run directory wins over a checkpoint file beside it
    with pytest.raises(ConfigError, match="no trained adapters"):
        choose_model("strong", str(run), None, tmp_path)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    choice = choose_model("weak", str(checkpoint), None, tmp_path)
    assert choice.source.path == str(checkpoint) and choice.adapters is None
