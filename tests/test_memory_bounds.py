"""Sizes checked against the memory they imply (incremental.config.memory): the estimates are
lower bounds of what the real code allocates, and the check refuses in one line naming the key,
the bytes and the memory, before any data is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from incremental.config import load_config
from incremental.config.memory import check_memory, readable_bytes, run_memory_needs
from incremental.errors import ConfigError


def config(*sets: str):
    return load_config("digits_b0_5steps", sets)[0]


def need(cfg, key: str) -> int:
    return sum(n.bytes for n in run_memory_needs(cfg) if n.key == key)


def test_ranpac_needs_one_fp64_m_by_m_matrix_in_host_ram():
    cfg = config("strategy={name: ranpac, projection_dim: 3000}")
    assert need(cfg, "strategy.projection_dim") == 8 * 3000 ** 2
    check_memory(cfg, host_bytes=10 ** 9)  # 72 MB of ridge system and a small ViT fit in 1 GB
    with pytest.raises(ConfigError) as refused:
        check_memory(cfg, host_bytes=60 * 10 ** 6)
    assert refused.value.key == "strategy.projection_dim"
    assert str(refused.value).endswith("needs at least 72.0 MB; 60.0 MB host RAM available")
    # on a GPU run the ridge system still lives in host RAM, the model on the GPU
    check_memory(cfg, host_bytes=200 * 10 ** 6, device_bytes=10 ** 9)
    with pytest.raises(ConfigError, match="free on the GPU"):
        check_memory(config("backbone={name: vit, embed_dim: 4096, num_heads: 16}"), host_bytes=10 ** 12,
                     device_bytes=10 ** 9)


def test_the_analytic_methods_need_an_fp64_m_by_m_inverse_per_stream_and_a_block():
    acil = need(config("strategy={name: acil, expansion_size: 3000, rls_batch_size: 100}"), "strategy.expansion_size")
    assert acil == 8 * 3000 ** 2 + 3 * 8 * 3000 * 100
    dsal = need(config("strategy={name: dsal, expansion_size: 3000, rls_batch_size: 100}"), "strategy.expansion_size")
    assert dsal == 2 * 8 * 3000 ** 2 + 3 * 8 * 3000 * 100


def test_ranpacs_reference_precision_needs_half():
    assert need(config("strategy={name: ranpac, projection_dim: 3000, precision: float32}"),
                "strategy.projection_dim") == 4 * 3000 ** 2


def test_the_sum_of_the_needs_is_checked_and_names_the_largest():
    cfg = config("strategy={name: ranpac, projection_dim: 2000}")
    total = sum(n.bytes for n in run_memory_needs(cfg))
    largest = max(run_memory_needs(cfg), key=lambda n: n.bytes)
    with pytest.raises(ConfigError) as refused:
        check_memory(cfg, host_bytes=total - 1)
    assert largest.bytes <= total - 1 and refused.value.key == largest.key
    assert f"need at least {readable_bytes(total)} together" in str(refused.value)


def test_prompt_pools_scale_with_the_pool_and_the_backbone_width():
    small, large = (config(f"strategy={{name: l2p, pool_size: {p}, length: 8}}") for p in (10, 1000))
    assert need(large, "strategy.pool_size") == 100 * need(small, "strategy.pool_size")
    width = small.backbone.config.embed_dim
    assert need(small, "strategy.pool_size") == 10 * 9 * width * 16  # prompts and keys, with grads and AdamW
    coda = config("strategy={name: codaprompt, pool_size: 10000, length: 1024, layers: [0, 1, 2, 3]}")
    with pytest.raises(ConfigError, match=r"^strategy\.pool_size: a pool of 10000 prompt components"):
        check_memory(coda, host_bytes=24 * 10 ** 9)


def test_a_vit_estimate_is_a_lower_bound_of_its_real_parameters():
    """The estimate never exceeds what timm's ViT really holds (else it would refuse runs that fit)."""
    from incremental.models.net import build_model

    cfg = config("backbone={name: vit, embed_dim: 64, depth: 3, num_heads: 4}")
    model = build_model(cfg.backbone, in_chans=1, img_size=32, initial_classes=2)
    real = sum(p.numel() for p in model.backbone.parameters()) * 16  # value, grad, two AdamW moments
    estimate = need(cfg, "backbone.embed_dim")
    assert 0.8 * real <= estimate <= real


def test_the_refusal_comes_before_any_allocation():
    """The issue's case: M = 100,000 was accepted and died in an 80 GB allocation. Under an 8 GB
    address-space limit the run is refused in one line, exit 2, without an allocator error."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30)); "
              "from incremental.cli import main; "
              "sys.exit(main(['check', 'digits_b0_5steps', '--set', 'strategy={name: ranpac, projection_dim: 100000}']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("--set strategy={name: ranpac, projection_dim: 100000}: strategy.projection_dim: ")
    assert "needs at least 80.0 GB" in line and "host RAM available" in line
