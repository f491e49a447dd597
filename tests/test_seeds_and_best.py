"""`set seed` means one thing (issue 18): before the first training step it re-initialises what `load` initialised;
after, the weights keep theirs and the shell says so. The end of a run names the best epoch beside the last, and
`eval` says which weights it evaluated."""

import io
import re

import pytest
import torch

from pgshell.engine.train.loop import Trainer
from pgshell.session import Session
from pgshell.shell import PgShell, run_plan


def weights(s: Session) -> dict:
    return {k: v.clone() for k, v in s.built.module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def session(tmp_path, split_folder):
    made = []

    def make() -> Session:
        s = Session(root=tmp_path / "sessions")
        s.attach_data(str(split_folder), size=32)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(save=False)


def test_set_seed_after_load_initialises_as_set_seed_then_load(session):
    runs = {}
    for seed in (1, 2):
        a = session()
        a.load_model("test_resnet")
        a.freeze(["backbone"])
        said = a.set("seed", seed)
        b = session()
        b.set("seed", seed)
        b.load_model("test_resnet")
        b.freeze(["backbone"])
        assert said == f"re-initialised test_resnet with seed {seed} (as `set seed {seed}` then `load` would)"
        assert same(weights(a), weights(b))
        trainable = lambda s: {n for n, p in s.built.module.named_parameters() if p.requires_grad}  # noqa: E731
        assert trainable(a) == trainable(b) == set(a.built.head)  # the frozen set survives the re-initialisation
        assert a.describe()["model"]["initialised with"] == f"seed {seed}"
        runs[seed] = weights(a)
    zero = session()
    zero.load_model("test_resnet")
    assert not same(runs[1], runs[2]) and not same(runs[1], weights(zero))


def test_set_seed_after_a_training_step_keeps_the_weights_and_says_so(session):
    s = session()
    s.load_model("test_resnet")
    s.set("batch_size", 8)
    s.train(steps=1)
    s.wait()
    before = weights(s)
    said = s.set("seed", 5)
    assert said.startswith("training has started: the weights keep their initialisation from seed 0; seed 5 sets "
                           "the data order and augmentation from here")
    assert said.endswith("`load test_resnet` again to re-initialise the weights with it")
    assert same(before, weights(s)) and s.config.seed == 5 and s.trainer.pos.step == 1
    assert s.describe()["model"]["initialised with"] == "seed 0 (seed is 5 now: `load` again to use it)"


def test_the_end_of_a_run_names_the_best_epoch_and_eval_says_which_weights(tmp_path, split_folder, monkeypatch,
                                                                          capsys):
    """A scripted validation sequence whose best (epoch 2) is not its last (epoch 3)."""
    accuracies = iter([0.5, 0.8, 0.6])
    plain = Trainer.evaluate

    def scripted(self, split="val", collect=False, module=None):
        res = plain(self, split, collect, module)
        return dict(res, accuracy=next(accuracies)) if split == "val" and not collect else res

    monkeypatch.setattr(Trainer, "evaluate", scripted)
    out = io.StringIO()
    app = PgShell(interactive=False, sessions_dir=str(tmp_path / "sessions"), stdout=out)
    assert run_plan(app, [f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train 3"]) == 0
    (file,) = (tmp_path / "sessions").glob("*.session")
    folder = file.with_suffix("")
    lines = out.getvalue().splitlines()
    end = lines.index(next(ln for ln in lines if ln.startswith("done: 12 batches")))
    assert re.fullmatch(r"best epoch 2 by val_accuracy: 0\.8000 \(checkpoint \S+/checkpoints/epoch-0002\.safetensors\); "
                        r"last epoch 3: val_accuracy 0\.6000", lines[end + 1])
    assert sum("best epoch 2" in ln for ln in lines) == 1  # the plan's last lines do not repeat it
    monkeypatch.undo()

    out = io.StringIO()
    app = PgShell(session=Session.open(file), interactive=False, stdout=out)
    assert run_plan(app, ["eval", "eval --checkpoint best"]) == 0
    lines = out.getvalue().splitlines()
    assert ("evaluated: the current weights (epoch 3, step 12); the best is epoch 2 (val_accuracy 0.8000): "
            "`eval --checkpoint best`") in lines
    assert (f"evaluated: checkpoint {folder}/checkpoints/epoch-0002.safetensors (epoch 2, step 8), the best by "
            "val_accuracy") in lines
    assert lines[-1].startswith("best epoch 2 by val_accuracy: 0.8000")  # a script's final lines name it
    assert not app.failed.is_set() and "Traceback" not in capsys.readouterr().err

    out = io.StringIO()  # mid-epoch, eval names the position in the words of `pause` and `show`
    app = PgShell(session=Session.open(file), interactive=False, stdout=out)
    assert run_plan(app, ["train --steps 2", "eval --tta flip"]) == 0
    assert ("evaluated: the current weights (epoch 4, batch 2/4 (step 14); test-time augmentation: flip); the best "
            "is epoch 2 (val_accuracy 0.8000): `eval --checkpoint best`") in out.getvalue().splitlines()


def test_tune_trials_keep_their_initial_weights_when_the_seed_reinitialises_the_model(tmp_path, split_folder):
    """`tune`'s rule: every trial of a study starts from the weights the model had when the study began — a later
    `set seed` that re-initialises the session's model does not move them."""
    from pgshell.engine.store.checkpoint import load_checkpoint

    out = io.StringIO()
    app = PgShell(interactive=False, sessions_dir=str(tmp_path / "sessions"), stdout=out)
    tune = ("tune --trials 1 --steps 1 --space lr=1e-3:1e-1:log weight_decay=- optimizer=- batch_size=- freeze=- "
            "label_smoothing=-")
    try:
        for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", tune):
            app.failed.clear()
            app.onecmd_plus_hooks(line)
            assert not app.failed.is_set(), out.getvalue()[-500:]
        s = app.session
        (init,) = (s.folder / "trials").glob("*.initial.safetensors")
        before = init.read_bytes()
        first = weights(s)
        app.onecmd_plus_hooks("set seed 3")
        assert "re-initialised test_resnet with seed 3" in out.getvalue() and not same(first, weights(s))
        app.onecmd_plus_hooks(tune)
        assert not app.failed.is_set() and "tune done: 1 trials" in out.getvalue().split("seed 3")[-1]
        assert init.read_bytes() == before  # the study's starting weights are the first model's
        assert same(load_checkpoint(init)["model"], first)
    finally:
        app.session.close(save=False)
