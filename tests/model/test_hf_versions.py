"""The transformers versions the model supports: declared once, checked at model build."""

import os
import re

import pytest
import transformers

from unigen.model.hf_versions import TRANSFORMERS_REQUIREMENT, check_transformers_version

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def test_declared_requirement_is_the_checked_one():
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    with open(os.path.join(ROOT, "requirements", "test.in")) as f:
        dev = f.read()
    assert re.findall(r'"(transformers[^"]*)"', setup) == [TRANSFORMERS_REQUIREMENT]
    assert re.findall(r"^(transformers\S*)", dev, flags=re.M) == [TRANSFORMERS_REQUIREMENT]


@pytest.mark.parametrize("version", ["5.6.0", "5.24.0", "5.10.0.dev0", transformers.__version__])
def test_supported_versions_pass(version):
    check_transformers_version(version)


@pytest.mark.parametrize("version", ["4.57.1", "4.45.0", "5.0.0", "5.5.4", "6.0.0", "garbage"])
def test_other_versions_fail_naming_both(version):
    with pytest.raises(ImportError, match=re.escape(TRANSFORMERS_REQUIREMENT)):
        check_transformers_version(version)


def test_building_the_model_checks_the_installed_version(monkeypatch):
    from unigen.model import hf_versions
    from unigen.model.config import UniGenConfig
    from unigen.model.unigen_model import UniGen

    monkeypatch.setattr(hf_versions, "_installed_version", lambda: "4.46.3")
    with pytest.raises(ImportError, match="transformers 4.46.3 is installed"):
        UniGen(UniGenConfig.tiny())
