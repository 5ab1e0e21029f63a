"""Test instrumentation for launched multi-process runs (put on PYTHONPATH by tests/test_distributed.py).

NVILA_TEST_SEEN=<prefix>: every process appends the origin of each training sample it reads to <prefix>.rank<R>.
NVILA_TEST_KILL=<rank>:<step>:<where>: that process SIGKILLs itself at that global step, in the training step
("step") or in the middle of writing the checkpoint ("save").

The patches are applied when nvila-ft's trainer module is first imported, so that nothing is imported (or
printed) in processes that never use it.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

TARGET = "nvila_ft.training.trainer"


def _patch(trainer_module) -> None:
    from nvila_ft.data import dataset

    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("NVILA_TEST_SEEN"):
        getitem = dataset.ConversationDataset.__getitem__

        def recording_getitem(self, index):
            with open(f"{os.environ['NVILA_TEST_SEEN']}.rank{rank}", "a") as handle:
                handle.write(self.records[index].origin + "\n")
            return getitem(self, index)

        dataset.ConversationDataset.__getitem__ = recording_getitem
    if os.environ.get("NVILA_TEST_KILL"):
        kill_rank, kill_step, kill_where = os.environ["NVILA_TEST_KILL"].split(":")
        trainer_cls = trainer_module.NVILATrainer

        def maybe_die(trainer, where):
            if rank == int(kill_rank) and where == kill_where and trainer.state.global_step == int(kill_step):
                os.kill(os.getpid(), signal.SIGKILL)

        step, save = trainer_cls.training_step, trainer_cls._save

        def training_step(self, *args, **kwargs):
            maybe_die(self, "step")
            return step(self, *args, **kwargs)

        def save_then_die(self, output_dir=None, state_dict=None):
            save(self, output_dir, state_dict)  # the adapters are written, the rest of the checkpoint is not
            maybe_die(self, "save")

        trainer_cls.training_step, trainer_cls._save = training_step, save_then_die


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


if os.environ.get("NVILA_TEST_SEEN") or os.environ.get("NVILA_TEST_KILL"):
    sys.meta_path.insert(0, _AfterImport())
