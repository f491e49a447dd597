"""The optimizer through timm's factory (engine/train/optim.py, issue 23): sgd/adam/adamw exactly as before, every timm
optimizer available to `set optimizer`, a timm-only one resuming exactly."""

import subprocess
import sys

import pytest
import timm
import torch

from pgshell.engine.config import TrainConfig
from pgshell.engine.train.optim import build_optimizer, optimizer_names, set_momentum
from pgshell.session import Session

from conftest import exact_rows, new_session, run_out, train_to_end, weights_of


def _model():
    model = timm.create_model("test_resnet", num_classes=3)
    return model, {n for n, _ in model.named_parameters() if n.startswith("fc.")}


# ---------------------------------------------------------------- sgd, adam, adamw: as before
# The groups the hand-built SGD made before (pgshell 9be214a) for lr 0.02, layer_decay 0.5, weight_decay 1e-4:
# (role, layer_scale, decay, lr, weight_decay, tensors, first parameter).
SGD_GROUPS = [
    ("head", 1.0, True, 0.02, 1e-4, 1, "fc.weight"),
    ("head", 1.0, False, 0.02, 0.0, 1, "fc.bias"),
    ("backbone", 0.5, True, 0.01, 1e-4, 3, "layer4.0.conv1.weight"),
    ("backbone", 0.5, False, 0.01, 0.0, 6, "layer4.0.bn1.weight"),
    ("backbone", 0.25, True, 0.005, 1e-4, 4, "layer3.0.conv1.weight"),
    ("backbone", 0.25, False, 0.005, 0.0, 8, "layer3.0.bn1.weight"),
    ("backbone", 0.125, True, 0.0025, 1e-4, 3, "layer2.0.conv1.weight"),
    ("backbone", 0.125, False, 0.0025, 0.0, 6, "layer2.0.bn1.weight"),
    ("backbone", 0.0625, True, 0.00125, 1e-4, 2, "layer1.0.conv1.weight"),
    ("backbone", 0.0625, False, 0.00125, 0.0, 4, "layer1.0.bn1.weight"),
    ("backbone", 0.03125, True, 0.000625, 1e-4, 3, "conv1.0.weight"),
    ("backbone", 0.03125, False, 0.000625, 0.0, 6, "conv1.1.weight"),
]


def test_sgd_groups_lrs_and_weight_decays_are_those_of_before():
    model, head = _model()
    opt = build_optimizer(model, head, TrainConfig(lr=0.02, layer_decay=0.5, weight_decay=1e-4, nesterov=True))
    assert type(opt) is torch.optim.SGD
    got = [(g["role"], g["layer_scale"], g["decay"], g["lr"], g["weight_decay"], len(g["params"]), g["names"][0])
           for g in opt.param_groups]
    assert got == SGD_GROUPS
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters())) == 47
    assert all(g["initial_lr"] == g["lr"] and g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    before = torch.optim.SGD([torch.zeros(1)], lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-4)
    assert opt.defaults == before.defaults  # foreach, maximize, dampening...: torch's own defaults, as before
    # timm's `sgd` is Nesterov by default; pgshell's follows `nesterov` (off by default), and momentum 0 turns it off
    assert [g["nesterov"] for g in build_optimizer(model, head, TrainConfig()).param_groups] == [False, False]
    plain = build_optimizer(model, head, TrainConfig(momentum=0.0, nesterov=True))
    assert plain.param_groups[0]["nesterov"] is False and plain.param_groups[0]["momentum"] == 0.0


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_and_adamw_are_torchs_with_momentum_as_beta1(name, cls):
    model, head = _model()
    opt = build_optimizer(model, head, TrainConfig(optimizer=name, lr=0.003, momentum=0.8, weight_decay=0.05,
                                                   backbone_lr_scale=0.1))
    assert type(opt) is cls
    assert opt.defaults == cls([torch.zeros(1)], lr=0.003, betas=(0.8, 0.999), weight_decay=0.05).defaults
    assert [(g["role"], g["decay"], g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups] == [
        ("head", True, 0.003, 0.05, 1), ("head", False, 0.003, 0.0, 1),
        ("backbone", True, pytest.approx(0.0003), 0.05, 15), ("backbone", False, pytest.approx(0.0003), 0.0, 30)]
    set_momentum(opt.param_groups[0], 0.5)  # a live `set momentum`
    assert opt.param_groups[0]["betas"] == (0.5, 0.999)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_torchs_optimizers_keep_their_checkpoint_state_as_it_was(name):
    """By parameter name, per parameter only: what checkpoints of earlier versions hold and newer ones load."""
    from pgshell.engine.train.optim import load_state_by_name, state_by_name

    model, head = _model()
    cfg = TrainConfig(optimizer=name, weight_decay=0.01)
    opt = build_optimizer(model, head, cfg)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = state_by_name(opt, name)
    assert set(state) == {"type", "state"} and len(state["state"]) == 47
    again = build_optimizer(model, head, cfg)
    load_state_by_name(again, state)
    before, after = opt.state_dict(), again.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["state"].keys() == before["state"].keys()
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(after["state"][i][k]))
               for i, s in before["state"].items() for k, v in s.items())


# ---------------------------------------------------------------- timm's optimizers
def test_every_usable_timm_optimizer_is_offered():
    from timm.optim import list_optimizers

    names = optimizer_names()
    assert set(names) <= set(list_optimizers())
    assert {"sgd", "adam", "adamw", "lamb", "lion", "adan", "adopt", "nadamw", "rmsprop", "muon"} <= set(names)
    assert "adahessian" not in names  # needs a second-order backward pass the loop does not do
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        assert not [n for n in names if n.startswith("bnb")]
    if importlib.util.find_spec("opt_einsum") is None:  # Kron without it asked for 110 GB at its first step
        assert not [n for n in names if n.startswith("kron")]


def test_momentum_is_beta1_and_the_other_betas_stay_timms():
    model, head = _model()

    def group(name, **kw):
        return build_optimizer(model, head, TrainConfig(optimizer=name, **kw)).param_groups[0]

    assert group("adan", momentum=0.9)["betas"] == (0.9, 0.92, 0.99)  # Adan's three, its first replaced
    assert group("lion", momentum=0.95)["betas"] == (0.95, 0.99)
    assert group("adafactor")["beta1"] is None  # Adafactor without a first moment, as timm builds it
    assert group("cadafactor", momentum=0.8)["beta1"] == 0.8  # its cautious variant has one
    assert group("rmsprop", momentum=0.5)["momentum"] == 0.5
    group = {"betas": (0.9, 0.92, 0.99)}
    set_momentum(group, 0.7)
    assert group == {"betas": (0.7, 0.92, 0.99)}
    group = {"betas": None, "lr": 1.0}
    set_momentum(group, 0.7)
    assert group == {"betas": None, "lr": 1.0}


def test_settings_an_optimizer_refuses_are_one_clear_error():
    from pgshell.engine.errors import PgError

    model, head = _model()
    with pytest.raises(PgError, match="optimizer nesterov cannot be built with these settings: .*momentum"):
        build_optimizer(model, head, TrainConfig(optimizer="nesterov", momentum=0.0))


def test_set_optimizer_nope_says_so_in_one_line_listing_the_choices(app, capsys):
    ok, _, err = run_out(app, capsys, "set optimizer nope")
    assert not ok and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert "optimizer must be one of" in line and "not 'nope'" in line
    listed = line.split("one of ", 1)[1].split(", not")[0].split(", ")
    assert listed == list(optimizer_names())
    ok, _, _ = run_out(app, capsys, "set optimizer lamb")
    assert ok and app.session.config.optimizer == "lamb"


def test_tab_lists_the_optimizers_and_help_set_names_timms(app, capsys):
    provider = app.settables["optimizer"].choices_provider
    assert [c.text for c in provider(app)] == list(optimizer_names())
    _, out, _ = run_out(app, capsys, "help set")
    assert "any of timm's optimizers" in " ".join(out.split())


def test_the_common_optimizers_are_checked_without_importing_torch():
    code = ("import sys; from pgshell.engine.config import parse_value as p; "
            "assert [p('optimizer', n) for n in ('sgd', 'adam', 'adamw')] == ['sgd', 'adam', 'adamw']; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_timm_only_optimizer_trains_and_resumes_exactly(tmp_path, split_folder):
    """LAMB (timm's, not torch's) with weight decay: 2 epochs straight, and the same cut after 3 steps, saved,
    reopened in a new session: the same weights and metrics rows, bit for bit."""
    settings = {"optimizer": "lamb", "lr": 0.01, "weight_decay": 0.01}
    ref = new_session(tmp_path / "sessions", split_folder, "ref", **settings)
    train_to_end(ref, epochs=2)
    assert type(ref.trainer.optimizer).__name__ == "Lamb"
    ref_weights, ref_rows = weights_of(ref.built.module), exact_rows(ref.folder)
    assert [r[3] for r in ref_rows].count("train") == 8  # 4 steps an epoch (30 images, batches of 8)
    ref.close(save=False)

    s = new_session(tmp_path / "sessions", split_folder, "cut", **settings)
    train_to_end(s, steps=3)
    state = s.trainer.optimizer_state()
    assert state["type"] == "lamb" and "exp_avg" in state["state"]["fc.weight"]
    # Lamb counts its steps in the parameter group, not per parameter: the checkpoint keeps that count too
    assert [int(g["values"]["step"]) for g in state["groups"]] == [3] * 4  # head, backbone; with decay or not
    assert sum(len(g["names"]) for g in state["groups"]) == 47
    file = s.save()
    s.close(save=False)
    torch.manual_seed(1)  # a resume must not depend on the process's history
    r = Session.open(file)
    assert r.trainer.pos.step == 3
    loaded = r.trainer.optimizer.state[dict(r.built.module.named_parameters())["fc.weight"]]
    assert torch.equal(loaded["exp_avg"], state["state"]["fc.weight"]["exp_avg"])
    train_to_end(r, epochs=2 - r.trainer.pos.epoch)
    assert exact_rows(r.folder) == ref_rows  # the losses, accuracies and lrs of every step and epoch
    w = weights_of(r.built.module)
    assert all(torch.equal(w[n], ref_weights[n]) for n in ref_weights)
    r.close(save=False)


@pytest.mark.slow
def test_every_offered_optimizer_steps_and_resumes_from_a_checkpoint(tmp_path):
    """Each optimizer `set optimizer` offers takes two steps on a tiny model; its state by name, written to a
    checkpoint file and read back into a new optimizer over a copy, gives the same next two steps."""
    import copy

    from pgshell.engine.store import checkpoint as C
    from pgshell.engine.train.optim import load_state_by_name, state_by_name

    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    base, head = _model()

    def steps(model, opt, k):
        out = []
        for _ in range(k):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    failed = {}
    for name in optimizer_names():
        cfg = TrainConfig(optimizer=name, lr=0.01, weight_decay=0.01)
        model = copy.deepcopy(base)
        opt = build_optimizer(model, head, cfg)
        steps(model, opt, 2)
        C.save_checkpoint(tmp_path / "c.safetensors", {"model": dict(model.state_dict()),
                                                        "optimizer": state_by_name(opt, name)})
        straight = steps(model, opt, 2)
        state = C.load_checkpoint(tmp_path / "c.safetensors")
        again = copy.deepcopy(base)
        again.load_state_dict(state["model"])
        resumed = build_optimizer(again, head, cfg)
        load_state_by_name(resumed, state["optimizer"])
        if steps(again, resumed, 2) != straight or not all(v == v for v in straight):
            failed[name] = straight
    assert failed == {}
