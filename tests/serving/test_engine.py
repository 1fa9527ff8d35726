"""The serving engine without HTTP, on tiny random models: the paged cache against the preallocated
caches (GQA and MLA), greedy engine output against ``generate``, batch invariance of the decode step,
block accounting (finish, stop string, cancel, error), the bounded queue and waiting for blocks."""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from metal_marlin import TrellisForCausalLM, replace_linear_layers
from metal_marlin.generation import SamplingParams
from metal_marlin.serving import Engine, GenerationRequest, QueueFullError
from metal_marlin.serving.engine import DECODE_PASS_ROWS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nn"))
from tiny_models import CONFIGS, build_model  # noqa: E402


class LetterTokenizer:
    """Token ``i`` is the letter ``chr(97 + i % 26)``: enough text for the engine's detokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def tiny(arch: str, quantized: bool = False) -> TrellisForCausalLM:
    """A tiny random model; ``"mla_dense"``: deepseek_v3's with dense MLPs only."""
    if arch == "mla_dense":
        config = CONFIGS["deepseek_v3"]()
        config.first_k_dense_replace = config.num_hidden_layers
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        hf = build_model(arch)
    if quantized:
        replace_linear_layers(hf, format="int4", group_size=32)
    model = TrellisForCausalLM.from_hf_model(copy.deepcopy(hf))
    model.config.eos_token_id = None  # random weights: no stop token, every request runs to max_tokens
    return model


def prompts(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, 320, (int(torch.randint(3, 14, (1,), generator=gen)),), generator=gen).tolist())
            for _ in range(n)]


def run(engine: Engine, requests: list[GenerationRequest], max_steps: int = 500) -> dict[int, list]:
    """Submit every request, step until all finished; each request's outputs by id."""
    outputs: dict[int, list] = {}
    for r in requests:
        rid = engine.submit(r, lambda out: outputs[out.request_id].append(out))
        outputs[rid] = []
    for _ in range(max_steps):
        if all(o and o[-1].finish_reason for o in outputs.values()):
            return outputs
        engine.step()
    raise AssertionError("the engine did not finish")


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3", "glm4_moe_lite"])
def test_paged_steps_match_the_preallocated_cache(arch):
    """Sequences of different lengths prefilled one by one, then decoded together, each over its own
    scattered blocks: the logits of a full forward (the preallocated KVCache / MLACache path)."""
    model = tiny(arch)
    ids = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)
        paged = model.new_paged_cache(40, 4)
        assert paged.is_latent == (arch in ("deepseek_v3", "glm4_moe_lite"))
        paged.allocator.allocate(5)  # tables need not start at the first blocks
        tables = [paged.allocator.allocate(3) + paged.allocator.allocate(1) for _ in range(3)]
        lengths = [5, 3, 7]
        got = [[model(ids[b:b + 1, :n], cache=paged.step([tables[b]], [0], n))[0]] for b, n in enumerate(lengths)]
        while min(lengths) < 12:
            rows = [b for b in range(3) if lengths[b] < 12]
            step = paged.step([tables[b] for b in rows], [lengths[b] for b in rows], 1)
            assert step.decodes_paged
            logits = model(torch.stack([ids[b, lengths[b]:lengths[b] + 1] for b in rows]), cache=step)
            for i, b in enumerate(rows):
                got[b].append(logits[i])
                lengths[b] += 1
    torch.testing.assert_close(torch.stack([torch.cat(g) for g in got]), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "batch_invariant"), [("qwen3", True), ("glm4_moe_lite", True), ("qwen3", False),
                                                       ("glm4_moe_lite", False)])
def test_engine_greedy_matches_generate(arch, batch_invariant):
    model = tiny(arch)
    engine = Engine(model, LetterTokenizer(), max_batch=3, num_blocks=64, block_size=4,
                    batch_invariant=batch_invariant)
    ps = prompts(5)
    outputs = run(engine, [GenerationRequest(p, 6) for p in ps])
    for rid, p in enumerate(ps):
        want = model.generate(torch.tensor([p]), max_new_tokens=6)[0, len(p):].tolist()
        assert tokens(outputs[rid]) == want
        assert "".join(o.text for o in outputs[rid]) == LetterTokenizer().decode(want)
        last = outputs[rid][-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", len(p), 6)
    assert engine.blocks_used == 0 and engine.num_running == 0


@pytest.mark.parametrize("arch", ["llama", "mla_dense"])
def test_decode_pass_rows_do_not_depend_on_the_other_rows(arch):
    """Batch invariance: a sequence's logits in a decode pass are bit-identical whatever the other rows
    hold (other sequences or padding), with quantized linear layers (the CPU GEMV). Dense MLPs only: MoE
    layers group a batch's tokens by expert (docs/serving.md)."""
    model = tiny(arch, quantized=True)
    cache = model.new_paged_cache(64, 4)
    ps = prompts(DECODE_PASS_ROWS, seed=2)
    tables = [cache.allocator.allocate(5) for _ in ps]  # widths differ: 1 to 4 blocks in use
    with torch.inference_mode():
        for p, table in zip(ps, tables, strict=True):
            model(torch.tensor([p]), cache=cache.step([table], [0], len(p)))
        lengths = [len(p) for p in ps]
        tokens_in = torch.tensor([[p[0]] for p in ps])
        crowded = model(tokens_in, cache=cache.step(tables, lengths, 1, DECODE_PASS_ROWS))
        for row in range(DECODE_PASS_ROWS):
            alone_tokens = torch.cat([tokens_in[row:row + 1], torch.zeros(DECODE_PASS_ROWS - 1, 1, dtype=torch.long)])
            alone = model(alone_tokens, cache=cache.step([tables[row]], [lengths[row]], 1, DECODE_PASS_ROWS))
            assert torch.equal(alone[0], crowded[row]), row


def test_engine_output_is_the_same_alone_and_in_a_crowd():
    model = tiny("llama", quantized=True)
    ps = prompts(11, seed=3)
    kw = dict(max_batch=16, num_blocks=128, block_size=4)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=5)
    crowd = run(Engine(model, LetterTokenizer(), **kw), [GenerationRequest(p, 7, sampled) for p in ps])
    for rid in (0, 6, 10):
        alone = run(Engine(model, LetterTokenizer(), **kw), [GenerationRequest(ps[rid], 7, sampled)])
        assert tokens(alone[0]) == tokens(crowd[rid])


def test_blocks_are_freed_on_finish_stop_string_cancel_and_error():
    model = tiny("llama")
    engine = Engine(model, LetterTokenizer(), max_batch=4, num_blocks=32, block_size=4)
    free_run = run(engine, [GenerationRequest((5, 6, 7), 8)])[0]
    text = "".join(o.text for o in free_run)
    assert engine.blocks_used == 0
    stop = text[3:5]
    stopped = run(engine, [GenerationRequest((5, 6, 7), 8, stop=(stop,))])[1]
    assert "".join(o.text for o in stopped) == text[:text.index(stop)]
    assert stopped[-1].finish_reason == "stop" and engine.blocks_used == 0

    outputs: dict[int, list] = {0: [], 1: []}
    for p in ((1, 2, 3), (4, 5)):
        engine.submit(GenerationRequest(p, 20), lambda out: outputs[out.request_id - 2].append(out))
    engine.step()
    engine.step()
    held = engine.blocks_needed(GenerationRequest((1, 2, 3), 20)) + engine.blocks_needed(GenerationRequest((4, 5), 20))
    assert engine.blocks_used == held and engine.metrics.kv_blocks_used._value.get() == held
    engine.cancel(2)
    engine.step()
    assert outputs[0][-1].finish_reason == "cancelled"
    assert engine.blocks_used == engine.blocks_needed(GenerationRequest((4, 5), 20))
    engine.cancel(3)
    engine.step()
    assert engine.blocks_used == 0 and engine.num_running == 0

    forward = model.forward

    def failing_forward(input_ids, *args, **kwargs):
        if (input_ids == 13).any():
            raise RuntimeError("poisoned token")
        return forward(input_ids, *args, **kwargs)

    model.forward = failing_forward
    try:
        results = run(engine, [GenerationRequest((13, 1), 4), GenerationRequest((2, 3), 4)])
    finally:
        del model.forward
    failed, ok = results.values()
    assert failed[-1].finish_reason == "error" and "poisoned token" in failed[-1].error
    assert ok[-1].finish_reason == "length" and len(tokens(ok)) == 4
    assert engine.blocks_used == 0


def test_queue_bound_and_waiting_for_blocks():
    model = tiny("qwen3")
    engine = Engine(model, LetterTokenizer(), max_batch=8, num_blocks=7, block_size=4, max_queue=2)
    request = GenerationRequest((1, 2, 3, 4), 9)  # 12 positions: 3 of the 6 usable blocks
    outputs: dict[int, list] = {}
    for _ in range(2):
        outputs[engine.submit(request, lambda out: outputs[out.request_id].append(out))] = []
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(request, lambda out: None)
    with pytest.raises(ValueError, match="needs 7 KV blocks; the cache has 6"):
        engine.check(GenerationRequest((1, 2, 3, 4), 25))
    engine.step()
    assert (engine.num_running, engine.num_waiting, engine.blocks_used) == (2, 0, 6)
    outputs[engine.submit(request, lambda out: outputs[out.request_id].append(out))] = []
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)  # no blocks left: the third waits
    for _ in range(20):
        engine.step()
    assert all(o[-1].finish_reason == "length" and len(tokens(o)) == 9 for o in outputs.values())
    assert engine.blocks_used == 0


def test_engine_thread_serves_and_shuts_down():
    model = tiny("llama")
    engine = Engine(model, LetterTokenizer(), num_blocks=32, block_size=4)
    engine.start()
    done = []
    finished = threading.Event()

    def collect(out):
        done.append(out)
        if out.finish_reason:
            finished.set()

    engine.submit(GenerationRequest((3, 4, 5), 5), collect)
    assert finished.wait(30)
    engine.shutdown()
    assert len(tokens(done)) == 5 and engine.blocks_used == 0
