"""Hand-written benchmark rows in each task's real layout, the tiny model they run on, and lm-eval task YAMLs that
read the same rows offline (``include:`` of lm-eval's own task YAML, so its prompts, few-shot settings, filters and
metrics are the stock ones; only the data source and, for generation, ``max_gen_toks`` are overridden).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random

from aquila_npu.testing.lm_eval_tasks import (lm_eval_tasks_dir, write_csv, write_group, write_gsm8k, write_jsonl,
                                              write_lm_eval_gsm8k, write_lm_eval_mmlu, write_mmlu, write_yaml)
from aquila_npu.testing.tiny_hf import TINY, tiny_llama

LM_EVAL_TASKS = lm_eval_tasks_dir()
SPEC = dataclasses.replace(TINY, name="tiny-gqa-2k", max_position_embeddings=2048)
SYLLABLES = ["ka", "lo", "mi", "ta", "ren", "shu", "po", "vex", "quin", "dar", "el", "ost", "ung", "ber", "fy"]
CHINESE = "北京是中国的首都上海天气很好我们今天学习人工智能模型生成文本问题答案是否你好世界语言农作物土壤艺术绘画网络协议会计"

# ---------------------------------------------------------------- rows (question, A, B, C, D, answer)
MMLU = {
    "anatomy": {
        "dev": [("Which bone is in the arm?", "femur", "humerus", "tibia", "fibula", "B"),
                ("The heart has how many chambers?", "two", "three", "four", "five", "C"),
                ("Where is the liver?", "left chest", "right abdomen", "head", "foot", "B"),
                ("What carries oxygen?", "platelets", "plasma", "red cells", "white cells", "C"),
                ("The skull protects the", "heart", "lungs", "brain", "stomach", "C")],
        "test": [("Which organ pumps blood?", "heart", "liver", "kidney", "lung", "A"),
                 (" The largest bone is the ", "femur", "stapes", "ulna", "radius", "A"),
                 ("Cells, tissues and organs form", "systems", "None", "atoms", "stars, planets", "A")],
    },
    "philosophy": {
        "dev": [("Who wrote the Republic?", "Plato", "Kant", "Hume", "Locke", "A"),
                ("Ethics studies", "rocks", "right action", "stars", "numbers", "B"),
                ("Descartes said I think, therefore", "I doubt", "I am", "I wait", "I go", "B"),
                ("Logic studies", "valid inference", "weather", "music", "cooking", "A"),
                ("A priori knowledge is known", "by experience", "by smell", "without experience", "never", "C")],
        "test": [("Socrates was a teacher of", "Plato", "Newton", "Darwin", "Euler", "A"),
                 ("Metaphysics asks about", "prices", "reality", "grammar", "sports", "B")],
    },
}
CEVAL = {
    "accountant": {
        "dev": [("会计的基本假设是什么", "持续经营", "天气很好", "人工智能", "语言模型", "A", "持续经营是基本假设"),
                ("资产负债表反映", "经营成果", "财务状况", "现金流量", "所有者权益变动", "B", "反映财务状况"),
                ("会计要素包括", "资产", "北京", "上海", "网络", "A", "资产是会计要素"),
                ("收入会导致", "负债增加", "资产减少", "所有者权益增加", "费用增加", "C", "收入增加权益"),
                ("会计期间通常为", "一天", "一周", "一月", "一年", "D", "会计年度")],
        "val": [("下列属于流动资产的是", "货币资金", "固定资产", "无形资产", "长期股权投资", "A"),
                (" 会计核算的基础是 ", "权责发生制", "收付实现制", "天气", "网络", "A"),
                ("企业的利润等于", "收入减费用", "资产减负债", "收入加费用", "资产加负债", "A")],
    },
    "computer_network": {
        "dev": [("网络协议的三要素不包括", "语法", "语义", "时序", "颜色", "D", "颜色不是"),
                ("IP地址有多少位", "16", "32", "64", "128", "B", "IPv4是32位"),
                ("TCP是", "面向连接的", "无连接的", "物理层协议", "应用层协议", "A", "面向连接"),
                ("HTTP默认端口", "21", "25", "80", "110", "C", "80"),
                ("DNS的作用是", "域名解析", "文件传输", "邮件发送", "远程登录", "A", "域名解析")],
        "val": [("OSI模型有几层", "五", "六", "七", "八", "C"),
                ("以太网属于", "局域网", "广域网", "城域网", "个人网", "A")],
    },
}
CMMLU = {
    "agronomy": {
        "dev": [("农作物需要什么", "阳光", "网络", "会计", "绘画", "A"),
                ("土壤的主要成分", "矿物质", "塑料", "金属", "玻璃", "A"),
                ("水稻适合种植在", "沙漠", "水田", "高山", "冰川", "B"),
                ("化肥的作用", "提供养分", "杀虫", "除草", "灌溉", "A"),
                ("农作物轮作可以", "减少病虫害", "增加降雨", "降低温度", "改变季节", "A")],
        "test": [("小麦是一种", "粮食作物", "经济作物", "油料作物", "饲料作物", "A"),
                 ("土壤酸碱度用什么表示", "pH值", "温度", "湿度", "密度", "A")],
    },
    "arts": {
        "dev": [("绘画的基本要素", "线条", "网络", "会计", "土壤", "A"),
                ("京剧起源于", "北京", "上海", "广州", "深圳", "A"),
                ("国画使用", "油彩", "水墨", "丙烯", "粉笔", "B"),
                ("书法的工具是", "毛笔", "钢笔", "铅笔", "粉笔", "A"),
                ("艺术的功能包括", "审美", "会计", "农业", "网络", "A")],
        "test": [("蒙娜丽莎的作者", "达芬奇", "梵高", "毕加索", "莫奈", "A"),
                 ("交响乐属于", "音乐艺术", "绘画艺术", "雕塑艺术", "建筑艺术", "A"),
                 ("中国画的特点", "写意", "写实", "抽象", "立体", "A")],
    },
}
GSM8K_TRAIN = [(f"Tom has {a} apples and buys {b} more. How many apples does he have?",
                f"Tom starts with {a}.\nHe buys {b} more, so {a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}")
               for a, b in ((3, 4), (10, 5), (7, 8), (12, 9), (2, 2), (6, 1), (20, 30), (9, 9))]
GSM8K_TEST = [("A box holds 6 eggs. How many eggs are in 4 boxes?", "6 * 4 = <<6*4=24>>24.\n#### 24"),
              ("Mia reads 1,200 pages in 3 days. How many pages per day?", "1,200 / 3 = 400.\n#### 400"),
              ("Sam had $5 and spent $2. How much is left?", "5 - 2 = <<5-2=3>>3.\n#### 3")]
BBH = {
    "boolean_expressions": [{"input": "not ( True ) and ( True ) is", "target": "False"},
                            {"input": "True and not not ( not False ) is", "target": "True"},
                            {"input": "not True or ( False and True ) is", "target": "False"}],
    "date_understanding": [
        {"input": "Today is 3/5, and it is Jane's second time in the year 1973 to see a meteor shower. What is the "
                  "date a month ago in MM/DD/YYYY?\nOptions:\n(A) 02/05/1973\n(B) 03/05/1973\n(C) 01/02/1973",
         "target": "(A)"},
        {"input": "Yesterday was April 30, 2021. What is the date today in MM/DD/YYYY?\nOptions:\n(A) 05/01/2021\n"
                  "(B) 04/29/2021\n(C) 05/02/2021", "target": "(A)"}],
}
AGIEVAL = {  # AGIEval's data/v1 rows
    "aqua-rat": [
        {"passage": None, "question": "A train covers 60 km in 1.5 hours. What is its speed?",
         "options": ["(A)30 km/h", "(B)40 km/h", "(C)45 km/h", "(D)50 km/h", "(E)60 km/h"], "label": "B",
         "answer": None, "other": None},
        {"passage": None, "question": "What is 15% of 200?",
         "options": ["(A)15", "(B)20", "(C)30", "(D)35", "(E)40"], "label": "C", "answer": None, "other": None}],
    "lsat-lr": [
        {"passage": "Every swan the researcher saw was white. ",
         "question": "Which one of the following most weakens the argument?",
         "options": ["(A)A black swan was seen.", "(B)Swans can fly.", "(C)The researcher likes birds.",
                     "(D)Some birds are white.", "(E)Swans eat plants."], "label": "A", "answer": None}],
    "gaokao-physics": [
        {"passage": None, "question": "下列说法正确的是（ ）",
         "options": ["(A)光速最快", "(B)声音可以在真空传播", "(C)能量守恒", "(D)重力向上"], "label": ["A", "C"],
         "answer": None},
        {"passage": None, "question": "物体做自由落体运动时（ ）",
         "options": ["(A)速度不变", "(B)加速度不变", "(C)位移不变", "(D)质量增加"], "label": ["B"], "answer": None}],
    "math": [
        {"passage": None, "question": "What is $2 + 3$?", "options": None, "label": None, "answer": "5"},
        {"passage": None, "question": "Simplify $\\frac{6}{8}$.", "options": None, "label": None,
         "answer": "\\frac{3}{4}"}],
}
# The hails/agieval-* rows lm-eval reads for the same questions, written out by hand: "query" is AGIEval's
# zero-shot prompt (dataset_loader.convert_zero_shot), "gold" the option indices.
AGIEVAL_HAILS = {
    "aqua-rat": [
        {"query": "Q: A train covers 60 km in 1.5 hours. What is its speed? Answer Choices: (A)30 km/h (B)40 km/h "
                  "(C)45 km/h (D)50 km/h (E)60 km/h\nA: Among A through E, the answer is",
         "choices": ["(A)30 km/h", "(B)40 km/h", "(C)45 km/h", "(D)50 km/h", "(E)60 km/h"], "gold": [1]},
        {"query": "Q: What is 15% of 200? Answer Choices: (A)15 (B)20 (C)30 (D)35 (E)40\n"
                  "A: Among A through E, the answer is",
         "choices": ["(A)15", "(B)20", "(C)30", "(D)35", "(E)40"], "gold": [2]}],
    "lsat-lr": [
        {"query": "Every swan the researcher saw was white. Q: Which one of the following most weakens the argument? "
                  "Answer Choices: (A)A black swan was seen. (B)Swans can fly. (C)The researcher likes birds. "
                  "(D)Some birds are white. (E)Swans eat plants.\nA: Among A through E, the answer is",
         "choices": ["(A)A black swan was seen.", "(B)Swans can fly.", "(C)The researcher likes birds.",
                     "(D)Some birds are white.", "(E)Swans eat plants."], "gold": [0]}],
    "gaokao-physics": [
        {"query": "问题：下列说法正确的是（ ） 选项：(A)光速最快 (B)声音可以在真空传播 (C)能量守恒 (D)重力向上\n"
                  "答案：从A到D, 我们应选择",
         "choices": ["(A)光速最快", "(B)声音可以在真空传播", "(C)能量守恒", "(D)重力向上"], "gold": [0, 2]},
        {"query": "问题：物体做自由落体运动时（ ） 选项：(A)速度不变 (B)加速度不变 (C)位移不变 (D)质量增加\n"
                  "答案：从A到D, 我们应选择",
         "choices": ["(A)速度不变", "(B)加速度不变", "(C)位移不变", "(D)质量增加"], "gold": [1]}],
    "math": [{"query": "Q: What is $2 + 3$?\nA: The answer is", "answer": "5"},
             {"query": "Q: Simplify $\\frac{6}{8}$.\nA: The answer is", "answer": "\\frac{3}{4}"}],
}
HUMANEVAL_IDS = ("HumanEval/7", "HumanEval/23", "HumanEval/45")
GEN_TOKENS = {"gsm8k": 32, "bbh": 24, "human_eval": 48}  # lm-eval max_gen_toks in the parity runs (agieval: stock 32)


def build_model_assets(root, layouts=((1, 1), (2, 2))):
    """A byte-level BPE tokenizer trained here (1003 ids, Aquila2's special tokens), the tiny random HF model with
    2048 positions saved with it, and Megatron conversions: {"hf": dir, (tp, pp): dir}."""
    from aquila_npu.checkpoint.convert import to_megatron
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.data.bpe import train_tokenizer

    rng = random.Random(0)
    corpus = []
    for _ in range(3000):
        corpus.append(" ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
                               for _ in range(rng.randint(5, 15))) + ". Question: Answer: A B C D The answer is 12")
        corpus.append("".join(rng.choice(CHINESE) for _ in range(rng.randint(5, 20))))
        corpus.append("def f(x):\n    return x + 1  # (A) 3.5\n")
    hf = os.path.join(root, "hf")
    train_tokenizer(hf, corpus, SPEC.vocab_size, exact_size=True)
    tiny_llama(SPEC).save_pretrained(hf)
    out = {"hf": hf}
    for tp, pp in layouts:
        out[tp, pp] = os.path.join(root, f"mg-tp{tp}-pp{pp}")
        to_megatron(HFReader(hf), out[tp, pp], tp, pp)
    return out


def humaneval_problems():
    from aquila_npu.evaluation.humaneval import packaged_data

    with gzip.open(packaged_data(), "rt") as f:
        rows = {r["task_id"]: r for r in map(json.loads, f)}
    return [rows[t] for t in HUMANEVAL_IDS]


def write_fixtures(root):
    """Every task's data in its real layout under ``root``; returns {task: --task-data-path}."""
    paths = {}
    paths["mmlu"] = write_mmlu(root, MMLU)  # no header
    for subject, splits in CEVAL.items():  # header (explanation text in every split: the datasets CSV reader lm-eval
        for split, rows in splits.items():  # uses infers one column type for all splits)
            write_csv(os.path.join(root, "ceval", split, f"{subject}_{split}.csv"),
                      ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                      [(i, *r, *(["解析"] if len(r) == 6 else [])) for i, r in enumerate(rows)])
    paths["ceval"] = os.path.join(root, "ceval", "val")
    for subject, splits in CMMLU.items():  # an unnamed index column first
        for split, rows in splits.items():
            write_csv(os.path.join(root, "cmmlu", split, f"{subject}.csv"),
                      ["", "Question", "A", "B", "C", "D", "Answer"], [(i, *r) for i, r in enumerate(rows)])
    paths["cmmlu"] = os.path.join(root, "cmmlu", "test")
    paths["gsm8k"] = write_gsm8k(root, GSM8K_TRAIN, GSM8K_TEST)
    for subtask, examples in BBH.items():
        os.makedirs(os.path.join(root, "bbh"), exist_ok=True)
        with open(os.path.join(root, "bbh", f"{subtask}.json"), "w") as f:
            json.dump({"canary": "BENCHMARK DATA", "examples": examples}, f)
    paths["bbh"] = os.path.join(root, "bbh")
    for subset, rows in AGIEVAL.items():
        write_jsonl(os.path.join(root, "agieval", f"{subset}.jsonl"), rows)
    paths["agieval"] = os.path.join(root, "agieval")
    write_jsonl(os.path.join(root, "humaneval", "HumanEval.jsonl"), humaneval_problems())
    paths["human_eval"] = os.path.join(root, "humaneval", "HumanEval.jsonl")
    return paths


def write_lm_eval_tasks(root, include):
    """lm-eval task YAMLs (in ``include``) over the fixtures in ``root``; returns {our task: [lm-eval task or group
    names]} and the lm-eval data written for it."""
    os.makedirs(include, exist_ok=True)
    lm = os.path.join(root, "lm_eval_data")
    names = {}
    # MMLU: lm-eval reads cais/mmlu's fields (question, subject, choices, answer index); 5-shot from dev
    names["mmlu"] = write_lm_eval_mmlu(include, lm, MMLU, num_fewshot=5)
    # C-Eval (0-shot) and CMMLU (2-shot): the same CSV files we read
    for ours, stock, splits_of, shots, data in (("ceval", "ceval/ceval-valid_{s}.yaml", ("val", "dev"), 0, CEVAL),
                                                ("cmmlu", "cmmlu/cmmlu_{s}.yaml", ("test", "dev"), 2, CMMLU)):
        tasks = []
        for subject in data:
            split_files = {sp: os.path.join(root, ours, sp, f"{subject}_{sp}.csv" if ours == "ceval" else
                                            f"{subject}.csv") for sp in splits_of}
            task = f"local_{ours}_{subject}"
            write_yaml(os.path.join(include, f"{task}.yaml"),
                       f"include: {LM_EVAL_TASKS}/{stock.format(s=subject)}\ntask: {task}\ndataset_path: csv\n"
                       f"dataset_name: null\ndataset_kwargs:\n  data_files:\n" +
                       "".join(f"    {sp}: {p}\n" for sp, p in split_files.items()) + f"num_fewshot: {shots}\n")
            tasks.append(task)
        write_group(os.path.join(include, f"local_{ours}.yaml"), f"local_{ours}", tasks, ["acc", "acc_norm"])
        names[ours] = [f"local_{ours}", *tasks]
    gen = GEN_TOKENS
    names["gsm8k"] = [write_lm_eval_gsm8k(include, os.path.join(root, "gsm8k"), gen["gsm8k"])]
    tasks = []
    for subtask in BBH:
        task = f"local_bbh_{subtask}"
        write_yaml(os.path.join(include, f"{task}.yaml"),
                   f"include: {LM_EVAL_TASKS}/bbh/fewshot/{subtask}.yaml\ntask: {task}\ndataset_path: json\n"
                   f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {root}/bbh/{subtask}.json\n"
                   f"  field: examples\ngeneration_kwargs:\n  until:\n    - \"</s>\"\n    - \"Q\"\n    - \"\\n\\n\"\n"
                   f"  do_sample: false\n  temperature: 0.0\n  max_gen_toks: {gen['bbh']}\n")
        tasks.append(task)
    write_group(os.path.join(include, "local_bbh.yaml"), "local_bbh", tasks, ["exact_match"])
    names["bbh"] = ["local_bbh", *tasks]
    tasks = []
    for subset, rows in AGIEVAL_HAILS.items():
        path = os.path.join(lm, "agieval", f"{subset}.jsonl")
        write_jsonl(path, rows)
        task = f"local_agieval_{subset.replace('-', '_')}"
        write_yaml(os.path.join(include, f"{task}.yaml"),
                   f"include: {LM_EVAL_TASKS}/agieval/{subset}.yaml\ntask: {task}\ndataset_path: json\n"
                   f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {path}\n")
        tasks.append(task)
    write_group(os.path.join(include, "local_agieval.yaml"), "local_agieval", tasks, ["acc"])
    names["agieval"] = ["local_agieval", *tasks]
    # HumanEval: lm-eval's humaneval.yaml imports `evaluate.load("code_eval")`, which needs the Hub; this task has
    # its prompt, target, generation settings and filter (tests check them against the stock YAML) and no metric
    # that executes code (our sandbox's verdicts are checked separately).
    write_yaml(os.path.join(include, "local_humaneval_utils.py"),
               "def build_predictions(resps, docs):\n    return [[doc['prompt'] + r for r in resp] "
               "for resp, doc in zip(resps, docs)]\n\n\ndef no_metric(references, predictions):\n    return 0.0\n")
    write_yaml(os.path.join(include, "local_humaneval.yaml"),
               f"task: local_humaneval\ndataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
               f"    test: {root}/humaneval/HumanEval.jsonl\noutput_type: generate_until\ntest_split: test\n"
               "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{test}}\\ncheck({{entry_point}})\"\nmetric_list:\n"
               "  - metric: !function local_humaneval_utils.no_metric\n    aggregation: mean\n"
               "    higher_is_better: true\n"
               "generation_kwargs:\n  until:\n    - \"\\nclass\"\n    - \"\\ndef\"\n    - \"\\n#\"\n    - \"\\nif\"\n"
               f"    - \"\\nprint\"\n  max_gen_toks: {gen['human_eval']}\n  do_sample: false\n"
               "repeats: 1\nnum_fewshot: 0\n"
               "filter_list:\n  - name: \"create_test\"\n    filter:\n      - function: \"custom\"\n"
               "        filter_fn: !function local_humaneval_utils.build_predictions\n")
    names["human_eval"] = ["local_humaneval"]
    return names
