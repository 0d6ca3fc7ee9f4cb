"""The remote code shipped with an export is generated from the package and cannot drift from it."""

from __future__ import annotations

import ast
import hashlib
import json

import pytest
import torch

from mks2.export import export_model
from mks2.export.bundle import BundleError, bundle_sources, module_path, rewrite_imports
from tests.export.export_helpers import run_config, tiny_model


class _DropImports(ast.NodeTransformer):
    """Remove import statements: what remains must be identical."""

    def visit_Import(self, node):
        return None

    def visit_ImportFrom(self, node):
        return None


def _code_without_imports(text: str) -> str:
    return ast.dump(_DropImports().visit(ast.parse(text)))


def test_bundle_is_the_package_code_with_only_imports_rewritten():
    files = bundle_sources()
    assert {"configuration_mks2.py", "modeling_mks2.py", "mks2_model_modeling.py", "mks2_model_decoder.py",
            "mks2_model_mome.py", "mks2_model_vision.py", "mks2_config_schema.py"} <= set(files)  # fmt: skip
    assert "mks2_config_loader.py" not in files  # the schema alone: exported models need no omegaconf
    for name, item in files.items():
        source = module_path(item.module).read_text()
        assert item.source_sha256 == hashlib.sha256(module_path(item.module).read_bytes()).hexdigest()
        header, body = item.text.split("\n", 2)[:2], item.text.split("\n", 2)[2]
        assert item.source_sha256 in header[0], name
        assert body == rewrite_imports(source, name)[0], name
        assert _code_without_imports(body) == _code_without_imports(source), f"{name}: more than imports changed"
        tree = ast.parse(body)
        for node in ast.walk(tree):  # nothing of the package is imported any more
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in ("mks2", "mks2_kernels"), (name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] not in ("mks2", "mks2_kernels") for a in node.names), name


def test_exported_files_carry_the_current_package_hashes(tmp_path):
    cfg = run_config("model.stage=mome")
    export_model(tiny_model(cfg), cfg, tmp_path / "out", verify=False, progress=False)
    manifest = json.loads((tmp_path / "out" / "mks2_export.json").read_text())
    assert manifest["bundle"], "mks2 format must bundle its code"
    for name, entry in manifest["bundle"].items():
        item = bundle_sources()[name]
        assert entry["sha256"] == item.source_sha256
        assert (tmp_path / "out" / name).read_text() == item.text


@pytest.mark.parametrize(
    "source, message",
    [
        ("import mks2.config\n", "is not supported"),
        ("from . import x\n", "relative imports"),
        ("from mks2 import config\n", "only supported for"),
        ("x = 1; from mks2.config import Stage\n", "alone on its line"),
        ("from omegaconf import OmegaConf\n", "omegaconf, which an exported model must not need"),
        ("import deepspeed\n", "deepspeed, which an exported model must not need"),
    ],
)
def test_unsupported_import_forms_fail_at_export_time(source, message):
    with pytest.raises(BundleError, match=message):
        rewrite_imports(source, "demo.py")


def test_rewrite_examples():
    text, needed = rewrite_imports(
        "def f():\n    from mks2.model.layers import (\n        Linear,\n        RMSNorm as N,\n    )\n    return 1\n",
        "demo.py",
    )
    assert text == "def f():\n    from .mks2_model_layers import Linear, RMSNorm as N\n    return 1\n"
    assert needed == ["mks2.model.layers"]
    text, needed = rewrite_imports("from mks2 import ops\n", "demo.py")
    assert text == "from .mks2_export_remote_ops_reference import ops\n"
    assert needed == ["mks2.export.remote.ops_reference"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts", [2, 3])
def test_exported_mixing_without_autograd_equals_the_kernels_reference(dtype, experts):
    """generate() runs the export's op-lean mixing (no autograd); it computes the reference's formula."""
    from mks2_kernels.reference import forward as reference_forward

    from mks2.export.remote.ops_reference import mome_mix

    gen = torch.Generator().manual_seed(experts)
    x = torch.randn(3, 5, 16, generator=gen).to(dtype)
    w = torch.randn(experts, 16, generator=gen).to(dtype)
    y = torch.randn(experts, 3, 5, 16, generator=gen).to(dtype)
    want, want_gates = reference_forward(x.reshape(-1, 16), w, y.reshape(experts, -1, 16))
    with torch.no_grad():
        got, gates = mome_mix(x, w, y, return_gates=True)
    assert got.dtype == dtype and gates.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(gates.reshape(-1, experts), want_gates, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.reshape(-1, 16).float(), want.float(), rtol=tol, atol=tol)
    with torch.enable_grad():  # with autograd: the reference itself
        xg = x.float().requires_grad_()
        out = mome_mix(xg, w.float(), y.float())
        out.sum().backward()
    assert xg.grad is not None
