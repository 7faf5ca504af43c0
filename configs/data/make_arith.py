"""Writes the synthetic arithmetic task that ships with Tandem.

    python3 configs/data/make_arith.py            # the JSONL files (stdlib only)
    python3 configs/data/make_arith.py --parquet  # also the .parquet files (needs pyarrow)

Problems are two-digit additions ("12+7"), subtractions with a non-negative
result ("45-18") and multiplications by one digit ("23*4"); the answer is the
exact integer as text. The held-out eval file shares no problem with the
training file. The same script gives the same bytes.
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240501
N_TRAIN = 6000
N_EVAL = 500


def universe():
    problems = []
    for a in range(100):
        for b in range(100):
            problems.append((f"{a}+{b}", a + b, "add"))
            if b <= a:
                problems.append((f"{a}-{b}", a - b, "sub"))
        for b in range(10):
            problems.append((f"{a}*{b}", a * b, "mul"))
    return problems


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for question, answer, _ in rows:
            f.write(json.dumps({"prompt": question, "answer": str(answer)}) + "\n")


def write_parquet(path, rows):
    # Other column names than the JSONL files (a column mapping is needed),
    # an integer answer column, and two row groups.
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "question": pa.array([q for q, _, _ in rows], pa.string()),
            "solution": pa.array([a for _, a, _ in rows], pa.int64()),
            "kind": pa.array([k for _, _, k in rows], pa.string()),
        }
    )
    pq.write_table(table, path, compression="snappy", row_group_size=6)


def write_chat_parquet(path, rows):
    # TRL's conversational format, as Hugging Face datasets stores it: the
    # prompt is a list of {"role", "content"} structs.
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    prompts = [
        [{"role": "system", "content": "Answer with the number."}, {"role": "user", "content": q}]
        for q, _, _ in rows
    ]
    table = pa.table(
        {
            "prompt": pa.array(prompts, pa.list_(message)),
            "answer": pa.array([str(a) for _, a, _ in rows], pa.string()),
        }
    )
    pq.write_table(table, path, compression="snappy")


def write_verl_parquet(path, rows):
    # verl's layout (its examples/data_preprocess scripts): a conversational
    # prompt and the reference answer inside the reward_model struct
    # (data.answer_column: reward_model.ground_truth).
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    reward_model = pa.struct([("ground_truth", pa.string()), ("style", pa.string())])
    extra_info = pa.struct([("index", pa.int64()), ("split", pa.string())])
    table = pa.table(
        {
            "data_source": pa.array(["arith"] * len(rows), pa.string()),
            "prompt": pa.array([[{"role": "user", "content": q}] for q, _, _ in rows], pa.list_(message)),
            "ability": pa.array(["math"] * len(rows), pa.string()),
            "reward_model": pa.array(
                [{"ground_truth": str(a), "style": "rule"} for _, a, _ in rows], reward_model
            ),
            "extra_info": pa.array([{"index": i, "split": "test"} for i in range(len(rows))], extra_info),
        }
    )
    pq.write_table(table, path, compression="snappy")


def main():
    problems = universe()
    random.Random(SEED).shuffle(problems)
    eval_rows = problems[:N_EVAL]
    train_rows = problems[N_EVAL : N_EVAL + N_TRAIN]
    write_jsonl(HERE / "arith_train.jsonl", train_rows)
    write_jsonl(HERE / "arith_eval.jsonl", eval_rows)
    if "--parquet" in sys.argv[1:]:
        write_parquet(HERE / "arith_tiny.parquet", eval_rows[:12])
        write_chat_parquet(HERE / "arith_chat_tiny.parquet", eval_rows[:4])
        write_verl_parquet(HERE / "arith_verl_tiny.parquet", eval_rows[:4])


if __name__ == "__main__":
    main()
