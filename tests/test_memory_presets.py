"""Named memory configurations: the paper's and the reference repository's values, valid,
and refused for a model they were not made for."""

import pytest

from infllm_lite import InfLLMLiteError, MemoryConfig
from infllm_lite.config import ModelArgs
from infllm_lite.memory_presets import PRESETS


def args(native: int, theta: float) -> ModelArgs:
    return ModelArgs.from_hf_config(dict(
        architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=native, rms_norm_eps=1e-5, rope_theta=theta))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config_for_its_own_model(name):
    preset = PRESETS[name]
    config = MemoryConfig.preset(name, args(32768, preset.rope_theta))
    for key, value in preset.fields.items():
        assert getattr(config, key) == value
    assert config.topk <= config.max_cached_blocks


def test_the_papers_configurations():
    mistral, llama3 = MemoryConfig.preset("infllm-mistral-paper"), MemoryConfig.preset("infllm-llama3-paper")
    for c in (mistral, llama3):
        assert (c.exc_block_size, c.block_size, c.repr_topk, c.n_local, c.n_init) == (512, 128, 4, 4096, 128)
    assert (mistral.topk, llama3.topk, llama3.max_cached_blocks) == (96, 32, 32)
    repo = MemoryConfig.preset("infllm-mistral-repo")
    assert (repo.topk, repo.max_cached_blocks, repo.chunk_size) == (16, 32, 8192)
    assert MemoryConfig.preset("infllm-qwen-repo").chunk_size == 2048
    assert MemoryConfig.preset("infllm-vicuna-repo", topk=8).topk == 8  # overrides


def test_a_preset_is_refused_for_a_model_it_was_not_made_for(smollm):
    model, _ = smollm  # SmolLM2: native 8192, RoPE base 100000
    with pytest.raises(InfLLMLiteError, match="made for Mistral-7B-Instruct-v0.2 .RoPE base 1e.06"):
        MemoryConfig.preset("infllm-mistral-paper", model.args)
    with pytest.raises(InfLLMLiteError, match="local window of 4096 tokens, beyond this model's native context of 2048"):
        MemoryConfig.preset("infllm-llama3-paper", args(2048, 5e5))
    with pytest.raises(InfLLMLiteError, match="unknown memory preset 'infllm-gpt'; available: infllm-mistral-paper"):
        MemoryConfig.preset("infllm-gpt")


def test_the_cli_takes_a_preset_and_refuses_one_for_another_model(capsys, tiny_folder):
    from infllm_lite.cli import main
    code = main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--attention", "infllm", "--memory-preset", "infllm-llama3-paper"])
    err = capsys.readouterr().err
    assert code == 1 and "memory preset 'infllm-llama3-paper' has a local window of 4096 tokens" in err
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--attention", "full", "--memory-preset", "infllm-llama3-paper"]) == 1
    assert "--memory-preset" in capsys.readouterr().err  # does not apply to full attention
