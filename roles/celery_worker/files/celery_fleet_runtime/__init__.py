"""celery-fleet's runtime: the operator's Celery app, with the fleet's delivery, transport and result settings.

Every worker and every client the fleet runs names ``celery_fleet_runtime:app`` as its app. Importing that
attribute imports the operator's app (``CELERY_FLEET_APP``: ``module`` or ``module:attribute``, found the way
``celery --app`` finds one) and applies the settings the fleet owns on top of whatever the app configured:
late acknowledgement, requeue on a lost worker process, the broker and result URLs, kombu's transport options
(the visibility timeout above the fleet's longest hard time limit, the socket timeouts) and result expiry.
Everything else (routes, serializers, task modules, beat schedule) stays the app's.

The role installs this package outside the releases (root's, on PYTHONPATH through the environment file), so
that every release, an older one a failed roll goes back to included, runs with the same guarantees.
Standard library and Celery's public API only: it runs with whatever Celery a release pins.
"""

import importlib
import json
import os
import sys

APP_VARIABLE = "CELERY_FLEET_APP"

# Task attributes the fleet's guarantees rest on, with the setting each is bound from at finalize.
GUARANTEED_TASK_OPTIONS = {"acks_late": "task_acks_late", "reject_on_worker_lost": "task_reject_on_worker_lost"}

# What the fleet found when it applied its settings to each app: {id(app): {...}} (the check reports it).
APPLIED = {}


def _flag(environ, name, default):
    value = environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def fleet_settings(environ=None):
    """The settings the fleet owns, from the environment file the role writes. Unset variables leave the
    app's own value, except the delivery guarantees, which default to on."""
    environ = os.environ if environ is None else environ
    settings = {
        "task_acks_late": _flag(environ, "CELERY_TASK_ACKS_LATE", True),
        "task_reject_on_worker_lost": _flag(environ, "CELERY_TASK_REJECT_ON_WORKER_LOST", True),
        # A worker started while the broker restarts waits for it instead of exiting.
        "broker_connection_retry_on_startup": True,
    }
    if environ.get("CELERY_FLEET_TASK_EVENTS", "").strip():
        # Task events for the fleet's monitor (Flower): workers send them, and so does every client through the
        # runtime on publishing (task-sent).
        events = _flag(environ, "CELERY_FLEET_TASK_EVENTS", False)
        settings["worker_send_task_events"] = events
        settings["task_send_sent_event"] = events
    if environ.get("CELERY_BROKER_URL"):
        settings["broker_url"] = environ["CELERY_BROKER_URL"]
    if environ.get("CELERY_RESULT_BACKEND"):
        settings["result_backend"] = environ["CELERY_RESULT_BACKEND"]
    if environ.get("CELERY_RESULT_EXPIRES"):
        settings["result_expires"] = int(environ["CELERY_RESULT_EXPIRES"])
    options = json.loads(environ.get("CELERY_BROKER_TRANSPORT_OPTIONS") or "{}")
    if options:
        settings["broker_transport_options"] = options
        if "socket_timeout" in options:
            settings["redis_socket_timeout"] = options["socket_timeout"]
        if "socket_connect_timeout" in options:
            settings["redis_socket_connect_timeout"] = options["socket_connect_timeout"]
    return settings


def apply(app, settings):
    """Apply the fleet's settings over the app's. The app's other transport options (key prefix, priority
    steps, ...) stay; the fleet's win where both set one. Returns what the check reports of the app's own
    settings: whether it was finalized before them, and its own transport options."""
    if not app.configured:
        # Before the app's configuration loads: tasks bound while it loads (a periodic task added in
        # on_after_configure, a schedule naming task objects) must already see the fleet's guarantees.
        conf_guarantees = {name: settings[name] for name in GUARANTEED_TASK_OPTIONS.values() if name in settings}
        app.conf.update(conf_guarantees)
    conf = app.conf  # reading it loads the app's configuration (Django settings included)
    own_options = dict(conf.broker_transport_options or {})
    found = {"finalized_before_fleet_settings": bool(app.finalized), "app_transport_options": own_options}
    merged = dict(settings)
    if "broker_transport_options" in settings:
        merged["broker_transport_options"] = {**own_options, **settings["broker_transport_options"]}
    conf.update(merged)
    APPLIED[id(app)] = found
    return found


def _cgroup_memory():
    """(memory, cap) in bytes of this process's own cgroup: under systemd, the worker instance's unit, its
    pool's children included. cgroup v2 (memory.current, memory.max) or v1's memory controller
    (memory.usage_in_bytes, memory.limit_in_bytes); None where unknown or unlimited."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as cgroup:
            lines = [line.rstrip("\n").split(":", 2) for line in cgroup]
    except OSError:
        return None, None
    v1 = next((path for _, controllers, path in lines if "memory" in controllers.split(",")), None)
    if v1 is not None:
        top, files = os.path.join("/sys/fs/cgroup/memory", v1.lstrip("/")), ("memory.usage_in_bytes",
                                                                             "memory.limit_in_bytes")
    else:
        v2 = next((path for hierarchy, _, path in lines if hierarchy == "0"), None)
        if v2 is None:
            return None, None
        top, files = os.path.join("/sys/fs/cgroup", v2.lstrip("/")), ("memory.current", "memory.max")
    values = []
    for name in files:
        try:
            with open(os.path.join(top, name), encoding="ascii") as value:
                text = value.read().strip()
        except OSError:
            text = ""
        # v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages), v2 with "max".
        values.append(int(text) if text.isdigit() and int(text) < 2**62 else None)
    return tuple(values)


def fleet_info():
    """What this node tells the fleet's monitor and status, in its stats reply (``celery inspect stats``, key
    ``fleet``): the release it runs (the releases/<id>/venv the interpreter comes from), the memory of its unit
    (the node and its children) and that unit's cap, in bytes."""
    prefix = os.path.realpath(sys.prefix)
    release = os.path.basename(os.path.dirname(prefix)) if os.path.basename(prefix) == "venv" else None
    memory, memory_max = _cgroup_memory()
    return {"release": release, "memory": memory, "memory_max": memory_max}


_FLEET_INFO_STEP = None


def _add_fleet_info_step(app):
    """A worker bootstep whose info() adds fleet_info() to the node's stats reply: the monitor and status get
    it from the stats broadcast they send anyway (Celery's public bootsteps API), not from a broadcast of its
    own (a fifth concurrent one lost replies in tests)."""
    global _FLEET_INFO_STEP
    if _FLEET_INFO_STEP is None:
        from celery import bootsteps

        # A StartStopStep, which starts and stops nothing (no obj): only those are listed in the worker's steps,
        # whose info() the stats reply gathers.
        class FleetInfo(bootsteps.StartStopStep):
            name = "celery_fleet_runtime.FleetInfo"

            def info(self, worker):
                return {"fleet": fleet_info()}

        _FLEET_INFO_STEP = FleetInfo
    app.steps["worker"].add(_FLEET_INFO_STEP)


def load(spec=None, environ=None):
    """The operator's app with the fleet's settings applied. Imports with the normal import path only (never
    the current directory first, as ``celery --app`` would)."""
    from celery import Celery
    from celery.app.utils import find_app

    environ = os.environ if environ is None else environ
    spec = spec or environ.get(APP_VARIABLE)
    if not spec:
        raise RuntimeError(f"{APP_VARIABLE} is not set: it names the application, as module or module:attribute")
    app = find_app(spec, imp=importlib.import_module)
    if not isinstance(app, Celery):
        raise RuntimeError(f"{APP_VARIABLE}={spec} is a {type(app).__name__}, not a Celery application")
    apply(app, fleet_settings(environ))
    _add_fleet_info_step(app)
    return app


def __getattr__(name):
    """``celery_fleet_runtime:app``: loaded on first use, once per process."""
    if name == "app":
        try:
            app = globals()["app"] = load()
        except AttributeError as error:  # Celery's find_app would report "celery_fleet_runtime:app not found"
            raise RuntimeError(f"loading {os.environ.get(APP_VARIABLE)!r} failed: {error!r}") from error
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
