"""Text -> tokens -> packed sequences -> webdataset shards -> micro-batches.

Public API:
    prepare_dataset(PrepareConfig) -> Manifest        build a dataset directory
    open_dataset(path, seq_len=, tokenizer_sha256=)   load and check its manifest
    verify_dataset(path, manifest) -> [problems]       re-hash and re-read every shard
    TrainLoader(path, manifest, ...)                   resumable training micro-batches
    validation_batches(path, manifest, ...)            layout-independent validation batches
    Tokenizer.load(path)                               sentencepiece + mask id
"""

from dlm_pretrain.data_pipeline.config import DataConfig, PrepareConfig
from dlm_pretrain.data_pipeline.manifest import Manifest, open_dataset
from dlm_pretrain.data_pipeline.prepare import prepare_dataset
from dlm_pretrain.data_pipeline.reader import Batch, TrainLoader, validation_batches
from dlm_pretrain.data_pipeline.shards import verify_dataset
from dlm_pretrain.data_pipeline.tokenizer import Tokenizer

__all__ = [
    "Batch",
    "DataConfig",
    "Manifest",
    "PrepareConfig",
    "Tokenizer",
    "TrainLoader",
    "open_dataset",
    "prepare_dataset",
    "validation_batches",
    "verify_dataset",
]
