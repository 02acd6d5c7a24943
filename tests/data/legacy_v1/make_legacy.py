"""Make a tiny buffer, run and share with the code at git 5bd3815 (width-4 ConvNet, noise-initialised)."""
import functools
import distill.buffer as B
from distill.config import BufferConfig, RunConfig
from distill.models import create_model

WIDTH = {"width": 4}
B.create_model = functools.partial(create_model, **WIDTH)
_write = B.write_expert
def write_expert(*a, json_attrs, **kw):
    return _write(*a, json_attrs={**json_attrs, "model_kwargs": WIDTH}, **kw)
B.write_expert = write_expert
B.build_buffer(BufferConfig(data="tiny.npz", out="buffer", model="convnet", experts=1, epochs=2,
                            snapshot_dtype="float16", device="cpu"))
from distill.mtt import distill_run
distill_run(RunConfig(buffer="buffer", out="run", ipc=1, iterations=2, syn_steps=2, expert_epochs=1,
                      max_start_epoch=1, init="noise", eval_every=0, eval_models=0, device="cpu"))
from distill.privacy import run_audit
r = run_audit("run", "tiny.npz", networks=1, epochs=2, expert_epochs=1, bootstrap=20, pairs=0, device="cpu")
print(r.text())
from distill.export import export_share
export_share("run", "share_v1_0.h5", description="A pre-change share made from noise, for the loading test.", force=True)
