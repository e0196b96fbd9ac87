"""The environment builder: nothing inherited, refused names never pass."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payload_wrapper.environment import (
    REFUSED_NAMES,
    REFUSED_PREFIXES,
    PayloadPaths,
    build_environment,
    is_refused,
)
from payload_wrapper.errors import EXIT_CLIENT, ClientError

PATHS = PayloadPaths(
    user="nobody",
    home="/w/job-1/home",
    tmpdir="/w/job-1/tmp",
    egg_cache="/tmp/payload-eggs-x",
    proxy="/w/job-1/proxy/x509up",
    ca_dir="/ca",
    vomsdir="/voms",
    path="/usr/bin:/bin",
    job_id="1",
)

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
refused = st.one_of(
    st.sampled_from(sorted(REFUSED_NAMES)),
    st.builds(
        lambda p, rest: p + rest,
        st.sampled_from(REFUSED_PREFIXES),
        st.from_regex(r"[A-Z0-9_]{0,10}", fullmatch=True),
    ),
)


def test_nothing_is_inherited() -> None:
    caller = {"LD_PRELOAD": "/nonexistent.so", "MALLOC_CHECK_": "3", "SECRET": "x", "LANG": "C"}
    env = build_environment(PATHS, caller_env=caller)
    assert set(env) == {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "PYTHON_EGG_CACHE",
        "X509_USER_PROXY",
        "X509_CERT_DIR",
        "X509_VOMS_DIR",
        "PAYLOAD_WRAPPER_JOB_ID",
    }
    assert env["HOME"] == PATHS.home and env["X509_USER_PROXY"] == PATHS.proxy


def test_keep_and_set() -> None:
    env = build_environment(
        PATHS,
        caller_env={"LANG": "C.UTF-8"},
        keep=["LANG", "ABSENT"],
        set_=[("SITE", "a b; $(rm -rf /)")],
    )
    assert env["LANG"] == "C.UTF-8"
    assert "ABSENT" not in env
    assert env["SITE"] == "a b; $(rm -rf /)"  # a value, passed verbatim to execve


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "MALLOC_CHECK_",
        "PYTHONPATH",
        "BASH_ENV",
        "ld_library_path",
        "IFS",
        "NODE_OPTIONS",
        "BASH_FUNC_x%%",
    ],
)
def test_refused_names_fail_with_201(name: str) -> None:
    with pytest.raises(ClientError) as info:
        build_environment(PATHS, caller_env={name: "x"}, keep=[name])
    assert info.value.exit_code == EXIT_CLIENT
    assert name in info.value.message


@pytest.mark.parametrize("name", ["HOME", "X509_USER_PROXY", "PATH", "TMPDIR"])
def test_reserved_names_cannot_be_overridden(name: str) -> None:
    with pytest.raises(ClientError, match="sets this variable itself"):
        build_environment(PATHS, caller_env={}, set_=[(name, "/elsewhere")])


@given(
    caller=st.dictionaries(
        st.one_of(names, refused), st.text(max_size=20).filter(lambda v: "\x00" not in v)
    ),
    keep=st.lists(st.one_of(names, refused), max_size=8),
    sets=st.lists(
        st.tuples(
            st.one_of(names, refused), st.text(max_size=10).filter(lambda v: "\x00" not in v)
        ),
        max_size=8,
    ),
)
def test_no_refused_name_ever_survives(
    caller: dict[str, str], keep: list[str], sets: list[tuple[str, str]]
) -> None:
    try:
        env = build_environment(PATHS, caller_env=caller, keep=keep, set_=sets)
    except ClientError:
        return  # refused requests fail the job; that is allowed
    assert not [k for k in env if is_refused(k)]
    assert not [k for k in env if k.upper().startswith(("LD_", "MALLOC_"))]
    # only asked-for names (plus the wrapper's own) appear
    asked = set(keep) | {k for k, _ in sets}
    assert set(env) <= asked | {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "PYTHON_EGG_CACHE",
        "X509_USER_PROXY",
        "X509_CERT_DIR",
        "X509_VOMS_DIR",
        "PAYLOAD_WRAPPER_JOB_ID",
    }


@given(name=refused)
def test_every_refused_request_is_a_client_error(name: str) -> None:
    with pytest.raises(ClientError):
        build_environment(PATHS, caller_env={name: "1"}, keep=[name])
    with pytest.raises(ClientError):
        build_environment(PATHS, caller_env={}, set_=[(name, "1")])
