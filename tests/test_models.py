"""Models: names, the catalogue, building with a new head, weight files, the offline caches, freezing."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from pgshell.engine import models as M
from pgshell.engine.errors import PgError
from pgshell.engine.models.build import build_model
from pgshell.engine.models.catalogue import SEED_FAMILIES, list_models, resolve_name, weights_status
from pgshell.engine.models.freezing import count_params, freeze, frozen_bn_to_eval, stages, unfreeze
from pgshell.engine.models.spec import ModelSpec

from conftest import ROOT

CONVNET_SEEDS = {"resnet18", "resnet50", "resnet152", "mobilenetv3", "mobilenetv3_small"}


def _build(name, num_classes=3, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(ModelSpec(name, num_classes, **kw))


def _build_on_meta(name):
    """Shapes, names and counts without allocating or initialising weights: full-size models in milliseconds.

    Forward passes of such a model run inside `torch.device("meta")` too (its inputs are meta tensors there): they
    check shapes, which is all the meta device computes.
    """
    with torch.device("meta"):
        return _build(name)


def _numel(params):
    return sum(p.numel() for p in params)


def _trainable_names(built):
    return {n for n, p in built.module.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ names


def test_seed_families_are_real_timm_names():
    pretrained = set(timm.list_models(pretrained=True))
    assert {s["name"] for s in SEED_FAMILIES} >= {"resnet18", "resnet50", "resnet152", "mobilenetv3",
                                                  "mobilenetv3_small", "vit", "dino", "dinov2", "deit", "deit3"}
    for seed in SEED_FAMILIES:
        assert seed["default"] in pretrained, seed
        assert set(seed["alternatives"]) <= pretrained, seed
        arch = seed["default"].partition(".")[0]
        assert timm.models.model_entrypoint(arch).__module__ == f"timm.models.{seed['family']}"


@pytest.mark.parametrize("short, full", [
    ("resnet18", "resnet18.a1_in1k"), ("resnet50", "resnet50.a1_in1k"), ("resnet152", "resnet152.a1_in1k"),
    ("mobilenetv3", "mobilenetv3_large_100.ra_in1k"), ("mobilenetv3_small", "mobilenetv3_small_100.lamb_in1k"),
    ("vit", "vit_base_patch16_224.augreg2_in21k_ft_in1k"), ("dino", "vit_small_patch16_224.dino"),
    ("dinov2", "vit_small_patch14_dinov2.lvd142m"), ("deit", "deit_small_patch16_224.fb_in1k"),
    ("deit3", "deit3_small_patch16_224.fb_in1k"),
])
def test_resolve_short_names(short, full):
    assert resolve_name(short) == ("timm", full)


def test_resolve_other_names(tmp_path):
    assert resolve_name("tv:resnet50") == ("torchvision", "torchvision:resnet50")
    assert resolve_name("TorchVision:ResNet50") == ("torchvision", "torchvision:resnet50")
    assert resolve_name("resnet50.tv_in1k") == ("timm", "resnet50.tv_in1k")
    assert resolve_name("test_resnet") == ("timm", "test_resnet.r160_in1k")  # timm's default pretrained tag
    assert resolve_name("test_mambaout") == ("timm", "test_mambaout")  # no pretrained tag at all
    (tmp_path / "net.py").write_text("def make(): pass\n")
    assert resolve_name(f"{tmp_path}/net.py:make") == ("file", f"{tmp_path / 'net.py'}:make")


@pytest.mark.parametrize("name, suggestion", [
    ("resnet5O", "resnet50"), ("mobilenet_v3_small", "tv:mobilenet_v3_small"), ("tv:resnet", "tv:resnet18"),
    ("resnet18.bogus", "resnet18.a1_in1k"),
])
def test_unknown_name_suggests_close_matches(name, suggestion):
    with pytest.raises(PgError) as e:
        resolve_name(name)
    assert suggestion in str(e.value) and "models PATTERN" in str(e.value)


def test_file_names_need_a_factory_and_an_existing_file(tmp_path):
    with pytest.raises(PgError, match="FACTORY"):
        resolve_name("net.py")
    with pytest.raises(PgError, match="does not exist"):
        resolve_name(f"{tmp_path}/missing.py:make")


def test_spec_round_trips_through_json():
    spec = ModelSpec("tv:resnet18", 4, pretrained=True, weights="w.pth")
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert ModelSpec.from_dict({"name": "resnet18", "num_classes": 2}) == ModelSpec("resnet18", 2)
    with pytest.raises(PgError, match="unknown model fields"):
        ModelSpec.from_dict({"name": "resnet18", "num_classes": 2, "colour": "red"})


# ------------------------------------------------------------------------------------------------ catalogue


def test_list_models_lists_the_seed_families_quickly():
    M._count_params_on_meta.cache_clear()
    start = time.perf_counter()
    rows = list_models()
    elapsed = time.perf_counter() - start
    assert [r["name"] for r in rows] == [s["name"] for s in SEED_FAMILIES]
    assert elapsed < 5.0
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet18"]["params"] == 11_689_512  # resnet18 with its 1000-class ImageNet head
    assert by_name["resnet50"]["params"] == 25_557_032
    assert all(isinstance(r["params"], int) and r["params"] > 0 for r in rows)
    assert by_name["resnet18"]["input_size"] == 224 and by_name["dinov2"]["input_size"] == 518
    assert {r["weights"] for r in rows} <= {"cached", "download"}
    assert by_name["dino"]["full_name"] == "vit_small_patch16_224.dino" and by_name["dino"]["source"] == "timm"


def test_list_models_with_a_pattern():
    rows = list_models("resnet1", limit=6)
    names = [r["name"] for r in rows]
    assert names[:2] == ["resnet18", "resnet152"] and len(rows) == 6
    assert "resnet18.a1_in1k" not in names  # shown once, as its seed family
    assert all("resnet1" in r["full_name"] for r in rows)
    tv = list_models("tv:resnet1*")
    assert [r["name"] for r in tv] == ["tv:resnet101", "tv:resnet152", "tv:resnet18"]
    assert tv[2]["params"] == 11_689_512 and tv[2]["family"] == "resnet" and tv[2]["source"] == "torchvision"
    assert [r["name"] for r in list_models("test_vit.*")] == ["test_vit.r160_in1k"]
    assert list_models("no_such_model_anywhere") == []
    assert list_models("tv:regnet_x_400mf")[0]["params"] is None  # its constructor cannot run on the meta device


def test_weights_status_without_weights():
    assert weights_status("test_mambaout", "timm") == "-"
    assert weights_status("/tmp/net.py:make", "file") == "-"


# ------------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize("short", [s["name"] for s in SEED_FAMILIES])
def test_every_seed_family_builds_with_a_new_head(short):
    built = _build_on_meta(short)
    head = built.module.get_classifier()
    assert head.out_features == 3
    assert set(built.head) == {f"{n}.{p}" for n, m in built.module.named_modules() if m is head
                               for p, _ in m.named_parameters()}
    assert built.source == "timm" and built.full_name == resolve_name(short)[1]
    assert built.is_convnet == (short in CONVNET_SEEDS)
    total = count_params(built.module)[1]
    freeze(built, ["backbone"])
    assert count_params(built.module) == (_numel(head.parameters()), total)
    freeze(built, ["none"])
    assert count_params(built.module) == (total, total)
    if built.is_convnet:
        built.module.eval()
        with torch.no_grad(), torch.device("meta"):
            assert built.module(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_timm_test_models_forward_and_data_config():
    cnn, vit = _build("test_resnet"), _build("test_vit")
    assert cnn.head == ["fc.weight", "fc.bias"] and vit.head == ["head.weight", "head.bias"]
    assert (cnn.is_convnet, vit.is_convnet) == (True, False)
    assert vit.data_config["input_size"] == (3, 160, 160) and vit.data_config["mean"] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert vit.module.eval()(torch.randn(2, 3, 160, 160)).shape == (2, 3)
        assert cnn.module.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_same_seed_same_head():
    a, b, c = _build("tv:resnet18", seed=1), _build("tv:resnet18", seed=1), _build("tv:resnet18", seed=2)
    assert torch.equal(a.module.fc.weight, b.module.fc.weight)
    assert not torch.equal(a.module.fc.weight, c.module.fc.weight)


def test_torchvision_heads_are_replaced():
    resnet = _build_on_meta("tv:resnet18")
    assert resnet.head == ["fc.weight", "fc.bias"] and resnet.module.fc.out_features == 3
    assert resnet.source == "torchvision" and resnet.full_name == "torchvision:resnet18" and resnet.is_convnet
    # without its weights, timm's defaults; the weights' own transforms are checked in the offline-cache test
    assert resnet.data_config == timm.data.resolve_model_data_config(nn.Identity())
    assert resnet.data_config["input_size"] == (3, 224, 224)
    with torch.no_grad(), torch.device("meta"):
        assert resnet.module.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    mobile = _build_on_meta("tv:mobilenet_v3_small")
    assert mobile.head == ["classifier.3.weight", "classifier.3.bias"]
    assert mobile.module.classifier[3].out_features == 3 and mobile.module.classifier[0].out_features == 1024
    vit = _build_on_meta("tv:vit_b_16")
    assert vit.head == ["heads.head.weight", "heads.head.bias"] and vit.module.heads.head.out_features == 3
    assert not vit.is_convnet


MODEL_FILE = """
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))

def with_classes(num_classes):
    return Net(num_classes)

def without_classes():
    return Net()

def broken():
    raise ValueError("boom")
"""


@pytest.mark.parametrize("factory", ["with_classes", "without_classes"])
def test_custom_file_model(tmp_path, factory):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    built = _build(f"{tmp_path}/net.py:{factory}")
    assert built.source == "file" and built.head == ["classifier.weight", "classifier.bias"]
    assert built.module.classifier.out_features == 3 and not built.is_convnet
    assert built.data_config["input_size"] == (3, 224, 224)  # timm's defaults for a model without a config
    with torch.no_grad():
        assert built.module(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_custom_file_errors(tmp_path):
    (tmp_path / "net.py").write_text(MODEL_FILE)
    with pytest.raises(PgError, match="boom"):
        _build(f"{tmp_path}/net.py:broken")
    with pytest.raises(PgError, match="no function 'missing'.*with_classes"):
        _build(f"{tmp_path}/net.py:missing")
    (tmp_path / "bad.py").write_text("import no_such_module_here\n")
    with pytest.raises(PgError, match="importing .* failed"):
        _build(f"{tmp_path}/bad.py:make")


# ------------------------------------------------------------------------------------------------ weight files


def _saved_resnet(num_classes=5):
    torch.manual_seed(123)
    return {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=num_classes).state_dict().items()}


def _assert_backbone_equals(built, saved, head_loaded):
    own = built.module.state_dict()
    for key, tensor in saved.items():
        if key.startswith("fc."):
            assert torch.equal(own[key], tensor) == head_loaded, key
        else:
            assert torch.equal(own[key], tensor), key


def test_weights_from_safetensors_skip_a_head_of_another_size(tmp_path):
    saved = _saved_resnet(num_classes=5)
    file = tmp_path / "w.safetensors"
    safetensors.torch.save_file(saved, str(file))
    built = _build("test_resnet", weights=str(file))
    _assert_backbone_equals(built, saved, head_loaded=False)
    assert built.module.fc.out_features == 3
    assert "head skipped" in built.notes[-1] and f"loaded {len(saved) - 2} tensors" in built.notes[-1]


def test_weights_from_nested_dataparallel_pth(tmp_path):
    saved = _saved_resnet(num_classes=5)
    file = tmp_path / "w.pth"
    torch.save({"epoch": 7, "state_dict": {"module." + k: v for k, v in saved.items()}}, file)
    built = _build("test_resnet", weights=str(file))
    _assert_backbone_equals(built, saved, head_loaded=False)


def test_weights_with_the_same_class_count_load_the_head(tmp_path):
    saved = _saved_resnet(num_classes=3)
    torch.save(saved, tmp_path / "w.pt")
    built = _build("test_resnet", weights=str(tmp_path / "w.pt"))
    _assert_backbone_equals(built, saved, head_loaded=True)
    assert "skipped" not in built.notes[-1]


def test_weights_of_another_model_are_refused(tmp_path):
    torch.manual_seed(0)
    safetensors.torch.save_file(timm.create_model("test_vit").state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(PgError, match="tensors in .* don't match .*another model"):
        _build("test_resnet", weights=str(tmp_path / "vit.safetensors"))
    with pytest.raises(PgError, match="does not exist"):
        _build("test_resnet", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(PgError, match="unknown weights format"):
        _build("test_resnet", weights=str(tmp_path / "w.npz"))


class _Touch:
    """Unpickling this creates a file: what a malicious weights file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_pickle_with_code_is_never_unpickled(tmp_path):
    probe, marker = tmp_path / "probe", tmp_path / "marker"
    torch.save({"fc.weight": torch.zeros(3, 4), "x": _Touch(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert probe.exists()  # the file really is dangerous to unpickle
    torch.save({"fc.weight": torch.zeros(3, 4), "x": _Touch(marker)}, tmp_path / "evil.pth")
    with pytest.raises(PgError, match="not a plain state dict.*torch.save\\(model.state_dict\\(\\)"):
        _build("test_resnet", weights=str(tmp_path / "evil.pth"))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ pretrained caches

# Runs in a fresh interpreter so huggingface_hub and torch.hub read HF_HOME / TORCH_HOME from the environment as
# they would for a user. urlopen is replaced so that no test can ever download anything.
_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, sys, urllib.error
    import safetensors.torch, torch, torch.hub
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")
    torch.hub.urlopen = no_network
    from pgshell.engine.models import ModelSpec, build_model, weights_status
    from pgshell.engine.errors import PgError

    def same(built, file_state):
        own = built.module.state_dict()
        head = set(built.head)
        return sorted(k for k, v in file_state.items() if k not in head and not torch.equal(own[k], v)), \\
            len([k for k in file_state if k not in head])

    def error(name):
        try:
            build_model(ModelSpec(name, 3, pretrained=True))
        except PgError as e:
            return str(e)
        return "no error"

    out = {"status": {n: weights_status(n, s) for n, s in [("test_resnet.r160_in1k", "timm"),
           ("test_vit.r160_in1k", "timm"), ("torchvision:resnet18", "torchvision"),
           ("torchvision:resnet34", "torchvision")]}}
    torch.manual_seed(5)
    timm_built = build_model(ModelSpec("test_resnet", 3, pretrained=True))
    out["timm_diff"] = same(timm_built, safetensors.torch.load_file(sys.argv[1]))
    out["timm_notes"] = timm_built.notes
    torch.manual_seed(5)
    tv_built = build_model(ModelSpec("tv:resnet18", 3, pretrained=True))
    out["tv_diff"] = same(tv_built, torch.load(sys.argv[2], weights_only=True))
    out["tv_data_config"] = tv_built.data_config
    out["timm_error"] = error("test_vit")
    out["tv_error"] = error("tv:resnet34")
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def offline_caches(tmp_path_factory):
    """Fake caches holding one timm and one torchvision weight file in the libraries' real layouts."""
    root = tmp_path_factory.mktemp("caches")
    hub = root / "hf" / "hub"
    repo = hub / "models--timm--test_resnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    timm_file = repo / "snapshots" / commit / "model.safetensors"
    torch.manual_seed(11)
    safetensors.torch.save_file(timm.create_model("test_resnet").state_dict(), str(timm_file))
    checkpoints = root / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    tv_file = checkpoints / os.path.basename(torchvision.models.ResNet18_Weights.DEFAULT.url)
    torch.manual_seed(12)
    torch.save(torchvision.models.resnet18().state_dict(), tv_file)
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(root / "torch"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(timm_file), str(tv_file)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), hub, checkpoints


def test_pretrained_timm_weights_come_from_the_hub_cache(offline_caches):
    out, hub, _ = offline_caches
    assert out["status"]["test_resnet.r160_in1k"] == "cached" and out["status"]["test_vit.r160_in1k"] == "download"
    mismatched, compared = out["timm_diff"]
    assert mismatched == [] and compared > 20
    assert str(hub) in out["timm_notes"][0]


def test_pretrained_torchvision_weights_come_from_the_torch_hub_cache(offline_caches):
    out, _, _ = offline_caches
    assert out["status"]["torchvision:resnet18"] == "cached" and out["status"]["torchvision:resnet34"] == "download"
    mismatched, compared = out["tv_diff"]
    assert mismatched == [] and compared > 100
    assert out["tv_data_config"] == {"input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 0.875,
                                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                     "crop_mode": "center"}  # ResNet18_Weights.DEFAULT.transforms()


def test_pretrained_weights_missing_offline_say_where_and_what_to_do(offline_caches):
    out, hub, checkpoints = offline_caches
    assert str(hub) in out["timm_error"] and "--weights" in out["timm_error"]
    assert "timm.create_model('test_vit.r160_in1k', pretrained=True)" in out["timm_error"]
    assert str(checkpoints) in out["tv_error"] and "--weights" in out["tv_error"]


def test_pretrained_without_published_weights():
    with pytest.raises(PgError, match="no pretrained weights"):
        _build("test_mambaout", pretrained=True)


# ------------------------------------------------------------------------------------------------ freezing


def test_freeze_stages_by_prefix():
    built = _build_on_meta("resnet18")
    assert stages(built) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    everything = {n for n, _ in built.module.named_parameters()}
    layer1 = {n for n in everything if n.startswith("layer1.")}
    freeze(built, ["layer1"])
    assert _trainable_names(built) == everything - layer1
    assert count_params(built.module)[0] == count_params(built.module)[1] - _numel(built.module.layer1.parameters())
    with pytest.raises(PgError, match="'layer'.*conv1, bn1, layer1, layer2, layer3, layer4, fc"):
        freeze(built, ["layer2", "layer"])
    assert _trainable_names(built) == everything - layer1  # a bad word changes nothing


def test_prefixes_match_whole_names_only():
    module = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])  # children "0".."10"
    built = M.BuiltModel(module, ["10.weight", "10.bias"], {}, "file", "seq", False)
    freeze(built, ["1"])
    assert _trainable_names(built) == {n for n, _ in module.named_parameters()} - {"1.weight", "1.bias"}
    freeze(built, ["10.weight"])
    assert "10.weight" not in _trainable_names(built) and "10.bias" in _trainable_names(built)


def test_unfreeze():
    built = _build("test_resnet")
    total = count_params(built.module)[1]
    freeze(built, ["all"])
    assert count_params(built.module) == (0, total)
    unfreeze(built, ["layer4", "fc"])
    expected = _numel(built.module.layer4.parameters()) + _numel(built.module.fc.parameters())
    assert count_params(built.module) == (expected, total)
    freeze(built, ["all"])
    unfreeze(built, ["head"])
    assert _trainable_names(built) == {"fc.weight", "fc.bias"}
    unfreeze(built, ["all"])
    assert count_params(built.module) == (total, total)
    with pytest.raises(PgError, match="say what to unfreeze"):
        unfreeze(built, [])


def test_frozen_batchnorm_keeps_its_running_statistics():
    built = _build("test_resnet")
    bns = [m for m in built.module.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(4, 3, 64, 64) * 3 + 1

    def running_means():
        return [bn.running_mean.clone() for bn in bns]

    before = running_means()
    built.module.train()
    built.module(x)  # without the call, train mode moves the statistics: the check below can fail
    assert any(not torch.equal(a, b) for a, b in zip(before, running_means()))

    freeze(built, ["backbone"])
    built.module.train()
    frozen_bn_to_eval(built.module)
    before = running_means()
    loss = built.module(x).sum()
    loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, running_means()))
    assert built.module.fc.weight.grad is not None and built.module.conv1[0].weight.grad is None

    unfreeze(built, ["layer4"])
    built.module.train()
    frozen_bn_to_eval(built.module)
    assert all(m.training for m in built.module.layer4.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(m.training for m in built.module.layer1.modules() if isinstance(m, nn.BatchNorm2d))


def test_batchnorm_without_affine_follows_its_parent():
    module = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), nn.Linear(4, 2))
    built = M.BuiltModel(module, ["1.weight", "1.bias"], {}, "file", "seq", True)
    freeze(built, ["backbone"])
    module.train()
    frozen_bn_to_eval(module)
    assert not module[0][1].training and module[1].training
    unfreeze(built, ["all"])
    module.train()
    frozen_bn_to_eval(module)
    assert module[0][1].training


def test_count_params():
    layer = nn.Linear(4, 3)
    layer.bias.requires_grad_(False)
    assert count_params(layer) == (12, 15)
