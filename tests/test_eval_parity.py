"""Every task against its references on one tiny random model (2048 positions) and hand-written rows in each task's
real layout (``eval_fixtures``):

* ``--scoring lm-eval``: lm-evaluation-harness 0.4.13 itself runs the stock task YAMLs (``include:``) on the Hugging
  Face model, offline; our library runs the converted checkpoint at tp1 with two data-parallel replicas and at
  tp2-pp2. Identical prompts, identical per-example predictions / generations / filtered outputs, log-likelihoods
  within 1e-4, identical metrics per example and per group.
* ``--scoring modellink``: the prompt of each task's first row equals the string ModelLink builds (written out below,
  from MindSpeed-LLM's templates and format strings), and every generation equals Hugging Face's greedy
  ``generate`` from ModelLink's tokens (the model built from its config in this process; see DEVELOPERS.md).
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, child_env, read_json, torchrun
from eval_fixtures import (AGIEVAL, BBH, CEVAL, CMMLU, GSM8K_TEST, MMLU, SPEC, build_model_assets, write_fixtures,
                           write_lm_eval_tasks)

# (run name, task, options) for both scorings; the generation lengths match eval_fixtures.GEN_TOKENS for lm-eval
RUNS = [
    ("mmlu-lm", "mmlu", {"scoring": "lm-eval", "num_fewshot": 5}),
    ("ceval-lm", "ceval", {"scoring": "lm-eval"}),
    ("cmmlu-lm", "cmmlu", {"scoring": "lm-eval", "num_fewshot": 2}),
    ("gsm8k-lm", "gsm8k", {"scoring": "lm-eval", "max_new_tokens": 32}),
    ("bbh-lm", "bbh", {"scoring": "lm-eval", "max_new_tokens": 24}),
    ("agieval-lm", "agieval", {"scoring": "lm-eval"}),
    ("human_eval-lm", "human_eval", {"scoring": "lm-eval", "max_new_tokens": 48}),
    ("mmlu-ml", "mmlu", {"scoring": "modellink"}),
    ("ceval-ml", "ceval", {"scoring": "modellink"}),
    ("cmmlu-ml", "cmmlu", {"scoring": "modellink"}),
    ("gsm8k-ml", "gsm8k", {"scoring": "modellink", "max_new_tokens": 24}),
    ("bbh-ml", "bbh", {"scoring": "modellink", "max_new_tokens": 16}),
    ("agieval-ml", "agieval", {"scoring": "modellink"}),
    ("human_eval-ml", "human_eval", {"scoring": "modellink", "max_new_tokens": 32}),
    ("mmlu-lm0", "mmlu", {"scoring": "lm-eval"}),  # the evaluate command's default (0-shot): its test's reference
]
MODELLINK_DEFAULT_NEW_TOKENS = {"mmlu": 2, "ceval": 2, "cmmlu": 2, "agieval": 3}
LM_TASKS = {"mmlu": ["anatomy", "philosophy"], "ceval": ["accountant", "computer_network"],
            "cmmlu": ["agronomy", "arts"], "agieval": ["aqua-rat", "lsat-lr", "gaokao-physics"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsuite")
    assets = build_model_assets(str(root))
    paths = write_fixtures(str(root / "data"))
    names = write_lm_eval_tasks(str(root / "data"), str(root / "include"))
    runs = [{"name": n, "task": t, "path": paths[t], "options": o} for n, t, o in RUNS]
    (root / "runs.json").write_text(json.dumps(runs))
    return {"root": root, "assets": assets, "paths": paths, "names": names}


@pytest.fixture(scope="module")
def lm_eval(env):
    """lm-eval's results and per-task samples (sorted by document, then filter)."""
    root = env["root"]
    out = root / "lmeval_out"
    groups = ",".join(n[0] for n in env["names"].values())
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={env['assets']['hf']},"
         "dtype=float32", "--tasks", groups, "--include_path", str(root / "include"), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(out), "--log_samples"],
        env=child_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                           HF_DATASETS_CACHE=str(root / "hf_datasets_cache")),
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = read_json(glob.glob(str(out / "*" / "results_*.json"))[0])["results"]
    samples = {}
    for path in glob.glob(str(out / "*" / "samples_*.jsonl")):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in open(path)),
                               key=lambda s: (s["doc_id"], s.get("filter", "")))
    return results, samples


def _ours(env, layout, nproc, tag):
    out = env["root"] / f"ours-{tag}"
    out.mkdir()
    proc = torchrun("tests/eval_worker.py", nproc, [env["assets"][layout], env["assets"]["hf"], out,
                                                    env["root"] / "runs.json", 4], timeout=900)
    return {n: read_json(out / f"{n}.json") for n, _, _ in RUNS}, proc.stdout


@pytest.fixture(scope="module")
def ours_dp2(env):
    return _ours(env, (1, 1), 2, "tp1-dp2")


@pytest.fixture(scope="module")
def ours_tp2pp2(env):
    return _ours(env, (2, 2), 4, "tp2-pp2")


# ---------------------------------------------------------------- lm-eval parity
def _records(report, subject=None):
    return [r for r in report["records"] if subject is None or r["subject"] == subject]


def _check_multiple_choice(report, samples, group_results, metrics, group_metrics=None):
    task = report["task"]
    for subject in LM_TASKS[task]:
        key = f"local_{task}_{subject.replace('-', '_')}"
        recs, ref = _records(report, subject), samples[key]
        assert len(recs) == len(ref) > 0, (key, len(recs), len(ref))
        for r, s in zip(recs, ref):
            args = [s["arguments"][f"gen_args_{i}"] for i in range(len(s["arguments"]))]
            assert {a["arg_0"] for a in args} == {r["prompt"]}, key  # identical prompt
            lls = [float(x[0]) for x in s["filtered_resps"]]
            assert r["loglikelihoods"] == pytest.approx(lls, abs=1e-4), key
            for m in metrics:
                assert r["metrics"][m] == float(s[m]), (key, m)
    for m in metrics if group_metrics is None else group_metrics:
        assert report["summary"]["metrics"][m] == pytest.approx(group_results[f"{m},none"], abs=1e-12), m


def _check_generation(recs, ref, key):
    assert len(recs) == len(ref) > 0, key
    for r, s in zip(recs, ref):
        assert s["arguments"]["gen_args_0"]["arg_0"] == r["prompt"], key
        assert r["generation"] == s["resps"][0][0], (key, r["generation"], s["resps"][0][0])


def check_against_lm_eval(ours, lm_eval):
    results, samples = lm_eval
    _check_multiple_choice(ours["mmlu-lm"], samples, results["local_mmlu"], ["acc"])
    _check_multiple_choice(ours["ceval-lm"], samples, results["local_ceval"], ["acc", "acc_norm"])
    _check_multiple_choice(ours["cmmlu-lm"], samples, results["local_cmmlu"], ["acc", "acc_norm"])
    agi = ours["agieval-lm"]
    _check_multiple_choice(agi, samples, {}, ["acc", "acc_norm"], group_metrics=())
    math = _records(agi, "math")
    _check_generation(math, samples["local_agieval_math"], "agieval math")
    assert [r["metrics"]["acc"] for r in math] == [float(s["acc"]) for s in samples["local_agieval_math"]]
    assert agi["summary"]["metrics"]["acc"] == pytest.approx(results["local_agieval"]["acc,none"], abs=1e-12)
    # GSM8K: both filters, per example and overall
    gsm = ours["gsm8k-lm"]["records"]
    ref = samples["local_gsm8k"]
    assert len(ref) == 2 * len(gsm) == 2 * len(GSM8K_TEST)
    for s in ref:
        r = gsm[s["doc_id"]]
        _check_generation([r], [s], "gsm8k")
        assert r["prediction"][s["filter"]] == s["filtered_resps"][0]
        assert r["metrics"][f"exact_match,{s['filter']}"] == float(s["exact_match"])
    for f in ("strict-match", "flexible-extract"):
        assert ours["gsm8k-lm"]["summary"]["metrics"][f"exact_match,{f}"] == \
            results["local_gsm8k"][f"exact_match,{f}"]
    # BBH
    bbh = ours["bbh-lm"]
    for subtask in BBH:
        recs = _records(bbh, subtask)
        _check_generation(recs, samples[f"local_bbh_{subtask}"], subtask)
        assert [r["metrics"]["exact_match"] for r in recs] == \
            [float(s["exact_match"]) for s in samples[f"local_bbh_{subtask}"]]
    assert bbh["summary"]["metrics"]["exact_match"] == pytest.approx(results["local_bbh"]["exact_match,none"])
    # HumanEval: prompt, completion and lm-eval's filtered prediction (prompt + completion) start our program
    he = ours["human_eval-lm"]["records"]
    _check_generation(he, samples["local_humaneval"], "humaneval")
    for r, s in zip(he, samples["local_humaneval"]):
        assert r["prediction"].startswith(s["filtered_resps"][0][0] + "\n")
        assert r["status"][0] in ("passed", "failed", "timed out")


def test_lm_eval_scoring_tp1_two_replicas_equals_lm_eval(ours_dp2, lm_eval):
    check_against_lm_eval(ours_dp2[0], lm_eval)


@pytest.mark.slow
def test_lm_eval_scoring_tp2_pp2_equals_lm_eval(ours_tp2pp2, lm_eval):
    check_against_lm_eval(ours_tp2pp2[0], lm_eval)


# ---------------------------------------------------------------- ModelLink's prompts, written out
def _block(q, a, b, c, d):
    return f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}"


EXPECTED_MODELLINK_PROMPT = {
    # mmlu_5shot_template.json's format: header with two spaces, dev rows joined by "\n", then "\n\n" + question
    "mmlu": "The following are multiple choice questions (with answers) about  anatomy.\n"
            "Which bone is in the arm?\nA. femur\nB. humerus\nC. tibia\nD. fibula\nAnswer: B\n"
            "The heart has how many chambers?\nA. two\nB. three\nC. four\nD. five\nAnswer: C\n"
            "Where is the liver?\nA. left chest\nB. right abdomen\nC. head\nD. foot\nAnswer: B\n"
            "What carries oxygen?\nA. platelets\nB. plasma\nC. red cells\nD. white cells\nAnswer: C\n"
            "The skull protects the\nA. heart\nB. lungs\nC. brain\nD. stomach\nAnswer: C\n\n"
            "Which organ pumps blood?\nA. heart\nB. liver\nC. kidney\nD. lung\nAnswer:",
    "ceval": "请从下列选择题中选择正确的选项。\n\n"
             "问：会计的基本假设是什么\nA. 持续经营\nB. 天气很好\nC. 人工智能\nD. 语言模型\n答：A\n\n"
             "问：资产负债表反映\nA. 经营成果\nB. 财务状况\nC. 现金流量\nD. 所有者权益变动\n答：B\n\n"
             "问：会计要素包括\nA. 资产\nB. 北京\nC. 上海\nD. 网络\n答：A\n\n"
             "问：收入会导致\nA. 负债增加\nB. 资产减少\nC. 所有者权益增加\nD. 费用增加\n答：C\n\n"
             "问：会计期间通常为\nA. 一天\nB. 一周\nC. 一月\nD. 一年\n答：D\n\n"
             "问：下列属于流动资产的是\nA. 货币资金\nB. 固定资产\nC. 无形资产\nD. 长期股权投资\n答：",
    "cmmlu": "以下是中国关于农学考试的单项选择题，请选出其中的正确答案。\n "
             "农作物需要什么\nA. 阳光\nB. 网络\nC. 会计\nD. 绘画\n答案： A\n"
             "土壤的主要成分\nA. 矿物质\nB. 塑料\nC. 金属\nD. 玻璃\n答案： A\n"
             "水稻适合种植在\nA. 沙漠\nB. 水田\nC. 高山\nD. 冰川\n答案： B\n"
             "化肥的作用\nA. 提供养分\nB. 杀虫\nC. 除草\nD. 灌溉\n答案： A\n"
             "农作物轮作可以\nA. 减少病虫害\nB. 增加降雨\nC. 降低温度\nD. 改变季节\n答案： A\n\n\n"
             "小麦是一种\nA. 粮食作物\nB. 经济作物\nC. 油料作物\nD. 饲料作物\n答案： ",
    "gsm8k": "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
             "done, there will be 21 trees. How many trees did the grove workers plant today?\n\nA:There are 15 trees "
             "originally. Then there were 21 trees after some more were planted. So there must have been 21 - 15 = 6. "
             "The answer is 6.\n\nQ: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are "
             "in the parking lot?\n\nA:There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.\n\n"
             "Q: Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
             "total?\n\nA:Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
             "After eating 35, they had 74 - 35 = 39. The answer is 39.\n\n"
             "A box holds 6 eggs. How many eggs are in 4 boxes?",
    "bbh": "Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not True ) ) is\nA: False\n\n"
           "Q: True and False and not True and True is\nA: False\n\nQ: not not ( not ( False ) ) is\nA: True\n\n"
           "Q: not ( True ) and ( True ) is\nA:",
}


def test_modellink_prompts_are_modellinks(ours_dp2, env):
    ours = ours_dp2[0]
    for task, expected in EXPECTED_MODELLINK_PROMPT.items():
        assert ours[f"{task}-ml"]["records"][0]["prompt"] == expected, task
    mmlu = _records(ours["mmlu-ml"], "anatomy")
    assert mmlu[1]["prompt"].endswith("\n\n The largest bone is the \nA. femur\nB. stapes\nC. ulna\nD. radius\nAnswer:")
    # ModelLink reads the test rows with pandas' defaults: an option written None prints as nan
    assert mmlu[2]["prompt"].endswith("\n\nCells, tissues and organs form\nA. systems\nB. nan\nC. atoms\n"
                                      "D. stars, planets\nAnswer:")
    assert "B. None" in _records(ours["mmlu-lm"], "anatomy")[2]["prompt"]  # lm-eval keeps the text
    # AGIEval: ModelLink's few-shot text, then "   {passage}\n{question}\n{question template}\n{options}\n{answer}"
    agi = {r["subject"]: r for r in reversed(ours["agieval-ml"]["records"])}
    assert agi["aqua-rat"]["prompt"].startswith("Here are the answers for the problems in the exam.\nProblem 1.    A "
                                                "cycled from P to Q at 10 kmph")
    assert agi["aqua-rat"]["prompt"].endswith(
        "\nAnswer:B\n\nProblem 6.   A train covers 60 km in 1.5 hours. What is its speed?\n\nChoose from the following "
        "options:\n\n(A)30 km/h\n(B)40 km/h\n(C)45 km/h\n(D)50 km/h\n(E)60 km/h\n\nAnswer:")
    assert agi["lsat-lr"]["prompt"].endswith(
        "   Every swan the researcher saw was white. \nWhich one of the following most weakens the argument?\n\n"
        "Choose from the following options:\n\n(A)A black swan was seen.\n(B)Swans can fly.\n(C)The researcher likes "
        "birds.\n(D)Some birds are white.\n(E)Swans eat plants.\n\nAnswer:")
    assert agi["math"]["prompt"].endswith("\n\nProblem 5.   What is $2 + 3$?\n\nChoose from the following options:\n\n"
                                          "\n\nAnswer:")
    assert [r["target"] for r in ours["agieval-ml"]["records"]] == ["B", "C", "A,C", "B", "A", "5", "\\frac{3}{4}"]
    he = ours["human_eval-ml"]["records"][0]
    assert he["prompt"].startswith("The definition and function description of the python function are as follows. "
                                   "Please complete the implementation of the python function.\nfrom typing import "
                                   "List\n\n\ndef filter_by_substring(")
    assert he["prediction"].startswith("from typing import List\nimport math\nfrom typing import List\n"
                                       "def filter_by_substring(")


def test_modellink_generations_equal_hf_greedy(ours_dp2, env):
    """ModelLink's decoding (tokenizer.encode(prompt), greedy, EOS stops, special tokens skipped) vs HF generate.
    A prompt longer than 2048 - max_new_tokens tokens (AGIEval's few-shot text with this tiny tokenizer) keeps its
    last tokens, as lm-eval truncates (ModelLink itself fails on such a prompt)."""
    from transformers import AutoTokenizer

    from aquila_npu.testing.tiny_hf import tiny_llama

    tok = AutoTokenizer.from_pretrained(env["assets"]["hf"])
    model = tiny_llama(SPEC)
    ours = ours_dp2[0]
    checked = truncated = 0
    for name, task, options in RUNS:
        if options["scoring"] != "modellink":
            continue
        n_new = options.get("max_new_tokens", MODELLINK_DEFAULT_NEW_TOKENS.get(task))
        for r in ours[name]["records"]:
            full = tok.encode(r["prompt"])
            keep = SPEC.max_position_embeddings - n_new
            assert r["truncated"] == (len(full) > keep)
            truncated += r["truncated"]
            ids = torch.tensor([full[-keep:]])
            with torch.no_grad():
                out = model.generate(ids, do_sample=False, max_new_tokens=n_new, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
            assert r["generation"] == tok.decode(new, skip_special_tokens=True), (name, r["line"])
            checked += 1
    assert checked == sum(len(ours[n]["records"]) for n, _, o in RUNS if o["scoring"] == "modellink")
    assert 0 < truncated < checked


def test_modellink_answers_follow_modellinks_rules(ours_dp2):
    """The recorded answer is ModelLink's extraction of the recorded generation (the extraction rules themselves are
    checked on written-out texts in test_eval_prompts)."""
    from aquila_npu.evaluation.bbh import modellink_bbh_answer
    from aquila_npu.evaluation.cmmlu import first_option
    from aquila_npu.evaluation.gsm8k import modellink_gsm8k_answer
    from aquila_npu.evaluation.mmlu import modellink_mmlu_answer

    ours = ours_dp2[0]
    for r in ours["mmlu-ml"]["records"]:
        assert r["prediction"] == modellink_mmlu_answer(r["generation"])
        assert r["correct"] == (r["prediction"] == r["target"])
    for r in ours["ceval-ml"]["records"]:
        assert r["prediction"] == r["generation"].strip() and r["correct"] == (r["prediction"] == r["target"])
    for r in ours["cmmlu-ml"]["records"]:
        assert r["prediction"] == first_option(r["generation"])
    for r in ours["gsm8k-ml"]["records"]:
        assert r["prediction"] == modellink_gsm8k_answer(r["generation"])
        assert r["correct"] == (r["prediction"] == r["target"].split("#### ")[-1])
    for r in ours["bbh-ml"]["records"]:
        assert r["prediction"] == modellink_bbh_answer(r["generation"], r["subject"])
    for r in ours["human_eval-ml"]["records"]:
        assert r["correct"] == (r["status"] == ["passed"])


@pytest.mark.slow
def test_tp2_pp2_gives_the_same_records(ours_dp2, ours_tp2pp2):
    """Both scorings: the same prompts, generations and answers at tp2-pp2 as at tp1 with two replicas."""
    a, b = ours_dp2[0], ours_tp2pp2[0]
    for name, _, _ in RUNS:
        for x, y in zip(a[name]["records"], b[name]["records"]):
            for key in ("prompt", "generation", "prediction", "correct", "metrics", "target", "file", "line"):
                assert x.get(key) == y.get(key), (name, key)
            if "loglikelihoods" in x:
                assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-4)


def test_reports_group_by_subject_and_category(ours_dp2):
    ours, stdout = ours_dp2
    mmlu = ours["mmlu-ml"]["summary"]
    assert mmlu["subjects"]["anatomy"]["n"] == 3 and mmlu["subjects"]["philosophy"]["n"] == 2
    assert set(mmlu["categories"]) == {"stem", "humanities"}
    ceval = ours["ceval-lm"]["summary"]
    assert {c: v["n"] for c, v in ceval["categories"].items()} == {"Other": 3, "STEM": 2}
    assert sorted(ours["cmmlu-lm"]["summary"]["categories"]) == ["Humanities", "Other"]
    for run in ("mmlu-lm", "ceval-lm", "cmmlu-lm"):
        s = ours[run]["summary"]
        assert s["metrics"]["acc"] == pytest.approx(sum(r["correct"] for r in ours[run]["records"]) / s["n"])
    assert "mmlu (scoring modellink): 5 examples" in stdout and "ceval (scoring lm-eval): 5 examples" in stdout
    assert "exact_match,strict-match" in stdout and "pass@1" in stdout


def test_the_evaluate_command_runs_several_tasks_with_either_scoring(env, ours_dp2, tmp_path):
    """``python -m aquila_npu.evaluate`` with ModelLink's flags: two tasks at once (comma-separated, one data path
    each), --output-dir, and per-example records equal to the library's, for either scoring."""
    for scoring, tag in (("lm-eval", "lm"), ("modellink", "ml")):
        out = tmp_path / scoring
        out.mkdir()
        proc = torchrun("-m aquila_npu.evaluate", 1, [
            "--task", "ceval,mmlu", "--task-data-path", f"{env['paths']['ceval']},{env['paths']['mmlu']}",
            "--scoring", scoring, "--load", env["assets"][1, 1], "--tokenizer-name-or-path", env["assets"]["hf"],
            "--output-dir", out, "--no-progress"])
        for task in ("ceval", "mmlu"):
            report = read_json(out / f"{task}.json")
            # the library's run with the options the command line gives (mmlu-lm is 5-shot, the command 0-shot)
            want = ours_dp2[0][f"{task}-{tag}" + ("0" if (task, tag) == ("mmlu", "lm") else "")]["records"]
            assert report["scoring"] == scoring and report["total"] == len(want)
            assert [r["prediction"] for r in report["records"]] == [r["prediction"] for r in want], (task, scoring)
            assert f"{task} (scoring {scoring})" in proc.stdout


def test_fixture_layouts_are_the_real_ones(env):
    """The rows written are the layouts ModelLink documents (checked on the files, not through our reader)."""
    paths = env["paths"]
    first = open(os.path.join(paths["mmlu"], "anatomy_test.csv")).readline()
    assert first == "Which organ pumps blood?,heart,liver,kidney,lung,A\n"  # no header
    assert open(os.path.join(paths["cmmlu"], "agronomy.csv")).readline() == ",Question,A,B,C,D,Answer\n"
    assert open(os.path.join(paths["ceval"], "accountant_val.csv")).readline() == \
        "id,question,A,B,C,D,answer,explanation\n"
    assert set(json.load(open(os.path.join(paths["bbh"], "boolean_expressions.json")))) == {"canary", "examples"}
    assert sorted(os.listdir(paths["agieval"])) == sorted(f"{s}.jsonl" for s in AGIEVAL)
    assert len(MMLU) == len(CEVAL) == len(CMMLU) == 2
    assert ROOT.is_dir()
