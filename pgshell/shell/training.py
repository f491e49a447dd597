"""Training commands: train, pause, continue, stop, wait."""

from __future__ import annotations

from cmd2 import with_argparser

from ..engine.errors import PgError
from ._common import Commands, parser

# In a script `train` blocks until its run ends, so a `pause` or `stop` on the next line finds nothing to act on.
_SCRIPT_HINT = (": in a script `train` waits until its run ends; `train --steps K` trains K steps and stops there "
                "(`save` keeps the run resumable)")


# ====================================================================== Training
class TrainingCommands(Commands):
    DEFAULT_CATEGORY = "Training"

    train_parser = parser("Train N more epochs (or K more steps with --steps) from where the model is. Returns to "
                          "the prompt at once; progress shows in the toolbar. In a script it waits until done, so "
                          "`--steps K` is how a script stops part-way. A step is an optimizer step: one batch, or "
                          "K batches under `set accumulate K` (the step the position, checkpoints and metrics count)."
                          , "train 5")
    train_parser.add_argument("epochs", nargs="?", type=int, help="more epochs (default: up to the `epochs` setting)")
    train_parser.add_argument("--steps", type=int, help="more optimizer steps instead of epochs (batches, unless "
                                                         "`accumulate` > 1)")
    train_parser.add_argument("--restart", action="store_true",
                              help="a new phase (after `unfreeze`, say): the lr schedule starts again at this epoch "
                                   "(StepLR's decays, cosine's span up to `epochs`); sets `schedule_start`")

    @with_argparser(train_parser)
    def do_train(self, args):
        """Train in the background."""
        if args.epochs is not None and args.steps is not None:
            raise PgError("give epochs or --steps, not both")
        self._cmd.poutput(self.session.train(args.epochs, args.steps, restart=args.restart))
        self._cmd.after_start()

    finetune_parser = parser("fastai's fine-tune recipe as one command: train the head alone for --head-epochs with "
                             "the backbone frozen, then unfreeze everything and train EPOCHS more with the backbone's "
                             "lr x --backbone-lr-scale (discriminative lrs). The same as typing `freeze`, `train K`, "
                             "`unfreeze all`, `set backbone_lr_scale S`, `train EPOCHS`; `pause`/`continue` work in "
                             "either phase.", "finetune 5 --head-epochs 1")
    finetune_parser.add_argument("epochs", type=int, help="epochs of the whole model after the head's")
    finetune_parser.add_argument("--head-epochs", type=int, default=1, help="epochs of the head alone first (1)")
    finetune_parser.add_argument("--backbone-lr-scale", type=float, default=0.1,
                                 help="the backbone's lr factor in the second phase (0.1)")

    @with_argparser(finetune_parser)
    def do_finetune(self, args):
        """Fine-tune: the head first, then everything."""
        self._cmd.poutput(self.session.finetune(args.epochs, args.head_epochs, args.backbone_lr_scale))
        self._cmd.after_start()

    @with_argparser(parser("Pause the run after the current batch (a checkpoint is written).", "pause"))
    def do_pause(self, _):
        """Pause training."""
        s = self.session
        if not s.running:
            raise PgError("nothing is training" + (" (the run is already paused: `continue`)" if s.paused
                                                   else self._in_script()))
        if not s.pause():
            raise PgError("still finishing the current batch; it will pause after it")
        self._cmd.flush_messages()
        self._cmd.last_result = True

    @with_argparser(parser("Continue the paused run where it stopped.", "continue"))
    def do_continue(self, _):
        """Continue a paused run."""
        self._cmd.poutput(self.session.resume())
        self._cmd.after_start()

    @with_argparser(parser("Stop the run after the current batch; `continue` will not resume it.", "stop"))
    def do_stop(self, _):
        """Stop training."""
        if not self.session.stop():
            raise PgError("nothing to stop" + ("" if self.session.paused else self._in_script()))
        self._cmd.flush_messages()
        self._cmd.last_result = True

    @with_argparser(parser("Block until the current run finishes or pauses (Ctrl-C pauses it), printing its "
                           "progress every few seconds and each epoch's line.", "wait"))
    def do_wait(self, _):
        """Wait for training."""
        app, s = self._cmd, self.session
        if not s.running:
            app.poutput("nothing is running" + (": the run is paused — `continue` resumes it" if s.paused else
                                                " (idle)"))
            app.last_result = dict(s.status)
            return
        if app.interactive:  # the prompt goes away: say why and how to get it back
            app.poutput("waiting for the run to finish or pause (Ctrl-C pauses it)")
        with app.holding_alerts():  # the epoch lines are printed as they come, not held for the next prompt
            app.wait_for_run(progress=True)

    def _in_script(self) -> str:
        return "" if self._cmd.interactive else _SCRIPT_HINT
