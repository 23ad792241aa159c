"""docs/numerics.md#scaling: batch size, horizon, LR and WD transfer from d12 (the derived-values table)."""

import pytest

from nanochat_jax import scaling
from nanochat_jax.config import Dial, config_for_depth

# depth: (B, steps@12, steps@8, LR scale, Muon WD, Muon LR, dmodel scale)  — upstream's derived-values table
TABLE = {
    12: (524288, 2520, 1680, 1.0, 0.28, 0.02, 1.0),
    16: (524288, 5376, 3584, 1.0, 0.131, 0.02, 0.866),
    20: (1048576, 4980, 3320, 1.414, 0.100, 0.0283, 0.775),
    24: (1048576, 8352, 5568, 1.414, 0.0597, 0.0283, 0.707),
    26: (1048576, 10510, 7007, 1.414, 0.0475, 0.0283, 0.679),
    32: (2097152, 9600, 6400, 2.0, 0.0368, 0.04, 0.612),
}


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_derived_values_match_spec_table(depth):
    B, steps12, steps8, lr_scale, wd, muon_lr, dmodel = TABLE[depth]
    dial = Dial(depth)
    cfg = dial.config
    assert scaling.auto_total_batch_size(dial) == B
    assert scaling.auto_total_batch_size(dial, param_data_ratio=8) == B  # B depends only on depth
    assert scaling.num_iterations(cfg, B) == steps12
    assert scaling.num_iterations(cfg, B, param_data_ratio=8) == steps8
    assert scaling.batch_lr_scale(B) == pytest.approx(lr_scale, abs=1e-3)
    assert scaling.scaled_weight_decay(dial, B) == pytest.approx(wd, rel=5e-3)
    assert 0.02 * scaling.batch_lr_scale(B) == pytest.approx(muon_lr, rel=2e-3)
    assert scaling.dmodel_lr_scale(cfg) == pytest.approx(dmodel, abs=1e-3)


def test_horizon_precedence():
    cfg = config_for_depth(12)
    assert scaling.num_iterations(cfg, 2**19, num_iterations=77, target_flops=1e18) == 77
    flops_per_step = 759_696_048 * 2**19
    assert scaling.num_iterations(cfg, 2**19, target_flops=100 * flops_per_step) == 100
    with pytest.raises(ValueError, match="no training horizon"):
        scaling.num_iterations(cfg, 2**19, param_data_ratio=-1)


def test_weight_decay_uses_ratio_horizon_and_scales_with_batch():
    dial = Dial(24)
    # twice the batch: sqrt(2) more decay; the d12 reference at B_REF gets exactly the base value
    assert scaling.scaled_weight_decay(dial, 2**21) / scaling.scaled_weight_decay(dial, 2**20) == pytest.approx(2**0.5)
    assert scaling.scaled_weight_decay(Dial(12), 2**19, 0.28) == pytest.approx(0.28)
