"""LoRA, DoRA and rsLoRA through the shared method contract, on every model family and layer type."""

from contract import Case, contract_tests
from models import VIT_QV

from peftkit import LoraConfig


def lora_case(id, model, ref_kwargs=None, **kwargs):
    ref_kwargs = dict(kwargs) if ref_kwargs is None else ref_kwargs
    return Case(id, model, lambda: LoraConfig(**kwargs), ref=lambda peft: peft.LoraConfig(**ref_kwargs))


CASES = [
    lora_case("lora-llama-qv", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    lora_case("lora-llama-all-linear", "llama", r=4, target_modules="all-linear"),
    lora_case("rslora-llama", "llama", r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"]),
    lora_case("dora-llama", "llama", r=4, use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj"]),
    lora_case("lora-gpt2-conv1d", "gpt2", r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    lora_case("dora-gpt2-conv1d", "gpt2", r=4, use_dora=True, target_modules=["c_attn"], fan_in_fan_out=True),
    lora_case("lora-bert-cls", "bert", r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    lora_case("lora-t5", "t5", r=4, target_modules=["q", "v", "wo"]),
    lora_case("lora-vit", "vit", r=4, target_modules=VIT_QV, modules_to_save=["classifier"]),
    lora_case("dora-vit", "vit", r=4, use_dora=True, target_modules=VIT_QV, modules_to_save=["classifier"]),
    lora_case("lora-mlp-patterns", "mlp", r=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 2},
              alpha_pattern={"lin0": 16}),
    lora_case("lora-embedding", "llama", r=4, target_modules=["embed_tokens", "q_proj"]),
    lora_case("dora-embedding", "llama", r=4, use_dora=True, target_modules=["embed_tokens"]),
    lora_case("lora-conv2d", "cnn", r=2, target_modules=["conv0", "conv1", "lin"]),
    lora_case("dora-conv2d", "cnn", r=2, use_dora=True, target_modules=["conv0", "conv1"]),
    lora_case("lora-bias-all", "mlp", r=4, target_modules=["lin0", "lin1"], bias="all"),
    lora_case("lora-layers-to-transform", "llama", r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
              layers_pattern="layers"),
]

globals().update(contract_tests(CASES))
