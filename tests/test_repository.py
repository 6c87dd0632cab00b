"""The README stands alone: it links only to files of the repository, which exist,
and the system packages it names are those the one install script installs."""

from __future__ import annotations

import re
import subprocess

from support import ROOT

README = (ROOT / "README.md").read_text()


def test_the_readme_links_only_to_files_of_the_repository() -> None:
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets
    for target in targets:
        if target.startswith("#"):
            continue
        assert "://" not in target, f"{target}: the README links to files of the repository"
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{target} is outside the repository"
        assert path.exists(), f"{target} does not exist"


def test_one_script_installs_the_system_packages_the_readme_names() -> None:
    listed = subprocess.run(
        [str(ROOT / "scripts" / "install-system-deps"), "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {"redis-tools", "iproute2", "nftables", "iputils-ping", "prometheus"} <= set(listed)
    tests_section = README[README.index("## Tests") :]
    for package in listed:
        assert f"`{package}`" in tests_section, f"the README's Tests section omits {package}"
    assert "scripts/install-system-deps" in (ROOT / ".ci" / "run").read_text()
