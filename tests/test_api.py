"""The public API is FORMULAS.md's: names, signatures and defaults; and the README's demo runs."""

import inspect
import pathlib
import subprocess
import sys

import pytest

import fastkd
from fastkd import functional

# The signatures FORMULAS.md gives, verbatim (module constructors and call signatures).
CONTRACT = {
    fastkd.PairwiseAffinityLoss: '(patch=1, pool="avg", pool_scale=None, window=None, eps=1e-8, '
                                 'detach_norm=False, reduction="mean", backend="auto")',
    fastkd.AffinityDistillationLoss: '(eps=1e-8, reduction="mean", backend="auto")',
    fastkd.ConsistencyLoss: '(border="valid", dilation=1, reduction="mean", backend="auto")',
    fastkd.ProbabilityLoss: '(reduction="mean", backend="auto")',
    fastkd.PixelwiseKDLoss: '(temperature=1.0, reduction="mean", backend="auto")',
    fastkd.FeatureAutoencoder: "(in_channels, latent_channels, strides=(1,1,2))",
    fastkd.FeatureAdapter: "(in_channels, out_channels)",
    fastkd.AdaptationLoss: "(p=1, q=2, eps=1e-8)",
    fastkd.HolisticDiscriminator: "(num_classes, image_channels=3, base_channels=64, blocks=4, attention=2)",
    fastkd.holistic_d_loss: "(D, fake, real, image=None, gp_weight=10.0)",
    fastkd.holistic_g_loss: "(D, fake, image=None)",
    fastkd.pseudo_labels: "(t_logits, threshold=0.7, ignore_index=255)",
}
CALLS = {
    fastkd.PairwiseAffinityLoss: "(s, t)",
    fastkd.AffinityDistillationLoss: "(s, t)",
    fastkd.ConsistencyLoss: "(s, t)",
    fastkd.ProbabilityLoss: "(s_logits, t_logits, mask=None)",
    fastkd.PixelwiseKDLoss: "(s_logits, t_logits, mask=None)",
    fastkd.AdaptationLoss: "(adapted_s, encoded_t)",
}


def parameters(text):
    """'(a, b=1)' -> [('a', None), ('b', 1)]: the signature text parsed as a lambda's."""
    return actual(eval(f"lambda {text[1:-1]}: None"))  # noqa: S307 (the literal strings above)


def actual(function):
    """[(name, default or None)] of the positional parameters."""
    return [(p.name, None if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(function).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("obj", CONTRACT, ids=lambda o: o.__name__)
def test_signature_is_the_contracts(obj):
    assert actual(obj) == parameters(CONTRACT[obj])


@pytest.mark.parametrize("module", CALLS, ids=lambda o: o.__name__)
def test_call_signature_is_the_contracts(module):
    assert actual(module.forward)[1:] == parameters(CALLS[module])  # [1:] drops self


def test_functional_has_a_function_per_loss_with_the_modules_parameters():
    pairs = {
        functional.pairwise_affinity_loss: (fastkd.PairwiseAffinityLoss, ["s", "t"]),
        functional.affinity_distillation_loss: (fastkd.AffinityDistillationLoss, ["s", "t"]),
        functional.consistency_loss: (fastkd.ConsistencyLoss, ["s", "t"]),
        functional.probability_loss: (fastkd.ProbabilityLoss, ["s_logits", "t_logits", "mask"]),
        functional.pixelwise_kd_loss: (fastkd.PixelwiseKDLoss, ["s_logits", "t_logits", "mask"]),
        functional.adaptation_loss: (fastkd.AdaptationLoss, ["adapted_s", "encoded_t"]),
    }
    for function, (module, inputs) in pairs.items():
        names = [name for name, _ in actual(function)]
        assert names == inputs + [name for name, _ in actual(module.__init__)[1:]], function.__name__
        assert any(paper in function.__doc__ for paper in ("Liu et al.", "He et al.", "Xie et al.")), function
    for name in ("holistic_d_loss", "holistic_g_loss", "pseudo_labels"):
        assert getattr(functional, name) is getattr(fastkd, name)


def test_quickstart_demo_runs(tmp_path):
    """The README's install-and-run command ends with this script."""
    script = pathlib.Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" loss ") == 6 and "nan" not in result.stdout.lower(), result.stdout
