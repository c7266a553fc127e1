"""The attention_kernel option resolved once into a kernel object (attention/kernels.py):
every option value names its kernel, a bad one is refused listing them, and a kernel
object is taken as is, giving the same tokens as its name."""

import pytest
import torch

from infllm_lite import InfLLMLiteError, MemoryConfig, generate_ids
from infllm_lite.attention import kernel_name, make_attention_state
from infllm_lite.attention.kernels import DenseKernel, FlexKernel, WindowKernel, make_kernel
from infllm_lite.options import ATTENTION_KERNELS


@pytest.mark.parametrize("name", [k for k in ATTENTION_KERNELS if k != "auto"])
def test_every_option_value_names_its_kernel(name):
    kernel = make_kernel(name, "cpu")
    assert kernel.name == name and kernel_name(name, "cpu") == name
    assert kernel.compiled == (name in ("flex", "window"))


def test_auto_and_the_triton_scores_follow_the_device():
    assert isinstance(make_kernel("auto", "cpu"), WindowKernel)
    on_cuda = make_kernel("auto", "cuda")
    assert isinstance(on_cuda, FlexKernel) and on_cuda.compiled and on_cuda.triton_scores
    assert not make_kernel("flex", "cpu").triton_scores
    assert isinstance(make_kernel("torch", "cpu"), DenseKernel)


def test_a_bad_kernel_is_refused_in_every_mode(tiny):
    model, _ = tiny
    for mode in ("full", "streaming", "infllm"):
        with pytest.raises(InfLLMLiteError, match="unknown attention kernel 'fast'; available: auto, flex"):
            make_attention_state(mode, model.args, capacity=8, kernel="fast")


def test_a_kernel_object_is_taken_as_is(tiny):
    model, _ = tiny
    kernel = WindowKernel(compiled=False)
    memory = MemoryConfig(n_init=4, n_local=64, block_size=16, topk=2, exc_block_size=32, max_cached_blocks=4)
    state = make_attention_state("infllm", model.args, capacity=8, memory=memory, kernel=kernel)
    assert state.kernel is kernel
    state.close()
    ids = torch.randint(0, model.args.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    run = dict(attention="infllm", memory=memory, max_new_tokens=6)
    by_name = list(generate_ids(model, ids, attention_kernel="window-eager", **run))
    assert list(generate_ids(model, ids, attention_kernel=kernel, **run)) == by_name
