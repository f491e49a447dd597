"""pgshell — AI Playground: a command-line shell for fine-tuning pretrained image classifiers."""

__version__ = "0.1.0"
