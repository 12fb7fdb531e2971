"""accel.select: which stages a run takes, from its device, whether its method is compiled, and
train.method_implementation (u2pl_scale/accel/__init__.py)."""
import pytest

from u2pl_scale import accel
from u2pl_scale.config import ConfigError, load_config
from u2pl_scale.method.stages import REFERENCE


@pytest.mark.parametrize("device, compiled, implementation, expected", [
    ("cpu", False, "auto", "cpu"), ("cpu", True, "auto", "reference"), ("cpu", False, "reference", "reference"),
    ("cuda", False, "auto", "cuda"), ("cuda", True, "auto", "cuda-compiled"), ("cuda", False, "reference", "reference"),
    ("meta", False, "auto", "reference"),
])
def test_the_stages_follow_device_compilation_and_setting(device, compiled, implementation, expected):
    stages = accel.select(device, compiled=compiled, implementation=implementation)
    assert stages.name == expected
    if expected == "reference":
        assert stages is REFERENCE
    if expected == "cuda-compiled":  # the reference but for the queue write's row copy
        assert stages.percentiles_and_count is REFERENCE.percentiles_and_count
        assert stages.queue_write is not REFERENCE.queue_write


def test_each_cpu_selection_owns_its_buffers():
    first, second = accel.select("cpu"), accel.select("cpu")
    assert first.scaled_ce_sum.keywords["pool"] is not second.scaled_ce_sum.keywords["pool"]


def test_an_unknown_implementation_is_refused_by_the_config_and_by_select():
    with pytest.raises(ConfigError, match="train.method_implementation"):
        load_config(None, ["train.method_implementation=fast"])
    with pytest.raises(ValueError, match="fast"):
        accel.select("cpu", implementation="fast")
