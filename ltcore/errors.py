"""Finding what went wrong inside Ray: the error a task or worker raised, under Ray's wrappers."""

from __future__ import annotations


def root_cause(err: BaseException) -> BaseException:
    """The innermost error: what a Ray Data task or Ray Train worker raised, not Ray's wrappers around it.

    Follows ``__cause__``, Ray's ``cause`` (task errors), Ray Train's ``controller_failure`` and the first of its
    ``worker_failures``; stops at the first error without one.
    """
    seen: set[int] = set()
    e: BaseException = err
    while id(e) not in seen:
        seen.add(id(e))
        nxt = getattr(e, "controller_failure", None) or e.__cause__ or getattr(e, "cause", None)
        errors = getattr(e, "worker_failures", None) or getattr(e, "errors", None)
        if nxt is None and isinstance(errors, dict) and errors:
            nxt = next(iter(errors.values()))
        if not isinstance(nxt, BaseException):
            break
        e = nxt
    return e
