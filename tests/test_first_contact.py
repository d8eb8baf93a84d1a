"""What a new user meets first, off the GPU: crashes that end in one message, launchers, the first runs of a
small corpus (issue "Run where users run", items 10-19)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT, child_env


def test_a_crash_while_readers_are_open_prints_no_shutdown_tracebacks(tmp_path):
    """A reader suspended in a crashing frame is closed at interpreter shutdown, when nothing can be imported: its
    GeneratorExit must not print "Exception ignored in: <generator ...>" screens under the real error."""
    data = tmp_path / "docs.txt"
    data.write_text("one\ntwo\nthree\n" * 20)
    script = textwrap.dedent("""
        from dapt.formats import READERS, FormatOptions
        from dapt.sources import Position

        def run():
            readers = [READERS[f](%r, Position(), FormatOptions()) for f in ("lines", "docs", "lines")]
            for r in readers:
                next(r)
            raise RuntimeError("the real error")

        run()
    """) % str(data)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=child_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert "RuntimeError: the real error" in proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
