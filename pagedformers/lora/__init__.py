"""LoRA adapters: `LoRARequest` (which adapter a request uses), PEFT adapter files (`adapter`), the layers that add
each row's low-rank update to a base linear (`layers`), and the worker's slots of loaded adapters (`model`)."""

from pagedformers.lora.request import LoRARequest

__all__ = ["LoRARequest"]
