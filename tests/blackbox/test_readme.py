"""The README walkthrough "send and read your first message", run as written (ports adapted)."""

from __future__ import annotations

import re
import time
import shlex
import subprocess
import sys
from pathlib import Path

from mailserver.testing import ServerProcess

README = Path(__file__).resolve().parents[2] / "README.md"


def _blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Send and read your first message", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def test_readme_walkthrough(tmp_path: Path, tools: None) -> None:
    blocks = _blocks()
    assert len(blocks) == 4
    server = ServerProcess.create(tmp_path / "var")
    with server:
        outputs = []
        for block in blocks:
            script = (block.replace(":5465", f":{server.port('submissions')}")
                      .replace(":1993", f":{server.port('imaps')}")
                      .replace(".venv/bin/caducee", f"{shlex.quote(sys.executable)} -m caducee"))
            r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, (script, r.stdout, r.stderr)
            outputs.append(r.stdout)
            if "--mail-rcpt" in script:
                time.sleep(0.5)  # let the delivery worker place it
    search, fetch = outputs[2].split("\n", 1)[0], outputs[2]
    assert "* SEARCH 1" in search
    assert "Subject: Premier message" in fetch and "Bonjour Louis" in fetch
    assert "submit" in outputs[3] and "deliver" in outputs[3] and "read" in outputs[3]
    assert "audit trail intact" in outputs[3]



