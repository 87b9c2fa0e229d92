"""The README's variants table is generated from the registry and kept in sync."""

import subprocess
import sys
from pathlib import Path

import plugin

ROOT = Path(__file__).resolve().parents[2]


def test_readme_variants_table_matches_the_registry():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "variants_table.py"), "--check",
                           str(ROOT / "README.md")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_table_lists_every_registered_variant_with_its_parameters():
    sys.path.insert(0, str(ROOT / "scripts"))
    from variants_table import table

    text = table()
    for name, variant in plugin.variants().items():
        assert f"`{name}`" in text
        for p in variant.params:
            assert f"`{p.name}`" in text
