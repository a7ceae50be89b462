"""Executors: where the units of one job run.

`local` (the default, nothing to install): the units run one after another inside the job's own worker process.
`ray`: each unit is a Ray task with its resource request (CPUs, GPUs, memory), on an existing cluster
(`--ray-address host:6379`, `ray://host:10001`, `auto`) or on a local Ray started for the job and stopped after it.

A unit's function runs in a worker and returns a payload; it never writes the store. The driver (the job process)
receives each payload as its unit finishes and stores it with its provenance, so the store stays the one source of
truth. A unit may take another unit's output as an argument (`UnitRef`): locally it is the value, on Ray the object
ref, so a candidate made once is read by all its evaluations from the object store. A Ray worker lost mid-task is
retried once; after that, or on an error in the unit, the unit is reported failed by its key and the others go on.
"""
from __future__ import annotations

import importlib
import os
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from shrink_core.errors import ShrinkError

EXECUTORS = ("local", "ray")
RAY_ADDRESS_ENV = "SHRINK_RAY_ADDRESS"
EXECUTOR_ENV = "SHRINK_EXECUTOR"
LOCAL_RAY = "local"  # the address that starts a private Ray for one job
POLL_S = 0.5  # how often the driver checks for finished units, progress and cancel
RETRIES = 1  # a worker lost mid-task is retried this many times, then reported
# Ray starts workers at nice 15: on a machine busy with anything else, units would get a few per cent of a core
# (measured: 301 s against 20 s for a toy sweep beside two spinning processes). Units compete as the local
# executor's do.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


@dataclass(frozen=True)
class ExecutorConfig:
    version: int = 1
    kind: str = "local"
    address: str = ""  # ray only; "" reads $SHRINK_RAY_ADDRESS, then starts a local Ray
    local_cpus: int | None = None  # a local Ray started on demand gets this many CPUs (default: the machine's)
    cpus_per_unit: float = 1.0

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ShrinkError(f"Unknown executor {self.kind!r}; choose one of: {', '.join(EXECUTORS)}.")
        if self.kind == "local" and self.address:
            raise ShrinkError("--ray-address only applies to --executor ray; drop it or choose the ray executor.")
        if self.local_cpus is not None and self.local_cpus < 1:
            raise ShrinkError(f"A local Ray needs at least 1 CPU, got {self.local_cpus}; pass --ray-cpus 1 or more.")
        if self.cpus_per_unit <= 0:
            raise ShrinkError(f"Each unit needs a positive number of CPUs, got {self.cpus_per_unit}; pass "
                              f"--ray-cpus-per-unit 1 (or another positive number).")

    @property
    def ray_address(self) -> str:
        return self.address or os.environ.get(RAY_ADDRESS_ENV, "") or LOCAL_RAY

    def to_dict(self) -> dict:
        return {"kind": self.kind, "address": self.address, "local_cpus": self.local_cpus,
                "cpus_per_unit": self.cpus_per_unit}

    @staticmethod
    def from_dict(data: dict | None) -> ExecutorConfig:
        data = dict(data or {})
        known = {"version", "kind", "address", "local_cpus", "cpus_per_unit"}
        unknown = set(data) - known
        if unknown:
            raise ShrinkError(f"Unknown executor settings: {', '.join(sorted(unknown))}; the known ones are "
                              f"{', '.join(sorted(known))}.")
        return ExecutorConfig(**data)


def default_executor() -> ExecutorConfig:
    """$SHRINK_EXECUTOR (local or ray), else local."""
    return ExecutorConfig(kind=os.environ.get(EXECUTOR_ENV, "local") or "local")


@dataclass(frozen=True)
class UnitRef:
    """Another unit's output as an argument; `index` picks one of a multi-output unit's outputs."""
    key: str
    index: int | None = None


@dataclass(frozen=True)
class Unit:
    key: str  # names the unit in progress, in failure reports and in Ray's task list ("w4g64 x en")
    function: str  # "shrink_core.module:function", called as function(**args) in the worker
    args: dict = field(default_factory=dict)
    outputs: int = 1  # >1: the function returns a tuple; output 0 goes to the driver, the rest only to other units
    gpus: float = 0.0
    memory_bytes: int | None = None  # from the memory model, where there is one

    def __post_init__(self):
        module, _, function = self.function.partition(":")
        if not module.startswith("shrink_core.") or not function.isidentifier():
            raise ValueError(f"unit function must be 'shrink_core.module:function', got {self.function!r}")


@dataclass(frozen=True)
class UnitFailure:
    key: str
    reason: str


def call_unit(function: str, **args):
    """The body of every unit, on any executor: import the function and call it. On Ray the arguments travel as
    keywords, so an input that is another unit's output (an ObjectRef) arrives resolved."""
    module_name, function_name = function.split(":")
    return getattr(importlib.import_module(module_name), function_name)(**args)


def _depends_on(unit: Unit) -> set[str]:
    return {value.key for value in unit.args.values() if isinstance(value, UnitRef)}


def _check_order(units: list[Unit]) -> None:
    outputs: dict[str, int] = {}
    for unit in units:
        if unit.key in outputs:
            raise ValueError(f"two units share the key {unit.key!r}")
        missing = _depends_on(unit) - set(outputs)
        if missing:
            raise ValueError(f"unit {unit.key!r} needs {sorted(missing)} before it")
        for ref in (v for v in unit.args.values() if isinstance(v, UnitRef)):
            if (ref.index is None) != (outputs[ref.key] == 1):  # Ray hands over one ref per output
                raise ValueError(f"unit {unit.key!r} must pick one output of {ref.key!r} by index (and only there)")
        outputs[unit.key] = unit.outputs


OnResult = Callable[[Unit, object], None]
Progress = Callable[[float, str], None]


def run_units(units: list[Unit], config: ExecutorConfig, on_result: OnResult, progress: Progress) -> list[UnitFailure]:
    """Run `units` (each after the units it refers to) and call `on_result(unit, payload)` in this process as each
    finishes. `progress(fraction, message)` is called often; it raises JobCancelled to stop: on Ray the remote tasks
    are cancelled too. Returns the units that failed (a unit whose input failed fails with it)."""
    _check_order(units)
    if config.kind == "ray":
        return _run_ray(units, config, on_result, progress)
    return _run_local(units, on_result, progress)


def _resolve(args: dict, outputs: dict):
    resolved = {}
    for name, value in args.items():
        if isinstance(value, UnitRef):
            out = outputs[value.key]
            value = out if value.index is None else out[value.index]
        resolved[name] = value
    return resolved


def _run_local(units: list[Unit], on_result: OnResult, progress: Progress) -> list[UnitFailure]:
    outputs, failures, failed = {}, [], set()
    for index, unit in enumerate(units):
        progress(index / len(units), f"{unit.key}: running")
        lost = _depends_on(unit) & failed
        if lost:
            failures.append(UnitFailure(unit.key, f"its input {sorted(lost)[0]} failed"))
            failed.add(unit.key)
            continue
        try:
            out = call_unit(unit.function, **_resolve(unit.args, outputs))
        except ShrinkError as exc:
            failures.append(UnitFailure(unit.key, str(exc)))
            failed.add(unit.key)
            continue
        except Exception as exc:  # the unit's own bug: its traceback in the job's log, one line in the report
            traceback.print_exc()
            failures.append(UnitFailure(unit.key, f"{type(exc).__name__}: {exc}"))
            failed.add(unit.key)
            continue
        outputs[unit.key] = out
        on_result(unit, out[0] if unit.outputs > 1 else out)
        _release_unused(units, index, outputs)
    progress(1.0, "all units done")
    return failures


def _release_unused(units: list[Unit], index: int, outputs: dict) -> None:
    """Drop outputs no later unit refers to (a candidate model is held only while its evaluations need it)."""
    needed = set().union(*(_depends_on(u) for u in units[index + 1:])) if index + 1 < len(units) else set()
    for key in [k for k in outputs if k not in needed]:
        del outputs[key]


def connect(config: ExecutorConfig) -> bool:
    """Connect this process to Ray as the config says; True when it started a private local Ray (stop it after)."""
    try:
        import ray
    except ImportError as exc:
        raise ShrinkError("The ray executor needs Ray, which is not installed; run `./run ray` (installs "
                          "requirements-ray.txt) or choose --executor local.") from exc
    if ray.is_initialized():
        return False
    address = config.ray_address
    env = {"env_vars": {k: os.environ[k] for k in ("SHRINK_HOME", "SHRINK_MODEL_CACHE", "HF_HUB_OFFLINE",
                                                  "TOKENIZERS_PARALLELISM") if k in os.environ}}
    try:
        if address == LOCAL_RAY:  # "local": a new Ray even where $RAY_ADDRESS or `ray start` names another
            ray.init(address="local", num_cpus=config.local_cpus or os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, configure_logging=False, runtime_env=env,
                     _system_config=LOCAL_SYSTEM_CONFIG)
            return True
        ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=env)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ShrinkError(f"Could not reach the Ray cluster at {address!r} ({reason}); check the address (or "
                          f"${RAY_ADDRESS_ENV}), or leave it empty to start a local Ray.") from exc
    return False


@contextmanager
def session(config: ExecutorConfig):
    """Hold the executor for several `run_units` calls (one Ray connection, its workers kept warm); a local Ray
    started here is stopped at the end."""
    if config.kind != "ray":
        yield
        return
    import ray

    started = connect(config)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def describe(config: ExecutorConfig | None = None) -> dict:
    """What the executor sees, for the Model page: {kind, address, workers (CPU slots), gpus, nodes}.
    Ray is asked only when it is already connected or an address is configured; it is never started for this."""
    config = config or default_executor()
    if config.kind == "local":
        return {"kind": "local", "address": "", "workers": 1, "gpus": _local_gpus(), "nodes": 1,
                "note": "one worker process per job on this machine"}
    try:
        import ray
    except ImportError:
        return {"kind": "ray", "address": config.ray_address, "workers": 0, "gpus": 0, "nodes": 0,
                "note": "Ray is not installed: run `./run ray`"}
    if not ray.is_initialized() and config.ray_address == LOCAL_RAY:
        cpus = config.local_cpus or os.cpu_count() or 1
        return {"kind": "ray", "address": LOCAL_RAY, "workers": int(cpus // config.cpus_per_unit),
                "gpus": _local_gpus(), "nodes": 1, "note": "a local Ray is started for each job and stopped after"}
    was_connected = ray.is_initialized()
    connect(config)
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        if not was_connected:  # a page asking must not stay a driver of someone's cluster
            ray.shutdown()
    return {"kind": "ray", "address": config.ray_address,
            "workers": int(resources.get("CPU", 0) // config.cpus_per_unit), "gpus": int(resources.get("GPU", 0)),
            "nodes": nodes, "note": "the connected cluster"}


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_fits(units: list[Unit], config: ExecutorConfig) -> None:
    """A unit that asks for more than any node has would wait forever on Ray: refuse it now, in one sentence."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for unit in units:
        needs = {"CPU": (config.cpus_per_unit, "CPUs", "lower --ray-cpus-per-unit"),
                 "GPU": (unit.gpus, "GPUs", "add a node with a GPU"),
                 "memory": (unit.memory_bytes or 0, "bytes of memory", "add a node with more memory, or use a "
                                                                         "smaller dtype (spec suffix #bf16)")}
        for resource, (amount, noun, fix) in needs.items():
            if amount and not any(r.get(resource, 0) >= amount for r in nodes):
                most = max((r.get(resource, 0) for r in nodes), default=0)
                raise ShrinkError(f"Unit {unit.key!r} needs {amount:,.0f} {noun} and the largest node of the Ray "
                                  f"cluster has {most:,.0f}; {fix}.")


def _run_ray(units: list[Unit], config: ExecutorConfig, on_result: OnResult, progress: Progress) -> list[UnitFailure]:
    import ray

    started = connect(config)
    try:
        _check_fits(units, config)
        remote = ray.remote(call_unit)
        refs: dict[str, object] = {}  # unit key -> its ObjectRef (or list of refs for multi-output units)
        to_driver: dict[object, Unit] = {}
        for unit in units:
            args = {}
            for name, value in unit.args.items():
                if isinstance(value, UnitRef):
                    value = refs[value.key] if value.index is None else refs[value.key][value.index]
                args[name] = value
            options = {"name": unit.key, "num_cpus": config.cpus_per_unit, "num_gpus": unit.gpus,
                       "max_retries": RETRIES, "retry_exceptions": False, "num_returns": unit.outputs}
            if unit.memory_bytes:
                options["memory"] = unit.memory_bytes
            out = remote.options(**options).remote(unit.function, **args)
            refs[unit.key] = out
            to_driver[out[0] if unit.outputs > 1 else out] = unit
        del refs  # the object store frees an intermediate output once the units that read it are done
        return _blame_inputs(units, _collect(to_driver, on_result, progress))
    finally:
        if started:
            ray.shutdown()


def _collect(to_driver: dict, on_result: OnResult, progress: Progress) -> list[UnitFailure]:
    import ray

    pending, failures, total = list(to_driver), [], len(to_driver)
    try:
        progress(0.0, f"0 of {total} units done")
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in ready:
                unit = to_driver.pop(ref)
                try:
                    payload = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    failures.append(UnitFailure(unit.key, _ray_reason(exc)))
                    continue
                on_result(unit, payload)
            done = total - len(pending)
            progress(done / total, f"{done} of {total} units done")
    except BaseException:  # cancelled, interrupted, or the driver's own error: the remote work stops too
        for ref in pending:
            ray.cancel(ref, force=True)  # stops the remote work, not only our wait for it
        raise
    return failures


def _blame_inputs(units: list[Unit], failures: list[UnitFailure]) -> list[UnitFailure]:
    """Ray hands a unit the error of a failed input as its own; say which input failed instead, as locally."""
    failed = {f.key for f in failures}
    out = []
    for unit in units:
        failure = next((f for f in failures if f.key == unit.key), None)
        if failure is None:
            continue
        lost = sorted(_depends_on(unit) & failed)
        out.append(UnitFailure(unit.key, f"its input {lost[0]} failed") if lost else failure)
    return out


def _ray_reason(exc) -> str:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, ShrinkError):
            return str(cause)
        if isinstance(cause, ray.exceptions.RayError):  # an input unit failed: say so, not its traceback
            return f"its input failed ({_ray_reason(cause)})"
        return f"{type(cause).__name__}: {cause}"
    if isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return f"its Ray worker was lost {RETRIES + 1} times ({type(exc).__name__})"
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return "its Ray worker ran out of memory"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def failure_sentence(failures: list[UnitFailure], total: int) -> str:
    """One sentence naming each failed unit and why; the units that finished are already stored."""
    listed = "; ".join(f"{f.key}: {f.reason}" for f in failures)
    return (f"{len(failures)} of {total} units failed ({listed}); the other {total - len(failures)} finished and "
            f"are stored.")

