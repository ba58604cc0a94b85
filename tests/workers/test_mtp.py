"""The MTP forward against its definition (GLM45.md §3.2) and transformers 5.x's MtpModel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Glm4MoeForCausalLM as HFGlm4Moe
from transformers.modeling_layers import MtpModel

from workers.batch import SequenceChunk, build_batch
from workers.generate import load_model
from workers.kv_cache import PagedKVCache

TOLERANCE = 1e-4


def _run_ours(model, tokens: list[int]):
    """Main forward over ``tokens[:-1]``, then the MTP over (h_i, t_{i+1}) at positions i."""
    kv = PagedKVCache(model.config, num_blocks=16, block_size_tokens=8)
    table = kv.allocator.allocate(4)
    inputs = tokens[:-1]
    batch = build_batch([SequenceChunk(inputs, 0, table, num_logits=len(inputs))], 8)
    main = model.forward(batch, kv)
    draft = model.mtp_forward(main.hidden_states, torch.tensor(tokens[1:]), batch, kv)
    return main, draft


def test_mtp_matches_transformers_mtp_model(tiny_checkpoint):
    folder = tiny_checkpoint("air46")
    ours = load_model(folder)
    tokens = torch.randint(0, ours.config.vocab_size, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    main, draft = _run_ours(ours, tokens)

    hf = HFGlm4Moe.from_pretrained(folder, dtype=torch.float32).eval()
    mtp = MtpModel.from_pretrained(hf).eval()
    with torch.inference_mode():
        inputs = torch.tensor([tokens[:-1]])
        hidden = hf.model(inputs).last_hidden_state  # after model.norm
        torch.testing.assert_close(main.hidden_states, hidden[0], atol=TOLERANCE, rtol=0)
        positions = torch.arange(len(tokens) - 1)[None]
        z = mtp.forward_layer(0, hidden, positions, None, input_ids=torch.tensor([tokens[1:]]))
        ref_logits = mtp._project_to_logits(z)[0]
        torch.testing.assert_close(draft.hidden_states, z[0], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(draft.logits, ref_logits, atol=TOLERANCE, rtol=0)
        # HF5 gives the shifted tokens their own positions (i+1); only relative offsets matter.
        z_shifted = mtp.forward_layer(0, hidden, positions + 1, None, input_ids=torch.tensor([tokens[1:]]))
        torch.testing.assert_close(draft.logits, mtp._project_to_logits(z_shifted)[0], atol=TOLERANCE, rtol=0)


def test_mtp_follows_its_definition(tiny_checkpoint):
    """Embedding half first, main hidden after the final norm, shared_head.norm before the head."""
    model = load_model(tiny_checkpoint("glm45"))
    tokens = torch.randint(0, model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(6)).tolist()
    main, draft = _run_ours(model, tokens)
    mtp = model.mtp
    e = model.model.embed_tokens(torch.tensor(tokens[1:]))
    h = main.hidden_states

    def draft_logits(first: torch.Tensor, second: torch.Tensor, head_norm: bool) -> torch.Tensor:
        kv = PagedKVCache(model.config, num_blocks=16, block_size_tokens=8)
        batch = build_batch([SequenceChunk(tokens[:-1], 0, kv.allocator.allocate(2), num_logits=8)], 8)
        u = F.linear(torch.cat((first, second), dim=-1), mtp.eh_proj.weight)
        rope = model.rotary.cos_sin(batch.positions, u.dtype)
        with torch.inference_mode():
            y = type(mtp).__mro__[1].forward(mtp, u, batch, rope, kv)
            return F.linear(mtp.shared_head.norm(y) if head_norm else y, model.lm_head.weight)

    with torch.inference_mode():
        expected = draft_logits(mtp.enorm(e), mtp.hnorm(h), head_norm=True)
        torch.testing.assert_close(draft.logits, expected, atol=1e-5, rtol=0)
        # Each alternative reading of the definition gives different logits: the test can tell them apart.
        assert (draft_logits(mtp.hnorm(h), mtp.enorm(e), head_norm=True) - draft.logits).abs().max() > 1e-2
        assert (draft_logits(mtp.enorm(e), mtp.hnorm(h), head_norm=False) - draft.logits).abs().max() > 1e-2
