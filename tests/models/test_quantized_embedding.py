"""``QuantizedEmbedding`` and the tied quantized output head: the embedded model's Q8_0 ``token_embd`` kept as
int8 g32 for the lookup and the lm_head (one copy), checked against the raw GGUF bytes in float64, plus the
import, runtime, dequantization and checkpoint paths of a tied quantized pair."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from gguf_builder import write_llama_gguf
from safetensors import safe_open
from test_gguf import tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

from metal_marlin import CheckpointError, TrellisForCausalLM, load_quantized_model, read_gguf, save_quantized
from metal_marlin.cli import main
from metal_marlin.formats import get_format
from metal_marlin.models.checkpoint import load_transformers_checkpoint
from metal_marlin.models.gguf import build_model_from_gguf
from metal_marlin.models.info import describe_checkpoint
from metal_marlin.models.loading import embedded_model_path
from metal_marlin.nn import MetalQuantizedLinear, QuantizedEmbedding, dequantize_model

Q8_0_BLOCK_BYTES = 34  # float16 d, then 32 int8 q: weight = d * q


def q8_0_float64(path: str, tensor_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, d, q)`` of a Q8_0 matrix decoded from the file's bytes in float64 (d, q repeated per weight)."""
    tensor = next(t for t in GGUFReader(path).tensors if t.name == tensor_name)
    assert tensor.tensor_type.name == "Q8_0"
    rows = int(tensor.shape[1])
    blocks = np.asarray(tensor.data).view(np.uint8).reshape(rows, -1, Q8_0_BLOCK_BYTES)
    d = np.repeat(blocks[..., :2].copy().view(np.float16).astype(np.float64), 32, axis=-1).reshape(rows, -1)
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float64).reshape(rows, -1)
    return torch.from_numpy(d * q), torch.from_numpy(d), torch.from_numpy(q)


def unique_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*model.parameters(), *model.buffers())}
    return sum(storages.values())


def assert_shared_pair(model: nn.Module) -> None:
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, QuantizedEmbedding) and isinstance(head, MetalQuantizedLinear)
    assert head.packed.data_ptr() == embedding.packed.data_ptr()
    assert head.scales.data_ptr() == embedding.scales.data_ptr()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


# -- the embedded model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded():
    """The embedded model imported from its GGUF, and its Q8_0 table decoded from the raw bytes."""
    path = str(embedded_model_path())
    return build_model_from_gguf(read_gguf(path)), q8_0_float64(path, "token_embd.weight")


def test_embedding_rows_equal_gguf_q8_0_blocks(embedded):
    model, (table, _, _) = embedded
    vocab, dim = table.shape
    ids = torch.cat([torch.tensor([0, vocab - 1]),
                     torch.randint(0, vocab, (62,), generator=torch.Generator().manual_seed(1))]).reshape(2, 32)
    rows = model.model.embed_tokens(ids)
    assert rows.dtype == torch.float32 and rows.shape == (2, 32, dim)
    # d (float16) times q (int8) needs at most 19 significant bits: float32 holds it exactly.
    assert torch.equal(rows.double(), table[ids])
    path = str(embedded_model_path())
    tensor = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    by_gguf = torch.from_numpy(np.asarray(dequantize(tensor.data, tensor.tensor_type)).reshape(vocab, dim))
    assert torch.equal(by_gguf[ids].double(), table[ids])


def test_lm_head_logits_within_float32_bound(embedded):
    model, (table, d, q) = embedded
    x = torch.randn(2, 3, table.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.lm_head(x).double()
    want = x.double() @ table.T
    # The kernels evaluate int8 symmetric as s * sum(u * x) - 128 * s * sum(x) with codes u = q + 128
    # (docs/formats.md); float32 rounding of those K-term sums stays within gamma_(K+2) times their
    # magnitude sum |s| (u + 128) |x| (which also bounds dequantize-then-matmul's error).
    k = table.shape[1]
    magnitude = x.double().abs() @ (d.abs() * (q + 256)).T
    assert torch.all((got - want).abs() <= (k + 2) * 2.0**-24 * magnitude)


def test_embedded_runtime_holds_one_quantized_table(embedded):
    model, (table, _, _) = embedded
    assert_shared_pair(model)
    runtime = TrellisForCausalLM.from_hf_model(copy.deepcopy(model))
    assert_shared_pair(runtime)
    vocab, dim = table.shape
    # The same runtime with the dense float32 tie it had before: embedding and head share one dense table.
    dense_tie = copy.deepcopy(runtime)
    embedding = nn.Embedding(vocab, dim, device="meta")
    embedding.weight = nn.Parameter(table.float())
    head = nn.Linear(dim, vocab, bias=False, device="meta")
    head.weight = embedding.weight
    dense_tie.model.embed_tokens, dense_tie.lm_head = embedding, head
    quantized_table = vocab * dim + vocab * (dim // 32) * 2  # int8 codes + float16 scales, held once
    assert unique_bytes(dense_tie) - unique_bytes(runtime) == 4 * vocab * dim - quantized_table


# -- a tiny tied model with a Q8_0 token embedding ----------------------------------------------------------

IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tied_q8_embedding(tmp_path_factory):
    """``(path, imported model, transformers twin holding gguf's dequantized weights)``."""
    model = tiny_llama(tie=True)
    path = str(tmp_path_factory.mktemp("gguf") / "tied.gguf")
    reference = write_llama_gguf(model, path, type_overrides={"model.embed_tokens.weight": "Q8_0"})
    twin = copy.deepcopy(model)
    twin.load_state_dict(reference, strict=False)
    return path, build_model_from_gguf(read_gguf(path)), twin


def test_import_installs_the_shared_pair(tied_q8_embedding):
    path, imported, twin = tied_q8_embedding
    assert_shared_pair(imported)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    want, _, _ = q8_0_float64(path, "token_embd.weight")
    assert torch.equal(imported.model.embed_tokens.dequantize_weight().double(), want)
    torch.testing.assert_close(logits(imported, IDS), logits(twin, IDS), rtol=1e-4, atol=1e-4)
    runtime = TrellisForCausalLM.from_hf_model(copy.deepcopy(imported))
    assert_shared_pair(runtime)
    torch.testing.assert_close(logits(runtime, IDS), logits(twin, IDS), rtol=1e-4, atol=1e-4)


def test_untied_or_dense_embeddings_stay_dense(tmp_path):
    untied = str(tmp_path / "untied.gguf")
    write_llama_gguf(tiny_llama(), untied, type_overrides={"model.embed_tokens.weight": "Q8_0"})
    model = build_model_from_gguf(read_gguf(untied))
    assert type(model.model.embed_tokens) is nn.Embedding and isinstance(model.lm_head, MetalQuantizedLinear)
    dense = str(tmp_path / "dense.gguf")
    write_llama_gguf(tiny_llama(tie=True), dense)
    model = build_model_from_gguf(read_gguf(dense))
    assert type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    runtime = TrellisForCausalLM.from_hf_model(model)
    assert runtime.lm_head.weight is runtime.model.embed_tokens.weight


def test_dequantize_model_restores_a_dense_tie(tied_q8_embedding):
    _, imported, twin = tied_q8_embedding
    dense = copy.deepcopy(imported)
    dequantize_model(dense)
    assert type(dense.model.embed_tokens) is nn.Embedding and type(dense.lm_head) is nn.Linear
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    assert torch.equal(dense.model.embed_tokens.weight, twin.model.embed_tokens.weight)


def test_checkpoint_round_trip_keeps_one_shared_copy(tied_q8_embedding, tmp_path):
    _, imported, _ = tied_q8_embedding
    save_quantized(imported, tmp_path / "ck")
    qconfig = json.loads((tmp_path / "ck" / "quantization_config.json").read_text())
    assert qconfig["modules"]["model.embed_tokens"]["kind"] == "embedding"
    assert qconfig["modules"]["lm_head"]["tied_to"] == "model.embed_tokens"
    keys = set()
    for shard in (tmp_path / "ck").glob("model-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys.update(f.keys())
    assert {"model.embed_tokens.packed", "model.embed_tokens.scales"} <= keys
    assert not any(k.startswith("lm_head.") or k == "model.embed_tokens.weight" for k in keys)
    assert "lm_head shares the tensors of model.embed_tokens" in describe_checkpoint(tmp_path / "ck")

    ours, _ = load_transformers_checkpoint(tmp_path / "ck")
    runtime, _ = load_quantized_model(tmp_path / "ck")
    via_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for loaded in (ours, runtime, via_hf):
        assert_shared_pair(loaded)
        for key in ("packed", "scales"):
            assert torch.equal(getattr(loaded.model.embed_tokens, key), getattr(imported.model.embed_tokens, key))
    assert torch.equal(logits(ours, IDS), logits(imported, IDS))
    assert torch.equal(logits(via_hf, IDS), logits(imported, IDS))
    # our runtime's forward differs from transformers' in float32 rounding only
    torch.testing.assert_close(logits(runtime, IDS), logits(imported, IDS), rtol=0, atol=1e-5)


def test_cli_quantizes_a_model_with_the_pair(tied_q8_embedding, tmp_path, capsys):
    """``quantize`` dequantizes first: the pair becomes a dense tie, lm_head is kept dense by default."""
    path, imported, _ = tied_q8_embedding
    out = tmp_path / "ck"
    assert main(["quantize", path, str(out), "--format", "int8", "--group-size", "32"]) == 0
    loaded, _ = load_transformers_checkpoint(out)
    assert type(loaded.model.embed_tokens) is nn.Embedding
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, imported.model.embed_tokens.dequantize_weight())


# -- bad input --------------------------------------------------------------------------------------------

def test_bad_ids_and_shapes(tied_q8_embedding):
    _, imported, _ = tied_q8_embedding
    embedding = imported.model.embed_tokens
    for bad in (256, -1):
        with pytest.raises(IndexError, match=rf"model\.embed_tokens: token id {bad} is out of range .* 256 rows"):
            embedding(torch.tensor([[3, bad, 5]]))
    with pytest.raises(TypeError, match=r"model\.embed_tokens: token ids must be an integer tensor"):
        embedding(torch.zeros(2, 3))
    stacked = get_format("int8").quantize(torch.randn(2, 8, 64), group_size=32)
    with pytest.raises(ValueError, match=r"table: an embedding table is 2-D .* got shape \(2, 8, 64\)"):
        QuantizedEmbedding.from_quantized(stacked, name="table")
    other = MetalQuantizedLinear(128, 256, bias=False, format="int4", group_size=32, name="head")
    with pytest.raises(ValueError, match=r"head: cannot share the weight of model\.embed_tokens"):
        other.share_weight(embedding)


def test_saving_a_broken_tie_is_refused(tied_q8_embedding, tmp_path):
    _, imported, _ = tied_q8_embedding
    broken = copy.deepcopy(imported)
    broken.lm_head.packed = broken.lm_head.packed.clone()  # what Module.to() does when it moves the buffers
    with pytest.raises(CheckpointError, match=r"lm_head: its tensors belong to a tied embedding but are no longer"):
        save_quantized(broken, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
