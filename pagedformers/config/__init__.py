"""The engine's configuration in three stages: `EngineArgs` (what the user typed) -> `resolve()` (pure; the
model's files are read by `loading.model_files`) -> `EngineConfig` (frozen, in sub-configs)."""

from pagedformers.config.args import EngineArgs, ModelImpl
from pagedformers.config.engine_config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    PoolingHead,
    SchedulerConfig,
)
from pagedformers.config.pooler import PoolerConfig
from pagedformers.config.resolve import ModelFiles, resolve

__all__ = ["CacheConfig", "DeviceConfig", "EngineArgs", "EngineConfig", "LoRAConfig", "ModelConfig", "ModelFiles",
           "ModelImpl", "ParallelConfig", "PoolerConfig", "PoolingHead", "SchedulerConfig", "resolve"]
