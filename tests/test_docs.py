"""The README and docs/ agree with the tree: every relative link resolves, and no committed file holds a machine's
absolute path (results files record repository-relative paths: examples/run_record.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|Users)/\S+")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_no_committed_document_holds_a_machine_path():
    files = [*PAGES, *sorted((ROOT / "docs").rglob("*.json"))]
    found = {str(f.relative_to(ROOT)): MACHINE_PATH.findall(f.read_text(encoding="utf-8")) for f in files}
    found = {name: paths[:3] for name, paths in found.items() if paths}
    assert not found, f"absolute machine paths in committed files: {found}"


def test_recorded_arguments_are_portable():
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    from run_record import portable

    assert portable(str(ROOT / "examples" / "data" / "train.txt")) == "examples/data/train.txt"
    assert portable("/somewhere/else/model") == "model"
    # an installed package's data (inside or outside the checkout's venv): from the package's name on
    assert portable(str(ROOT / ".venv/lib/python3.11/site-packages/pkg/model")) == "pkg/model"
    assert portable("/usr/lib/python3/site-packages/pkg/model") == "pkg/model"
    assert portable({"a": ["gpt2", 3, None]}) == {"a": ["gpt2", 3, None]}


def test_readme_shows_the_convert_command_and_its_flags_exist():
    """The README's convert section right after the Quickstart; every flag it uses is one `convert --help` lists."""
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    assert sections[sections.index("Quickstart") + 1].startswith("Convert your own model: `hf-merged-attn convert`")
    section = readme.split("## Convert your own model", 1)[1].split("\n## ", 1)[0]
    assert "hf-merged-attn inspect" in section and "[6/6] saved" in section  # the stand-in's real output is pasted
    flags = set(re.findall(r"(?<![\w-])--[a-z_]+", section)) - {"--help"}
    assert {"--model_name_or_path", "--kv_budget", "--output_dir", "--push_to_hub", "--hub_model_id"} <= flags
    help_text = subprocess.run([sys.executable, "-m", "hf_merged_attn", "convert", "--help"], capture_output=True,
                               text=True, check=True, cwd=ROOT).stdout
    listed = set(re.findall(r"(?<![\w-])--[a-z_]+", help_text))
    assert flags <= listed, f"README flags missing from convert --help: {sorted(flags - listed)}"
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    assert "hf-merged-attn = hf_merged_attn.cli:main" in setup  # the console script


def test_the_readme_is_one_page_and_its_results_live_in_docs():
    """#38: the README stays within 260 lines; every result page it names opens with the command that made it, and the
    convert command's full output lives in docs/usage.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 260
    usage = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    convert = usage.split("## Converting a model", 1)[1]
    assert "[0/6] arguments checked" in convert and "[6/6] saved" in convert and "Every step is a library function" in convert
    for page in ("real_weights.md", "speed.md", "rotary.md", "domains.md", "exact_rope_smollm2.md"):
        assert f"(docs/{page}" in readme, page
        assert (ROOT / "docs" / page).exists(), page
