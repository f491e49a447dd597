"""One story about the state: the same state and the same position wording in notices, the reopen line and `show`;
`show` names what is used; `done:` counts the whole `train` command."""

import threading

from pgshell.session import Session

WAIT = 120


def _session(tmp_path, folder, messages):
    s = Session(root=tmp_path / "sessions", notify=messages.append)
    s.set("batch_size", 8)
    s.attach_data(str(folder), size=32)
    s.load_model("test_resnet")
    s.use_name("story")
    return s


def test_a_reopened_paused_session_says_paused_everywhere_with_one_position_wording(tmp_path, split_folder):
    messages = []
    s = _session(tmp_path, split_folder, messages)

    def pause_at_2(info):
        if info["step"] == 2:
            s.request_pause()

    s.batch_listeners.append(pause_at_2)
    s.train(epochs=2)
    assert s.wait(WAIT) and s.paused
    assert "paused at epoch 1, batch 2/4 (step 2); checkpoint step-0000002.safetensors" in messages[-1]
    assert s.status["state"] == "paused" and s.describe()["position"]["at"] == "epoch 1, batch 2/4 (step 2)"
    file = s.save()
    s.close(save=False)
    r = Session.open(file)
    assert r.summary_line() == "test_resnet, epoch 1, batch 2/4 (step 2), paused: `continue` resumes"
    assert r.status["state"] == "paused" and r.describe()["position"]["state"] == "paused"
    r.stop()
    assert r.status["state"] == "idle"
    r.close(save=False)


def test_show_names_the_size_in_use_and_the_best_checkpoint_by_its_path(tmp_path, split_folder):
    s = _session(tmp_path, split_folder, [])
    s.train(epochs=1)
    assert s.wait(WAIT)
    info = s.describe()
    assert info["model"]["input"] == "32x32 (data --size)"
    best = info["files"]["best"]
    assert best.startswith(str(tmp_path / "sessions" / "story" / "checkpoints" / "epoch-0001.safetensors"))
    assert "(epoch 1, val_accuracy" in best
    assert info["position"]["at"] == "epoch 1, batch 4/4 (step 4)"
    s.close(save=False)


def test_done_counts_the_whole_train_command_across_a_mid_run_save(tmp_path, split_folder):
    messages = []
    s = _session(tmp_path, split_folder, messages)
    saved = threading.Event()

    def save_at_2(info):  # `save` from another thread, as the shell's: pause, save, continue
        if info["step"] == 2 and not saved.is_set():
            threading.Thread(target=lambda: (s.save(), saved.set())).start()

    s.batch_listeners.append(save_at_2)
    s.train(epochs=1)
    assert saved.wait(WAIT)
    assert s.wait(WAIT) and s.trainer.pos.step == 4
    done = [m for m in messages if m.startswith("done:")]
    assert len(done) == 1 and done[0].startswith("done: 4 batches, 30 images in ")
    assert done[0].endswith("at epoch 1, batch 4/4 (step 4)")
    s.close(save=False)


def test_train_says_when_a_cosine_schedule_does_not_end_with_the_run(tmp_path, split_folder):
    s = _session(tmp_path, split_folder, [])
    s.set("scheduler", "cosine")
    s.set("lr", 0.1)  # epochs stays 25: `train 1` ends far from the schedule's end
    line = s.train(epochs=1)
    assert s.wait(WAIT)
    assert line.startswith("training 1 epoch (epoch 1 to 1)\nnote: the cosine schedule spans 25 epochs; this run "
                           "stops at epoch 1 with lr 0.1 — `set epochs 1` to end it there")
    assert "`set epochs 1` to end it there" in line
    s.set("epochs", 2)
    assert s.train(epochs=1) == "training 1 epoch (epoch 2 to 2)"  # ends where the schedule ends: nothing to say
    assert s.wait(WAIT)
    line = s.train(epochs=1)
    assert s.wait(WAIT) and "from epoch 3" not in line and "lr 0" in line and "`set epochs 3`" in line
    s.close(save=False)
