"""The interactive shell through a pseudo-terminal (pexpect): prompt, toolbar, pause, continue, Ctrl-C, quit."""

import json
import re
import sys
import time
from pathlib import Path

import pexpect
import torch

from pgshell.engine.store import checkpoint as C

from conftest import pgshell_env, pgshell_here

PROMPT = r"pgshell>"
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class Screen:
    """A pgshell in a pseudo-terminal, read as plain text: cursor-forward codes become spaces, other escape codes
    vanish (prompt_toolkit draws the toolbar and prompt with them). It answers cursor-position requests like a
    real terminal; without them prompt_toolkit cannot reserve the toolbar's row."""

    def __init__(self, cwd, *args):
        env = pgshell_env(TERM="xterm")
        self.child = pexpect.spawn(sys.executable, ["-m", "pgshell", *args], cwd=str(cwd), env=env,
                                   encoding="utf-8", timeout=5, dimensions=(40, 160))
        self.text = ""
        self.expect(PROMPT)

    def _read(self):
        try:
            raw = self.child.read_nonblocking(65536, timeout=0.2)
        except pexpect.TIMEOUT:
            return
        if "\x1b[6n" in raw:  # answer cursor-position requests as a terminal does (the toolbar needs them)
            self.child.send("\x1b[1;1R")
        self.text += _CSI.sub(lambda m: " " * int(m.group(1) or 1) if m.group(2) == "C" else "", raw)

    def expect(self, pattern, timeout=120):
        """Wait for `pattern` (a regex) in the output after what was matched before; returns the match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text)
            if m:
                self.text = self.text[m.end():]
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not seen; last output: {self.text[-800:]!r}")
            if not self.child.isalive():
                self._read()
                if not re.search(pattern, self.text):
                    raise AssertionError(f"pgshell exited; {pattern!r} not seen in {self.text[-800:]!r}")
                continue
            self._read()

    def cmd(self, line, expect=PROMPT):
        self.child.sendline(line)
        return self.expect(expect)

    def finish(self):
        self.child.expect(pexpect.EOF, timeout=120)
        self.child.close()
        return self.child.exitstatus


def spawn(cwd, *args):
    return Screen(cwd, *args)


def cmd(screen, line, expect=PROMPT):
    return screen.cmd(line, expect)


def long_run(cwd, split_folder) -> Screen:
    """A shell training 40 epochs of 15 batches in the background, at its prompt."""
    sh = spawn(cwd)
    sh.cmd(f"data {split_folder} --size 32")
    sh.cmd("load test_resnet")
    sh.cmd("set batch_size 2")
    sh.cmd("train 40", expect="training 40 epochs")
    sh.expect(PROMPT)  # the prompt is back at once while training runs
    return sh


def test_interactive_train_pause_continue_ctrl_c_quit(tmp_path, split_folder):
    sh = long_run(tmp_path, split_folder)
    sh.expect(r"epoch \d+ +batch \d+/15 +loss")  # the bottom toolbar shows progress
    sh.cmd("pause", expect="paused at epoch")
    sh.cmd("continue", expect="training")
    sh.expect(r"epoch \d+ +batch \d+/15 +loss")
    sh.child.sendcontrol("c")  # Ctrl-C at the prompt pauses the run; the shell stays
    sh.expect("paused at epoch")
    assert sh.child.isalive()
    sh.cmd("show", expect="paused")
    sh.child.sendline("quit")
    m = sh.expect(r"saved (\S+\.session)")
    assert sh.finish() == 0
    saved = Path(m.group(1)) if Path(m.group(1)).is_absolute() else tmp_path / m.group(1)
    assert json.loads(saved.read_text())["target"] == {"epoch": 40}


def test_interactive_pause_quit_reopen_continue_is_exact(tmp_path, split_folder):
    """Pause anywhere, quit, `pgshell -s`, `continue`: the same weights as one uninterrupted run."""
    # batch_size 2: 15 batches an epoch, so the run is still going when `pause` arrives (with 4 it could end first)
    setup = [f"data {split_folder} --size 32", "load test_resnet", "set batch_size 2"]
    sh = spawn(tmp_path)
    for line in setup:
        sh.cmd(line)
    sh.cmd("train 3", expect=r"epoch \d+ +batch \d+/15")
    sh.cmd("pause", expect="paused at epoch")
    sh.cmd("save cut.session", expect="saved")
    sh.child.sendline("quit")
    assert sh.finish() == 0
    sh = spawn(tmp_path, "-s", "cut.session")
    sh.cmd("continue", expect="epoch 3 done")
    sh.expect(PROMPT)
    sh.child.sendline("quit")
    assert sh.finish() == 0

    # the uninterrupted reference: the same lines as a plan, in this process (the terminal is not what it tests)
    ref = pgshell_here(stdin="\n".join([*setup, "train 3", "save ref.session", "quit"]) + "\n", cwd=tmp_path)
    assert ref.returncode == 0 and "epoch 3 done" in ref.stdout and "saved" in ref.stdout, ref.stderr
    _, a = C.load_latest(tmp_path / "cut" / "checkpoints")
    _, b = C.load_latest(tmp_path / "ref" / "checkpoints")
    assert a["position"] == b["position"] and a["position"]["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_ctrl_c_during_wait_pauses_and_says_so_once(tmp_path, split_folder):
    """The terminal echoes ^C itself; the shell adds its words once, not a second ^C."""
    sh = long_run(tmp_path, split_folder)
    sh.child.sendline("wait")
    sh.expect(r"waiting for the run to finish or pause \(Ctrl-C pauses it\)")
    sh.child.sendcontrol("c")
    said = sh.expect(r"(?s)(.*?)paused at epoch").group(1)
    assert said.count("^C") == 1 and said.count("pausing after this batch") == 1, said
    sh.expect(PROMPT)
    sh.child.sendline("quit")
    sh.expect(r"saved \S+\.session")
    assert sh.finish() == 0
