"""What is written to disk: the checkpoint format, the checkpoint saver handler, digests of weights, files and
folders. Names are re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "CheckpointError": "checkpoint", "atomic_write_bytes": "checkpoint", "open_append": "checkpoint",
    "clean_partial_writes": "checkpoint", "save_checkpoint": "checkpoint", "read_metadata": "checkpoint",
    "check_size": "checkpoint", "load_checkpoint": "checkpoint", "list_checkpoint_files": "checkpoint",
    "load_latest": "checkpoint", "CheckpointSaver": "saver", "slim": "saver", "Manifest": "digests",
    "file_sha256": "digests", "weights_digest": "digests", "data_manifest": "digests", "manifest_digest": "digests",
    "manifest_changes": "digests", "write_manifest": "digests", "read_manifest": "digests",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
