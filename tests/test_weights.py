"""Weights from where users keep them: any file name, training-checkpoint containers, key prefixes, EMA, model
folders (timm / Hugging Face layout), hub names from the local cache; and a pickle payload never runs."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.models import save_for_hf

from pgshell.engine import models as M
from pgshell.engine.data.transforms import build_transform
from pgshell.engine.errors import PgError
from pgshell.engine.models.build import build_model
from pgshell.engine.models.spec import ModelSpec
from pgshell.engine.models.weights import read_weights

ROOT = Path(__file__).resolve().parent.parent


def _build(name, num_classes=3, **kw):
    torch.manual_seed(0)
    return build_model(ModelSpec(name, num_classes, **kw))


@pytest.fixture(scope="module")
def saved():
    """The weights every format below holds: a 3-class test_resnet, so the head loads too."""
    torch.manual_seed(123)
    return {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=3).state_dict().items()}


def _other():
    torch.manual_seed(999)
    return timm.create_model("test_resnet", num_classes=3).state_dict()


def _timm_folder(folder: Path, state: dict) -> Path:
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(state)
    save_for_hf(model, str(folder), model_config={"label_names": ["cat", "dog", "fox"]}, safe_serialization=True)
    return folder


def _write_formats(d: Path, state: dict) -> dict[str, Path]:
    """The same weights the ways training code of the ecosystem saves them."""
    d.mkdir(parents=True, exist_ok=True)
    files = {
        # the public CIFAR ResNets: a zip torch.save, the weights under state_dict, keys from DataParallel
        "th": d / "resnet20-12fca82f.th",
        # the PyTorch ImageNet example: the legacy (non-zip) format, the arch and optimizer beside the weights
        "pth.tar": d / "checkpoint.pth.tar",
        # Lightning: the LightningModule's attribute as prefix, its loss and metric tensors, trainer bookkeeping
        "ckpt": d / "epoch=2-step=10.ckpt",
        # an EMA helper's checkpoint: the live weights under "model" differ, the EMA's are preferred
        "ema": d / "ema.pt",
        # safetensors under a name that says nothing, and a torch.save file under safetensors' name
        "safetensors as .bin": d / "weights.bin",
        "torch.save as .safetensors": d / "renamed.safetensors",
    }
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.7}, files["th"])
    torch.save({"epoch": 90, "arch": "test_resnet", "state_dict": state, "best_acc1": 76.1,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}},
               files["pth.tar"], _use_new_zipfile_serialization=False)
    torch.save({"epoch": 2, "global_step": 10, "pytorch-lightning_version": "2.4.0",
                "state_dict": {**{f"model.{k}": v for k, v in state.items()},
                               "loss_fn.weight": torch.ones(3), "train_acc.correct": torch.tensor(7)},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.01}]}], "lr_schedulers": [],
                "hyper_parameters": {"lr": 0.01, "num_classes": 3}, "callbacks": {}}, files["ckpt"])
    torch.save({"model": _other(), "ema": {"module": state, "decay": 0.9998}, "epoch": torch.tensor(5)}, files["ema"])
    safetensors.torch.save_file(state, str(files["safetensors as .bin"]))
    torch.save(state, files["torch.save as .safetensors"])
    files["timm folder"] = _timm_folder(d / "exported", state)
    return files


def test_the_same_weights_in_every_format_load_to_identical_tensors(tmp_path, saved):
    files = _write_formats(tmp_path, saved)
    for kind, file in files.items():
        built = _build("test_resnet", weights=str(file))
        own = built.module.state_dict()
        assert set(own) == set(saved), kind
        assert all(torch.equal(own[k], saved[k]) for k in saved), kind
        assert f"loaded {len(saved)} tensors" in built.notes[-1], (kind, built.notes)
    ckpt_note = _build("test_resnet", weights=str(files["ckpt"])).notes[-1]
    assert "prefix 'model.' removed" in ckpt_note and "2 other tensors of the checkpoint left out" in ckpt_note
    assert "'ema/module'" in _build("test_resnet", weights=str(files["ema"])).notes[-1]
    # the folder is also a model by itself, built by timm's own local-dir loader
    folder = _build(str(files["timm folder"]), pretrained=True)
    assert folder.full_name == f"local-dir:{files['timm folder'].resolve()}" and folder.source == "timm"
    assert all(torch.equal(folder.module.state_dict()[k], saved[k]) for k in saved)


def test_a_prefix_is_removed_only_when_that_makes_the_keys_match():
    own = {"fc.weight": torch.zeros(1), "model.fc.weight": torch.zeros(1), "conv.weight": torch.zeros(1)}
    assert M._best_prefix(["model.fc.weight", "conv.weight"], own) == ""  # the model's own names
    assert M._best_prefix(["model.module.fc.weight", "model.module.conv.weight"], own) == "model.module."
    assert M._best_prefix(["backbone.conv.weight", "head.x"], own) == "backbone."
    assert M._best_prefix(["encoder.nothing", "x.y"], own) == ""


def test_another_models_weights_say_how_many_matched_with_two_examples_of_each_side(tmp_path, saved):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", num_classes=3).state_dict()
    file = tmp_path / "vit.pth.tar"
    torch.save({"state_dict": {f"model.{k}": v for k, v in vit.items()}}, file)
    with pytest.raises(PgError) as info:
        _build("test_resnet", weights=str(file))
    msg = str(info.value)
    assert "\n" not in msg and f"{len(vit)} of {len(vit)} tensors in {file} don't match" in msg
    assert "(0 match; only in the file: model.cls_token, model.pos_embed; only in the model: conv1.0.weight, conv1.1.weight" in msg
    # half a model: the count of matches and both sides' examples
    half = dict(list(saved.items())[:20])
    half.update({"extra.one": torch.zeros(2), "extra.two": torch.zeros(2)})
    torch.save(half, tmp_path / "half.th")
    with pytest.raises(PgError, match=r"2 of 22 tensors .* \(20 match; only in the file: extra.one, extra.two; "
                                      r"only in the model: \S+, \S+\)"):
        _build("test_resnet", weights=str(tmp_path / "half.th"))


def test_files_that_are_not_weights_are_one_clear_line(tmp_path):
    (tmp_path / "notes.th").write_text("not weights at all")
    with pytest.raises(PgError, match="is not a weights file .*torch.save"):
        read_weights(tmp_path / "notes.th")
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(PgError, match="not a readable PyTorch file"):
        read_weights(tmp_path / "truncated.ckpt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_tensors.pt")
    with pytest.raises(PgError, match="holds no tensors"):
        read_weights(tmp_path / "no_tensors.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PgError, match="holds none of model.safetensors, pytorch_model.bin"):
        read_weights(tmp_path / "empty_dir")
    with pytest.raises(PgError, match="is not a model folder: it needs config.json"):
        _build(str(tmp_path / "empty_dir"), pretrained=True)


class _Touch:
    """Unpickling this creates a file: what a malicious weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_pickle_payload_in_any_format_runs_nothing(tmp_path, saved):
    probe = tmp_path / "probe"
    torch.save({"x": _Touch(probe)}, tmp_path / "probe.th")
    torch.load(tmp_path / "probe.th", weights_only=False)
    assert probe.exists()  # the payload really creates a file when unpickled
    marker = tmp_path / "marker"
    payload = _Touch(marker)
    evil = {
        "evil.th": lambda f: torch.save({"state_dict": {**saved, "x": payload}}, f),
        "evil.pth.tar": lambda f: torch.save({"state_dict": saved, "arch": payload}, f,
                                             _use_new_zipfile_serialization=False),
        "evil.ckpt": lambda f: torch.save({"state_dict": saved, "hyper_parameters": payload}, f),
        "evil_ema.pt": lambda f: torch.save({"ema": {"module": saved}, "ema_helper": payload}, f),
    }
    for name, write in evil.items():
        write(tmp_path / name)
        with pytest.raises(PgError, match="not a plain state dict.*not loaded for safety"):
            _build("test_resnet", weights=str(tmp_path / name))
    folder = _timm_folder(tmp_path / "evil_folder", saved)
    (folder / "model.safetensors").unlink()
    torch.save({**saved, "x": payload}, folder / "pytorch_model.bin")
    with pytest.raises(PgError, match="not a plain state dict"):
        _build("test_resnet", weights=str(folder))
    with pytest.raises(PgError, match="timm could not load the model folder"):  # timm's loader: weights_only too
        _build(str(folder), pretrained=True)
    assert not marker.exists()


PRETRAINED_CFG_FILE = """
import torch.nn as nn

pretrained_cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                      interpolation="bilinear")

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))

def cifar(num_classes):
    return Net(num_classes)

def own_attribute(num_classes):
    net = Net(num_classes)
    net.pretrained_cfg = dict(input_size=(3, 40, 40), crop_pct=0.8, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    return net

def broken_cfg(num_classes):
    net = Net(num_classes)
    net.pretrained_cfg = "32px please"
    return net
"""


def test_a_model_file_declares_its_own_preprocessing(tmp_path):
    from PIL import Image

    (tmp_path / "cifar.py").write_text(PRETRAINED_CFG_FILE)
    built = _build(f"{tmp_path}/cifar.py:cifar")
    cfg = built.data_config
    assert (cfg["input_size"], cfg["crop_pct"], cfg["mean"], cfg["std"]) == ((3, 32, 32), 1.0, (0.5,) * 3, (0.25,) * 3)
    # crop_pct 1.0: the eval transform keeps every pixel of a 32 px image (no border crop)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    got = build_transform(cfg, train=False)(Image.fromarray(pixels.numpy()))
    assert torch.allclose(got, (pixels.permute(2, 0, 1).float() / 255 - 0.5) / 0.25, atol=1e-6)
    own = _build(f"{tmp_path}/cifar.py:own_attribute").data_config  # the model's attribute wins over the file's
    assert (own["input_size"], own["crop_pct"]) == ((3, 40, 40), 0.8)
    with pytest.raises(PgError, match="pretrained_cfg in .* is a str: make it a dict"):
        _build(f"{tmp_path}/cifar.py:broken_cfg")


# Runs in a fresh interpreter so huggingface_hub reads HF_HOME from the environment as it would for a user; urlopen
# and the hub's HTTP are never reached (HF_HUB_OFFLINE=1).
_HUB_SCRIPT = textwrap.dedent("""
    import json, sys
    import safetensors.torch, torch
    from pgshell.engine.models import ModelSpec, build_model, weights_status
    from pgshell.engine.errors import PgError
    saved = safetensors.torch.load_file(sys.argv[1])
    out = {"status": [weights_status("hf-hub:pgtest/tiny_resnet", "timm"),
                      weights_status("hf-hub:pgtest/missing", "timm")]}
    torch.manual_seed(0)
    built = build_model(ModelSpec("hf-hub:pgtest/tiny_resnet", 3, pretrained=True))
    own = built.module.state_dict()
    out["different"] = [k for k in saved if not torch.equal(own[k], saved[k])]
    out["compared"] = len(saved)
    out["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in built.data_config.items()}
    torch.manual_seed(0)
    out["new_head"] = build_model(ModelSpec("hf-hub:pgtest/tiny_resnet", 5, pretrained=True)).module.fc.out_features
    try:
        build_model(ModelSpec("hf-hub:pgtest/missing", 3, pretrained=True))
        out["error"] = "no error"
    except PgError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")


def test_hub_names_load_through_timm_from_the_local_cache(tmp_path, saved):
    hub = tmp_path / "hf" / "hub"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = hub / "models--pgtest--tiny_resnet"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(saved)
    save_for_hf(model, str(snapshot), model_config={"label_names": ["a", "b", "c"]}, safe_serialization=True,
                data_config={"input_size": (3, 48, 48), "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, str(snapshot / "model.safetensors")], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == ["cached", "download"]
    assert out["different"] == [] and out["compared"] == len(saved)
    assert out["data_config"]["input_size"] == [3, 48, 48] and out["data_config"]["crop_pct"] == 1.0
    assert out["new_head"] == 5  # another class count: timm drops the saved head and makes a new one
    assert str(hub) in out["error"] and "--weights" in out["error"]
    assert "timm.create_model('hf-hub:pgtest/missing', pretrained=True)" in out["error"]
