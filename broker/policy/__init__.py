"""The policy engine: who may delegate, retrieve, renew, inspect or destroy which credential.

Pure — no file, network or clock access (see README.md in this directory).
:func:`load_policy` compiles ``{filename: text}`` into a :class:`PolicySet`;
:func:`evaluate` decides a :class:`Request` against it and an optional
:class:`OwnerPolicy`, returning a :class:`Decision` with a trace.
"""

from __future__ import annotations

from broker.policy._duration import DurationError, format_duration, parse_duration
from broker.policy._enums import Action, AuthMethod, Effect
from broker.policy._evaluate import (
    compile_owner_entries,
    evaluate,
    unsafe_rule_message,
    unsafe_rules,
    validate_owner_policy,
)
from broker.policy._fqan import Fqan, FqanError, parse_fqan
from broker.policy._loader import (
    check_policy_files,
    compile_policy_files,
    format_issues,
    load_policy,
    sort_file_names,
    sort_issues,
)
from broker.policy._model import (
    REASON_ALLOWED,
    REASON_BAD_OWNER,
    REASON_DENY_RULE,
    REASON_JOB_ID,
    REASON_NO_RULE,
    REASON_OWNER,
    Decision,
    OwnerPolicy,
    PolicyIssue,
    PolicySet,
    Request,
    Rule,
    RuleRef,
    TraceEntry,
    validate_dn,
)
from broker.policy._patterns import (
    PatternError,
    Subject,
    TokenClaims,
    compile_linear,
    parse_pattern,
    scope_covers,
)

__all__ = [
    "REASON_ALLOWED",
    "REASON_BAD_OWNER",
    "REASON_DENY_RULE",
    "REASON_JOB_ID",
    "REASON_NO_RULE",
    "REASON_OWNER",
    "Action",
    "AuthMethod",
    "Decision",
    "DurationError",
    "Effect",
    "Fqan",
    "FqanError",
    "OwnerPolicy",
    "PatternError",
    "PolicyIssue",
    "PolicySet",
    "Request",
    "Rule",
    "RuleRef",
    "Subject",
    "TokenClaims",
    "TraceEntry",
    "check_policy_files",
    "compile_linear",
    "compile_owner_entries",
    "compile_policy_files",
    "evaluate",
    "format_duration",
    "format_issues",
    "load_policy",
    "parse_duration",
    "parse_fqan",
    "parse_pattern",
    "scope_covers",
    "sort_file_names",
    "sort_issues",
    "unsafe_rule_message",
    "unsafe_rules",
    "validate_dn",
    "validate_owner_policy",
]
