"""The server's log never carries an exception's text (it may hold message or patient data)."""

from __future__ import annotations

import io
import logging

from caducee.app import SafeFormatter


def test_tracebacks_keep_the_place_and_drop_the_text() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test.safe")
    log.addHandler(handler)
    log.propagate = False
    patient = "".join(["2790351", "21518989"])  # an INS, built so that no source line carries it whole
    try:
        raise ValueError(f"cannot parse patient {patient}")
    except ValueError:
        log.error("event=failure ref=ABC", exc_info=True)
    out = stream.getvalue()
    assert "event=failure ref=ABC" in out
    assert "exception=ValueError" in out and "test_logging.py" in out
    assert patient not in out and "cannot parse" not in out


def test_the_time_cached_per_second_is_the_time_logging_would_write() -> None:
    ours = SafeFormatter("%(asctime)s %(message)s")
    reference = logging.Formatter("%(asctime)s %(message)s")
    base = 1_780_000_000.0
    for created in (base + 0.001, base + 0.999, base + 1.0, base + 1.5, base + 3600.25, base + 0.5):
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == reference.format(record)
