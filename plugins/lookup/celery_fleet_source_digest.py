"""celery_fleet_source_digest: the digest of a release's sources, computed on the controller in the play's own process.

The digest itself is build_wheelhouse.py's (source_digest), loaded from the path given: the builder stays the one
place that defines it, and the playbooks get it without a module run on localhost (a fork, a Python start and the
builder's imports, twice per site.yml).
"""

from __future__ import annotations

import importlib.util

from ansible.errors import AnsibleLookupError
from ansible.plugins.lookup import LookupBase

DOCUMENTATION = r"""
name: celery_fleet_source_digest
short_description: sha256 of an application's sources, its lock and its local wheels (build_wheelhouse.py's digest)
description:
  - Loads C(source_digest) from the builder script given and returns its digest of the sources, as the builder's
    C(--digest) prints it.
options:
  _terms:
    description: The application's source directory, on the controller.
    required: true
  builder:
    description: Path of build_wheelhouse.py.
    required: true
  lock:
    description: Path of the lock file.
    required: true
  find_links:
    description: Directories of local wheels (their names and contents count).
    type: list
    elements: str
    default: []
"""

RETURN = r"""
_raw:
  description: One hex digest.
  type: list
  elements: str
"""

_BUILDERS = {}


def load_builder(path):
    """The builder script as a module (once per path and process)."""
    if path not in _BUILDERS:
        spec = importlib.util.spec_from_file_location("celery_fleet_build_wheelhouse", path)
        if spec is None or spec.loader is None:
            raise AnsibleLookupError(f"celery_fleet_source_digest: cannot load the builder {path}")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except OSError as error:
            raise AnsibleLookupError(f"celery_fleet_source_digest: cannot load the builder {path}: {error}") from error
        _BUILDERS[path] = module
    return _BUILDERS[path]


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        self.set_options(var_options=variables, direct=kwargs)
        if len(terms) != 1:
            raise AnsibleLookupError("celery_fleet_source_digest takes one source directory")
        builder = load_builder(self.get_option("builder"))
        try:
            return [builder.source_digest(str(terms[0]), self.get_option("lock"), self.get_option("find_links"))]
        except SystemExit as error:  # the builder's own errors (a --find-links directory that is not one)
            raise AnsibleLookupError(str(error)) from None
        except OSError as error:
            raise AnsibleLookupError(f"celery_fleet_source_digest: {error}") from error
