"""`main.py --export` under a multi-process launch (torchrun, srun): rank 0 exports, the other
ranks wait for it, so no two processes write the same temporary .partial file.

Each rank runs main.cli with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and a
stand-in for export.export_onnx that records which rank called it."""
import os
import sys

import pytest
import torch

from helpers import run_ranks

pytestmark = pytest.mark.slow  # two interpreters and a gloo group


def _rank(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import export
    import main

    def record(model, path, arch, **kwargs):
        with open(os.path.join(out_dir, f"export_calls_rank{rank}"), "w") as f:
            f.write(path)
        return {"onnx_path": path, "json_path": export.metadata_path(path), "verification": {"max_abs_diff": 0.0}}
    export.export_onnx = record
    code = main.cli(["--export", os.path.join(out_dir, "m.onnx"), "--resume", os.path.join(out_dir, "dense.pth"),
                     "--device", "cpu", "--num_workers", "0"])
    torch.save({"code": code}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_export_runs_on_rank_0_only(tmp_path):
    import models
    model = models.build_model("vit_pico_patch8_32", num_classes=10)
    models.save_model_file(str(tmp_path / "dense.pth"), model,
                           models.model_arch("vit_pico_patch8_32", model, 32, (0.5,) * 3, (0.5,) * 3))
    results = run_ranks(__file__, tmp_path, world=2, timeout=240)
    assert [r["code"] for r in results] == [0, 0]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("export_calls")) == ["export_calls_rank0"]


if __name__ == "__main__":  # one rank of test_export_runs_on_rank_0_only
    torch.set_num_threads(1)
    _rank(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
