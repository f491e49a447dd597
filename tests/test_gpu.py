"""The CUDA fast path: run with `pytest -m gpu` on a machine with an NVIDIA GPU (skipped elsewhere)."""

import pytest
import torch

from pgshell.engine.train.device import resolve_runtime
from pgshell.engine.train.metrics import read_rows
from pgshell.session import Session

from conftest import new_session

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
WAIT = 300


def test_gpu_defaults_are_fast():
    rt = resolve_runtime("auto", "auto", "auto", "all", is_convnet=True)
    assert rt.device.type == "cuda" and rt.amp_dtype is torch.bfloat16 and rt.channels_last
    assert not resolve_runtime("auto", "auto", "auto", "all", is_convnet=False).channels_last
    assert torch.backends.cudnn.benchmark


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_on_gpu(tmp_path, split_folder, amp):
    s = new_session(tmp_path / "sessions", split_folder, "g", amp=amp, lr=0.01)
    s.train(epochs=2)
    assert s.wait(WAIT) and "error" not in s.status
    tr = s.trainer
    assert tr.runtime.device.type == "cuda" and (tr.scaler is not None) == (amp == "fp16")
    assert next(tr.built.module.parameters()).is_cuda
    # channels_last for a convnet on the GPU
    conv = next(m for m in tr.built.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    losses = [float(r["loss"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] * 1.5
    s.close(save=False)


def test_checkpoint_from_gpu_loads_on_cpu(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, "g")
    s.train(steps=2)
    assert s.wait(WAIT)
    file = s.save()
    w = {k: v.cpu() for k, v in s.built.module.state_dict().items()}
    s.close(save=False)
    r = Session.open(file)
    r.set("device", "cpu")
    r._ensure_trainer()
    assert all(torch.equal(v.cpu(), w[k]) for k, v in r.built.module.state_dict().items())
    r.close(save=False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DataParallel needs 2+ GPUs")
def test_data_parallel_over_all_gpus_saves_unwrapped(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, "g", devices="all")
    s.train(steps=2)
    assert s.wait(WAIT)
    assert isinstance(s.trainer.net, torch.nn.DataParallel)
    state = s.trainer.state_dict()
    assert not any(k.startswith("module.") for k in state["model"])
    s.close(save=False)
