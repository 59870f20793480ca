#!/usr/bin/env python
"""Explain a dataset on an already running Ray cluster: the script `ray submit` uploads.

    ray submit cluster/aws.yaml cluster/explain_job.py -- MANIFEST STORE [unioncam run options]
    ray job submit --address http://127.0.0.1:8265 --working-dir cluster -- \
        python explain_job.py MANIFEST STORE [options]

Why it is this small: `ray submit` copies ONLY this file to ``~/explain_job.py`` on the head
node and runs it with the head's ``python``, so it must not import anything next to it. It
imports the installed ``pipeline`` package (the cluster YAML's ``setup_commands`` install the
project on every node) and hands the arguments to ``unioncam run``'s own parser, so the
options, their checks and their one-line errors are exactly the CLI's. ``--address auto`` is
added unless an address is given: the script always joins the cluster it runs on instead of
starting a private Ray instance on the head.

Credentials: never pass them as arguments. `ray submit` puts the arguments on an ``ssh``
command line and ``ray job submit`` stores the entrypoint in the job table and the dashboard,
so a secret there leaks into shell histories, process lists and logs. Storage credentials come
from the node's standard environment (instance role / service account, ``AWS_*`` variables,
``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``); this script refuses ``--storage-option``
keys that look like credentials, and it prints nothing but what ``unioncam run`` prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

#: ``--storage-option`` keys that carry secrets (s3fs ``key``/``secret``/``token``, gcsfs
#: ``token``, generic ``password``...). Matching is on the lower-cased key's words.
CREDENTIAL_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session")

#: gcsfs ``token`` values that select an authentication mode rather than hold a secret.
PUBLIC_TOKEN_MODES = ("anon", "google_default", "cloud")

#: Exit code for a refused command line (the ``unioncam`` CLI's usage-error code).
EXIT_USAGE = 2


def _is_credential_key(key: str) -> bool:
    words = key.lower().replace("-", "_").split("_")
    return any(w.startswith(c) for w in words for c in CREDENTIAL_WORDS)


def _credential_keys(key: str, value: str) -> list[str]:
    """Credential-like key names in one ``KEY=VALUE`` pair, including keys nested in a JSON
    object value (``client_kwargs={"aws_secret_access_key": ...}``)."""
    if _is_credential_key(key):
        # gcsfs' token modes name no secret: token=anon / google_default / cloud.
        if key.lower() == "token" and value in PUBLIC_TOKEN_MODES:
            return []
        return [key]
    try:
        obj = json.loads(value)
    except ValueError:
        return []
    found: list[str] = []
    stack = [(key, obj)]
    while stack:
        prefix, o = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                name = f"{prefix}.{k}"
                if _is_credential_key(str(k)):
                    found.append(name)
                else:
                    stack.append((name, v))
    return sorted(found)


def credential_options(argv: Sequence[str]) -> list[str]:
    """Names of ``--storage-option KEY=VALUE`` keys that look like credentials.

    Only key names are returned, so the caller can report them without echoing values.
    """
    found: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--storage-option" and i + 1 < len(argv):
            pair = argv[i + 1]
            i += 1
        elif arg.startswith("--storage-option="):
            pair = arg.split("=", 1)[1]
        else:
            i += 1
            continue
        i += 1
        key, _, value = pair.partition("=")
        found.extend(_credential_keys(key, value))
    return found


def build_run_argv(argv: Sequence[str]) -> list[str]:
    """The ``unioncam`` argv for these script arguments: ``run ... --address auto``.

    A leading ``run`` is accepted (``explain_job.py run M S`` reads like the CLI). An explicit
    ``--address`` wins, e.g. ``ray://head:10001`` when this script runs off-cluster.
    """
    args = list(argv)
    if args and args[0] == "run":
        args = args[1:]
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    return ["run", *args]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline on the current cluster; returns ``unioncam run``'s exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    secrets = credential_options(args)
    if secrets:
        print(
            f"explain_job: refusing credential storage option(s) {', '.join(secrets)} on the "
            "command line (job arguments end up in logs and the dashboard); provide them "
            "through the node's environment or instance role instead",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        from pipeline import cli
    except ImportError as exc:
        print(
            f"explain_job: the unioncam project is not installed for {sys.executable} ({exc}); "
            "install it on every node (the cluster YAML's setup_commands do: "
            "pip install -e ~/unioncam)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        return int(cli.main(build_run_argv(args)) or 0)
    except SystemExit as exc:  # argparse usage errors and --help
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
