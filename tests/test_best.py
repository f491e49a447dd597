"""The best model from what was trained: checkpoint soups (engine/soup.py, session/best.py), the session report and
autofit's budget. Tiny models (test_resnet) on 32 px images the tests make."""

import json

import pytest
import torch

from conftest import make_split, new_app, new_session, run, train_to_end


# ====================================================================== soups: pure functions
def test_a_uniform_soup_of_known_weights_is_their_exact_mean():
    from pgshell.engine.soup import average_weights

    states = [{"w": torch.tensor([1.0, 0.1], dtype=torch.float32), "h": torch.tensor([2.0], dtype=torch.float16),
               "n": torch.tensor(3)} for _ in range(3)]
    states[1]["w"] = torch.tensor([2.0, 0.2])
    states[2]["w"] = torch.tensor([4.0, 0.7])
    states[1]["h"], states[2]["h"] = torch.tensor([3.0], dtype=torch.float16), torch.tensor([7.0], dtype=torch.float16)
    states[1]["n"], states[2]["n"] = torch.tensor(5), torch.tensor(9)
    soup = average_weights(states)
    # the correctly rounded float32 mean: computed exactly in float64 from the float32 values, rounded once
    exact = (torch.tensor([1.0, 0.1]).double() + torch.tensor([2.0, 0.2]).double()
             + torch.tensor([4.0, 0.7]).double()) / 3
    assert soup["w"].dtype == torch.float32 and torch.equal(soup["w"], exact.float())
    assert soup["w"][0].item() == torch.tensor(7 / 3, dtype=torch.float32).item()
    assert soup["h"].dtype == torch.float16 and soup["h"].item() == 4.0
    assert soup["n"].item() == 3  # integer tensors (num_batches_tracked) come from the first state


def test_ingredients_of_another_network_are_refused_naming_the_tensor():
    from pgshell.engine.errors import PgError
    from pgshell.engine.soup import check_ingredients

    a, b = {"fc.weight": torch.zeros(3, 4)}, {"fc.weight": torch.zeros(5, 4)}
    with pytest.raises(PgError, match=r"fc\.weight \(\(5, 4\) vs \(3, 4\)\)"):
        check_ingredients([a, b], ["a", "b"])
    with pytest.raises(PgError, match="tensors only in one: head.bias"):
        check_ingredients([a, {**a, "head.bias": torch.zeros(1)}], ["a", "b"])


def test_greedy_soup_tries_best_first_and_keeps_only_what_does_not_lower_accuracy():
    from pgshell.engine.soup import greedy_soup, rank

    single = [0.50, 0.90, 0.70, 0.80, 0.80]
    order = rank(single)
    assert order == [1, 3, 4, 2, 0]  # by accuracy, ties in the given order
    soups = {(1,): 0.90, (1, 3): 0.92, (1, 3, 4): 0.91, (1, 2, 3): 0.92, (0, 1, 2, 3): 0.93}
    asked = []

    def score(indices):
        asked.append(list(indices))
        return soups[tuple(sorted(indices))]

    chosen, steps = greedy_soup(order, score)
    assert chosen == [1, 3, 2, 0]  # 4 lowered the soup's accuracy; 2 kept it equal (>=: the paper's rule)
    assert [(s.index, s.score, s.kept) for s in steps] == [
        (1, 0.90, True), (3, 0.92, True), (4, 0.91, False), (2, 0.92, True), (0, 0.93, True)]
    assert asked == [[1], [1, 3], [1, 3, 4], [1, 3, 2], [1, 3, 2, 0]]


def _bn_net(dropout: float = 0.0) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(dropout), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))


def test_batchnorm_recompute_gives_the_batches_statistics_and_touches_nothing_else():
    from pgshell.engine.soup import recompute_batchnorm

    net = _bn_net(dropout=0.5)
    net[2].running_mean.fill_(9.0)
    net[5].running_mean.fill_(7.0)
    net.train()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 6, 6, generator=g) * 2 + 1 for _ in range(4)] + [torch.randn(1, 3, 6, 6)]
    seen = recompute_batchnorm(net, batches, ["2"])  # only the first BatchNorm; the batch of one is skipped
    assert seen == 32
    with torch.no_grad():  # the direct computation: the conv's outputs, dropout off (eval mode), per batch
        outs = [net[0](x) for x in batches[:4]]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs])
    variances = torch.stack([o.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for o in outs])
    assert torch.allclose(net[2].running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(net[2].running_var, variances.mean(0), atol=1e-5)
    assert net[2].num_batches_tracked.item() == 4
    assert torch.equal(net[5].running_mean, torch.full((2,), 7.0))  # not named: untouched
    assert net[2].momentum == 0.1 and all(m.training for m in net.modules())  # momentum and modes restored


def test_batchnorm_recompute_of_every_layer_matches_torch_update_bn():
    from torch.optim.swa_utils import update_bn

    from pgshell.engine.soup import batchnorm_layers, recompute_batchnorm

    ours, theirs = _bn_net(), _bn_net()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]
    recompute_batchnorm(ours, batches, list(batchnorm_layers(ours)))
    update_bn(batches, theirs)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k


def test_only_batchnorm_layers_whose_statistics_differ_are_recomputed():
    from pgshell.engine.soup import differing_batchnorm

    net = _bn_net()
    a = {k: v.clone() for k, v in net.state_dict().items()}
    b = {k: v.clone() for k, v in a.items()}
    b["5.running_var"] += 1  # a trained layer; "2" is as a frozen backbone's: the same in every checkpoint
    b["0.weight"] += 1  # weights differ everywhere: not a reason by itself
    assert differing_batchnorm(net, [a, b]) == ["5"]
    assert differing_batchnorm(net, [a, a]) == []


# ====================================================================== soups of a session's run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A session that trained test_resnet 4 epochs (epoch checkpoints 1-4) on train/val/test folders."""
    from conftest import make_images

    tmp = tmp_path_factory.mktemp("soup")
    folder = make_split(tmp / "tv")
    make_images(folder / "test", per_class=3, seed=3)
    s = new_session(tmp / "sessions", folder, epochs=4, optimizer="adamw", lr=0.01)
    train_to_end(s)
    yield s, tmp
    s.close(save=False)


def _epoch_states(s, epochs):
    from pgshell.engine.checkpoint import load_checkpoint

    return [load_checkpoint(s.folder / "checkpoints" / f"epoch-{e:04d}.safetensors")["model"] for e in epochs]


def test_a_uniform_soup_of_a_run_averages_its_checkpoints_and_recomputes_batchnorm(trained):
    from pgshell.engine.checkpoint import load_checkpoint, read_metadata
    from pgshell.engine.soup import average_weights
    from pgshell.session import best as B
    from pgshell.session import review as R

    s, _ = trained
    res = B.soup(s, "uniform", top=3)
    states = _epoch_states(s, [1, 2, 3, 4])
    accs = [float(read_metadata(s.folder / "checkpoints" / f"epoch-{e:04d}.safetensors")["val_accuracy"])
            for e in (1, 2, 3, 4)]
    top3 = sorted(sorted(range(4), key=lambda i: -accs[i])[:3])
    assert res["members"] == [f"epoch-{i + 1:04d}.safetensors" for i in top3]
    soup = load_checkpoint(s.folder / "checkpoints" / "soup.safetensors")
    mean = average_weights([states[i] for i in top3])
    for k, v in soup["model"].items():
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.equal(v, mean[k]), k  # every weight is the exact mean
    # every BatchNorm layer trained, so every one got statistics of its own: not the mean of the ingredients'
    assert res["bn"]["layers"] == sum(1 for k in mean if k.endswith("running_mean")) and res["bn"]["images"] == 30
    assert not torch.equal(soup["model"]["bn1.running_mean"], mean["bn1.running_mean"])
    assert soup["optimizer"] is None and soup["soup"]["members"] == res["members"]
    assert soup["position"]["epoch"] == max(i + 1 for i in top3)  # the newest ingredient's position and settings
    # `eval --checkpoint soup` gives the figures the soup reported, and its test figures
    val, test = R.evaluate(s, ["val", "test"], "soup")
    assert (val["accuracy"], val["loss"]) == (res["val"]["accuracy"], res["val"]["loss"])
    assert test["accuracy"] == res["test"]["accuracy"] and test["n"] == 9
    entry = s.changes.entries[-1]
    assert entry["kind"] == "soup" and entry["members"] == res["members"] and entry["cmd"] == "soup --uniform --top 3"


def test_a_greedy_soup_starts_from_the_best_epoch_and_a_soup_of_one_is_that_checkpoint(trained):
    from pgshell.engine.checkpoint import load_checkpoint
    from pgshell.session import best as B

    s, _ = trained
    res = B.soup(s, "greedy")
    tried = res["tried"]
    assert [t["val_accuracy"] for t in tried] == sorted((t["val_accuracy"] for t in tried), reverse=True)
    assert tried[0]["kept"] and tried[0]["soup_accuracy"] == tried[0]["val_accuracy"]  # the soup of one: as logged
    best = max(t["soup_accuracy"] for t in tried if t["kept"])
    assert res["val"]["accuracy"] == best >= res["best_single"]["val_accuracy"]
    kept = sorted(t["file"] for t in tried if t["kept"])
    assert res["members"] == kept
    one = B.soup(s, "uniform", checkpoints=["2"])  # one ingredient: no BatchNorm pass, the checkpoint's own weights
    assert one["bn"] == {"layers": 0, "images": 0}
    soup, (epoch2,) = load_checkpoint(s.folder / "checkpoints" / "soup.safetensors")["model"], _epoch_states(s, [2])
    assert all(torch.equal(soup[k], epoch2[k]) for k in epoch2)


def test_the_soup_checkpoint_evaluates_exports_predicts_and_forks_from_the_shell(trained, monkeypatch, capsys):
    import io

    from pgshell.session import Session
    from pgshell.shell import PgShell

    s, tmp = trained
    monkeypatch.chdir(tmp)
    s.close(save=True)  # the last test of the module: reopened in a shell as `pgshell -s` would
    app = PgShell(session=Session.open(s.file), interactive=False, sessions_dir=str(tmp / "sessions"),
                  stdout=io.StringIO())
    try:
        ok, res = run(app, "soup --uniform")
        assert ok and len(res["members"]) == 4
        ok, ev = run(app, "eval --checkpoint soup --split val")
        assert ok and ev["val"]["accuracy"] == res["val"]["accuracy"] and ev["val"]["model"] == "soup.safetensors"
        ok, exp = run(app, f"export timm {tmp / 'soup-timm'} --checkpoint soup")
        assert ok and exp["check"]["max_abs_diff"] < 1e-5
        ok, pred = run(app, f"predict {tmp / 'tv' / 'val'} --checkpoint soup")
        assert ok and pred["accuracy"] == res["val"]["accuracy"]  # the val folder's images, labelled by folder
        ok, _ = run(app, "fork from-soup --checkpoint soup")
        assert ok and app.session.name == "from-soup"
        assert app.session.latest_checkpoint.name == f"step-{res['position']['step']:07d}.safetensors"
        ok, ev2 = run(app, "eval --split val")  # the fork's weights are the soup's
        assert ok and ev2["val"]["accuracy"] == res["val"]["accuracy"] and ev2["val"]["loss"] == res["val"]["loss"]
        ok, _ = run(app, "soup --top 0")
        assert not ok
    finally:
        app.session.close(save=False)
