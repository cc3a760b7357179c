"""Start and stop worker processes cleanly, and import the user's dataset modules in each.

Why :func:`run_and_shut_down` exists: detectron2's ``launch`` starts one process per worker,
calls ``dist.init_process_group`` in each and runs the main function, but never destroys the
process group. A GLOO process group owns C++ background threads (its listening loop and the
pairs' I/O threads). When a worker returns with the group still alive, those threads are
still running while the interpreter shuts down and the C++ static destructors run; a
``std::thread`` destroyed while joinable calls ``std::terminate``, which prints "terminate
called without an active exception" and aborts (SIGABRT) the worker *after* a good run, so
``--num-gpus 2`` (or ``--num-machines 2``) exits non-zero now and then. The fix is at the
root: every worker waits for the others at a barrier (so nobody closes its connections
while a peer still talks to it) and destroys its process groups before returning.
"""
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
from typing import Callable, Iterable, List

import torch.distributed as dist
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

__all__ = ["import_user_modules", "launch", "run_and_shut_down", "shut_down_process_group"]

logger = logging.getLogger(__name__)


def shut_down_process_group(*, wait_for_peers: bool) -> None:
    """Destroy every torch.distributed process group of this process (no-op without one).

    Args:
        wait_for_peers: first wait at a barrier for the other workers (after a successful
            run; after a failure a peer may be inside another collective, so do not wait).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()  # the default group and every group made with new_group
        comm._LOCAL_PROCESS_GROUP = None  # detectron2's handle on a destroyed group


def run_and_shut_down(main_func: Callable, *args):
    """``main_func(*args)``, then a clean shutdown of this worker's process group (a barrier
    and ``destroy_process_group`` after success; ``destroy_process_group`` only after an
    exception, which is re-raised). Returns what ``main_func`` returns."""
    try:
        result = main_func(*args)
    except BaseException:
        try:
            shut_down_process_group(wait_for_peers=False)
        except Exception as cleanup_error:  # never hide the original error
            logger.warning("Could not destroy the process group: %s", cleanup_error)
        raise
    shut_down_process_group(wait_for_peers=True)
    return result


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1,
           machine_rank: int = 0, dist_url=None, args=(), timeout=None):
    """detectron2's ``launch`` whose workers shut their process group down cleanly (see the
    module docstring). Same arguments; ``main_func`` must be picklable (module level)."""
    kwargs = {} if timeout is None else {"timeout": timeout}
    d2_launch(
        run_and_shut_down,
        num_gpus_per_machine,
        num_machines=num_machines,
        machine_rank=machine_rank,
        dist_url=dist_url,
        args=(main_func, *args),
        **kwargs,
    )


def import_user_modules(modules: Iterable[str]) -> List[object]:
    """Import the user's modules (e.g. ones that register datasets at import), in order.

    Each entry is a path to a ``.py`` file (absolute or relative to the working directory) or
    a dotted module name, looked up on ``sys.path`` and in the working directory. A module
    already imported in this process is not imported again (so registrations run once).

    Raises:
        FileNotFoundError: a ``.py`` path that does not exist.
        ModuleNotFoundError: a module name that cannot be found (the message names it).
    """
    imported = []
    for entry in modules:
        if entry.endswith(".py") or os.sep in entry:
            path = os.path.abspath(os.path.expanduser(entry))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--register-module: no such file: {entry}")
            key = "maskattn_user_module_" + hashlib.sha1(path.encode()).hexdigest()[:12]
            if key not in sys.modules:
                spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[key] = module
                # The module's own folder is importable from it, as for `python module.py`.
                folder = os.path.dirname(path)
                if folder not in sys.path:
                    sys.path.append(folder)
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
            imported.append(sys.modules[key])
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            try:
                imported.append(importlib.import_module(entry))
            except ModuleNotFoundError as e:
                if e.name != entry.split(".")[0] and e.name != entry:
                    raise  # the module exists but one of its own imports is missing
                raise ModuleNotFoundError(
                    f"--register-module: cannot import '{entry}' (not on sys.path nor in "
                    f"the working directory {os.getcwd()}); give a module name or a path to "
                    "a .py file",
                    name=entry,
                ) from e
        logger.info("Imported user module %s", entry)
    return imported
