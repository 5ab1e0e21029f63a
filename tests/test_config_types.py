"""Config values checked against what they build (one-line errors naming the key), and CPU thread sizing."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from nvila_ft.commands.config_types import check_node
from nvila_ft.training.config import ConfigError
from nvila_ft.training.cpu_threads import cgroup_cpu_quota, set_cpu_threads, usable_cpus


def node(**values):
    return OmegaConf.create({"_target_": "nvila_ft.training.config.TrainerConfig", **values})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_steps": "abc"}, "trainer.max_steps = 'abc': expected an integer"),
        ({"max_steps": 1.5}, "trainer.max_steps = 1.5: expected an integer"),
        ({"learning_rate": "fast"}, "trainer.learning_rate = 'fast': expected a number"),
        ({"gradient_checkpointing": "maybe"}, "trainer.gradient_checkpointing = 'maybe': expected true or false or a list ([...])"),
        ({"eval_steps": "x"}, "trainer.eval_steps = 'x': expected an integer or null"),
        ({"extra": [1]}, "trainer.extra = [1]: expected a mapping of settings"),
        ({"max_steps": "???"}, "trainer.max_steps is required: set it on the command line (trainer.max_steps=...)"),
    ],
)
def test_wrong_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as error:
        check_node(node(**values), "trainer")
    assert str(error.value) == message


def test_right_values_pass_and_ints_are_numbers():
    check_node(node(max_steps=10, learning_rate=1, eval_steps=None, extra={"a": 1}), "trainer")


def test_nested_targets_and_policies_are_checked():
    task = OmegaConf.create({
        "_target_": "nvila_ft.domains.task.Task", "name": "t", "val_fraction": 0.1,
        "train": {"_target_": "nvila_ft.data.mixture.Mixture", "sources": [
            {"_target_": "nvila_ft.data.llava.LlavaJson", "path": "???"}]},
    })
    with pytest.raises(ConfigError, match=r"^task\.train\.sources\[0\]\.path is required"):
        check_node(task, "task")
    policy = OmegaConf.create({"_target_": "nvila_ft.adapters.AdapterPolicy", "llm": {"method": "lora", "r": "big"}})
    with pytest.raises(ConfigError, match=r"^adapters\.llm\.r = 'big': expected an integer$"):
        check_node(policy, "adapters")
    policy = OmegaConf.create({"_target_": "nvila_ft.adapters.AdapterPolicy", "llm": {"quantization": {"bits": "4"}}})
    with pytest.raises(ConfigError, match=r"^adapters\.llm\.quantization\.bits = '4': expected an integer$"):
        check_node(policy, "adapters")


def test_usable_cpus_follow_the_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs -> 2 threads
    assert cgroup_cpu_quota(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert cgroup_cpu_quota(tmp_path / "nowhere") is None
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert usable_cpus(tmp_path) == 1


def test_set_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for each process
        assert set_cpu_threads(None) == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads(None) == usable_cpus()
        with pytest.raises(ValueError, match="cpu_threads = 0"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
