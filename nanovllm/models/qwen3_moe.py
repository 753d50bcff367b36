"""Qwen3-MoE: Qwen3's attention (q/k norm) with a sparse MoE block as the MLP of most layers."""
from __future__ import annotations

import re

from transformers import PretrainedConfig

from nanovllm.layers.fused_moe import SparseMoeBlock
from nanovllm.models.llama import DenseMLP, DenseSwitches, MLPFactory
from nanovllm.models.qwen3 import Qwen3ForCausalLM

# model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight: one expert's projection in the checkpoint.
_EXPERT_TENSOR = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def is_sparse_layer(config: PretrainedConfig, index: int) -> bool:
    """As HF: experts in layer `index` unless it is in mlp_only_layers or off the decoder_sparse_step grid."""
    return (
        index not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (index + 1) % config.decoder_sparse_step == 0
    )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    def mlp_factory(self, config: PretrainedConfig, switches: DenseSwitches) -> MLPFactory:
        def build(config: PretrainedConfig, index: int):
            if not is_sparse_layer(config, index):
                return DenseMLP(config.hidden_size, config.intermediate_size)
            return SparseMoeBlock(
                config.num_experts, config.num_experts_per_tok, config.hidden_size, config.moe_intermediate_size,
                bool(config.norm_topk_prob),
            )

        return build

    def weight_target(self, name: str) -> tuple[str, object]:
        match = _EXPERT_TENSOR.match(name)
        if match is None:
            return super().weight_target(name)
        expert, proj = int(match["expert"]), match["proj"]
        if proj == "down":
            return f"{match['prefix']}.down_proj", expert
        return f"{match['prefix']}.gate_up_proj", (expert, 0 if proj == "gate" else 1)
