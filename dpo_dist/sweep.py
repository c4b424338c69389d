"""`dpo-dist sweep`: many training runs against one reference cache ("score once, sweep many").

A sweep file names override sets, one run each; every run trains into its own folder under the
sweep folder and reads the one shared cache:

    # sweep.yaml
    output_dir: outputs/beta-sweep          # optional; default: the config's output_dir
    runs:                                   # name -> overrides (a list of KEY=VALUE, or a mapping)
      beta0.1: [loss.beta=0.1]
      ipo:     {loss.loss_type: ipo, loss.beta: 0.5}
    grid:                                   # and/or: every combination, named after the values
      loss.beta: [0.05, 0.2]
      train.lr: [5.0e-7, 1.0e-6]

    dpo-dist sweep --config configs/demo.yaml sweep.yaml    # score once, train each run in turn
    tensorboard --logdir outputs/beta-sweep                 # the runs side by side

Runs may change the loss, optimizer, schedule, batch arithmetic, seed, policy or LoRA; anything
the cache depends on (data, tokenization, reference, tokenizer, scoring dtype) belongs in the
base config, and a run that changes it is refused, naming the field. On Slurm the same file drives
an array job (slurm/dpo_sweep.sbatch), one task per run, after one scoring job:

    dpo-dist sweep --config configs/demo.yaml sweep.yaml --slurm --sbatch-args="--nodes 1"
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from dpo_dist.core.atomic import atomic_write_text
from dpo_dist.config import Config, ConfigError, load_config

# Config fields a sweep run may not change: the shared cache depends on them (or the sweep sets them).
_CACHE_FIELDS = ("data", "score", "model.ref_name_or_path", "model.tokenizer", "model.trust_remote_code",
                 "output_dir", "cache_dir", "stages", "sft")


@dataclass
class SweepRun:
    name: str
    overrides: list[str]
    line: int  # line of the sweep file that defines it


@dataclass
class Sweep:
    path: Path
    runs: list[SweepRun]
    output_dir: str | None


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; errors are one line, `file:line: what is wrong`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}:1: expected a mapping with `runs:` and/or `grid:`")
    sections = {key.value: value for key, value in root.value}
    unknown = sorted(set(sections) - {"runs", "grid", "output_dir"})
    if unknown:
        node = next(k for k, _ in root.value if k.value == unknown[0])
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: unknown key {unknown[0]!r} (valid: runs, grid, output_dir)")
    runs: list[SweepRun] = []
    if "runs" in sections:
        runs += _named_runs(path, sections["runs"])
    if "grid" in sections:
        runs += _grid_runs(path, sections["grid"])
    if not runs:
        raise ConfigError(f"{path}:1: no runs (give `runs:` and/or `grid:`)")
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(f"{path}:{run.line}: run name {run.name!r} is used twice (first at line {seen[run.name]})")
        seen[run.name] = run.line
    out = sections.get("output_dir")
    return Sweep(path, runs, yaml.safe_load(yaml.serialize(out)) if out is not None else None)


def _named_runs(path: Path, node) -> list[SweepRun]:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:{node.start_mark.line + 1}: `runs` must map run names to overrides")
    runs = []
    for key, value in node.value:
        line = key.start_mark.line + 1
        name = str(key.value)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
            raise ConfigError(f"{path}:{line}: run name {name!r} must be letters, digits, and . _ = + - (it names a folder)")
        items = yaml.safe_load(yaml.serialize(value))
        if isinstance(items, dict):
            overrides = [f"{k}={_yaml_value(v)}" for k, v in items.items()]
        elif isinstance(items, list) and all(isinstance(i, str) and "=" in i for i in items):
            overrides = list(items)
        else:
            raise ConfigError(f"{path}:{line}: run {name!r}: give a list of KEY=VALUE strings or a mapping of fields to values")
        runs.append(SweepRun(name, overrides, line))
    return runs


def _grid_runs(path: Path, node) -> list[SweepRun]:
    line = node.start_mark.line + 1
    grid = yaml.safe_load(yaml.serialize(node))
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}:{line}: `grid` must map fields to non-empty lists of values")
    runs = []
    for values in itertools.product(*grid.values()):
        pairs = list(zip(grid, values))
        name = "-".join(f"{key.rsplit('.', 1)[-1]}{_yaml_value(v)}" for key, v in pairs)
        runs.append(SweepRun(re.sub(r"[^A-Za-z0-9._=+-]", "_", name), [f"{k}={_yaml_value(v)}" for k, v in pairs], line))
    return runs


def _yaml_value(value) -> str:
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _touches(override: str, field: str) -> bool:
    key = override.split("=", 1)[0].strip()
    return key == field or key.startswith(field + ".") or field.startswith(key + ".")


def plan(config_path: str | None, base_overrides: list[str], sweep: Sweep) -> tuple[Config, list[tuple[SweepRun, Config]]]:
    """The base config (it owns the shared cache) and one config per run, all validated up front.

    Run folders: SWEEP_ROOT/<name>, where SWEEP_ROOT is the sweep file's output_dir, else the base
    config's output_dir. The cache: the base config's cache_dir, else SWEEP_ROOT/cache.
    """
    base = load_config(config_path, base_overrides)
    root = Path(sweep.output_dir or base.output_dir)
    cache = base.cache_dir or str(root / "cache")
    # One cache and (with an SFT stage) one SFT run for every run of the sweep.
    shared = [f"cache_dir={cache}", f"sft.output_dir={base.sft.output_dir or root / 'sft'}"]
    base = load_config(config_path, [*base_overrides, f"output_dir={root}", *shared])
    runs = []
    for run in sweep.runs:
        for override in run.overrides:
            bad = next((f for f in _CACHE_FIELDS if _touches(override, f)), None)
            if bad:
                raise ConfigError(f"{sweep.path}:{run.line}: run {run.name!r}: {override} changes {bad}, which the "
                                  "shared cache depends on (or the sweep sets); put it in the base config")
        if any(_touches(o, "model.name_or_path") for o in run.overrides) and (base.uses_sft() or not base.model.ref_name_or_path):
            raise ConfigError(f"{sweep.path}:{run.line}: run {run.name!r} changes model.name_or_path while the reference "
                              + ("is the SFT export of that model; put it in the base config" if base.uses_sft()
                                 else "defaults to the policy; set model.ref_name_or_path in the base config"))
        try:
            cfg = load_config(config_path, [*base_overrides, *run.overrides, f"output_dir={root / run.name}", *shared])
        except ConfigError as e:
            raise ConfigError(f"{sweep.path}:{run.line}: run {run.name!r}: {e}") from None
        runs.append((run, cfg))
    return base, runs


def task_overrides(config_path: str | None, base_overrides: list[str], sweep: Sweep, index: int) -> list[str]:
    """The overrides that make run `index` of the sweep (for a Slurm array task)."""
    _, runs = plan(config_path, base_overrides, sweep)
    if not 0 <= index < len(runs):
        raise ConfigError(f"{sweep.path}: task {index} out of range: the sweep has {len(runs)} runs (0..{len(runs) - 1})")
    run, cfg = runs[index]
    return [*base_overrides, *run.overrides, *shared_overrides(cfg)]


def shared_overrides(cfg: Config) -> list[str]:
    """The folders `plan` gives a run: its own output_dir, the sweep's cache and SFT run."""
    return [f"output_dir={cfg.output_dir}", f"cache_dir={cfg.cache_dir}", f"sft.output_dir={cfg.sft_dir()}"]


def results_table(runs: list[tuple[SweepRun, Config]]) -> str:
    """One line per run: its overrides and final held-out metrics (or its state)."""
    lines = [f"{'run':<24} {'eval acc':>8} {'margin':>8} {'loss':>8}  overrides"]
    for run, cfg in runs:
        final = Path(cfg.output_dir) / "final_metrics.json"
        if final.exists():
            ev = json.loads(final.read_text()).get("eval", {})
            cells = [f"{ev.get(k, float('nan')):>8.3f}" for k in ("rewards/accuracies", "rewards/margins", "loss")]
        else:
            cells = [f"{'-':>8}"] * 3
        lines.append(f"{run.name:<24} {' '.join(cells)}  {' '.join(run.overrides)}")
    return "\n".join(lines)


def run_sweep(config_path: str | None, base_overrides: list[str], sweep_path: str, overwrite: bool = False) -> int:
    """Check every run folder, score once, train each run (finished ones are skipped), print the table."""
    from dpo_dist.launch import num_procs, run_torchrun
    from dpo_dist.pipeline import check_run_folder, ensure_cache

    sweep = load_sweep(sweep_path)
    base, runs = plan(config_path, base_overrides, sweep)
    root = Path(base.output_dir)
    print(f"[dpo-dist] sweep {sweep.path}: {len(runs)} runs into {root}/<run>, one cache {base.resolved_cache_dir()}", flush=True)
    if base.uses_sft():  # the SFT model is every run's reference and initial policy: first, once
        from dpo_dist.pipeline import run_sft

        code = run_sft(base, config_path, [*base_overrides, *shared_overrides(base)], num_procs(base)[0])
        if code != 0:
            return code
    for run, cfg in runs:  # every refusal before any work
        note = check_run_folder(cfg, num_procs(cfg)[0], overwrite)
        if note:
            print(f"[dpo-dist] {run.name}: {note}", flush=True)
    ensure_cache(base)
    failed = []
    for i, (run, cfg) in enumerate(runs, 1):
        print(f"[dpo-dist] run {i}/{len(runs)} {run.name}: {' '.join(run.overrides)}", flush=True)
        code = run_torchrun(cfg, config_path, [*base_overrides, *run.overrides, *shared_overrides(cfg)], resume=True)
        if code != 0:
            failed.append(run.name)
            print(f"[dpo-dist] run {run.name} failed (exit {code}); the others go on; rerun the sweep to resume it", flush=True)
    atomic_write_text(root / "sweep.json", json.dumps({"sweep": str(sweep.path), "runs": [
        {"name": run.name, "overrides": run.overrides, "output_dir": cfg.output_dir} for run, cfg in runs]}, indent=2))
    print("\n" + results_table(runs))
    print(f"\n  look at them side by side:  tensorboard --logdir {root}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- Slurm

# What `sweep --slurm` passes to the jobs itself; the same names in the caller's environment would
# change every task's folders or settings behind the sweep's back.
_JOB_VARIABLES = ("CONFIG", "SWEEP", "OVERRIDES", "OVERRIDES_FILE", "STAGES", "MODEL", "REF_MODEL", "DATA", "OUTPUT_DIR")


@dataclass
class JobShape:
    """Nodes and training processes per node of one array task, as slurm/dpo_hh.sbatch will count them."""
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    source: str  # where the numbers came from, shown to the user

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def job_shape(sbatch_args: list[str], script: Path, env: dict) -> JobShape:
    """The last --nodes/-N and --gpus-per-node in `sbatch_args`, else the script's #SBATCH lines (as
    sbatch reads them), then GPUS_PER_NODE / NPROC_PER_NODE from `env` as the batch script does.
    A node range (--nodes 2-4) counts its minimum: a job given more nodes has another world size."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-N", "--nodes")
    parser.add_argument("--gpus-per-node")
    header = [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
    found = {}
    for origin, args in ((script.name, shlex.split(" ".join(header))), ("--sbatch-args", sbatch_args)):
        given, _ = parser.parse_known_args(args)
        found.update({key: (value, origin) for key, value in (("nodes", given.nodes), ("gpus", given.gpus_per_node)) if value})
    nodes_text, nodes_from = found.get("nodes", ("1", "default"))
    gpus_text, gpus_from = found.get("gpus", ("0", "default"))
    try:
        nodes = int(re.split(r"[-:]", nodes_text)[0])
        gpus = int(env["GPUS_PER_NODE"]) if env.get("GPUS_PER_NODE") else int(gpus_text.rsplit(":", 1)[-1])
        procs = int(env["NPROC_PER_NODE"]) if env.get("NPROC_PER_NODE") else (gpus or 1)
    except ValueError as e:
        raise ConfigError(f"cannot tell the world size of the array tasks ({e}): give --sbatch-args=\"--nodes N "
                          "--gpus-per-node G\" or set GPUS_PER_NODE and NPROC_PER_NODE") from None
    source = (f"nodes from {nodes_from}, GPUs per node from {'GPUS_PER_NODE' if env.get('GPUS_PER_NODE') else gpus_from}, "
              f"processes per node from {'NPROC_PER_NODE' if env.get('NPROC_PER_NODE') else 'the GPUs (1 on CPU)'}")
    return JobShape(nodes, gpus, procs, source)


def _sbatch(args: list[str], env: dict) -> str:
    cmd = ["sbatch", "--parsable", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        said = "; ".join(line.strip() for line in (proc.stderr.strip() or proc.stdout).splitlines() if line.strip())
        raise ConfigError(f"{' '.join(shlex.quote(a) for a in cmd)} failed: {said}")  # one line, as every user error
    return proc.stdout.strip().split(";")[0]  # "jobid" or "jobid;cluster"


def submit_slurm(config_path: str | None, base_overrides: list[str], sweep_path: str, sbatch_args: str = "",
                 score_sbatch_args: str = "", overwrite: bool = False) -> int:
    """Check every run folder, then submit a scoring job (slurm/dpo_hh.sbatch, STAGES=score; none when
    the cache is ready) and an array job (slurm/dpo_sweep.sbatch, one task per run) that starts after
    the scoring job succeeds. Both run in this folder (the repository root) with this environment."""
    from dpo_dist.pipeline import cache_ready, check_run_folder

    if not config_path:
        raise ConfigError("--slurm needs --config: the scoring job and every array task read that file")
    if not shutil.which("sbatch"):
        raise ConfigError("--slurm: sbatch not found on PATH; run this on a Slurm login node")
    # The jobs run in WORKDIR, else the folder sbatch is called from, and find launchers/, slurm/
    # and relative config paths there.
    slurm_scripts = Path(os.environ.get("WORKDIR") or Path.cwd()) / "slurm"
    if not (slurm_scripts / "dpo_sweep.sbatch").is_file():
        raise ConfigError(f"--slurm: no slurm/dpo_sweep.sbatch in {slurm_scripts.parent}: run this from the repository "
                          "root (the jobs run in the folder you submit from), or set WORKDIR to it")
    sweep = load_sweep(sweep_path)
    base, runs = plan(config_path, base_overrides, sweep)
    root, cache = Path(base.output_dir), base.resolved_cache_dir()
    env = {k: v for k, v in os.environ.items() if k not in _JOB_VARIABLES}
    ignored = sorted(set(os.environ) & set(_JOB_VARIABLES))
    if ignored:
        print(f"[dpo-dist] not passed to the jobs: {', '.join(ignored)} from this environment (a sweep takes --config, "
              "the overrides and the sweep file)", flush=True)
    shape = job_shape(shlex.split(sbatch_args), slurm_scripts / "dpo_sweep.sbatch", env)
    print(f"[dpo-dist] sweep {sweep.path}: {len(runs)} runs into {root}/<run>, one cache {cache}", flush=True)
    print(f"[dpo-dist] each array task trains on {shape.nodes} node(s) x {shape.procs_per_node} process(es) = world "
          f"{shape.world_size} ({shape.source})", flush=True)
    sft_pending = base.uses_sft() and not (base.sft_export_dir() / "config.json").is_file()
    if sft_pending:
        print(f"[dpo-dist] the SFT run {base.sft_dir()} comes first (in the scoring job); the run folders are checked "
              "by each task", flush=True)
    for run, cfg in runs:  # every refusal before anything is submitted
        t = cfg.train
        got = t.micro_batch_size * t.gradient_accumulation_steps * shape.world_size
        if t.global_batch_size and t.global_batch_size != got:
            raise ConfigError(f"{sweep.path}:{run.line}: run {run.name!r}: train.global_batch_size={t.global_batch_size} but "
                              f"micro {t.micro_batch_size} x accumulation {t.gradient_accumulation_steps} x world "
                              f"{shape.world_size} = {got}: change the nodes (--sbatch-args), NPROC_PER_NODE or the overrides")
        note = None if sft_pending else check_run_folder(cfg, shape.world_size, overwrite)
        if note:
            print(f"[dpo-dist] {run.name}: {note}", flush=True)

    slurm_dir = root / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    # Overrides travel in files, one per line, so that values with spaces survive.
    base_file = (slurm_dir / "base.overrides").resolve()
    atomic_write_text(base_file, "".join(f"{o}\n" for o in base_overrides))
    common = shlex.split(sbatch_args)
    if not sft_pending and cache_ready(base):
        score_job = None
        print(f"[dpo-dist] reference cache {cache} is complete and matches: no scoring job", flush=True)
    else:
        score_file = (slurm_dir / "score.overrides").resolve()
        atomic_write_text(score_file, "".join(f"{o}\n" for o in [*base_overrides, *shared_overrides(base)]))
        stages = "sft,score" if base.uses_sft() else "score"
        score_job = _sbatch([*common, *shlex.split(score_sbatch_args), str(slurm_scripts / "dpo_hh.sbatch")],
                            {**env, "CONFIG": config_path, "STAGES": stages, "OVERRIDES_FILE": str(score_file)})
        print(f"[dpo-dist] scoring job {score_job}: slurm/dpo_hh.sbatch with STAGES={stages}", flush=True)
    array_args = [*common, f"--array=0-{len(runs) - 1}", *([f"--dependency=afterok:{score_job}"] if score_job else [])]
    try:
        array_job = _sbatch([*array_args, str(slurm_scripts / "dpo_sweep.sbatch")],
                            {**env, "CONFIG": config_path, "SWEEP": str(sweep.path.resolve()), "OVERRIDES_FILE": str(base_file)})
    except ConfigError as e:
        raise ConfigError(f"{e}" + (f" (the scoring job {score_job} was submitted: scancel {score_job})" if score_job else "")) from None
    after = f", after job {score_job} succeeds" if score_job else ""
    print(f"[dpo-dist] array job {array_job}: slurm/dpo_sweep.sbatch, tasks 0-{len(runs) - 1}{after}", flush=True)
    for i, (run, cfg) in enumerate(runs):
        print(f"  task {i}: {run.name:<20} {cfg.output_dir}  {' '.join(run.overrides)}")
    atomic_write_text(root / "sweep.json", json.dumps({"sweep": str(sweep.path), "runs": [
        {"name": run.name, "overrides": run.overrides, "output_dir": cfg.output_dir} for run, cfg in runs],
        "slurm": {"score_job": score_job, "array_job": array_job}}, indent=2))
    jobs = ",".join(j for j in (score_job, array_job) if j)
    print(f"\n  watch them:                 squeue -j {jobs}")
    print(f"  look at them side by side:  tensorboard --logdir {root}")
    if score_job:
        print(f"  (if the scoring job fails, the array tasks wait forever with Reason=DependencyNeverSatisfied: scancel {array_job})")
    return 0


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", metavar="SWEEP_FILE", help="YAML sweep file (runs: and/or grid:, see dpo_dist/sweep.py)")
    p.add_argument("--overwrite", action="store_true", help="move runs started with other settings aside, then redo them")
    p.add_argument("--list", action="store_true", help="print the runs (index, name, folder, overrides) and exit")
    p.add_argument("--task-overrides", type=int, metavar="N",
                   help="print the overrides of run N, one per line (a Slurm array task reads them), and exit")
    p.add_argument("--slurm", action="store_true",
                   help="submit to Slurm instead: a scoring job (skipped when the cache is ready), then an array job "
                   "of one task per run (slurm/dpo_sweep.sbatch) that starts after it succeeds")
    p.add_argument("--sbatch-args", default="", metavar="ARGS",
                   help='with --slurm: sbatch options for both jobs, given with = as they start with a dash: --sbatch-args="--nodes 1 --time 8:00:00"')
    p.add_argument("--score-sbatch-args", default="", metavar="ARGS",
                   help='with --slurm: sbatch options for the scoring job only, after --sbatch-args: --score-sbatch-args="--nodes 4"')
