"""The trainer's GPU step, emulated on CPU: bf16 autocast with the Triton kernels (interpreter).

On CUDA the trainer trains under autocast(bf16) with fp32 master weights and runs every fused op
through Triton; nothing else in the suite drives that combination through the trainer. Here
training.dtype=bfloat16 turns on CPU autocast and model.kernels.* forces the Triton kernels (attention
stays on the reference: the interpreter's bf16 tl.dot is broken), with and without native FP8, for
a few steps against the fp32 run on the same data.
"""

import math

import pytest
import train_testing

from llama3hp.config import load_job_config
from llama3hp.train import trainer as T

pytestmark = pytest.mark.xdist_group("train_gpu_emulated")

STEPS = 4
SMALL = [*train_testing.SMALL, f"training.steps={STEPS}", "metrics.plot=false", "checkpoint.enabled=false"]
TRITON = [f"model.kernels.{op}=triton" for op in ("rmsnorm", "rope", "swiglu", "cross_entropy")]


def _run(tmp_path, dataset, name, *extra):
    job = load_job_config(
        "tiny", [*SMALL, f'data.datasets=["{dataset}"]', f"run_dir={tmp_path}/{name}", *extra]
    )
    rows = T.Trainer(job).run().rows
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows]


@pytest.mark.usefixtures("bf16_round_to_nearest")  # the kernels' bf16 stores round as on the GPU
def test_bf16_autocast_with_triton_kernels_and_fp8_tracks_the_reference(tmp_path, small_dataset):
    bf16 = "training.dtype=bfloat16"
    ref = _run(tmp_path, small_dataset, "fp32", "training.dtype=float32")
    torch_amp = _run(tmp_path, small_dataset, "bf16_torch", bf16)  # PyTorch's own autocast path
    amp = _run(tmp_path, small_dataset, "bf16", bf16, *TRITON)
    fp8 = _run(tmp_path, small_dataset, "bf16_fp8", bf16, "fp8.recipe=rowwise", *TRITON)

    def rel(a, b):
        return max(abs(x - y) / abs(y) for x, y in zip(a, b))

    for losses, norms in (torch_amp, amp, fp8):
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses + norms)
    # The loss moves little in four steps, so the gradient norms (before clipping) are compared too:
    # a wrong or missing gradient shows there. Measured: the Triton kernels under autocast equal
    # PyTorch's autocast path to 1e-7 at the first step, 4e-6 (loss) and 1e-4 (norms) by the fourth;
    # FP8 is 7.5e-5 (loss) and 0.5% (norms) from fp32. (With the interpreter's truncating bf16 casts
    # the norms were 0.7% low.)
    assert rel(amp[0], torch_amp[0]) < 1e-4 and rel(amp[1], torch_amp[1]) < 1e-3, (amp, torch_amp)
    assert rel(fp8[0], ref[0]) < 1e-3 and rel(fp8[1], ref[1]) < 2e-2, (fp8, ref)
    assert torch_amp != ref and fp8[0] != amp[0]  # autocast and FP8 each really ran
