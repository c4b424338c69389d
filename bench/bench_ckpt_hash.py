"""What the checkpoint checksums cost: the COMPLETE marker records every file's size and sha256.

    .venv/bin/python bench/bench_ckpt_hash.py                      # 2 ranks, 4 GiB checkpoint, 3 repeats
    .venv/bin/python bench/bench_ckpt_hash.py --gib 1 --repeats 1  # quick check

A real 2-process gloo group (this machine has 2 cores) writes a checkpoint laid out as DeepSpeed lays
out ZeRO-3's: per rank `bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt` (fp32 master weights + Adam's
two moments: 12 bytes per parameter) and `zero_pp_rank_R_mp_rank_00_model_states.pt` (bf16 weights:
2 bytes per parameter), with torch.save, then measures, per save:

  save      both ranks' torch.save of their files, to the barrier after them;
  rank 0    the old marker: rank 0 hashes every file alone (`mark_complete(folder, step)`), as before;
  parallel  the new marker: `file_records`, each rank hashes its own files, gathered on rank 0.

The files are fresh in the page cache, as after a real save, so hashing is CPU-bound (sha256, one
core per rank). The resume-time check (`damage`, rank 0 alone, once per resume) costs what `rank 0`
costs. Prints a table and the ratios; --json writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RANK = """
import json, sys, time
from pathlib import Path
import torch, torch.distributed as tdist
from dpo_dist.engines.checkpoints import file_records, mark_complete
from dpo_dist.engines.dist import Dist

rank, world, folder, store, per_rank_params, repeats = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(1)
tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
dist = Dist(rank, rank, world, "cpu")
optim = {"fp32": torch.randn(per_rank_params), "exp_avg": torch.randn(per_rank_params), "exp_avg_sq": torch.rand(per_rank_params)}
model = {"bf16": torch.randn(per_rank_params).to(torch.bfloat16)}
rows = []
for repeat in range(repeats):
    step = folder / f"step-{repeat}" / "global_step"
    step.mkdir(parents=True, exist_ok=True)
    tdist.barrier()
    t0 = time.perf_counter()
    torch.save(optim, step / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    torch.save(model, step / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    tdist.barrier()
    t1 = time.perf_counter()
    if rank == 0:
        mark_complete(step.parent, repeat)
    tdist.barrier()
    t2 = time.perf_counter()
    records = file_records(step.parent, dist)
    tdist.barrier()
    t3 = time.perf_counter()
    if rank == 0:
        old = json.loads((step.parent / "COMPLETE").read_text())["files"]
        assert records == old, "parallel and one-rank records differ"
        size = sum(r["size"] for r in records.values())
        rows.append({"bytes": size, "save_s": t1 - t0, "rank0_s": t2 - t1, "parallel_s": t3 - t2})
    tdist.barrier()
    import shutil
    if rank == 0:
        shutil.rmtree(step.parent)
if rank == 0:
    print("ROWS " + json.dumps(rows))
tdist.destroy_process_group()
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=4.0, help="checkpoint size in GiB, all ranks together (default 4)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder under /tmp)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    per_rank_params = int(args.gib * 2**30 / 14 / args.ranks)  # 12 + 2 bytes per parameter
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(args.ranks), str(Path(d) / "ckpt"),
                                   str(Path(d) / "store"), str(per_rank_params), str(args.repeats)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(args.ranks)]
        outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        for out, err in outs:
            print(out, err[-3000:], file=sys.stderr)
        return 1
    rows = json.loads(next(line for line in outs[0][0].splitlines() if line.startswith("ROWS "))[5:])
    gib = rows[0]["bytes"] / 2**30
    med = {k: statistics.median(r[k] for r in rows) for k in ("save_s", "rank0_s", "parallel_s")}
    print(f"checkpoint {gib:.2f} GiB over {args.ranks} ranks ({per_rank_params:,} parameters per rank), "
          f"{len(rows)} saves, medians:")
    print(f"  save (torch.save, all ranks)      {med['save_s']:7.2f} s  {gib / med['save_s']:5.2f} GiB/s")
    print(f"  marker, rank 0 hashes every file  {med['rank0_s']:7.2f} s  {gib / med['rank0_s']:5.2f} GiB/s  "
          f"({med['rank0_s'] / med['save_s']:.2f}x the save)")
    print(f"  marker, each rank its own files   {med['parallel_s']:7.2f} s  {gib / med['parallel_s']:5.2f} GiB/s  "
          f"({med['parallel_s'] / med['save_s']:.2f}x the save)")
    print(f"  speed-up of the marker: {med['rank0_s'] / med['parallel_s']:.2f}x with {args.ranks} ranks")
    if args.json:
        Path(args.json).write_text(json.dumps({"gib": gib, "ranks": args.ranks, "rows": rows, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
