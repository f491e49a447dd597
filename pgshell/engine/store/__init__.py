"""What is written to disk: the checkpoint format, the checkpoint saver handler, digests of weights, files and
folders. Names are re-exported here lazily."""

from ..lazy import exports, lazy_getattr

_EXPORTS = exports("""
    checkpoint: CheckpointError atomic_write_bytes open_append clean_partial_writes save_checkpoint read_metadata
    checkpoint: check_size load_checkpoint list_checkpoint_files load_latest
    saver: CheckpointSaver slim
    digests: Manifest file_sha256 weights_digest data_manifest manifest_digest manifest_changes write_manifest
    digests: read_manifest
""")

__all__ = [*_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
