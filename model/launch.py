"""Build (and run) the command that starts the trainer, from the workflow's `train.launch` settings.

    python -m model.launch --accelerate-config config/accelerate/cpu.yaml --processes 2 -- \\
        --stage 1 --features ... --out results/experiments/full/stage1 --resume

Two launchers, picked from the Accelerate config file and the process count:

* CPU with more than one process: `torchrun` (`python -m torch.distributed.run`), one gloo rank per
  process, `ACCELERATE_USE_CPU=true`. `accelerate launch --cpu --num_processes 2` and an Accelerate
  config with `distributed_type: MULTI_CPU` start ONE process without MPI (checked with accelerate
  1.15 and torch 2.13 on CPU), so they are never used for that.
* everything else (one CPU process, one or many GPUs, DeepSpeed ZeRO-2, several machines):
  `accelerate launch --config_file <file> --num_processes N --num_machines M ...`; `--processes` and
  `--machines` override the file's `num_processes` / `num_machines`.

Several machines (SLURM: one launcher per node): the rank comes from `--machine-rank`, else
`$SLURM_NODEID`, else `$MACHINE_RANK`; the head node from `--main-process-ip`, else `$MASTER_ADDR`.
`--dry-run` prints the command instead of running it. Otherwise the command replaces this process
(exec), so signals and the exit status are the trainer's own.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CPU_TYPES = {"NO", "MULTI_CPU"}


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    launcher: str  # "torchrun" | "accelerate"

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.argv)


def read_accelerate_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"accelerate config {p} not found")
    cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: not a YAML mapping")
    return cfg


def is_cpu_config(cfg: dict[str, Any]) -> bool:
    """A config that trains on CPU: `use_cpu: true`, or a CPU distributed type on a machine without CUDA."""
    if cfg.get("use_cpu"):
        return True
    if str(cfg.get("distributed_type", "NO")) in CPU_TYPES:
        try:
            import torch

            return not torch.cuda.is_available()
        except ImportError:  # pragma: no cover - the trainer needs torch anyway
            return True
    return False


def gpus_per_machine(accelerate_config: str | os.PathLike, processes: int | None = None,
                     machines: int | None = None) -> int:
    """GPUs one machine of the run needs: 0 for a CPU config (whatever its process count), else the
    processes per machine (one process per GPU). The train rules request this as their `gpu` resource,
    so a SLURM job is granted the GPUs its launcher will start processes on."""
    cfg = read_accelerate_config(accelerate_config)
    # not is_cpu_config(): the workflow plans jobs on a login node without CUDA, where a GPU file's
    # `distributed_type: NO` (single_gpu.yaml) must still ask for its GPU
    if cfg.get("use_cpu") or str(cfg.get("distributed_type", "NO")) == "MULTI_CPU":
        return 0
    nproc, nmach = process_counts(cfg, processes, machines)
    if nproc % nmach:
        raise ValueError(f"{accelerate_config}: {nproc} processes do not split evenly over {nmach} machines")
    return nproc // nmach


def process_counts(cfg: dict[str, Any], processes: int | None, machines: int | None) -> tuple[int, int]:
    """(processes, machines): the ones given, else the Accelerate file's; both must be >= 1."""
    nproc = int(processes if processes is not None else cfg.get("num_processes", 1) or 1)
    nmach = int(machines if machines is not None else cfg.get("num_machines", 1) or 1)
    if nproc < 1 or nmach < 1:
        raise ValueError(f"processes ({nproc}) and machines ({nmach}) must be >= 1")
    return nproc, nmach


def build_launch(
    accelerate_config: str | os.PathLike,
    trainer_args: list[str],
    *,
    processes: int | None = None,
    machines: int | None = None,
    machine_rank: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    module: str = "model.train",
    python: str = sys.executable,
    environ: dict[str, str] | None = None,
) -> Launch:
    environ = dict(os.environ if environ is None else environ)
    cfg = read_accelerate_config(accelerate_config)
    nproc, nmach = process_counts(cfg, processes, machines)
    if nmach > 1:
        if machine_rank is None:
            rank = environ.get("SLURM_NODEID", environ.get("MACHINE_RANK"))
            if rank is None:
                raise ValueError("several machines: give --machine-rank (or set SLURM_NODEID / MACHINE_RANK)")
            machine_rank = int(rank)
        main_process_ip = main_process_ip or environ.get("MASTER_ADDR")
        if not main_process_ip:
            raise ValueError("several machines: give --main-process-ip (or set MASTER_ADDR)")
        main_process_port = int(main_process_port or environ.get("MASTER_PORT", 29500))

    if is_cpu_config(cfg) and nproc > 1:
        argv = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc // nmach)]
        if nproc % nmach:
            raise ValueError(f"{nproc} processes do not split evenly over {nmach} machines")
        if nmach == 1:
            argv += ["--standalone"]  # free port on localhost, no rendezvous server to configure
        else:
            argv += ["--nnodes", str(nmach), "--node_rank", str(machine_rank),
                     "--master_addr", str(main_process_ip), "--master_port", str(main_process_port)]
        argv += ["-m", module, *trainer_args]
        return Launch(argv, {"ACCELERATE_USE_CPU": "true"}, "torchrun")

    argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            "--num_processes", str(nproc), "--num_machines", str(nmach)]
    if nmach > 1:
        argv += ["--machine_rank", str(machine_rank), "--main_process_ip", str(main_process_ip),
                 "--main_process_port", str(main_process_port), "--rdzv_backend", "c10d"]
    argv += ["-m", module, *trainer_args]
    return Launch(argv, {}, "accelerate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, trainer_args = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(prog="python -m model.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accelerate-config", required=True,
                    help="Accelerate config file (config/accelerate/*.yaml): the launcher, process and machine counts")
    ap.add_argument("--processes", type=int, default=None, help="total processes (default: the file's)")
    ap.add_argument("--machines", type=int, default=None, help="machines (default: the file's)")
    ap.add_argument("--machine-rank", type=int, default=None,
                    help="this machine's rank, with several machines (default: $SLURM_NODEID, else $MACHINE_RANK)")
    ap.add_argument("--main-process-ip", default=None,
                    help="address of the rank-0 machine, with several machines (default: $MASTER_ADDR)")
    ap.add_argument("--main-process-port", type=int, default=None,
                    help="port on the rank-0 machine, with several machines (default: $MASTER_PORT, else 29500)")
    ap.add_argument("--module", default="model.train", help="the trainer module each process runs (default: model.train)")
    ap.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    args = ap.parse_args(argv)
    launch = build_launch(
        args.accelerate_config,
        trainer_args,
        processes=args.processes,
        machines=args.machines,
        machine_rank=args.machine_rank,
        main_process_ip=args.main_process_ip,
        main_process_port=args.main_process_port,
        module=args.module,
    )
    if args.dry_run:
        print(launch.shell())
        return 0
    print(f"model.launch ({launch.launcher}): {launch.shell()}", file=sys.stderr, flush=True)
    os.execvpe(launch.argv[0], launch.argv, {**os.environ, **launch.env})
    return 127  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
