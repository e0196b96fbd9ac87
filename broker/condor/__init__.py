"""HTCondor glue: read the starter's job ad, check and augment submit descriptions.

Built on the ``htcondor2``/``classad2`` bindings (the 25.x wheel ships nothing
else); both are imported lazily so that the rest of the broker never pays for
them. See docs/htcondor.md.
"""

from __future__ import annotations

from broker.condor.jobad import JobAd, parse_environment, parse_job_ad, read_job_ad
from broker.condor.submit import (
    AugmentedSubmit,
    augment_submit,
    check_environment_names,
    parse_submit,
    submit_to_schedd,
)

__all__ = [
    "AugmentedSubmit",
    "JobAd",
    "augment_submit",
    "check_environment_names",
    "parse_environment",
    "parse_job_ad",
    "parse_submit",
    "read_job_ad",
    "submit_to_schedd",
]
