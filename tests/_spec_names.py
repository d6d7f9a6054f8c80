"""The spec's HF -> GGUF tensor-name table (§A.5), written from the spec, shared by the converter
and model tests as their oracle (deliberately not imported from diffcli.converter)."""
from __future__ import annotations


# HF parameter suffix (after `model.decoder.layers.N.`) -> GGUF suffix (after `blk.N.`), spec §A.5
LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "router.proj.weight": "ffn_gate_inp.weight", "router.scale": "ffn_gate_inp.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight", "layer_scalar": "layer_output_scale.weight",
}
GLOBAL_MAP = {
    "model.decoder.embed_tokens.weight": "token_embd.weight", "model.decoder.norm.weight": "output_norm.weight",
    "model.decoder.self_conditioning.pre_norm.weight": "self_cond_pre_norm.weight",
    "model.decoder.self_conditioning.gate_proj.weight": "self_cond_gate.weight",
    "model.decoder.self_conditioning.up_proj.weight": "self_cond_up.weight",
    "model.decoder.self_conditioning.down_proj.weight": "self_cond_down.weight",
}


def gguf_name_for(hf_name: str) -> str | None:
    if hf_name in GLOBAL_MAP:
        return GLOBAL_MAP[hf_name]
    for prefix, tail in (("model.decoder.layers.", None),
                         ("model.encoder.language_model.layers.", "enc_layer_output_scale.weight")):
        if hf_name.startswith(prefix):
            i, suffix = hf_name[len(prefix):].split(".", 1)
            if tail is not None:
                return f"blk.{i}.{tail}" if suffix == "layer_scalar" else None
            return f"blk.{i}.{LAYER_MAP[suffix]}"
    return None
