"""A payload that cannot be started as the mapped account gets a sentence, in both modes.

Mode setuid learns it from exec in the child; mode sudo from the helper's second line
in the wrapper's FIFO (believed only when the helper's status is the code it names).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from payload_wrapper import api
from tests.payload_wrapper.test_wrapper_containment import (
    audit_lines,
    helper_script,
    state_dir,  # noqa: F401 - fixture
    sudo_shim,
)

from .conftest import JobPlace, needs_root

pytestmark = [pytest.mark.root, needs_root]


@pytest.mark.parametrize("mode", ["setuid", "sudo"])
def test_exec_failures_name_the_account_and_the_reason(
    place: JobPlace,
    make_account: Callable[[str], str],
    state_dir: Path,  # noqa: F811
    mode: str,
) -> None:
    account = make_account(f"pwexec{mode[:2]}")
    extra: dict[str, object] = {}
    if mode == "sudo":
        extra = {"sudo": str(sudo_shim(place)), "sudo_helper": str(helper_script(place))}
    settings = place.settings(
        mode=mode, account=account, state_dir=state_dir, containment="session", **extra
    )
    private = place.script("private.sh", "#!/bin/sh\nexit 0\n")
    private.chmod(0o700)  # root's: the mapped account may not run it
    cases = [
        (str(private), 126, "Permission denied"),
        ("/nonexistent/payload", 127, "No such file or directory"),
    ]
    for n, (command, code, why) in enumerate(cases):
        assert api.run_payload(settings, place.proxy, [command], job_id=f"x{n}") == code
        reason = audit_lines(place)[-1]["reason"]
        assert reason == f"the mapped account {account} cannot execute {command}: {why}"
    # the payload's own 127 is the payload's: no sentence
    assert (
        api.run_payload(settings, place.proxy, ["/bin/sh", "-c", "exit 127"], job_id="own") == 127
    )
    assert audit_lines(place)[-1]["reason"] is None
