"""A paged KV cache for serving many sequences of different lengths at once.

Memory is a pool of fixed-size blocks per layer (``block_size`` positions each); every sequence owns a
list of blocks (its block table) and a length. GQA pools hold keys and values
``[layers, num_blocks, block_size, kv_heads, head_dim]``; MLA pools hold ``MLACache``'s per-token rows
``[latent, rotated shared key]`` as ``[layers, num_blocks, block_size, rank + rope]``. These are the
layouts of ``metal_marlin::paged_attention_decode`` and ``metal_marlin::mla_attention_decode``.

A forward over some sequences goes through a ``PagedStep``: the same interface as ``KVCache`` /
``MLACache`` (``begin``, ``attention_mask``, ``write``, ``end``), so the attention modules run unchanged.
``write`` stores the new tokens in their blocks and returns each sequence's own positions gathered
``[B, ..., S]`` with a key mask. A step where every row is one new token (decode) attends with the
paged-attention ops instead (Metal kernels on Apple GPUs, their reference elsewhere); no gather.

Block 0 is reserved: padding rows of a decode step (see ``PagedStep``) write there and read only it.
"""

from __future__ import annotations

import torch

from ..ops.attention import mla_attention_decode, paged_attention_decode

PAD_BLOCK = 0


class BlockAllocator:
    """Hands out block ids ``1 .. num_blocks - 1`` (block 0 is ``PAD_BLOCK``)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that sequences can hold (all but the reserved one)."""
        return self.num_blocks - 1

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"{count} blocks requested, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """Block pools for every layer and their allocator. ``kv_heads, head_dim`` for GQA, or
    ``latent_dim`` (= kv_lora_rank + rope) for MLA."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, *, kv_heads: int = 0, head_dim: int = 0,
                 latent_dim: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.device = torch.device(device)
        if latent_dim:
            self.entries = torch.zeros(layers, num_blocks, block_size, latent_dim, dtype=dtype, device=device)
            self.keys = self.values = None
        else:
            self.keys = torch.zeros(layers, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
            self.values = torch.zeros_like(self.keys)
            self.entries = None

    @property
    def is_latent(self) -> bool:
        return self.entries is not None

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def step(self, tables: list[list[int]], lengths: list[int], new_tokens: int,
             pass_rows: int | None = None) -> PagedStep:
        """The view for one forward: row ``b`` continues a sequence holding ``lengths[b]`` tokens in the
        blocks ``tables[b]`` with ``new_tokens`` more (the blocks must already hold room for them).
        ``pass_rows``: see ``PagedStep``."""
        return PagedStep(self, tables, lengths, new_tokens, pass_rows)


class PagedStep:
    """One forward's view of a ``PagedKVCache`` (see the module docstring): row ``b`` adds ``T`` tokens at
    positions ``lengths[b] ..`` of its sequence.

    ``pass_rows`` (decode only) makes a row's result independent of the other rows: the batch is padded
    to ``pass_rows`` rows (tokens of padding rows are written to, and read from, ``PAD_BLOCK`` only), and
    attention runs for each group of rows whose tables have the same width, padded to ``pass_rows``
    rows, so every attention call a row takes part in has the shape it would have alone. (The reference
    attention on the CPU rounds differently for different batch sizes and table widths.)"""

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], lengths: list[int], new_tokens: int,
                 pass_rows: int | None = None) -> None:
        bs, device = cache.block_size, cache.device
        real = len(tables)
        if pass_rows is not None:
            if new_tokens != 1 or real > pass_rows:
                raise ValueError(f"pass_rows is for decode steps of at most {pass_rows} rows, got "
                                 f"{real} rows of {new_tokens} tokens")
            tables = list(tables) + [[PAD_BLOCK]] * (pass_rows - real)
            lengths = list(lengths) + [0] * (pass_rows - real)
        totals = [n + new_tokens for n in lengths]
        for table, total in zip(tables, totals, strict=True):
            if len(table) * bs < total:
                raise ValueError(f"a sequence of {total} tokens needs {cache.blocks_for(total)} blocks, "
                                 f"its table has {len(table)}")
        self.cache = cache
        self.batch, self.steps = len(tables), new_tokens
        self.max_total = max(totals)
        width = cache.blocks_for(self.max_total)
        self.block_table = torch.tensor([t[:width] + [PAD_BLOCK] * (width - len(t[:width])) for t in tables],
                                        dtype=torch.int32, device=device)
        self.context_lens = torch.tensor(totals, dtype=torch.int32, device=device)
        self.groups = None if pass_rows is None else self._width_groups(tables[:real], totals, pass_rows)
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
        self.positions = lengths_t.unsqueeze(1) + torch.arange(new_tokens, device=device)  # [B, T]
        self.new_slots = self._slots(self.positions)
        # a decode step attends with the paged ops; other steps gather each sequence's positions
        self.decodes_paged = new_tokens == 1

    def _width_groups(self, tables: list[list[int]], totals: list[int], rows: int
                      ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each table width among the real rows: their row indices, and a block table and context
        lengths of ``rows`` rows (theirs, then padding)."""
        device, by_width = self.cache.device, {}
        for row, total in enumerate(totals[:len(tables)]):  # the padding rows need no attention
            by_width.setdefault(self.cache.blocks_for(total), []).append(row)
        groups = []
        for width, members in by_width.items():
            table = torch.full((rows, width), PAD_BLOCK, dtype=torch.int32, device=device)
            lens = torch.ones(rows, dtype=torch.int32, device=device)
            for i, row in enumerate(members):
                table[i] = torch.tensor(tables[row][:width], dtype=torch.int32)
                lens[i] = totals[row]
            groups.append((torch.tensor(members, device=device), table, lens))
        return groups

    def _paged_attention(self, op, queries: tuple[torch.Tensor, ...], pools: tuple[torch.Tensor, ...],
                         scale: float) -> torch.Tensor:
        """``op(*queries, *pools, block_table, context_lens, scale)`` (queries ``[B, heads, dim]``), in
        groups of equal table width if ``pass_rows`` was given; the result has ``queries[0]``'s shape."""
        queries = tuple(q.contiguous() for q in queries)
        if self.groups is None:
            return op(*queries, *pools, self.block_table, self.context_lens, scale)
        out = torch.zeros_like(queries[0])
        for members, table, lens in self.groups:
            padded = []
            for q in queries:
                rows = torch.zeros_like(q)
                rows[:len(members)] = q[members]
                padded.append(rows)
            out[members] = op(*padded, *pools, table, lens, scale)[:len(members)]
        return out

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat pool row (``block * block_size + offset``) of each position ``[B, n]``."""
        bs = self.cache.block_size
        blocks = self.block_table.long().gather(1, (positions // bs).clamp_max(self.block_table.shape[1] - 1))
        return blocks * bs + positions % bs

    # -- the cache interface of TrellisForCausalLM.forward and the attention modules ----------------

    def begin(self, step_mask: torch.Tensor) -> tuple[int, torch.Tensor]:
        if tuple(step_mask.shape) != (self.batch, self.steps) or not bool(step_mask.all()):
            raise ValueError(f"a paged step takes [{self.batch}, {self.steps}] real tokens, "
                             f"got a mask of {tuple(step_mask.shape)}")
        return 0, self.positions

    def attention_mask(self, start: int, steps: int) -> torch.Tensor | None:
        """``[B, 1, T, S]``: query ``t`` of row ``b`` sees that sequence's positions ``<= lengths[b] + t``
        (S covers the longest sequence; a shorter one's extra positions are masked). None for decode."""
        if self.decodes_paged:
            return None
        key_pos = torch.arange(self.max_total, device=self.positions.device)
        return (key_pos.view(1, 1, -1) <= self.positions.unsqueeze(-1)).unsqueeze(1)

    def end(self, step_mask: torch.Tensor) -> None:
        """Lengths are the caller's bookkeeping (the engine's sequences), nothing to do here."""

    def _store(self, pool: torch.Tensor, layer: int, rows: torch.Tensor) -> None:
        """``rows [B, T, ...]`` into their slots of ``pool[layer]``."""
        flat = pool[layer].view(-1, *pool.shape[3:])
        flat.index_copy_(0, self.new_slots.flatten(), rows.reshape(-1, *pool.shape[3:]).to(pool.dtype))

    def _gather(self, pool: torch.Tensor, layer: int) -> torch.Tensor:
        """Each sequence's positions ``0 .. max_total`` of ``pool[layer]``: ``[B, S, ...]``."""
        positions = torch.arange(self.max_total, device=pool.device).expand(self.batch, -1)
        flat = pool[layer].view(-1, *pool.shape[3:])
        return flat[self._slots(positions)]

    def write(self, layer: int, start: int, first: torch.Tensor, second: torch.Tensor):
        """GQA: ``k, v [B, kv_heads, T, d]`` -> keys, values ``[B, kv_heads, S, d]``. MLA: ``latent
        [B, T, rank]``, ``k_rope [B, T, rope]`` -> entries ``[B, S, rank + rope]``."""
        cache = self.cache
        if cache.is_latent:
            self._store(cache.entries, layer, torch.cat((first, second), dim=-1))
            return self._gather(cache.entries, layer)
        self._store(cache.keys, layer, first.transpose(1, 2))
        self._store(cache.values, layer, second.transpose(1, 2))
        return (self._gather(cache.keys, layer).transpose(1, 2), self._gather(cache.values, layer).transpose(1, 2))

    def decode_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> torch.Tensor:
        """Decode step, GQA: store ``k, v [B, kv_heads, 1, d]``, attend ``q [B, heads, 1, d]`` over each
        sequence's blocks; ``[B, heads, 1, d]``."""
        cache = self.cache
        self._store(cache.keys, layer, k.transpose(1, 2))
        self._store(cache.values, layer, v.transpose(1, 2))
        out = self._paged_attention(paged_attention_decode, (q.squeeze(2),), (cache.keys[layer], cache.values[layer]),
                                    scale)
        return out.unsqueeze(2)

    def decode_latent_attention(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor,
                                q_latent: torch.Tensor, q_rope: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode step, MLA: store ``latent [B, 1, rank]`` and ``k_rope [B, 1, rope]``; the attended
        latent ``[B, heads, 1, rank]`` of ``q_latent [B, heads, 1, rank]``, ``q_rope [B, heads, 1, rope]``."""
        cache = self.cache
        self._store(cache.entries, layer, torch.cat((latent, k_rope), dim=-1))
        out = self._paged_attention(mla_attention_decode, (q_latent.squeeze(2), q_rope.squeeze(2)),
                                    (cache.entries[layer],), scale)
        return out.unsqueeze(2)
