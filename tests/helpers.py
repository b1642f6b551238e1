"""What several test files share: paths, the one child-process environment, torchrun / `python -m` launchers, the
stand-in torchrun for example scripts, the --help check, and the tiny tokenizer + model + conversions fixture data.
(Fixtures themselves live in conftest.py.)"""

import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from aquila_npu import launch
from aquila_npu.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# torchrun's environment: a test that ran setup() in the pytest process may leave these behind (and a process group
# holding MASTER_PORT); a child process must never inherit them.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


def child_env(**extra) -> dict:
    """The environment of every child process a test starts: no torchrun variables, no AQUILA_DEVICE, one thread,
    this checkout importable, this interpreter's scripts (``torchrun``, ``python``) first on PATH even when its
    virtual environment is not activated (``.ci/run`` calls ``VENV/bin/python -m pytest``), warnings quiet; ``extra``
    on top."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and k != "AQUILA_DEVICE"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PATH=os.pathsep.join(filter(None, [os.path.dirname(sys.executable), os.environ.get("PATH")])))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fake_npu_env(**extra) -> dict:
    """``child_env()`` in which ``import torch_npu`` is the fake NPU runtime (``aquila_npu.testing.npu.runtime``):
    ``--device npu`` runs on the CPU. ``extra`` on top."""
    from aquila_npu.testing.npu.runtime import fake_runtime_path

    env = child_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([fake_runtime_path(), env["PYTHONPATH"]])
    return env


def run_module(module: str, *args, cwd=None, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """``python -m module args`` in a child process (exit status not checked)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=child_env(**env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def torchrun(script: str, nproc: int, args, timeout: int = 600, env=None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run a worker under torchrun on the CPU (gloo), one thread per process, in ``env`` (default ``child_env()``);
    fails the test on a non-zero exit unless ``check`` is False."""
    cmd = [*launch.torchrun(nproc), *(script.split() if script.startswith("-m ") else [str(ROOT / script)]),
           *map(str, args)]
    proc = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def torch_npu_wheel(version="2.13.0"):
    """The real torch_npu wheel of ``version`` (never installed), or None where it cannot be had.

    Looked for in $AQUILA_TORCH_NPU_WHEEL (one file), $AQUILA_TORCH_NPU_WHEEL_DIR and .cache/wheels; when missing, the
    test session downloads it once into .cache/wheels (``pip download --no-deps``; AQUILA_NO_DOWNLOAD=1 or no package
    index: the tests that need it skip, saying so). The default is the newest version we pin (the fake runtime mirrors
    it); 2.6.0 is the oldest we support."""
    found = _find_wheel(version)
    if found is None and version not in _DOWNLOAD_TRIED and os.environ.get("AQUILA_NO_DOWNLOAD") != "1":
        _DOWNLOAD_TRIED.add(version)
        os.makedirs(WHEEL_CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"torch-npu=={version}",
                        "-d", WHEEL_CACHE], capture_output=True, timeout=900)
        found = _find_wheel(version)
    return found


WHEEL_CACHE = str(ROOT / ".cache" / "wheels")
_DOWNLOAD_TRIED = set()


def _find_wheel(version):
    names = [os.environ.get("AQUILA_TORCH_NPU_WHEEL") or ""]
    for folder in (os.environ.get("AQUILA_TORCH_NPU_WHEEL_DIR"), WHEEL_CACHE):
        if folder:
            names += sorted(glob.glob(os.path.join(folder, "torch_npu-*.whl")))
    found = [n for n in names if os.path.basename(n).startswith(f"torch_npu-{version}-") and os.path.exists(n)]
    return found[0] if found else None


# Runs in child processes forked from a forkserver: a clean process started once per session that imported torch,
# megatron-core and the commands (no threads: forking the pytest process itself deadlocks once an earlier test left
# gloo or other threads behind). A tiny training run then takes about a second instead of an interpreter start.
FORKSERVER_PRELOAD = ["torch", "megatron.core", "aquila_npu.training.run", "aquila_npu.cli.pretrain",
                      "aquila_npu.jobs.pretrain", "aquila_npu.lora.training", "aquila_npu.cli.convert",
                      "aquila_npu.jobs.convert", "aquila_npu.cli.preprocess", "aquila_npu.data.preprocess",
                      "aquila_npu.cli.generate", "aquila_npu.inference.command", "aquila_npu.cli.evaluate",
                      "aquila_npu.evaluation.command", "helpers"]


def _forkserver():
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def _child(call, log, env):
    rc = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.update(env)
        import torch

        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 for every other child process (2 cores, shared)
        out = call()
        rc = out if isinstance(out, int) and not isinstance(out, bool) else 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def start_forked(call, log, **env):
    """Start ``call()`` (picklable: e.g. ``functools.partial(main, argv)``) in a child forked from the forkserver;
    stdout and stderr go to ``log``, ``env`` is added to its environment, its exit status is what ``call`` returns
    (a non-int: 0). Returns the multiprocessing Process (``.pid``; ``wait_forked``)."""
    proc = _forkserver().Process(target=_child, args=(call, str(log), {k: str(v) for k, v in env.items()}))
    proc.start()
    return proc


def wait_forked(proc) -> int:
    """The exit status of a ``start_forked`` child (-N: killed by signal N)."""
    proc.join()
    return proc.exitcode


def forked(call, log, **env) -> int:
    """``start_forked`` and wait: the exit status."""
    return wait_forked(start_forked(call, log, **env))


def exit_now(status: int = 0) -> int:
    """A child that does nothing (its pid is then a pid that is gone)."""
    return status


def hold_lock(target: str, seconds: float) -> int:
    """A child holding ``target``'s output lock, as a run writing it would."""
    import time

    from aquila_npu.outputs import owner

    owner.Lock(target, "--save-dir").acquire()
    time.sleep(seconds)
    return 0


def start_ranks(call, nproc: int, logdir, **env) -> list:
    """``call()`` on ``nproc`` forked ranks, each with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT on a free port) and its log ``<logdir>/rank<R>.log``. Returns their processes."""
    port = free_port()
    return [start_forked(call, os.path.join(str(logdir), f"rank{r}.log"), RANK=r, WORLD_SIZE=nproc, LOCAL_RANK=r,
                         LOCAL_WORLD_SIZE=nproc, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
            for r in range(nproc)]


def wait_ranks(procs, timeout: float = 600) -> list:
    """Every rank's exit status (-9: killed); as torchrun, the others are killed 10 s after one fails."""
    import time

    end, failed_at = time.monotonic() + timeout, None
    while any(p.exitcode is None for p in procs):
        for p in procs:
            p.join(0.02)
            if p.exitcode not in (None, 0) and failed_at is None:
                failed_at = time.monotonic()
        now = time.monotonic()
        if now > end or (failed_at is not None and now > failed_at + 10):
            for p in procs:
                if p.exitcode is None:
                    p.kill()
    return [p.exitcode for p in procs]


def forked_ranks(call, nproc: int, logdir, timeout: float = 600, **env) -> list:
    """``start_ranks`` and ``wait_ranks``: every rank's exit status."""
    return wait_ranks(start_ranks(call, nproc, logdir, **env), timeout)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def stub_torchrun_argv(script, tmp_path, **env_vars):
    """Run an example script with a stand-in ``torchrun`` that records its arguments (no CANN, no devices, no
    pre-flight unless ``PREFLIGHT`` is given); returns (launcher flags dict, module, the module's argv)."""
    stub = tmp_path / "stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_OUT"\n')
    (stub / "torchrun").chmod(0o755)
    record = tmp_path / "torchrun-args.txt"
    env = {k: v for k, v in child_env().items()  # this interpreter's ``python`` first, as the pre-flight needs
           if k not in ("TP", "PP", "PROMPT", "PROMPTS_FILE", "OUTPUT", "CHAT", "DATA_PATH", "CKPT_SAVE_DIR")}
    env.update(PATH=f"{stub}:{env['PATH']}", STUB_OUT=str(record), CANN_SET_ENV=str(tmp_path / "none.sh"),
               PREFLIGHT="0")  # by default nothing to check: no checkpoint here
    env.update({k: str(v) for k, v in env_vars.items()})
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    i = argv.index("-m")
    return dict(zip(argv[:i:2], argv[1:i:2])), argv[i + 1], argv[i + 2:]


def assert_help_documents_every_flag(parser):
    text = parser.format_help()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"


def call_main(main, args, capsys):
    """A command's ``main`` in this process: (exit status, stderr); argparse's own exits count as their status. An
    input error (``run_cli``'s exit status 2) must be exactly one line on stderr."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse: usage line + error line
        return e.code, capsys.readouterr().err
    err = capsys.readouterr().err
    if rc == 2:
        assert_one_line_error(err)
    return rc, err


def assert_one_line_error(stderr: str) -> None:
    """What a user sees for bad input: one line ``<prog>: error: ...`` (progress bars and warnings aside)."""
    lines = [ln for ln in stderr.strip().splitlines() if ": error: " in ln or "Traceback" in ln]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]


# ------------------------------------------------------------------------------ the tiny tokenizer, model, checkpoints
SYLLABLES = ["ka", "lo", "mi", "ta", "ren", "shu", "po", "vex", "quin", "dar", "el", "ost", "ung", "ber", "fy"]
CHINESE = "北京是中国的首都上海天气很好我们今天学习人工智能模型生成文本问题答案是否你好世界语言"


def words(rng, n):
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def build_assets(root, layouts=((1, 1), (2, 2))):
    """A byte-level BPE tokenizer trained here (English + Chinese, TINY's 1003 ids, Aquila2's special tokens), the
    tiny HF model saved with it, and Megatron conversions of it: {"hf": dir, (tp, pp): dir}."""
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.testing.tiny_hf import TINY, tiny_llama
    from aquila_npu.data.bpe import train_tokenizer

    rng = random.Random(0)
    corpus = []
    for _ in range(3000):
        corpus.append(words(rng, rng.randint(5, 15)) + ". Question: is it true? Answer: yes no Yes No")
        corpus.append("".join(rng.choice(CHINESE) for _ in range(rng.randint(5, 20))))
    hf = os.path.join(root, "hf")
    train_tokenizer(hf, corpus, TINY.vocab_size, exact_size=True)  # pad 0, bos 1, eos 2 as TINY
    tiny_llama().save_pretrained(hf)
    out = {"hf": hf}
    for tp, pp in layouts:
        out[tp, pp] = os.path.join(root, f"mg-tp{tp}-pp{pp}")
        to_megatron(HFReader(hf), out[tp, pp], tp, pp)
    return out


# ------------------------------------------------------------------------------------- documents for the data tests
# ModelLink's alpaca training prompt (docs/data.md), spelled out here independently of aquila_npu.data.templates
ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request. Please note that you need to think "
                 "through your response logically and step by step.")
AQUILA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！这是一个测试。",
    "",  # empty: no document (as in Megatron)
    "Line one\nline two\n\n  indented line with   spaces ",
    "emoji 🙂 and accents: café, naïve, Ærøskøbing",
    "word " * 300,
    "</s> literal special token text and <|endoftext|>",
    "x",
]
ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat well.\n2. Exercise.\n3. Sleep."},
    {"instruction": "Translate to Chinese.", "input": "Good morning", "output": "早上好"},
    {"instruction": "Summarize the text.", "input": "The quick brown fox jumps over the lazy dog. " * 5,
     "output": "A fox jumps over a dog."},
    {"instruction": "Say nothing.", "input": "", "output": ""},
]


def train_data_tokenizer(path):
    """A small BPE tokenizer over the data tests' documents."""
    from aquila_npu.data.bpe import train_tokenizer

    corpus = TEXTS + [r[k] for r in ROWS for k in ("instruction", "input", "output")] + [ALPACA_SYSTEM, AQUILA_SYSTEM]
    return train_tokenizer(str(path), corpus * 5, vocab_size=500)


# ------------------------------------------------------------------- training: tiny model, tokenizer, SFT data
NOUNS = ["apple", "sky", "grass", "snow", "coal", "sun", "rose", "sea", "cloud", "leaf", "milk", "fire"]
COLORS = ["red", "blue", "green", "white", "black", "yellow", "pink", "blue", "grey", "green", "white", "orange"]


def instruction_rows():
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        i = rng.randrange(len(NOUNS))
        rows.append({"instruction": f"What color is the {NOUNS[i]}?", "input": "",
                     "output": f"The {NOUNS[i]} is {COLORS[i]}."})
    return rows


def preprocess_instructions(rows, tok, prefix, *extra):
    from aquila_npu.cli.preprocess import main as preprocess

    src = prefix + ".jsonl"
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with open(src, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    assert preprocess(["--input", src, "--tokenizer-name-or-path", tok, "--output-prefix", prefix,
                       "--tokenizer-type", "PretrainedFromHF", "--handler-name", "GeneralInstructionHandler",
                       "--workers", "1", "--log-interval", "1000", *extra]) == 0
    return prefix


def build_training_assets(d):
    """Tokenizer, the tiny HF model, its tp1-pp1 and tp2-pp2 conversions, instruction data (in folder ``d``)."""
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.testing.tiny_hf import tiny_llama
    from aquila_npu.data.bpe import train_tokenizer

    corpus = [f"{r['instruction']} {r['output']}" for r in instruction_rows()] * 20
    corpus += [ALPACA_SYSTEM + "\n\n### Instruction:\n\n### Response:\n"] * 50  # the prompt template: few tokens
    tok = train_tokenizer(os.path.join(d, "tok"), corpus, vocab_size=1000)
    hf = os.path.join(d, "hf")
    tiny_llama().save_pretrained(hf)
    out = {"tok": tok, "hf": hf, "dir": d}
    for tp, pp in ((1, 1), (2, 2)):
        out[tp, pp] = os.path.join(d, f"mg-tp{tp}-pp{pp}")
        to_megatron(HFReader(hf), out[tp, pp], tp, pp)
    out["sft"] = preprocess_instructions(instruction_rows(), tok, os.path.join(d, "sft", "alpaca"), "--append-eod")
    return out


TRAIN_COMMON = ["--micro-batch-size", 2, "--global-batch-size", 4, "--seq-length", 32, "--lr", 1e-3,
          "--lr-decay-style", "constant", "--clip-grad", 1.0, "--log-interval", 1, "--eval-interval", 1000]


def read_metrics(path, key="lm_loss"):
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    return [r[key] for r in recs if key in r]


# --------------------------------------------------------------------------- LoRA: the PEFT adapters we test
LORA_HF_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AQUILA2_QV = dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.05)  # finetune_lora.sh
LORA_CASES = {"fused-all": dict(target_modules=LORA_HF_MODULES, share_fused_a=True),  # what our exports look like
              "aquila2-qv": AQUILA2_QV,  # separate A's: block-structured on import
              "separate-all": dict(target_modules=LORA_HF_MODULES)}


# ------------------------------------------------------------------------- one-rank training steps in this process
TRAIN_SEQ = 32  # the sequence length of ``trainer``'s runs
SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def trainer(dev, num_layers=None, *extra, seed=1234):
    """(one-step function ``step(sync=True)``, model, optimizer, RunConfig) for aquila2-tiny (``num_layers``) on this
    process's one-rank group, built by ``training.run.build`` from pretrain's flags plus ``extra``; the same weights
    and batches for the same seed."""
    from aquila_npu.benchmarking.run import model_spec
    from aquila_npu.cli.pretrain import parse
    from aquila_npu.models import arch_flags
    from aquila_npu.parallel import initialize_model_parallel
    from aquila_npu.training.batches import MockDataset, micro_batches
    from aquila_npu.training.config import resolve
    from aquila_npu.training.run import build
    from aquila_npu.training.step import train_step

    initialize_model_parallel(1, 1, seed)  # re-seeds: every model built here starts from the same weights
    spec = model_spec("aquila2-tiny", num_layers)
    args = parse([*map(str, arch_flags.to_argv(spec)), "--mock-data", "--train-iters", "4", "--seq-length",
                  str(TRAIN_SEQ), "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3", *extra])
    cfg = resolve(args, None, None, 1)
    model, optimizer, scheduler = build(args, cfg, dev)[:3]
    batches = micro_batches(MockDataset(16, TRAIN_SEQ, spec.vocab_size, seed), consumed_samples=0,
                            micro_batch_size=1, dp_rank=0, dp_size=1)

    def step(sync=True):
        return train_step(batches, model, optimizer, scheduler, num_microbatches=cfg.num_microbatches,
                          seq_length=TRAIN_SEQ, micro_batch_size=1, global_batch_size=cfg.global_batch_size,
                          sync=sync)

    return step, model, optimizer, cfg


def adam_steps(optimizer):
    """The ``step`` counters of torch's Adam state (kept on the host on every device)."""
    return [s["step"] for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            for s in opt.optimizer.state.values() if "step" in s]


def _flatten(data):
    if isinstance(data, (list, tuple)):
        for x in data:
            yield from _flatten(x)
    else:
        yield data


class SyncCounter:
    """Counts the calls that copy a tensor's value to the host (and so wait for a device): ``.item()``,
    ``.tolist()``, ``.cpu()``, ``.numpy()``, ``float() / int() / bool()`` of a tensor, ``torch.tensor(list of
    tensors)`` (one per tensor in it). On the CPU nothing really waits, so the calls that WOULD wait on a device are
    counted. Tensors that torch keeps on the host on a device too (``adam_steps``) are left out."""

    def __init__(self, host_tensors=()):
        import collections

        self.host = {id(t) for t in host_tensors}
        self.calls = collections.Counter()

    def _count(self, what, n=1):
        import traceback

        frame = traceback.extract_stack(limit=3)[0]
        self.calls[(what, frame.filename.rsplit("site-packages/", 1)[-1], frame.lineno)] += n

    def __enter__(self):
        import torch

        self.saved = {name: getattr(torch.Tensor, name) for name in SYNCING}
        self.saved_tensor = torch.tensor
        for name, fn in self.saved.items():
            def counted(t, *a, _fn=fn, _name=name, **k):
                if id(t) not in self.host:
                    self._count(_name)
                return _fn(t, *a, **k)
            setattr(torch.Tensor, name, counted)

        def tensor(data, *a, **k):
            n = sum(isinstance(x, torch.Tensor) for x in _flatten(data))
            if n:
                self._count("torch.tensor", n)
            return self.saved_tensor(data, *a, **k)
        torch.tensor = tensor
        return self

    def __exit__(self, *exc):
        import torch

        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)
        torch.tensor = self.saved_tensor

    @property
    def total(self):
        return sum(self.calls.values())


def assert_layouts_train_alike(runs, one="tp1", other="tp2pp2", steps=4):
    """Two runs of ``runs`` (a fixture's {name: (losses, report)}, metrics in ``runs["dir"]/<name>.jsonl``) trained
    the same: losses that move, equal within 1e-5 relative, gradient norms within 1e-4."""
    import numpy as np

    (a, _), (b, _) = runs[one], runs[other]
    a, b = np.array(a), np.array(b)
    assert len(a) == len(b) == steps and len(set(a)) == steps, (a, b)  # the weights learn: losses move
    assert np.max(np.abs(a - b) / np.abs(a)) < 1e-5, (a, b)
    ga, gb = (np.array(read_metrics(runs["dir"] / f"{n}.jsonl", "grad_norm")) for n in (one, other))
    assert np.max(np.abs(ga - gb) / ga) < 1e-4, (ga, gb)


# --------------------------------------------------------------------------- BAAI's own model code (issue 24)
FLAGAI_VERSION = "1.8.4"
_FLAGAI = {}


def flagai_wheel():
    """flagai 1.8.4's wheel (never installed, never a dependency): $AQUILA_FLAGAI_WHEEL, .cache/wheels, else
    downloaded once into .cache/wheels with ``pip download --no-deps``; None where it cannot be had
    (AQUILA_NO_DOWNLOAD=1, no package index)."""
    name = f"flagai-{FLAGAI_VERSION}-py3-none-any.whl"
    given = os.environ.get("AQUILA_FLAGAI_WHEEL")
    if given:
        return given if os.path.exists(given) else None
    path = os.path.join(WHEEL_CACHE, name)
    if not os.path.exists(path) and "download" not in _FLAGAI and os.environ.get("AQUILA_NO_DOWNLOAD") != "1":
        _FLAGAI["download"] = True
        os.makedirs(WHEEL_CACHE, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"flagai=={FLAGAI_VERSION}",
                        "-d", WHEEL_CACHE], capture_output=True, timeout=900)
    return path if os.path.exists(path) else None


def flagai_root():
    """The folder holding the wheel's ``flagai`` package (extracted once into .cache/flagai-1.8.4; a child process
    with it on PYTHONPATH has FlagAI "installed"), or a pytest skip saying why it cannot be had."""
    import zipfile

    import pytest

    if "root" not in _FLAGAI:
        wheel = flagai_wheel()
        if wheel is None:
            pytest.skip(f"flagai=={FLAGAI_VERSION} (BAAI's model code, the reference) cannot be had: no wheel in "
                        f"{WHEEL_CACHE} and no package index (or AQUILA_NO_DOWNLOAD=1)")
        root = ROOT / ".cache" / f"flagai-{FLAGAI_VERSION}"
        if not (root / "flagai" / "model" / "aquila2").is_dir():
            import shutil

            tmp = f"{root}.tmp{os.getpid()}"
            with zipfile.ZipFile(wheel) as z:
                z.extractall(tmp)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        _FLAGAI["root"] = root
    return _FLAGAI["root"]


def flagai(module: str):
    """``flagai.<module>`` from the wheel's own files (``flagai_root``), unchanged, or a pytest skip saying why it
    cannot be had. The shims transformers 5 needs: ``flagai`` and ``flagai.model`` (and, for the tokenizer,
    ``flagai.data`` / ``flagai.data.tokenizer``, whose ``__init__`` imports every tokenizer FlagAI has and boto3) are
    bare packages (their ``__init__`` is not run; the modules below them import as shipped)."""
    import importlib
    import types

    root = flagai_root()
    bare = ("flagai", "flagai.model") + (("flagai.data", "flagai.data.tokenizer") if module.startswith("data.") else ())
    for name in bare:
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")))]
            sys.modules[name] = package
    return importlib.import_module(f"flagai.{module}")


def flagai_randomize(model, seed):
    """Weights of magnitude 1 (decisive greedy choices): norms 1 + N(0, 0.1), matrices N(0, 1 / fan_in)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            scale = 0.1 if p.dim() == 1 else 1.0 / p.shape[-1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 else 0.0))
    return model


def aquila2_model(spec, seed=0):
    """FlagAI's AquilaForCausalLM for ``spec`` (the config as BAAI's config.json writes it), random weights."""
    configuration = flagai("model.aquila2.configuration_aquila")
    modeling = flagai("model.aquila2.modeling_aquila")
    cfg = {k: v for k, v in spec.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    return flagai_randomize(modeling.AquilaForCausalLM(flagai_readable(configuration.AquilaConfig(**cfg), spec))
                            .float().eval(), seed)


def flagai_readable(config, spec):
    """The transformers 5 shim of BAAI's AquilaConfig: BAAI's code reads ``config.rope_scaling`` as transformers 4
    kept it (None, or BAAI's config.json form ``{"type": "linear", "factor": f}``), transformers 5 turns it into
    ``rope_parameters`` (always a dict). The same as ``aquila_npu.checks.logits.baai_rope_scaling``."""
    from aquila_npu.checks.logits import baai_rope_scaling

    return baai_rope_scaling(config, spec.rope_scaling_factor)


def flagai_config(spec, multiple_of=8) -> dict:
    """FlagAI's config.json (its own keys) of a first-generation model of ``spec``'s shape."""
    from aquila_npu.models.flagai_config import ffn_size

    assert ffn_size(spec.hidden_size, multiple_of) == spec.intermediate_size
    return {"dim": spec.hidden_size, "n_layers": spec.num_layers, "n_heads": spec.num_attention_heads,
            "vocab_size": spec.vocab_size, "max_seq_len": spec.max_position_embeddings, "multiple_of": multiple_of,
            "norm_eps": spec.rms_norm_eps, "initializer_range": 0.006}


def aquila1_model(spec, folder, seed=0, batch=2):
    """FlagAI's AQUILAModel for ``spec``, built by FlagAI's ``init_from_json`` from its config.json in ``folder``
    (with its KV cache for ``batch`` rows), random weights saved there as FlagAI's ``pytorch_model.bin``: a FlagAI
    model folder as ``AutoLoader`` reads it."""
    import torch

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(flagai_config(spec), f)
    aquila_model = flagai("model.aquila_model")
    model = aquila_model.AQUILAModel.init_from_json(os.path.join(folder, "config.json"), use_cache=True,
                                                   max_batch_size=batch)
    model = flagai_randomize(model.float().eval(), seed)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return model
