

@pytest.mark.slow
def test_sighup_while_training_from_the_interactive_prompt_saves_the_run(tmp_path, split_folder):
    from test_interactive import Screen

    screen = Screen(tmp_path)
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "save i.session",
                 "train 200"):
        screen.cmd(line)  # `train` returns to the prompt at once: the run goes on in the background
    screen.expect("epoch 2 done")
    screen.child.kill(signal.SIGHUP)  # the terminal window closed
    screen.child.expect(pexpect_eof(), timeout=WAIT)
    screen.child.close()
    assert screen.child.exitstatus == 128 + signal.SIGHUP, screen.text[-800:]
    doc = json.loads((tmp_path / "i.session").read_text())
    step = C.load_checkpoint(tmp_path / doc["checkpoint"])["position"]["step"]
    assert step > 2 * BATCHES and _steps(tmp_path / "i") == list(range(1, step + 1))


def pexpect_eof():
    import pexpect

    return pexpect.EOF
