"""Every kernel in shaders/*.metal has a conformance test.

A conformance test module is tests/metal/test_msl_<family>.py; its module-level ``KERNELS`` lists the kernel
host names it runs in the MSL simulator. The union of those lists must cover every kernel (including every
template instantiation) that the simulator finds in the shaders, and name no kernel that does not exist.
"""

import importlib.util
from pathlib import Path

import pytest

from tests.mslsim import compile_metal

ROOT = Path(__file__).resolve().parents[2]
SHADERS = sorted((ROOT / "shaders").glob("*.metal"))
TEST_MODULES = sorted(Path(__file__).resolve().parent.glob("test_msl_*.py"))


def listed_kernels() -> dict[str, set[str]]:
    """KERNELS of every conformance test module, by module file name."""
    listed = {}
    for path in TEST_MODULES:
        spec = importlib.util.spec_from_file_location(f"kernel_coverage_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        kernels = getattr(module, "KERNELS", None)
        assert isinstance(kernels, list) and kernels, f"{path.name} must define a non-empty KERNELS: list[str]"
        listed[path.name] = set(kernels)
    return listed


@pytest.fixture(scope="module")
def shader_kernels() -> dict[str, list[str]]:
    assert SHADERS, "shaders/ has no .metal files"
    return {path.name: compile_metal(path).kernel_names for path in SHADERS}


def test_every_shader_kernel_has_a_conformance_test(shader_kernels):
    covered = set().union(*listed_kernels().values())
    missing = {name: sorted(set(kernels) - covered) for name, kernels in shader_kernels.items()}
    missing = {name: kernels for name, kernels in missing.items() if kernels}
    assert not missing, f"kernels without a conformance test (add them to KERNELS of a test_msl_*.py): {missing}"


def test_conformance_tests_name_existing_kernels(shader_kernels):
    existing = set().union(*map(set, shader_kernels.values()))
    unknown = {name: sorted(kernels - existing) for name, kernels in listed_kernels().items()}
    unknown = {name: kernels for name, kernels in unknown.items() if kernels}
    assert not unknown, f"KERNELS entries that no shader defines: {unknown}"
