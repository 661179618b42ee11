"""Block tables, reference counts and the prefix cache over a fixed pool of KV blocks.

Prefix caching: a full block is identified by the hash of its tokens chained with the
hash of the block before it, so equal hashes mean equal prefixes. Freed blocks keep
their hash and stay findable until the pool hands them out again (least recently freed
first), so a later request with the same prefix reuses them without recompute.

Free blocks are handed out in three tiers:
1. blocks freed without a hash (prefix caching off, or a request's unfilled last block), the most
   recently freed first. Their pages are in memory already, so the pool's working set (and the
   process's RSS) stays as large as the load, not the pool: the KV cache is allocated uninitialised,
   and each page faults on its first write (a run of the fixed throughput benchmark that walked on to
   fresh blocks took ~25K page faults);
2. blocks never used, in order;
3. freed blocks that hold a cached prefix, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from pagedformers.engine.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 prompt_blocks_only: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Cache only blocks wholly inside their request's prompt: where a window keeps the prompt (R-SWA), a
        # generated token's K/V depend on where its prompt ended, so a prompt holding those tokens cannot share them.
        self.prompt_blocks_only = prompt_blocks_only
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.recycled: list[int] = []  # tier 1, a stack
        self.next_unused = 0  # tier 2: blocks [next_unused, num_blocks)
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # tier 3, least recently freed first
        self.cached_blocks: dict[int, int] = {}  # block hash -> block id
        self.block_tables: dict[str, list[int]] = {}
        self.req_block_hashes: dict[str, list[int]] = {}  # hashes of a request's cached full blocks
        self.stats = PrefixCacheStats()
        # Blocks handed out for the first time since the last step: workers zero them before use
        # (the cache is allocated uninitialised, and attention reads whole blocks).
        self.fresh_blocks: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.recycled) + self.num_blocks - self.next_unused + len(self.cached_free)

    @property
    def usage(self) -> float:
        """Share of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding the longest prefix of req's tokens; at least one token is left to compute."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        hits: list[int] = []
        parent = None
        for i in range((req.num_tokens - 1) // self.block_size):
            parent = self._hash_block(req, i, parent)
            block = self.cached_blocks.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted request's lookup (not every retry of a request that had to wait)."""
        if self.enable_prefix_caching:
            self.stats.queries += num_tokens
            self.stats.hits += num_hit_tokens

    def allocate(self, req: Request, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Make room for num_new_tokens after req's computed (and `cached`) tokens; False if the pool is short."""
        table = self.block_tables.setdefault(req.request_id, [])
        num_tokens = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        num_needed = self.num_blocks_for(num_tokens) - len(table) - len(cached)
        num_reclaimed = sum(1 for b in cached if self.ref_counts[b] == 0)
        if num_needed > self.num_free_blocks - num_reclaimed:
            return False
        for block in cached:
            if self.ref_counts[block] == 0:  # a free block keeps its hash only in tier 3
                del self.cached_free[block]
            self.ref_counts[block] += 1
        if cached:
            self.req_block_hashes[req.request_id] = [self.block_hash[b] for b in cached]
        table.extend(cached)
        for _ in range(max(num_needed, 0)):
            table.append(self._pop_free_block())
        return True

    def free(self, req: Request) -> None:
        # Tail blocks first: they are the least likely to be shared, so tier 3 evicts them first.
        for block in reversed(self.block_tables.pop(req.request_id, [])):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is None:
                    self.recycled.append(block)
                else:
                    self.cached_free[block] = None
        self.req_block_hashes.pop(req.request_id, None)

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of req's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        hashes = self.req_block_hashes.setdefault(req.request_id, [])
        table = self.block_tables[req.request_id]
        computed = min(req.num_computed_tokens, req.num_prompt_tokens) if self.prompt_blocks_only \
            else req.num_computed_tokens
        for i in range(len(hashes), computed // self.block_size):
            h = self._hash_block(req, i, hashes[-1] if hashes else None)
            hashes.append(h)
            block = table[i]
            if self.block_hash[block] is None and h not in self.cached_blocks:
                self.block_hash[block] = h
                self.cached_blocks[h] = block

    def reset_prefix_cache(self) -> None:
        for h, block in list(self.cached_blocks.items()):
            if self.ref_counts[block] == 0:
                self.block_hash[block] = None
                del self.cached_blocks[h]
                del self.cached_free[block]
                self.recycled.append(block)

    def _hash_block(self, req: Request, index: int, parent: int | None) -> int:
        start = index * self.block_size
        tokens = tuple(req.all_token_ids[start:start + self.block_size])
        media = req.multi_modal_inputs
        if media is not None and start + self.block_size > media.first_position:
            # Placeholder tokens are equal for every image: the block's K/V depend on the media too
            # (and so, through the chained parent hash, do all later blocks); and on the tokens ahead
            # of it up to the end of a bidirectional range it ends in.
            ahead = media.group_end(start + self.block_size - 1)
            tokens += tuple(req.all_token_ids[start + self.block_size:ahead])
            return hash((parent, tokens, media.content_hash))
        if parent is None and req.lora_request is not None:  # K/V under an adapter are its own (and so, chained,
            return hash((tokens, req.lora_request.lora_int_id))  # are every later block's)
        return hash((parent, tokens))

    def take_fresh_blocks(self) -> list[int]:
        fresh, self.fresh_blocks = self.fresh_blocks, []
        return fresh

    def _pop_free_block(self) -> int:
        if self.recycled:
            block = self.recycled.pop()
        elif self.next_unused < self.num_blocks:
            block = self.next_unused
            self.next_unused += 1
            self.fresh_blocks.append(block)
        else:
            block, _ = self.cached_free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict it from the prefix cache
            if self.cached_blocks.get(h) == block:
                del self.cached_blocks[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block
