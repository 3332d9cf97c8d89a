"""``openldm serve``: the web UI's HTTP API (``/sdapi/v1``) and a job queue over one loaded model.

:mod:`~openldm.server.store` keeps the queue in SQLite (jobs survive a restart), :mod:`~openldm.server.
worker` runs them one at a time through the same options object and pipelines as the command line,
:mod:`~openldm.server.requests` turns the web UI's request shapes into those options, and
:mod:`~openldm.server.app` is the FastAPI application.
"""
