"""Who ran what: MLflow's own source, user and git tags for a command-line run.

MLflow's run-context providers (``mlflow.tracking.context.registry.resolve_tags``) give the
user, the source and, when the program file sits in a git checkout, its commit, branch and
remote. An installed ``qat-sweep`` lives in a virtual environment, so when the program has no
git checkout the working directory's (the user's project) is used, else this package's
(an editable checkout). The source name is the program (the UI shows a path's last part);
the whole command line, what a reader needs to reproduce a run, is the ``qat.command`` tag.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

GIT_COMMIT_TAG = "mlflow.source.git.commit"
SOURCE_NAME_TAG = "mlflow.source.name"


def command_line(argv: list[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    return shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else ""


def source_tags(argv: list[str] | None = None) -> dict[str, str]:
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    tags = {k: str(v) for k, v in resolve_tags({}).items()}
    for where in (os.getcwd(), str(Path(__file__).resolve().parent)):
        if GIT_COMMIT_TAG in tags:
            break
        for key, value in (("commit", get_git_commit(where)), ("branch", get_git_branch(where)),
                           ("repoURL", get_git_repo_url(where))):
            if value:
                tags[f"mlflow.source.git.{key}"] = value
    argv = list(sys.argv if argv is None else argv)
    if argv:
        tags[SOURCE_NAME_TAG] = Path(argv[0]).name
        tags["qat.command"] = command_line(argv)[:5000]
    return tags
