"""Which adapter sits in which LoRA slot of the workers: assigned by the driver as steps need them, least recently
used evicted. The scheduler keeps the adapters of running requests within the slots, so a step always fits."""

from __future__ import annotations

from collections import OrderedDict

from pagedformers.lora import LoRARequest


class LoRASlots:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first

    def assign(self, adapters: list[LoRARequest]) -> list[tuple[int, LoRARequest]]:
        """Slots for this step's adapters; returns the (slot, adapter) loads the workers must do first."""
        needed = {a.lora_int_id: a for a in adapters}
        assert len(needed) <= self.num_slots, "the scheduler admits at most max_loras adapters at once"
        loads = []
        for lora_id, adapter in needed.items():
            if lora_id in self.slot_of:
                self.slot_of.move_to_end(lora_id)
                continue
            free = sorted(set(range(self.num_slots)) - set(self.slot_of.values()))
            if free:
                slot = free[0]
            else:
                victim = next(k for k in self.slot_of if k not in needed)
                slot = self.slot_of.pop(victim)
            self.slot_of[lora_id] = slot
            loads.append((slot, adapter))
        return loads

    def forget(self, loads: list[tuple[int, LoRARequest]]) -> None:
        """Loads that may not have happened (their step failed): load them again when next needed."""
        for _, adapter in loads:
            self.slot_of.pop(adapter.lora_int_id, None)

    def slot(self, adapter: LoRARequest | None) -> int:
        return -1 if adapter is None else self.slot_of[adapter.lora_int_id]
