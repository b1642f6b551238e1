"""The layout planner (issue 27, part 1): its memory model against torch's allocator on CPU training runs of several
layouts of the debug models, its parameter counts against the registry's, its answers at ModelLink's settings, its
one-line errors, and the estimate ``aquila_npu.pretrain`` prints at start."""

import functools

import pytest

from aquila_npu.benchmarking.memory import CPU_LAYOUTS, RUN_FLAGS, compare, measure, measured
from aquila_npu.cli.plan import main as plan_main
from aquila_npu.cli.pretrain import main as pretrain_main, parse as pretrain_parse
from aquila_npu.models.registry import get_model_spec
from aquila_npu.planning import devices
from aquila_npu.planning.layouts import Cluster, candidates, rank
from aquila_npu.planning.memory import Parallel, Workload, estimate, stage_parameters

from helpers import ROOT, call_main, forked_ranks

QUICK = ("tiny-tp1", "small-tp1")


def _run_measured(name, tmp_path):
    nproc, flags = CPU_LAYOUTS[name]
    argv = RUN_FLAGS + flags
    out = tmp_path / "peaks"
    run = functools.partial(pretrain_main, argv)
    codes = forked_ranks(functools.partial(measure, run, str(out)), nproc, tmp_path)
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(nproc))
    assert codes == [0] * nproc, logs
    return compare(pretrain_parse(argv), nproc, measured(str(out))), logs


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow)
                                  for n in CPU_LAYOUTS])
def test_predicted_peak_is_within_10_percent_of_torchs_allocator(name, tmp_path):
    rows, logs = _run_measured(name, tmp_path)
    assert "memory plan: " in logs  # pretrain printed the plan's estimate of its own layout at start
    for row in rows:
        assert abs(row["error"]) <= 0.10, (name, row)


def test_parameters_per_rank_add_up_to_the_registrys_count():
    spec = get_model_spec("aquila2-34b")
    assert stage_parameters(spec, 1, 1) == (spec.num_parameters(),)
    tp, pp = 8, 2
    per_rank = stage_parameters(spec, tp, pp)
    norms = (2 * spec.num_layers + 1) * spec.hidden_size  # RMSNorm weights: whole on every tensor-parallel rank
    assert sum(per_rank) * tp - (tp - 1) * norms == spec.num_parameters()


def _cluster(nodes):
    return Cluster(devices.DEVICES["910B2"], 8, nodes, 353.9)


FUSED = frozenset({"rmsnorm", "flash_attn", "rotary", "swiglu"})


# ModelLink's Aquila2 scripts (examples/aquila2/pretrain_*.sh) and the step times its README publishes for them on
# Ascend NPUs (4.93 s and 307 s; seeds: ModelLink's Aquila2 README)
@pytest.mark.parametrize("model,nodes,seq,gbs,mbs,dtype,modellink,published_s", [
    ("aquila2-7b", 1, 2048, 64, 8, "fp16", Parallel(tp=8, pp=1, dp=1, micro_batch_size=8, sequence_parallel=True),
     4.93),
    ("aquila2-34b", 2, 4096, 1024, 2, "bf16", Parallel(tp=8, pp=2, dp=1, micro_batch_size=2,
                                                       sequence_parallel=True), 307),
])
def test_at_modellinks_settings_the_answer_is_modellinks_layout_or_better_with_the_reason(
        model, nodes, seq, gbs, mbs, dtype, modellink, published_s):
    work = Workload(get_model_spec(model), seq, gbs, dtype, fused=FUSED, fused_adam=True)
    cluster = _cluster(nodes)
    cands, _ = candidates(work, cluster, cluster.device.usable_bytes, micro_batch_size=mbs)
    ranked = rank(cands)
    ours = next(c for c in cands if c.par == modellink)
    assert ours.fits, ours.peak.parts()
    assert abs(ours.step_s / published_s - 1) < 0.25, ours.step_parts  # the estimate against ModelLink's figure
    best = ranked[0]
    if best.par != modellink:  # better: less of what costs time in ModelLink's layout, and it fits
        assert best.step_s < ours.step_s and best.fits
        assert best.step_parts["tensor-parallel"] < ours.step_parts["tensor-parallel"], best.step_parts
    # the documents quote these answers (README / README_zh "Bringing it up", docs/benchmark.md): never stale
    quoted = {f"{c.peak.peak / devices.GIB:.1f} GiB" for c in (best, ours)}
    for doc in ("README.md", "README_zh.md", "docs/benchmark.md"):
        text = (ROOT / doc).read_text()
        missing = [q for q in quoted if q not in text]
        assert not missing, f"{doc} does not quote the planner's {missing} for {model}"


def test_the_command_lists_layouts_and_explains_the_misfits(capsys):
    rc = plan_main(["--model", "aquila2-7b", "--device", "910B2", "--seq-length", "2048", "--global-batch-size", "64",
                    "--micro-batch-size", "8", "--fp16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "layouts fit" in out and "#1 as aquila_npu.pretrain flags: --tensor-model-parallel-size" in out
    assert "do not fit" in out and "tp1 pp1:" in out  # 7B whole on one 910B: 16 bytes a parameter, no room


@pytest.mark.parametrize("argv,message", [
    (["--model", "aquila2-7b", "--device", "MI300X", "--global-batch-size", "8"], "--device MI300X: unknown"),
    (["--model", "aquila2-7b", "--device", "910B2", "--global-batch-size", "8", "--tp", "3"],
     "--tp 3: tensor parallel size 3 does not divide"),
    (["--model", "aquila2-7b", "--device", "910B2", "--global-batch-size", "8", "--pp", "3"], "--pp 3"),
    (["--model", "aquila2-7b", "--device", "910B2"], "--global-batch-size is required"),
    (["--model", "aquila2-7b", "--device-memory-gb", "0", "--global-batch-size", "8"], "--device-memory-gb 0.0"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    rc, err = call_main(plan_main, argv, capsys)
    assert rc == 2 and message in err, err


def test_pretrain_warns_before_building_a_layout_that_will_not_fit(capsys):
    from aquila_npu.training import memory_plan
    from aquila_npu.training.config import resolve

    args = pretrain_parse(["--mock-data", "--train-iters", "1", "--model", "aquila2-7b", "--seq-length", "2048", "--bf16"])
    cfg = resolve(args, None, None, 1)
    said = []
    memory_plan.announce(args, cfg, None, said.append, device_kind="npu", capacity=int(60 * devices.GIB),
                         label="a 60 GiB device")
    assert said[0].startswith("memory plan: ") and "of 60.0 GiB on a 60 GiB device" in said[0]
    assert said[1].startswith("warning: the plan expects more memory than the device has")
    # 7B at tp1 in bf16: 16 bytes a parameter before any activation
    assert estimate(*memory_plan._plan(args, cfg, "npu"))[0].weights == 2 * get_model_spec("aquila2-7b").num_parameters()
