"""The best model from what was trained: checkpoint soups (engine/soup.py, session/best.py), the session report and
autofit's budget. Tiny models (test_resnet) on 32 px images the tests make."""

import json
import re

import pytest
import torch

from conftest import make_split, new_app, new_session, run, train_to_end


# ====================================================================== soups: pure functions
def test_a_uniform_soup_of_known_weights_is_their_exact_mean():
    from pgshell.engine.models.soup import average_weights

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
    from pgshell.engine.models.soup import check_ingredients

    a, b = {"fc.weight": torch.zeros(3, 4)}, {"fc.weight": torch.zeros(5, 4)}
    with pytest.raises(PgError, match=r"fc\.weight \(\(5, 4\) vs \(3, 4\)\)"):
        check_ingredients([a, b], ["a", "b"])
    with pytest.raises(PgError, match="tensors only in one: head.bias"):
        check_ingredients([a, {**a, "head.bias": torch.zeros(1)}], ["a", "b"])


def test_greedy_soup_tries_best_first_and_keeps_only_what_does_not_lower_accuracy():
    from pgshell.engine.models.soup import greedy_soup, rank

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
    asked.clear()  # out of time after two tastes: the greedy soup of what was tried
    chosen, steps = greedy_soup(order, score, stop=lambda: len(asked) >= 2)
    assert chosen == [1, 3] and len(steps) == 2


def _bn_net(dropout: float = 0.0) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(dropout), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2))


def test_batchnorm_recompute_gives_the_batches_statistics_and_touches_nothing_else():
    from pgshell.engine.models.soup import recompute_batchnorm

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

    from pgshell.engine.models.soup import batchnorm_layers, recompute_batchnorm

    ours, theirs = _bn_net(), _bn_net()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(3)]
    recompute_batchnorm(ours, batches, list(batchnorm_layers(ours)))
    update_bn(batches, theirs)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k


def test_only_batchnorm_layers_whose_statistics_differ_are_recomputed():
    from pgshell.engine.models.soup import differing_batchnorm

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
    from pgshell.engine.store.checkpoint import load_checkpoint

    return [load_checkpoint(s.folder / "checkpoints" / f"epoch-{e:04d}.safetensors")["model"] for e in epochs]


def test_a_uniform_soup_of_a_run_averages_its_checkpoints_and_recomputes_batchnorm(trained):
    from pgshell.engine.store.checkpoint import load_checkpoint, read_metadata
    from pgshell.engine.models.soup import average_weights
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
    from pgshell.engine.store.checkpoint import load_checkpoint
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


# ====================================================================== the report
def _html_parts(text: str) -> dict:
    from html.parser import HTMLParser

    class Parts(HTMLParser):
        def __init__(self):
            super().__init__()
            self.h2, self.imgs, self.cells, self.code, self._in = [], [], [], [], None

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.imgs.append(dict(attrs))
            self._in = tag

        def handle_endtag(self, tag):
            self._in = None

        def handle_data(self, data):
            if self._in == "h2":
                self.h2.append(data)
            elif self._in in ("td", "th"):
                self.cells.append(data.strip())
            elif self._in == "code":
                self.code.append(data)

    p = Parts()
    p.feed(text)
    return {"h2": p.h2, "imgs": p.imgs, "cells": p.cells, "code": "".join(p.code)}


def test_the_report_holds_the_data_runs_curves_and_the_best_models_figures(trained):
    import base64

    from pgshell.session import best as B
    from pgshell.session import review as R
    from pgshell.session.report import write_report

    s, tmp = trained
    soup = B.soup(s, "greedy")  # the best model the page shows: the soup when it is at least as good as the best epoch
    res = write_report(s, str(tmp / "out" / "r.html"))
    text = (tmp / "out" / "r.html").read_text()
    parts = _html_parts(text)
    assert parts["h2"] == ["Summary", "Data", "Runs and settings", "Curves", "The best model", "Highest losses (val)",
                           "How to export it"]
    assert len(parts["imgs"]) == 3 and [i["data-file"] for i in parts["imgs"]] == ["curves.png", "confusion.png",
                                                                                  "top-losses.png"]
    for img in parts["imgs"]:
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
        assert (tmp / "out" / "r_files" / img["data-file"]).read_bytes() == png  # written beside it too
    cells = parts["cells"]
    i = cells.index("dog")  # the data table: class, train, val, test counts
    assert cells[i:i + 4] == ["dog", "10", "4", "3"] and "total" in cells
    assert res["best"]["checkpoint"] == ("soup" if soup["val"]["accuracy"] >= s.best["value"] else "best")
    val, test = R.evaluate(s, ["val", "test"], res["best"]["checkpoint"])
    assert f"{100 * val['accuracy']:.1f}%" in cells and f"{100 * test['accuracy']:.1f}%" in cells
    assert re.search(rf"export timm exports/{s.name} --checkpoint {res['best']['checkpoint']}", parts["code"])
    top = R.top_losses(s, "val", 12, None, res["best"]["checkpoint"])
    assert top["rows"][0]["path"] in cells  # the highest-loss image is listed
    md = write_report(s, str(tmp / "out" / "r.md"))
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (tmp / "out" / "r.md").read_text())
    assert links == ["r_files/curves.png", "r_files/confusion.png", "r_files/top-losses.png"]
    assert all((tmp / "out" / link).stat().st_size > 2000 for link in links) and md["sections"] == res["sections"]


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
        ok, plan = run(app, f"export plan {tmp / 'fork.plan'}")  # a replay cannot remake an average: it says so
        assert ok and any("forked this session from a soup" in w for w in plan["warnings"])
        ok, ev2 = run(app, "eval --split val")  # the fork's weights are the soup's
        assert ok and ev2["val"]["accuracy"] == res["val"]["accuracy"] and ev2["val"]["loss"] == res["val"]["loss"]
        ok, _ = run(app, "soup --top 0")
        assert not ok
    finally:
        app.session.close(save=False)


# ====================================================================== autofit
def _latest_state(folder):
    from pgshell.engine.store.checkpoint import load_checkpoint

    doc = json.loads(folder.with_suffix(".session").read_text())
    return load_checkpoint(folder.parent / doc["checkpoint"])


def test_autofit_ends_inside_its_budget_says_why_and_replays_through_export_plan(tmp_path, split_folder, monkeypatch):
    import time

    from pgshell.session import autofit as AF
    from pgshell.session import study as T
    from pgshell.shell.cli import run_plan

    s = new_session(tmp_path / "sessions", split_folder)
    budget = 8.0
    t0 = time.monotonic()
    AF.start_autofit(s, f"{budget:g}s")
    assert s.wait(120) and "error" not in s.status, s.status
    wall = time.monotonic() - t0
    state = AF.read_state(s)
    assert state["done"] and state["finished"] == list(AF.PHASES)
    # the job's clock (from the command), and the test's
    assert state["spent"] <= budget and wall <= budget + 0.5, (wall, state["ended"], state["decisions"])
    decisions = " ".join(state["decisions"])
    assert "32 px images: the mild policy" in decisions and "weights not pretrained" in decisions
    assert "linear probe baseline" in decisions and ("chose " in decisions or "no time left" in decisions)
    trials = T.trials_table(s, study=state["study"])["trials"]  # every trial is a trial of the session's tune.db
    assert len(trials) == len(state["trials"]) and all(t["params"]["label_smoothing"] in (0.0, 0.1) for t in trials)
    final = state["final"]
    assert final.get("done") or final.get("skipped")
    if final.get("done"):
        via = {e["name"]: e["value"] for e in s.changes.entries if e.get("via") == "autofit" and e["kind"] == "set"}
        assert via["optimizer"] == "adamw" and via["crop_pct"] == 1.0 and via["epochs"] == final["epochs"]
        cut = any(d.startswith("the final run was cut by the budget") for d in state["decisions"])
        assert s.trainer.pos.epoch == final["epochs"] or cut
        # on a loaded machine the time left may not hold a soup: then autofit says so instead of overrunning
        if "soup" in state:
            assert state["soup"]["members"] and (s.folder / "checkpoints" / "soup.safetensors").is_file()
        else:
            assert any(d.startswith("no time left for the soup") for d in state["decisions"])
    else:
        assert any(d.startswith("no time left for the final run") for d in state["decisions"])
    # the run autofit made replays from the change log: the same weights, by the ordinary `set`s and `train`
    out = tmp_path / "af.plan"
    from pgshell.session.replay import export_plan

    assert export_plan(s, str(out))["warnings"] == []
    folder = s.folder
    s.close(save=True)
    monkeypatch.chdir(tmp_path)
    again = new_app(tmp_path / "again")
    assert run_plan(again, out.read_text().splitlines()) == 0
    (replayed,) = (tmp_path / "again").glob("*.session")
    a, b = _latest_state(folder), _latest_state(replayed.with_suffix(""))
    assert a["position"] == b["position"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_autofit_keeps_the_linear_probe_as_its_model_when_no_trial_beat_it(tmp_path, split_folder):
    """Pretrained weights, trials below the probe (measured on 100 images: 27% against 70%): the probe becomes the
    head, logged as `probe linear --apply` by autofit, and there is no final run; a trial above the probe, or weights
    not pretrained, keep today's final run."""
    from safetensors.torch import save_file

    from pgshell.session import Session
    from pgshell.session import autofit as AF

    donor = new_session(tmp_path / "donor", split_folder, name="donor")
    weights = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in donor.built.module.state_dict().items()}, str(weights))
    donor.close(save=False)
    s = Session(root=tmp_path / "sessions")
    s.attach_data(str(split_folder), size=32)
    s.load_model("test_resnet", weights=str(weights))
    s.use_name("lp")
    s.save()
    try:
        state = {"version": AF.VERSION, "metric": "val_accuracy", "recipe": {"pretrained": True}, "decisions": [],
                 "spent": 0.0, "budget": 60.0}
        job = AF.AutofitJob(s, state)
        assert not job._probe_wins({"value": 0.9, "from": "trial 2"}, 0.5)  # a trial beat it
        job.state["recipe"]["pretrained"] = False
        assert not job._probe_wins({"value": 0.2, "from": "trial 2"}, 0.5)  # random features: no probe head
        job.state["recipe"]["pretrained"] = True
        before = s.built.module.fc.weight.detach().clone()
        assert job._probe_wins({"value": 0.2, "from": "trial 2"}, 0.5)
        assert not torch.equal(s.built.module.fc.weight, before)
        assert state["final"]["skipped"] and state["final"]["probe"]
        assert state["decisions"][-1].startswith("nothing trained beat the linear probe (trial 2 reached 0.2000, "
                                                 "the probe 0.5000): the probe is the model, as its head (fc")
        assert [(e["cmd"], e.get("via")) for e in s.changes.entries if e["kind"] == "head"] == \
            [("probe linear --apply", "autofit")]
        accuracy = state["final"]["val"]["val_accuracy"]
        assert s.evaluate("val")["accuracy"] == pytest.approx(accuracy)
        assert AF.read_state(s)["final"]["probe"]
    finally:
        s.close(save=False)


@pytest.mark.slow  # a 10-second budget run twice over (quit and reopen): outside the default suite
def test_autofit_paused_and_quit_resumes_where_it_stopped_within_the_budget(tmp_path, split_folder):
    import threading

    from pgshell.session import Session
    from pgshell.session import autofit as AF

    s = new_session(tmp_path / "sessions", split_folder)
    searched = threading.Event()
    s.notify = lambda msg: searched.set() if msg.startswith("autofit: search: lr") else None
    budget = 10.0
    AF.start_autofit(s, f"{budget:g}s")
    assert searched.wait(60)  # the search has begun: quit in the middle of it
    s.close(save=True)
    before = AF.read_state(s)
    assert not before["done"] and {"plan", "probe", "lrfind"} <= set(before["finished"])
    assert "search" not in before["finished"] and before["spent"] < budget

    again = Session.open(s.file)
    try:
        msgs = []
        again.notify = msgs.append
        assert AF.start_autofit(again).startswith("continuing autofit from its search phase")
        assert again.wait(120) and "error" not in again.status, again.status
        after = AF.read_state(again)
        assert after["done"] and after["finished"] == list(AF.PHASES) and after["spent"] <= budget
        assert after["decisions"][:len(before["decisions"])] == before["decisions"]  # nothing done twice
        assert sum(d.startswith("linear probe baseline") for d in after["decisions"]) == 1
        assert not any(m.startswith("autofit: linear probe") for m in msgs)
    finally:
        again.close(save=False)


def test_autofit_budgets_and_metrics_are_checked_in_one_line():
    from pgshell.engine.errors import PgError
    from pgshell.session.autofit import parse_budget

    assert [parse_budget(t) for t in ("10m", "90s", "1h30m", "45", "1.5m", 7)] == [600, 90, 5400, 45, 90, 7]
    for bad in ("", "soon", "-5", "0s", "10x"):
        with pytest.raises(PgError, match="--budget"):
            parse_budget(bad)


def test_autofit_centres_its_search_on_the_valley_only_inside_the_adamw_window():
    from pgshell.session.autofit import FALLBACK_LR, trusted_lr

    assert trusted_lr(1.71e-4, pretrained=True) == (1.71e-4, "valley lr 1.71e-04")
    assert trusted_lr(3.59e-4, pretrained=True)[0] == 3.59e-4
    lr, why = trusted_lr(3.6e-7, pretrained=True)  # 100 images: the measured noisy valley
    assert lr == FALLBACK_LR[True] == 3e-4
    assert why.startswith("valley lr 3.60e-07 is outside 1e-05..0.003") and "lr 0.0003" in why
    assert trusted_lr(5.0, pretrained=False)[0] == FALLBACK_LR[False] == 2e-3
    assert trusted_lr(1e-2, pretrained=False)[0] == 1e-2  # from scratch a higher lr is believed


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_with_every_image_decoded(tmp_path, split_folder):
    """A real browser opens the page: every image decodes at its PNG's size, and the screenshot is not blank."""
    import shutil
    import subprocess

    from PIL import Image

    from pgshell.session.report import write_report

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    s = new_session(tmp_path / "sessions", split_folder, epochs=2)
    train_to_end(s)
    res = write_report(s, str(tmp_path / "r.html"))
    s.close(save=False)
    probe = tmp_path / "probe.html"  # the page plus a line of script that writes what the browser decoded
    probe.write_text((tmp_path / "r.html").read_text().replace(
        "</body>", "<script>document.body.setAttribute('data-images', Array.from(document.images).map("
                   "i => i.complete ? i.naturalWidth + 'x' + i.naturalHeight : 'none').join(' '))</script></body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    decoded = re.search(r'data-images="([^"]*)"', dom.stdout).group(1).split()
    sizes = [f"{w}x{h}" for w, h in (Image.open(p).size for p in res["images"])]
    assert decoded == sizes and len(sizes) == 3
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", (tmp_path / "r.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    grey = Image.open(shot).convert("L")
    dark = sum(grey.histogram()[:200]) / (grey.width * grey.height)
    assert grey.size == (1200, 2400) and dark > 0.02  # text, tables and plots, not an empty page


def test_bad_input_to_soup_report_and_autofit_is_one_line_saying_what_to_do(app, capsys):
    from conftest import run_out

    for line, words in (("autofit --budget soon", "--budget takes a time such as 10m"),
                        ("autofit --metric f1", "invalid choice"),
                        ("report", "nothing to report yet: `load`, `data` and `train` first"),
                        ("soup --uniform", "a soup needs the session's model and data"),
                        ("soup --greedy --uniform", "not allowed with argument")):
        ok, out, err = run_out(app, capsys, line)
        assert not ok and words in err and len(err.strip().splitlines()) == 1, (line, err)


def test_the_soup_report_and_autofit_layers_import_without_cmd2():
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; sys.modules['cmd2'] = None; sys.modules['prompt_toolkit'] = None\n"
            "import pgshell.engine.models.soup, pgshell.session.best, pgshell.session.report, pgshell.session.autofit\n"
            "assert 'cmd2' not in [m for m in sys.modules if sys.modules[m] is not None]\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
