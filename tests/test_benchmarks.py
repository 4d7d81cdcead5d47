"""``pytest benchmarks/ --benchmark-only``: the long CPU cases are opt-in (``--long``), a skip
says why in words a reader can act on, each benchmark prints a line as it ends and the run ends
with the comparison table (ratios against ours)."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU selection of the benchmarks (on a GPU they differ)")


def _bench(tmp_path, *args):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", *args, "--benchmark-only", "-q", "-rs",
                           "-p", "no:cacheprovider"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_long_cases_are_opt_in_and_skips_say_why(tmp_path):
    out = _bench(tmp_path, "benchmarks/test_bench_cross_entropy.py", "-k",
                 "gpt2_head or liger or tile_sweep")
    assert out.count("long case (about 1 minute per provider, 4.5 GB for eager PyTorch on 2 CPU "
                     "cores): run with --long") == 1  # -rs folds the four into one line
    assert "SKIPPED [4]" in out and "liger: needs CUDA" in out
    assert "tile sweep: needs CUDA and triton" in out
    assert "not available" not in out


def test_lines_while_running_and_the_table_at_the_end(tmp_path):
    out = _bench(tmp_path, "benchmarks/test_bench_contrastive.py", "-k",
                 "fwd_bwd_mining and (ours_torch or torch_vectorised or open_clip or inf_cl)")
    lines = out.splitlines()
    progress = [line for line in lines if line.startswith("[bench] contrastive_loss size=B512")]
    assert len(progress) == 2 and progress[0].startswith(
        "[bench] contrastive_loss size=B512 ours_torch: ")
    assert " ms (" in progress[1] and "× ours_torch)" in progress[1]
    summary = lines.index(next(line for line in lines
                               if "comparison with the alternatives (this run)" in line))
    table = "\n".join(lines[summary:])
    assert "| contrastive_loss | size=B512 | torch_vectorised |" in table
    assert "| contrastive_loss | size=B512 | ours_torch |" in table and "1.00×" in table
    # the reasons: what is missing, or what it needs
    assert ("open_clip: open_clip not installed" in out
            or "open_clip: open_clip installed but does not import" in out)
    assert "inf_cl: needs CUDA" in out
    assert os.path.isfile(tmp_path / "benchmarks_cpu.md")


def test_gpu_check_keeps_running_the_long_cases():
    # gpu_check.sh's stages pass --long to every benchmark run (they ran the long cases before
    # they were opt-in)
    script = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    stage = script[script.index("run_stage() {"):]
    stage = stage[:stage.index("\n}\n")]
    assert "--benchmark-only --long" in stage
