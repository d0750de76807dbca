"""README tables come from `make readme-numbers`: every block the README holds is one it knows."""

from __future__ import annotations

import pytest

from tools.readme_numbers import BLOCKS, README, blocks_in, replace_block


def test_every_readme_block_has_a_recipe_and_markers_pair_up():
    text = README.read_text(encoding="utf-8")
    names = blocks_in(text)
    assert names, "README.md has no generated number blocks"
    assert set(names) <= set(BLOCKS)
    for name in names:
        assert text.count(f"<!-- numbers:{name} -->") == 1
        assert text.count(f"<!-- /numbers:{name} -->") == 1
        body = text.split(f"<!-- numbers:{name} -->")[1].split(f"<!-- /numbers:{name} -->")[0]
        # written by the tool's full rerun, or rendered by its block renderer from the named commands' runs
        assert "Written by `make readme-numbers`" in body or (
            f"Rendered by `tools/readme_numbers.py` (block `{name}`" in body and "summary.json" in body
        )


def test_replace_block_rewrites_only_its_block():
    text = (
        "a\n<!-- numbers:x -->\nold\n<!-- /numbers:x -->\nb\n<!-- numbers:y -->\nkeep\n<!-- /numbers:y -->\n"
    )
    out = replace_block(text, "x", "new | 1")
    assert out == text.replace("old", "new | 1")
    assert replace_block(out, "x", "again") == text.replace("old", "again")
    empty = "<!-- numbers:x -->\n<!-- /numbers:x -->\n"
    assert replace_block(empty, "x", "t") == "<!-- numbers:x -->\nt\n<!-- /numbers:x -->\n"
    with pytest.raises(SystemExit, match="no block"):
        replace_block(text, "z", "")
